"""What train_chaos.py's run left behind, checked against its fault-free reference: every committed
checkpoint still there and readable, each resume from the last committed step, losses and final weights
bitwise equal."""

from __future__ import annotations

import os
from typing import Any

from chaos_common import summary


def checkpoint_report(run_dir: str, seen: dict[str, float]) -> list[dict[str, Any]]:
    """Every checkpoint Ray Train ever registered: does it still exist, and does it read back (the state
    file, one optimizer shard per rank, and DeepSpeed's own consolidation of the fp32 weights)?"""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from raylm.training import checkpoint as ckpt

    rows = []
    for name, t_seen in sorted(seen.items()):
        folder = os.path.join(run_dir, name)
        row: dict[str, Any] = {"name": name, "t_seen": t_seen, "exists": os.path.isdir(folder), "error": None}
        if row["exists"]:
            try:
                state = ckpt.read_state(folder)
                assert state["step"] == int(name.split("_")[1]), f"{name} holds step {state['step']}"
                assert get_fp32_state_dict_from_zero_checkpoint(folder, tag=ckpt.DS_TAG)
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"[-500:]
        rows.append(row)
    return rows


def weights_equal(ref_export: str, export: str) -> bool | None:
    from safetensors.torch import load_file

    a_path, b_path = (os.path.join(d, "model.safetensors") for d in (ref_export, export))
    if not (os.path.exists(a_path) and os.path.exists(b_path)):
        return None
    a, b = load_file(a_path), load_file(b_path)
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def resumes(hist: list[dict[str, Any]], seen: dict[str, float]) -> list[dict[str, Any]]:
    """For each restart (a new attempt): the step it resumed from, and the last checkpoint committed
    before its first step ended (what it should have resumed from)."""
    out = []
    for i, row in enumerate(hist):
        if i and row["attempt"] != hist[i - 1]["attempt"]:
            before = [int(n.split("_")[1]) for n, t in seen.items() if t < row["t_wall"]]
            out.append(
                {
                    "attempt": row["attempt"],
                    "from_step": row["step"] - 1,
                    "last_committed": max(before, default=0),
                }
            )
    return out


def fault_outcomes(faults: list[dict[str, Any]], hist: list[dict[str, Any]], finished: bool, commits) -> None:
    """recovered / recovery_s per fault: for a node fault, the first step of a new attempt after it;
    for a GCS restart, the GCS answering again and the run finishing. commits: (first seen, step,
    attempt) of every committed checkpoint, oldest first (the history keeps only the final attempts'
    rows, so the steps a killed attempt did after its last checkpoint are not in it)."""
    for i, f in enumerate(faults):
        if f["kind"] == "gcs_restart":
            # Checkpoints committed between the GCS's return and the next fault: the run went on; in
            # the attempt it was in before the kill (the workers untouched)?
            until = faults[i + 1]["t_fault"] if i + 1 < len(faults) else float("inf")
            old = [a for t, _, a in commits if t < f["t_fault"]]
            new = [a for t, _, a in commits if f["t_back"] < t < until]
            f["recovered"] = finished
            f["recovery_s"] = f["t_back"] - f["t_fault"]
            f["commits_after"] = len(new)
            f["training_restarted"] = any(a != (old[-1] if old else 0) for a in new)
            continue
        before = [r for r in hist if r["t_wall"] < f["t_fault"]]
        attempt = before[-1]["attempt"] if before else 0
        nxt = [r for r in hist if r["attempt"] > attempt and r["t_wall"] > f["t_fault"]]
        f["recovered"] = bool(nxt)
        f["recovery_s"] = nxt[0]["t_wall"] - f["t_fault"] if nxt else None
        f["resumed_at_step"] = nxt[0]["step"] if nxt else None


def commit_attempts(run_dir: str, seen: dict[str, float]) -> list[tuple[float, int, int]]:
    """(first seen, step, attempt that wrote it) per committed checkpoint still readable."""
    from raylm.training import checkpoint as ckpt

    out = []
    for name, t in sorted(seen.items(), key=lambda kv: kv[1]):
        try:
            state = ckpt.read_state(os.path.join(run_dir, name))
        except Exception:
            continue
        out.append((t, int(state["step"]), int(state.get("attempt", 0))))
    return out


def analyse(ref_cfg, cfg, run_dir, reference, chaos, director, plan, args) -> dict[str, Any]:
    from raylm.core.artifacts import TrainDir
    from tests.cluster.spot_scenario import expected_digests
    from tests.training.train_helpers import history

    ref_hist = history(ref_cfg) if reference["error"] is None else []
    hist = history(cfg) if chaos["error"] is None else []
    checkpoints = checkpoint_report(run_dir, director.seen)
    fault_outcomes(director.faults, hist, chaos["error"] is None, commit_attempts(run_dir, director.seen))
    lost = [c["name"] for c in checkpoints if not c["exists"]]
    corrupt = [c["name"] for c in checkpoints if c["exists"] and c["error"]]
    return {
        "plan": plan,
        "seed": args.seed,
        "max_steps": args.max_steps,
        "every_steps": args.every_steps,
        "reference": reference,
        "chaos": chaos,
        "director_error": director.error,
        "faults": director.faults,
        "history": hist,
        "expected_digests": expected_digests(cfg),
        "checkpoints": checkpoints,
        "lost_checkpoints": lost,
        "corrupt_checkpoints": corrupt,
        "resumes": resumes(hist, director.seen),
        "losses_equal": bool(hist) and [r["loss"] for r in hist] == [r["loss"] for r in ref_hist],
        "weights_equal": weights_equal(
            TrainDir(ref_cfg.train.output).export.root, TrainDir(cfg.train.output).export.root
        ),
        "summary": summary(director.faults, len(lost) + len(corrupt)),
    }

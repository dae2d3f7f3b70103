"""torchrun entry point: `torchrun --nproc-per-node N -m training.torchrun CONFIG.json` (also reachable
as `-m training.loop`). CONFIG.json is the loop config written by run.py's `loop_config` (with
backend="torchrun" and a storage_dir) or by benchmarks/train.py.

Checkpoints are step_* folders under storage_dir; a rerun of the same command continues from the newest
complete one. A SIGTERM stops the run at the next step boundary with a checkpoint, and the process exits
with 143 (128 + SIGTERM) so a supervisor knows to start it again.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

from raylm.core import metrics
from raylm.training import checkpoint as ckpt
from raylm.training.config import TrainConfig
from raylm.training.loop import Preempted, Report, train
from raylm.training.runtime import Torchrun

EXIT_PREEMPTED = 143


def keep_last_report(rank: int, keep_last: int) -> Report:
    """torchrun's report: the checkpoint is already in place under storage_dir (the runtime chose the
    folder); rank 0 logs it and deletes all but the newest `keep_last`. Metrics go to the log only."""

    def report(metrics_: dict[str, Any], checkpoint_dir: str | None) -> None:
        if checkpoint_dir is None or rank != 0:
            return
        ckpt.keep_last(os.path.dirname(checkpoint_dir), keep_last)
        metrics.log_rank0("checkpoint %s complete", checkpoint_dir)

    return report


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s raylm %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    argv = argv if argv is not None else sys.argv[1:]
    with open(argv[0]) as f:
        config = json.load(f)
    config["backend"] = "torchrun"
    if not config.get("storage_dir"):
        raise SystemExit(f"raylm: {argv[0]} has no storage_dir (where torchrun's checkpoints go)")
    rt = Torchrun(config["storage_dir"])
    keep_last = TrainConfig.model_validate(config["train"]).checkpoint.keep_last
    try:
        train(config, rt, keep_last_report(rt.rank, keep_last))
    except Preempted as exc:
        print(f"raylm: {exc}", file=sys.stderr)
        return EXIT_PREEMPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())

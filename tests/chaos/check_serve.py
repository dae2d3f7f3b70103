"""What serve_chaos.py's clients saw: which requests failed, how, and whether each failure is explained by
a fault (in flight on a killed replica) or is one too many."""

from __future__ import annotations

import json
from typing import Any

from chaos_common import summary


def openai_error(body: str) -> bool:
    """An OpenAI-style error body: {"error": {"message": str, "type": str, ...}}."""
    try:
        err = json.loads(body)["error"]
        return isinstance(err["message"], str) and isinstance(err["type"], str)
    except (ValueError, KeyError, TypeError):
        return False


def classify(row: dict[str, Any]) -> str:
    if row["status"] == 200:
        return "ok"
    if row["status"] is None:
        return "hang" if row["body"].startswith("timeout") else "connection"
    if row["status"] >= 500 and openai_error(row["body"]):
        return "clean_5xx"
    return f"other_{row['status']}"


def analyse(log: list[dict[str, Any]], faults: list[dict[str, Any]], plan: list[str], args) -> dict[str, Any]:
    kills = [f["t_fault"] for f in faults if f["kind"] == "replica_kill"]
    for row in log:
        row["outcome"] = classify(row)
        row["in_flight_at_kill"] = any(row["t_start"] <= t <= row["t_end"] for t in kills)
    failed = [r for r in log if r["outcome"] != "ok"]
    unexplained = [r for r in failed if not r["in_flight_at_kill"]]
    for f in faults:
        end = f["t_fault"] + (f["recovery_s"] or 0)
        window = [r for r in log if r["t_end"] >= f["t_fault"] and r["t_start"] <= end]
        f["requests_during"] = len(window)
        f["failed_during"] = sum(r["outcome"] != "ok" for r in window)
        f["in_flight"] = sum(r["t_start"] <= f["t_fault"] <= r["t_end"] for r in log)
    outcomes: dict[str, int] = {}
    for r in log:
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
    return {
        "plan": plan,
        "seed": args.seed,
        "clients": args.clients,
        "faults": faults,
        "requests": len(log),
        "outcomes": outcomes,
        "failed": failed,
        "unexplained_failures": len(unexplained),
        "unclean_failures": sum(r["outcome"] not in ("ok", "clean_5xx") for r in log),
        "requests_after_last_fault": sum(
            r["t_start"] > max((f["t_fault"] + (f["recovery_s"] or 0) for f in faults), default=0)
            for r in log
        ),
        "summary": summary(faults, len(unexplained)),
    }

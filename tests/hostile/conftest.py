"""Shared by the hostile-input suite: the tally of malformed inputs per entry point and outcome, written to
.bench/hostile.json when the session ends (benchmarks/hostile.py turns it into BENCHMARKS.md's table).

Each module's generators are seeded, so a run tries the same inputs every time; a test calls
`tally(entry_point, outcome, n)` once its inputs have all been checked, so only checked inputs count.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_COUNTS: Counter[tuple[str, str]] = Counter()
_INPUTS: dict[str, set[str]] = {}


@pytest.fixture(scope="session")
def tally():
    """tally(entry, outcome, keys): count the distinct inputs (by key) that got `outcome` at `entry`."""

    def add(entry: str, outcome: str, keys, again: bool = False) -> None:
        """again=True: the inputs were tried before (a flood re-sends them); they count in their row
        but not as new inputs of the entry point."""
        keys = {str(k) for k in keys}
        seen = _INPUTS.setdefault(entry, set())
        _COUNTS[(entry, outcome)] += len(keys) if again else len(keys - seen)
        if not again:
            seen |= keys

    return add


@pytest.fixture(autouse=True)
def fresh_logging():
    """core.cli.main calls logging.basicConfig, and Ray sets up its loggers, with the sys.stderr of that
    moment: in-process, one test's capture stream, closed when that test ends. Drop the root handlers a
    test added, and point any handler left on a closed stream at the current stderr."""
    loggers = [
        logging.root,
        *(x for x in logging.root.manager.loggerDict.values() if isinstance(x, logging.Logger)),
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and getattr(handler.stream, "closed", False):
                handler.stream = sys.stderr  # setStream would flush the closed one first
    before = list(logging.root.handlers)
    yield
    for handler in set(logging.root.handlers) - set(before):
        logging.root.removeHandler(handler)


def pytest_sessionfinish(session, exitstatus):
    if not _COUNTS:
        return
    rows = [{"entry": e, "outcome": o, "inputs": n} for (e, o), n in sorted(_COUNTS.items())]
    per_entry = {e: len(keys) for e, keys in sorted(_INPUTS.items())}
    out = ROOT / ".bench" / "hostile.json"
    out.parent.mkdir(exist_ok=True)
    body = {"date": time.strftime("%Y-%m-%d"), "total": sum(per_entry.values()), "per_entry": per_entry}
    out.write_text(json.dumps({**body, "rows": rows, "exitstatus": int(exitstatus)}, indent=2) + "\n")

"""How many hostile inputs each entry point gets, and what it answers: runs the generator-driven suite in
tests/hostile/ (seeded, so every run tries the same inputs), whose session hook writes
.bench/hostile.json, then prints that tally as the Markdown table BENCHMARKS.md's "Robustness" section
holds, with the wall time of the run.

    .venv/bin/python benchmarks/hostile.py            # the whole folder (slow tests included)
    .venv/bin/python benchmarks/hostile.py -m "not slow"   # config, cluster and submit only
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / ".bench" / "hostile.json"


def table(result: dict, seconds: float) -> str:
    lines = ["| entry point | outcome | inputs |", "|---|---|---|"]
    lines += [f"| {r['entry']} | {r['outcome']} | {r['inputs']} |" for r in result["rows"]]
    lines += [f"| **{entry}** | all | **{n}** |" for entry, n in result["per_entry"].items()]
    lines.append(f"| **total** | | **{result['total']}** |")
    return "\n".join(lines) + f"\n\nwall time of `pytest tests/hostile`: {seconds:.0f} s"


def main(argv: list[str]) -> int:
    RESULT.unlink(missing_ok=True)
    started = time.monotonic()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/hostile", *argv]
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    seconds = time.monotonic() - started
    if not RESULT.exists():
        print("no tally written (did any test run?)", file=sys.stderr)
        return rc or 1
    result = json.loads(RESULT.read_text())
    result["wall_s"] = round(seconds, 1)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result, seconds))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

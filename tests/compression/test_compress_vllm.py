"""A W8A8 model from raylm compress loads and answers through vLLM's CPU build, scoring the held-out rows
as transformers does (compare.json). W4A16 is not run here: vLLM's CPU kernel for it (cpu_gemm_wna16)
is not implemented for float32, the dtype raylm's vLLM CPU replicas run (README: Compression)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from raylm.core import storage
from raylm.core.artifacts import CompressDir

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]


def test_w8a8_answers_through_vllm_with_the_same_perplexity(compressed):
    cfg, _ = compressed
    out = CompressDir(cfg.compress.output)
    folder = out.method("w8a8").root
    script = os.path.join(os.path.dirname(__file__), "vllm_score.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    proc = subprocess.run(
        [sys.executable, script, folder, cfg.compress.data_dir, str(cfg.compress.eval.max_rows)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    scored = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("SCORE "))[6:])
    rows = {r["method"]: r for r in storage.read_json(out.compare_json)["rows"]}
    assert scored["answer_tokens"] == 4
    assert abs(scored["perplexity"] / rows["w8a8"]["perplexity"] - 1) < 0.01

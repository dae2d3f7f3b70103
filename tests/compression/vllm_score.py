"""Score a model folder with vLLM's offline engine (run as a subprocess by test_compress_vllm.py: vLLM
starts engine processes of its own, which must not inherit the test session's Ray).

    python tests/compression/vllm_score.py MODEL DATA_DIR ROWS  -> prints `SCORE {json}`
"""

from __future__ import annotations

import json
import math
import sys


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from raylm.training.data import TokenShards

    model, data_dir, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ids = TokenShards.open(data_dir, "eval")[:rows]
    llm = LLM(
        model=model,
        dtype="float32",
        max_model_len=ids.shape[1] + 8,
        kv_cache_memory_bytes=64 << 20,
        enforce_eager=True,
        max_num_seqs=8,
    )
    scored = llm.generate(
        [TokensPrompt(prompt_token_ids=r.tolist()) for r in ids],
        SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0),
    )
    nll = [
        -lp[t].logprob for r, o in zip(ids, scored) for t, lp in zip(r[1:].tolist(), o.prompt_logprobs[1:])
    ]
    answer = llm.generate(
        [TokensPrompt(prompt_token_ids=ids[0][:8].tolist())],
        SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
    )
    score = {
        "perplexity": math.exp(sum(nll) / len(nll)),
        "answer_tokens": len(answer[0].outputs[0].token_ids),
    }
    # flushed: vLLM's engine shutdown may end the process before Python flushes stdout
    print("SCORE " + json.dumps(score), flush=True)


if __name__ == "__main__":
    main()

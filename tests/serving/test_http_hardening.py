"""The HTTP surface under malformed and oversized input: every bad request gets an OpenAI-style 4xx body
(never a 500, never an error event after a 200 in a stream), a huge request is refused fast, and it
does not hold up the requests next to it.

One Serve application (its own name and route prefix) on the session's Ray; Serve is shut down at the
end, as test_server.py does. Each malformed input is one entry of a table below; MALFORMED counts them.
"""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import pytest
import requests

from raylm.serving.config import ServeConfig
from raylm.serving.run import start

pytestmark = pytest.mark.slow
BASE = "tiny"
ADAPTER = "lora.v1"  # a dotted id, as a Tune trial folder has: no valid torch module name
LIMIT = ServeConfig().http.max_request_bytes
WORDS = "the river and the mountain of the city "


@pytest.fixture(scope="module")
def url(ray_cluster, tiny_model_dir, tiny_adapters, loopback_port):
    from ray import serve

    cfg = ServeConfig(
        model=tiny_model_dir,
        app_name="hardening",
        http={"port": loopback_port, "route_prefix": "/hard"},
        adapters={"paths": {ADAPTER: tiny_adapters["lora-a"]}},
        batching={"max_batch_size": 8, "batch_wait_timeout_s": 0.01},
    )
    yield start(cfg, BASE)
    serve.shutdown()


def post(url: str, route: str, body=None, raw: bytes | None = None, **kw) -> requests.Response:
    data = raw if raw is not None else json.dumps(body).encode()  # ensure_ascii: "\ud800" stays an escape
    return requests.post(
        url + route, data=data, headers={"Content-Type": "application/json"}, timeout=120, **kw
    )


def refused(resp: requests.Response, status: int = 400, param=None, code=None) -> dict:
    """The response is an OpenAI-style error (not a stream), naming param and code when given."""
    assert resp.status_code == status, resp.text[:500]
    assert resp.headers["content-type"].startswith("application/json")
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"] and "Traceback" not in resp.text
    assert set(err) == {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def completion(**kw) -> dict:
    return {"model": BASE, "prompt": "the road", "max_tokens": 2, **kw}


def chat(content="the road", **kw) -> dict:
    return {"model": BASE, "messages": [{"role": "user", "content": content}], "max_tokens": 2, **kw}


def streamed_ok(resp: requests.Response) -> list[str]:
    """A 200 stream that ends with [DONE] and carries no error event; returns its data payloads."""
    assert resp.status_code == 200, resp.text[:500]
    events = [line[5:].strip() for line in resp.text.splitlines() if line.startswith("data:")]
    assert events[-1] == "[DONE]" and not any('"error"' in e for e in events), events
    return events


# ---- bad values: a seed outside the 64 bits torch.Generator takes, numbers json/pydantic choke on ------
HUGE_DIGITS = b"9" * 5000  # past sys.get_int_max_str_digits(): json.loads raises ValueError on it
BAD_SEEDS = [2**64, -(2**63) - 1, -(2**64) - 1, 10**30, -(10**30), 1e30, 0.5, str(2**64)]
BAD_NUMBERS = [  # (raw body, param): NaN and Infinity are Python-json extensions, parsed as floats
    (b'{"model": "tiny", "prompt": "a", "seed": ' + HUGE_DIGITS + b"}", None),
    (b'{"model": "tiny", "prompt": "a", "temperature": NaN}', "temperature"),
    (b'{"model": "tiny", "prompt": "a", "top_p": Infinity}', "top_p"),
    (b'{"model": "tiny", "prompt": "a", "max_tokens": 1e400}', "max_tokens"),
    (b'{"model": "tiny", "prompt": "a", "n": 100000000000000000000000}', "n"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("seed", BAD_SEEDS)
def test_seed_out_of_range_is_400(url, seed, stream):
    refused(post(url, "/completions", completion(seed=seed, stream=stream)), param="seed")
    refused(post(url, "/chat/completions", chat(seed=seed, stream=stream)), param="seed")


@pytest.mark.parametrize(("raw", "param"), BAD_NUMBERS)
def test_unusable_numbers_are_400(url, raw, param):
    refused(post(url, "/completions", raw=raw), param=param)
    refused(post(url, "/completions", raw=raw[:-1] + b', "stream": true}'), param=param)


def test_seeds_at_the_64_bit_edges_work_and_wrap(url):
    kw = {"max_tokens": 6, "temperature": 1.0}
    for seed in (2**64 - 1, -(2**63)):  # n=3 from the top seed: seed + choice wraps past 2**64 - 1
        assert post(url, "/completions", completion(seed=seed, n=3, **kw)).status_code == 200
        streamed_ok(post(url, "/chat/completions", chat(seed=seed, n=2, stream=True, **kw)))
    # a negative seed is its two's complement, as torch.Generator.manual_seed reads it
    texts = [
        post(url, "/completions", completion(seed=s, **kw)).json()["choices"][0]["text"]
        for s in (-5, 2**64 - 5)
    ]
    assert texts[0] == texts[1]


def test_ignore_eos_takes_a_boolean_and_generates_to_max_tokens(url):
    refused(post(url, "/completions", completion(ignore_eos="yes")), param="ignore_eos")
    body = post(url, "/completions", completion(ignore_eos=True, max_tokens=9)).json()
    assert body["usage"]["completion_tokens"] == 9 and body["choices"][0]["finish_reason"] == "length"


# ---- lone surrogates: JSON escapes in any string field, and CESU-8 bytes in the raw body ---------------
LONE = "\ud800"
SURROGATE_BODIES = [  # (route, body, param)
    ("/completions", completion(prompt="a" + LONE + "b"), "prompt"),
    ("/completions", completion(prompt="\udfff"), "prompt"),
    ("/completions", completion(prompt=["fine", "bad" + LONE]), "prompt"),
    ("/completions", completion(prompt="x" * 10_000 + LONE), "prompt"),
    ("/completions", completion(stop=LONE), "stop"),
    ("/completions", completion(stop=["ok", "a\udc80"]), "stop"),
    ("/completions", completion(model=BASE + LONE), "model"),
    ("/completions", completion(user="u" + LONE), "user"),
    ("/completions", completion(metadata={"note": [LONE]}), "metadata"),
    ("/completions", {**completion(), "bad" + LONE: 1}, None),
    ("/chat/completions", chat("hi " + LONE), "messages"),
    ("/chat/completions", chat([{"type": "text", "text": "a"}, {"type": "text", "text": LONE}]), "messages"),
    ("/chat/completions", chat("hi", stop=[LONE]), "stop"),
    ("/chat/completions", chat("hi", model=LONE), "model"),
    ("/chat/completions", chat("hi", user=LONE), "user"),
    ("/chat/completions", {**chat(), "messages": [{"role": "user", "content": "a", LONE: "x"}]}, "messages"),
]
CESU = b"\xed\xa0\x80"  # U+D800 as UTF-8-style bytes: json.loads(bytes) decodes them with surrogatepass
SURROGATE_RAW = [  # (route, raw body, param)
    ("/completions", b'{"model": "tiny", "prompt": "a' + CESU + b'"}', "prompt"),
    ("/completions", b'{"model": "tiny", "prompt": ["' + CESU + b'\xed\xb0\x80"]}', "prompt"),
    ("/completions", b'{"model": "tiny", "prompt": "a", "stop": "' + CESU + b'"}', "stop"),
    (
        "/chat/completions",
        b'{"model": "tiny", "messages": [{"role": "user", "content": "' + CESU + b'"}]}',
        "messages",
    ),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("route", "body", "param"), SURROGATE_BODIES)
def test_lone_surrogate_escapes_are_400(url, route, body, param, stream):
    err = refused(post(url, route, {**body, "stream": stream}))
    assert err["param"] == param and "surrogate" in err["message"]


@pytest.mark.parametrize(("route", "raw", "param"), SURROGATE_RAW)
def test_surrogate_bytes_are_400(url, route, raw, param):
    assert "surrogate" in refused(post(url, route, raw=raw), param=param)["message"]
    refused(post(url, route, raw=raw[:-1] + b', "stream": true}'), param=param)


def test_paired_escapes_and_invalid_utf8(url):
    # a surrogate pair escape is one real character (an emoji): still served, streamed or not
    assert post(url, "/completions", completion(prompt="smile \ud83d\ude00")).status_code == 200
    streamed_ok(post(url, "/chat/completions", chat("smile \U0001f600", stream=True)))
    refused(post(url, "/completions", raw=b'{"model": "tiny", "prompt": "a\xff"}'), param=None)


# ---- deep nesting: json.loads raises RecursionError past its recursion limit -------------------------
DEPTH = 100_000


def deep(kind: str, depth: int = DEPTH) -> bytes:
    return b'{"a": ' * depth + b"1" + b"}" * depth if kind == "object" else b"[" * depth + b"]" * depth


NESTED = [  # (route, raw body)
    ("/completions", deep("object")),
    ("/completions", deep("array")),
    ("/completions", b'{"model": "tiny", "prompt": ' + deep("array") + b"}"),
    ("/completions", b'{"model": "tiny", "prompt": "a", "extra": ' + deep("object") + b"}"),
    ("/completions", b'{"model": "tiny", "prompt": "a", "stop": ' + deep("array", 5000) + b"}"),
    ("/chat/completions", b'{"model": "tiny", "messages": ' + deep("array") + b"}"),
    (
        "/chat/completions",
        b'{"model": "tiny", "messages": [{"role": "user", "content": ' + deep("object") + b"}]}",
    ),
]


def streamed(raw: bytes) -> bytes | None:
    """The same body with "stream": true added, for bodies that are an object of request fields."""
    return raw[:-1] + b', "stream": true}' if raw.startswith(b'{"model"') else None


@pytest.mark.parametrize(("route", "raw"), NESTED)
def test_deep_nesting_is_400(url, route, raw):
    for body in filter(None, (raw, streamed(raw))):
        assert "nested too deeply" in refused(post(url, route, raw=body), param=None)["message"]


def test_moderate_nesting_in_an_ignored_field_still_works(url):
    raw = b'{"model": "tiny", "prompt": "a", "max_tokens": 2, "extra": ' + deep("object", 200) + b"}"
    assert post(url, "/completions", raw=raw).status_code == 200


# ---- size: the body is bounded at the HTTP layer, the prompt before it is tokenized ------------------
def raw_http(url: str, head: str, body_parts, wait_s: float = 20) -> bytes:
    """Send a request by hand (head, then body parts; the body is never finished) and return the answer
    once its error code arrived: the server must answer without having read the whole body."""
    where = urlparse(url)
    answer = b""
    with socket.create_connection((where.hostname, where.port), timeout=wait_s) as sock:
        sock.sendall(head.encode())
        try:
            for part in body_parts:
                sock.sendall(part)
        except OSError:
            pass  # the server answered and stopped reading: what we read below says what it answered
        while b"request_too_large" not in answer and (data := sock.recv(65536)):
            answer += data
    return answer


def head(url: str, route: str, **headers: str) -> str:
    where = urlparse(url)
    lines = [f"POST {where.path}{route} HTTP/1.1", f"Host: {where.netloc}", "Content-Type: application/json"]
    return "\r\n".join(lines + [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]) + "\r\n\r\n"


def test_oversized_body_is_413(url):
    big = json.dumps(completion(prompt="a", user="u" * LIMIT)).encode()
    for route in ("/completions", "/chat/completions"):
        refused(post(url, route, raw=big), status=413, code="request_too_large")
    # declared far too large, and not sent at all: refused from Content-Length alone
    answer = raw_http(url, head(url, "/completions", Content_Length=str(100 * LIMIT)), [b'{"model"'])
    assert answer.startswith(b"HTTP/1.1 413") and b"request_too_large" in answer
    # chunked, no Content-Length: refused once the running count passes the limit, before the end
    chunk = b"%x\r\n" % 65536 + b" " * 65536 + b"\r\n"
    parts = [b'6\r\n{"a":1\r\n'] + [chunk] * (LIMIT // 65536 + 8)
    answer = raw_http(url, head(url, "/chat/completions", Transfer_Encoding="chunked"), parts)
    assert answer.startswith(b"HTTP/1.1 413") and b"request_too_large" in answer


def test_large_allowed_bodies_still_work(url):
    padded = completion(user="u" * (LIMIT - 4096))  # just under the limit, in an ignored field
    assert post(url, "/completions", padded).status_code == 200
    chunked = (part for part in (b'{"model": "tiny", ', b'"prompt": "the road", "max_tokens": 2}'))
    assert post(url, "/completions", raw=chunked).json()["usage"]["completion_tokens"] >= 1
    # 100 prompts, more text than is tokenized inline: tokenized off the event loop, all answered
    many = post(url, "/completions", completion(prompt=[WORDS * 5] * 100, max_tokens=1))
    assert many.status_code == 200 and len(many.json()["choices"]) == 100


PAST_CONTEXT = [  # (route, body, param)
    ("/completions", completion(prompt=WORDS * 80_000), "prompt"),  # ~3 MB: 1000x what fits
    ("/completions", completion(prompt=["a", WORDS * 80_000]), "prompt"),
    ("/completions", completion(prompt=[WORDS * 70] * 40), "prompt"),  # each tokenized (off the loop)
    ("/chat/completions", chat(WORDS * 80_000), "messages"),
    ("/chat/completions", chat([{"type": "text", "text": WORDS * 80_000}]), "messages"),
]


@pytest.mark.parametrize(("route", "body", "param"), PAST_CONTEXT)
@pytest.mark.parametrize("stream", [False, True])
def test_prompt_past_the_context_is_refused_fast(url, route, body, param, stream):
    started = time.monotonic()
    err = refused(post(url, route, {**body, "stream": stream}), code="context_length_exceeded")
    assert err["param"] in (param, "prompt") and time.monotonic() - started < 3


def test_normal_requests_flow_next_to_huge_ones(url):
    def huge(_: int) -> int:
        return post(url, "/completions", completion(prompt=WORDS * 90_000)).status_code

    def normal(_: int) -> float:
        started = time.monotonic()
        assert post(url, "/completions", completion(max_tokens=4)).status_code == 200
        return time.monotonic() - started

    with ThreadPoolExecutor(6) as pool:
        big = pool.map(huge, range(3))
        time.sleep(0.2)  # the huge bodies are on their way
        took = list(pool.map(normal, range(3)))
        assert list(big) == [400] * 3
    assert max(took) < 3, took


# ---- streams: adapters, and what must be refused before the 200 -------------------------------------
STREAM_REFUSALS = [  # (route, body, status, param): each also appears unstreamed above or in test_server
    ("/completions", completion(model="no-such"), 404, "model"),
    ("/completions", completion(max_tokens=10_000), 400, "max_tokens"),
    ("/completions", completion(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("/completions", completion(prompt=""), 400, "prompt"),
    ("/chat/completions", chat(model="lora.v2"), 404, "model"),
    ("/chat/completions", {**chat(), "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
]


@pytest.mark.parametrize(("route", "body", "status", "param"), STREAM_REFUSALS)
def test_stream_refusals_come_before_the_stream(url, route, body, status, param):
    resp = post(url, route, {**body, "stream": True})
    assert resp.status_code == status and resp.json()["error"]["param"] == param


def test_dotted_adapter_id_streams(url):
    streamed_ok(post(url, "/completions", completion(model=ADAPTER, stream=True)))
    streamed_ok(post(url, "/chat/completions", chat(model=ADAPTER, stream=True, stop=["\n"])))


@pytest.mark.parametrize("stream", [False, True])
def test_too_many_prompts_in_one_request_is_400(url, stream):
    """A small body can hold a huge number of tiny prompts: the count is bounded like the size."""
    from raylm.serving.api import MAX_PROMPTS

    refused(
        post(url, "/completions", completion(prompt=["a"] * (MAX_PROMPTS + 1), stream=stream)), param="prompt"
    )


MALFORMED = {  # per class, for the robustness table (each streamed variant counted as its own input)
    "bad values (seed, numbers, prompt count)": 2 * 2 * len(BAD_SEEDS) + 2 * len(BAD_NUMBERS) + 2,
    "lone surrogates": 2 * len(SURROGATE_BODIES) + 2 * len(SURROGATE_RAW) + 1,  # + invalid UTF-8
    "deep nesting": sum(1 + (streamed(raw) is not None) for _, raw in NESTED),
    "oversized body (413)": 4,  # 2 routes with Content-Length, declared-only, chunked
    "prompt past the context": 2 * len(PAST_CONTEXT) + 1,  # + the concurrent huge prompt
    "refused before a stream": len(STREAM_REFUSALS),
}


def test_min_tokens_is_a_lower_bound(tiny_model_dir):
    """engine.min_tokens refuses prompts without tokenizing them: it must never exceed the real count."""
    from transformers import AutoTokenizer

    from raylm.serving.engine import _max_token_chars

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    longest = _max_token_chars(tok)
    texts = [WORDS * 50, "<|endoftext|>" * 300, " " * 5000, "mountain" * 700, "\U0001f600é" * 900, "x"]
    for text in texts:
        assert len(text) // longest <= len(tok(text, add_special_tokens=False)["input_ids"]), text[:40]

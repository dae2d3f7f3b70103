"""Hostile HTTP requests against one Serve application (the session's Ray, its own name and prefix):
wrong types and ranges for every OpenAI request field on both routes (streamed and not), invalid JSON
(seeded truncations of a valid body and hand-made breakage), NUL bytes, lone surrogates, oversized bodies
and prompts, unknown and path-like model names, wrong methods and routes, clients that disconnect
mid-stream or mid-body, and a flood of concurrent bad requests. Each must get a 4xx with an OpenAI error
body ({"error": {"message", "type", ...}}), never a 5xx or a traceback, and the server must answer a valid
request after every batch.
"""

from __future__ import annotations

import json
import random
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import pytest
import requests

from raylm.serving.api import MAX_PROMPTS
from raylm.serving.config import ServeConfig
from raylm.serving.run import start

pytestmark = pytest.mark.slow
BASE = "tiny"
ENTRY = "HTTP API"
LIMIT = 64 * 1024  # serve.http.max_request_bytes for this app: small, so oversized bodies are cheap
ROUTES = ("/completions", "/chat/completions")


@pytest.fixture(scope="module")
def url(ray_cluster, tiny_model_dir):
    from ray import serve

    cfg = ServeConfig(
        model=tiny_model_dir,
        app_name="hostile",
        http={"port": free_port(), "route_prefix": "/hostile", "max_request_bytes": LIMIT},
        batching={"max_batch_size": 8, "batch_wait_timeout_s": 0.01},
    )
    yield start(cfg, BASE)
    serve.delete("hostile")
    serve.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def good(route: str, **kw) -> dict:
    if route == "/completions":
        return {"model": BASE, "prompt": "the road", "max_tokens": 2, **kw}
    return {"model": BASE, "messages": [{"role": "user", "content": "the road"}], "max_tokens": 2, **kw}


def post(
    url: str, route: str, body=None, raw: bytes | None = None, session=requests, **kw
) -> requests.Response:
    data = raw if raw is not None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    return session.post(url + route, data=data, headers=headers, timeout=120, **kw)


def clean_error(resp: requests.Response, what) -> dict:
    """A 4xx with an OpenAI error body, no traceback."""
    assert 400 <= resp.status_code < 500, (what, resp.status_code, resp.text[:300])
    assert resp.headers.get("content-type", "").startswith("application/json"), (what, resp.headers)
    assert "Traceback" not in resp.text and 'File "' not in resp.text, (what, resp.text[:300])
    err = resp.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str), (what, err)
    assert err["type"] == "invalid_request_error", (what, err)
    return err


def alive(url: str) -> None:
    """The server still answers a valid request of each route, streamed and not, promptly."""
    started = time.monotonic()
    for route in ROUTES:
        resp = post(url, route, good(route))
        assert resp.status_code == 200 and resp.json()["choices"], resp.text[:300]
        stream = post(url, route, good(route, stream=True))
        assert stream.status_code == 200 and stream.text.rstrip().endswith("data: [DONE]"), stream.text[-300:]
    assert time.monotonic() - started < 60


# ---- wrong types and ranges for every field -----------------------------------------------------------
COMMON = {  # field -> bad values (never null: OpenAI allows null for most optional fields)
    "model": [5, [], {}, True, ""],
    "max_tokens": ["10", 0, -1, 1.5, True, [2], {"n": 2}, 10**30],
    "temperature": ["hot", -0.1, 2.5, True, [1.0], {}],
    "top_p": [0, -0.5, 1.5, "x", True, []],
    "n": [0, -1, 129, 9, "2", 2.5, True, []],
    "stop": [5, [1], ["a", "b", "c", "d", "e"], "", [""], {"a": 1}, [["a"]], True],
    "seed": ["1", 1.5, True, [], {}, 2**64],
    "stream": ["yes", "true", 1, 0.0, [], {}],
    "stream_options": ["x", [], 5, {"include_usage": "yes"}, {"include_usage": 1}],
    "logprobs": [True, 5, "x", {"a": 1}],
    "user": [5, [], {}, True],
}
ONLY = {
    "/completions": {
        "prompt": [None, 5, [], [1, 2], [[1]], {"a": 1}, "", True, ["a", 5]],
        "echo": [True, "yes", 1],
        "best_of": [2, 0, "x", True, [1]],
        "suffix": ["x", 5, []],
    },
    "/chat/completions": {
        "messages": [
            None,
            [],
            "hi",
            [1],
            ["hi"],
            [{"role": "user"}],
            [{"content": "x"}],
            [{"role": "wizard", "content": "x"}],
            [{"role": 5, "content": "x"}],
            [{"role": "user", "content": 5}],
            [{"role": "user", "content": None}],
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            [{"role": "user", "content": [{"type": "text"}]}],
            [{"role": "user", "content": [{"type": "text", "text": 5}]}],
            [{"role": "user", "content": {"type": "text", "text": "x"}}],
        ],
        "max_completion_tokens": [0, -3, "x", True, 1.5],
        "tools": [[{"type": "function", "function": {"name": "f"}}], "x", {"a": 1}],
    },
}


def field_cases() -> list[tuple[str, str, str, bool]]:
    """(route, field, repr of the bad value, stream) for every field of each route."""
    cases = []
    for route in ROUTES:
        for name, values in {**COMMON, **ONLY[route]}.items():
            for value in values:
                # a stream switch that is itself wrong is sent once; stream_options matter on a stream
                streams = {"stream": (False,), "stream_options": (True,)}.get(name, (False, True))
                cases += [(route, name, json.dumps(value), stream) for stream in streams]
    return cases


def test_wrong_types_and_ranges_of_every_field(url, tally):
    cases = field_cases()
    with requests.Session() as session:
        for route, name, value, stream in cases:
            body = {**good(route), name: json.loads(value)}
            if name != "stream":
                body["stream"] = stream
            err = clean_error(post(url, route, body, session=session), (route, name, value, stream))
            assert err["param"] in (name, None) or name == "model", (route, name, value, err)
    alive(url)
    tally(ENTRY, "4xx OpenAI error", [f"field {c}" for c in cases])


# ---- bodies that are not JSON objects -------------------------------------------------------------
def invalid_json(seed: int = 51) -> list[bytes]:
    rng = random.Random(seed)
    full = json.dumps(good("/completions", stop=["\n"], temperature=0.5)).encode()
    cuts = sorted(set(rng.randrange(1, len(full) - 1) for _ in range(30)))
    made = [
        b"",
        b" ",
        b"null",
        b"[]",
        b"[{}]",
        b"123",
        b'"string"',
        b"true",
        b"{",
        b"}",
        b"{,}",
        b"{'model': 'tiny', 'prompt': 'a'}",
        b'{"model": "tiny", "prompt": "a",}',
        b'{"model" "tiny"}',
        b'{"model": tiny}',
        b"model=tiny&prompt=a",
        b"\x00",
        full + b"\x00",
        full.replace(b'"the road"', b'"the\x00road"'),  # a raw NUL inside a string: a control character
        full.replace(b'"the road"', b'"the\nroad"'),
        full + b" trailing",
        full + full,
        b"\xff\xfe\xfd",
        b"\x80" + full,
        b"NaN",
        b"/* comment */" + full,
        rng.randbytes(512),
        rng.randbytes(4096),
    ]
    return [full[:cut] for cut in cuts] + made


def test_bodies_that_are_not_json_objects(url, tally):
    bodies = invalid_json()
    with requests.Session() as session:
        for raw in bodies:
            for route in ROUTES:
                clean_error(post(url, route, raw=raw, session=session), raw[:80])
    alive(url)
    tally(ENTRY, "400 OpenAI error", [f"body {r!r} {route}" for r in bodies for route in ROUTES])


# ---- text content: NUL escapes are served, lone surrogates are refused ------------------------------
def test_nul_escapes_are_served_and_surrogates_refused(url, tally):
    for route, body in [("/completions", good("/completions", prompt="a\u0000b")),
                        ("/chat/completions", good("/chat/completions", messages=[{"role": "user", "content": "\u0000" * 50}])),
                        ("/completions", good("/completions", prompt="x", stop=["\u0000"]))]:  # fmt: skip
        assert post(url, route, body).status_code == 200
    rng = random.Random(52)
    surrogate_cases = []
    for _ in range(12):
        route = rng.choice(ROUTES)
        lone = chr(rng.randrange(0xD800, 0xE000))
        field = rng.choice(
            ["prompt", "stop", "user", "model"] if route == "/completions" else ["stop", "user", "model"]
        )
        body = good(route, **{field: "a" + lone})
        if route == "/chat/completions" and rng.random() < 0.5:
            body = good(route, messages=[{"role": "user", "content": "b" + lone}])
        clean_error(post(url, route, body), (route, field))
        surrogate_cases.append(json.dumps(body))
    alive(url)
    tally(ENTRY, "served (200)", ["NUL escape in prompt", "NUL escapes in chat", "NUL stop sequence"])
    tally(ENTRY, "400 OpenAI error", [f"surrogate {c}" for c in surrogate_cases])


# ---- size: bodies past max_request_bytes, prompts past the context, too many prompts --------------------
def test_oversized_bodies_and_prompts(url, tally):
    cases = []
    for route in ROUTES:
        for size in (LIMIT + 1, 2 * LIMIT, 20 * LIMIT):
            err = clean_error(post(url, route, good(route, user="u" * size)), size)
            assert err["code"] == "request_too_large"
            cases.append(f"body {size} {route}")
        for words in (5_000, 50_000):
            text = "the river and the mountain " * words
            body = (
                good(route, prompt=text)
                if route == "/completions"
                else good(route, messages=[{"role": "user", "content": text[: LIMIT - 1000]}])
            )
            err = clean_error(post(url, route, body), words)
            cases.append(f"prompt {words} {route}")
    err = clean_error(
        post(url, "/completions", good("/completions", prompt=["a"] * (MAX_PROMPTS + 1))), "many"
    )
    assert err["param"] == "prompt"
    err = clean_error(
        post(url, "/completions", good("/completions", prompt=["the road"] * 40, n=8, max_tokens=255)), "room"
    )
    alive(url)
    tally(ENTRY, "413 / 400 OpenAI error", [*cases, "too many prompts", "completion past the context"])


# ---- model names: unknown and path-like ids are 404, never a file lookup ---------------------------------
MODEL_NAMES = [
    "no-such-model", "TINY", " tiny", "tiny ", "tiny\n", "tiny/", "./tiny", "../tiny", "../../etc/passwd",
    "/etc/passwd", "/", ".", "..", "~", "~/models/tiny", "C:\\models\\tiny", "file:///etc/passwd",
    "s3://bucket/model", "http://127.0.0.1/model", "%2e%2e%2fetc", "tiny\u0000", "tiny;rm -rf /",
    "x" * 5000, "tiny/../tiny", "lora-a", "best", "*", "{}", "🦙",
]  # fmt: skip


def test_unknown_and_path_like_model_names(url, tally):
    for name in MODEL_NAMES:
        for route in ROUTES:
            err = clean_error(post(url, route, good(route, model=name)), name[:40])
            assert err["code"] == "model_not_found" and err["param"] == "model", (name[:40], err)
    alive(url)
    tally(ENTRY, "404 model_not_found", [f"model {n!r} {r}" for n in MODEL_NAMES for r in ROUTES])


def test_wrong_methods_and_routes(url, tally):
    cases = [
        ("GET", "/completions"), ("PUT", "/completions"), ("DELETE", "/chat/completions"),
        ("PATCH", "/chat/completions"), ("POST", "/models"), ("GET", "/nope"), ("POST", "/completions/x"),
        ("POST", "/chat"), ("GET", "/../completions"), ("POST", "/embeddings"),
    ]  # fmt: skip
    for method, route in cases:
        resp = requests.request(method, url + route, data=b"{}", timeout=60)
        assert resp.status_code in (404, 405), (method, route, resp.status_code)
        assert "Traceback" not in resp.text and "error" in resp.json(), (method, route, resp.text[:200])
    alive(url)
    tally(ENTRY, "404 / 405 error body", [f"{m} {r}" for m, r in cases])


# ---- clients that go away: mid-stream, mid-body -------------------------------------------------------
def raw_request(url: str, route: str, body: bytes, send: int, declared: int | None = None) -> socket.socket:
    where = urlparse(url)
    head = (
        f"POST {where.path}{route} HTTP/1.1\r\nHost: {where.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {declared if declared is not None else len(body)}\r\n\r\n"
    ).encode()
    sock = socket.create_connection((where.hostname, where.port), timeout=60)
    sock.sendall(head + body[:send])
    return sock


def test_clients_that_disconnect(url, tally):
    cases = []
    for i in range(6):  # mid-stream: read the first bytes of a long stream, then hang up
        route = ROUTES[i % 2]
        body = json.dumps(good(route, stream=True, max_tokens=200, temperature=1.0)).encode()
        sock = raw_request(url, route, body, len(body))
        assert sock.recv(1024).startswith(b"HTTP/1.1 200")
        sock.close()
        cases.append(f"disconnect mid-stream {i}")
    for i in range(4):  # mid-body: a declared length never sent
        body = json.dumps(good(ROUTES[i % 2])).encode()
        raw_request(url, ROUTES[i % 2], body, len(body) // 2).close()
        cases.append(f"disconnect mid-body {i}")
    for i in range(2):  # non-streamed, hung up before the answer
        body = json.dumps(good(ROUTES[i], max_tokens=100)).encode()
        raw_request(url, ROUTES[i], body, len(body)).close()
        cases.append(f"disconnect before the answer {i}")
    time.sleep(1)
    alive(url)
    tally(ENTRY, "server unaffected", cases)


# ---- a flood: many bad requests at once, with valid ones in between --------------------------------------
def test_flood_of_concurrent_bad_requests(url, tally):
    rng = random.Random(53)
    bad = [(route, json.dumps({**good(route), name: json.loads(value)}).encode())
           for route, name, value, _ in rng.sample(field_cases(), 120)]  # fmt: skip
    bad += [(rng.choice(ROUTES), raw) for raw in rng.sample(invalid_json(), 40)]
    rng.shuffle(bad)

    def send(item):
        route, raw = item
        with requests.Session() as s:
            return post(url, route, raw=raw, session=s)

    def valid(route):
        return post(url, route, good(route)).status_code

    with ThreadPoolExecutor(32) as pool:
        answers = pool.map(send, bad)
        ok = list(pool.map(valid, [ROUTES[i % 2] for i in range(8)]))
        answers = list(answers)
    assert ok == [200] * 8
    assert not [r.status_code for r in answers if not 400 <= r.status_code < 500]
    for (_, raw), resp in zip(bad, answers):
        clean_error(resp, raw[:80])
    alive(url)
    tally(
        ENTRY,
        "4xx again, 32 concurrent clients (the same inputs re-sent)",
        [f"{r} {b!r}" for r, b in bad],
        again=True,
    )

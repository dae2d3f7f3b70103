"""OpenAI-compatible request and response bodies, and OpenAI-style error bodies.

Requests are validated here (types and ranges), so a bad value becomes a 400 naming the parameter before
anything reaches the model. Unknown request fields are ignored, as OpenAI's own server does for fields a
model does not use; parameters raylm cannot honour (logprobs, echo, best_of, tools) are rejected.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, field_validator, model_validator

MAX_STOP_SEQUENCES = 4
MAX_PROMPTS = 1024  # prompts in one completion request: a 4 MiB body could otherwise hold a million
# The seeds torch.Generator.manual_seed accepts: signed or unsigned 64-bit (a negative one is taken as its
# two's complement, so the engine wraps seed + choice into 64 bits and no valid seed can fail there).
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
# A lone UTF-16 surrogate: Python strings can hold one (from a "\ud800" escape, or CESU-8 bytes that
# json.loads decodes with surrogatepass), but no tokenizer and no UTF-8 response can carry it.
_SURROGATE = re.compile("[\\ud800-\\udfff]")


def _a_number(value: Any) -> Any:
    """pydantic's lax mode would read `true` as 1 and "10" as 10; OpenAI's API refuses both."""
    if isinstance(value, bool):
        raise ValueError("expected a number, not a boolean")
    if isinstance(value, str):
        raise ValueError("expected a number, not a string")
    return value


Number = BeforeValidator(_a_number)
Switch = Strict()  # true or false only: "yes", 1 or 0.0 are refused, as OpenAI's API does


class OpenAIError(Exception):
    """An error answered with an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(
    message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: Annotated[bool, Switch] = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: Annotated[int | None, Number] = Field(None, ge=1)
    temperature: Annotated[float, Number] = Field(1.0, ge=0, le=2)
    top_p: Annotated[float, Number] = Field(1.0, gt=0, le=1)
    n: Annotated[int, Number] = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: Annotated[int | None, Number] = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream: Annotated[bool, Switch] = False
    # vLLM's extension, same name and meaning: keep generating past the end-of-text token, to max_tokens
    # (load generators ask for it so that every request is as long as it asked to be).
    ignore_eos: Annotated[bool, Switch] = False
    stream_options: StreamOptions | None = None
    logprobs: Any = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else v or []
        if len(items) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(s == "" for s in items):
            raise ValueError("stop sequences must not be empty strings")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: Any) -> Any:
        if v not in (None, False, 0):
            raise ValueError("logprobs are not supported by this server")
        return v

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage_in_stream(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Request):
    prompt: str | list[str]
    echo: Annotated[bool, Switch] = False
    best_of: Annotated[int | None, Number] = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        if isinstance(v, list) and len(v) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts are allowed in one request (got {len(v)})")
        return v

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported by this server")
        if self.best_of not in (None, 1):
            raise ValueError("best_of other than 1 is not supported by this server")
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        return self

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[int | None, Number] = Field(None, ge=1)
    tools: list[Any] | None = None

    @model_validator(mode="after")
    def _unsupported(self) -> ChatCompletionRequest:
        if self.tools:
            raise ValueError("tools are not supported by this server")
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self

    def plain_messages(self) -> list[dict[str, str]]:
        # "developer" is OpenAI's newer name for "system"
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _response(
    rid: str, obj: str, model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """The envelope shared by completion and chat responses."""
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    }


def completion_body(
    rid: str,
    model: str,
    texts: list[str],
    reasons: list[str | None],
    prompt_tokens: int,
    completion_tokens: int,
) -> dict[str, Any]:
    choices = [
        {"index": i, "text": t, "logprobs": None, "finish_reason": r}
        for i, (t, r) in enumerate(zip(texts, reasons))
    ]
    return _response(rid, "text_completion", model, choices, prompt_tokens, completion_tokens)


def chat_body(
    rid: str,
    model: str,
    texts: list[str],
    reasons: list[str | None],
    prompt_tokens: int,
    completion_tokens: int,
) -> dict[str, Any]:
    choices = [
        {"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": r}
        for i, (t, r) in enumerate(zip(texts, reasons))
    ]
    return _response(rid, "chat.completion", model, choices, prompt_tokens, completion_tokens)


def completion_chunk(rid: str, model: str, index: int, text: str, reason: str | None) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": reason}],
    }


def chat_chunk(rid: str, model: str, index: int, delta: dict[str, str], reason: str | None) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}],
    }


def usage_chunk(rid: str, model: str, obj: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def models_body(ids: list[str], owner: str = "raylm") -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": i, "object": "model", "created": 0, "owned_by": owner} for i in ids],
    }


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """Turn pydantic/FastAPI validation errors into one readable message and the offending parameter."""
    parts, param = [], None
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            return "request body is not valid JSON", None
        where = ".".join(loc) or "body"
        param = param or (loc[0] if loc else None)
        parts.append(f"{where}: {err.get('msg', 'invalid').removeprefix('Value error, ')}")
    return "; ".join(parts) or "invalid request", param


def parse_body(raw: bytes) -> dict[str, Any]:
    """Decode a request body into a JSON object, refusing with a 400 (never a 500 from deeper down) what the
    server cannot serve: invalid JSON, nesting deeper than the parser's recursion limit, and lone
    surrogates in any string or key (the param names the top-level field holding one)."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise OpenAIError(400, "request body is nested too deeply") from None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError, an int past sys.get_int_max_str_digits()
        raise OpenAIError(400, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, "request body must be a JSON object")
    for key, value in body.items():
        bad_key = _has_surrogate(key)
        if bad_key or _has_surrogate(value):
            name = "a field name" if bad_key or len(key) > 64 else key
            raise OpenAIError(
                400,
                f"{name} is not valid Unicode text: it contains a lone surrogate (U+D800 to U+DFFF)",
                param=None if bad_key else key,
            )
    return body


def _has_surrogate(value: Any) -> bool:
    if not isinstance(value, str):
        # Strings nested in lists and objects: one pass in C over the value re-encoded, not a Python walk.
        try:
            value = json.dumps(value, ensure_ascii=False)
        except RecursionError:
            raise OpenAIError(400, "request body is nested too deeply") from None
    return _SURROGATE.search(value) is not None

"""Server-sent events for a streamed completion: OpenAI's chunk objects, one `data:` line each, then
`data: [DONE]`. The stream starts only once the request was accepted (its 200 is sent), so a failure
from here on can only be an error event."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from sse_starlette.sse import EventSourceResponse

from raylm.serving import api
from raylm.serving.engine import Delta

log = logging.getLogger("raylm")


@dataclass(frozen=True)
class StreamFormat:
    """What a stream's chunks look like: completion or chat chunks, and the usage chunk at the end."""

    rid: str
    model: str
    chunk: Callable[..., dict[str, Any]]  # api.completion_chunk or api.chat_chunk
    obj: str
    chat: bool
    sequences: int
    prompt_tokens: int
    include_usage: bool


def response(deltas: AsyncGenerator[tuple[int, Delta], None], fmt: StreamFormat) -> EventSourceResponse:
    return EventSourceResponse(events(deltas, fmt), ping=15)


async def events(
    deltas: AsyncGenerator[tuple[int, Delta], None], fmt: StreamFormat
) -> AsyncIterator[dict[str, str]]:
    def data(body: Any) -> dict[str, str]:
        return {"data": json.dumps(body)}

    tokens: dict[int, int] = {}
    try:
        if fmt.chat:
            for i in range(fmt.sequences):
                yield data(fmt.chunk(fmt.rid, fmt.model, i, {"role": "assistant", "content": ""}, None))
        async for i, delta in deltas:
            tokens[i] = delta.completion_tokens
            if delta.text or delta.finish_reason:
                payload: Any = delta.text
                if fmt.chat:
                    payload = {"content": delta.text} if delta.text else {}
                yield data(fmt.chunk(fmt.rid, fmt.model, i, payload, delta.finish_reason))
        if fmt.include_usage:
            yield data(api.usage_chunk(fmt.rid, fmt.model, fmt.obj, fmt.prompt_tokens, sum(tokens.values())))
    except Exception:
        log.exception("generation failed mid-stream")
        yield data(api.error_body("internal server error", kind="server_error"))
    finally:
        await deltas.aclose()  # a client gone mid-stream: its sequences leave the running batch
    yield {"data": "[DONE]"}

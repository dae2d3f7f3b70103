"""The async engine: one object owns the engine thread, the admission queue, the running batches and the
LoRA adapters, and `generate(request)` yields each request's deltas as they are decoded.

No Ray here: app.py puts it behind HTTP. Every model call runs on one thread, so an adapter is never
swapped under a running forward pass and the event loop stays free to accept and stream.

Iteration-level batching. A request is queued (split into slices of at most max_batch_size sequences).
When nothing is decoding, the first queued request waits up to batch_wait_timeout_s for company (or
until max_batch_size sequences are queued). Then, between two decoding steps, everything queued that fits
next to the running rows (at most max_batch_size decode together) is prefilled, packed, one prefill per
adapter, and merged into that adapter's running batch; so a request arriving mid-generation starts at
the next step instead of waiting for the running batch to finish. Batches of different adapters are
stepped in turn, never in one forward pass. A request whose consumer went away (a closed stream) leaves
its batch at the next step.

Adapters: an LRU of at most adapters.max_loaded per replica, with a count of the requests using each
(queued or decoding). An adapter in use is never unloaded: the LRU may hold more than max_loaded while
they are all in use, and shrinks back as they are released.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from raylm.core import metrics
from raylm.serving.engine import DecodeBatch, Delta, Engine, SamplingParams

log = logging.getLogger("raylm")
_DONE = object()  # put in a request's inbox after its last delta


@dataclass
class GenerationRequest:
    """One API request's sequences (prompts x n), all on one adapter (None = the base model).
    `model_id` is the name the client asked for, the tag of the request's metrics."""

    model_id: str
    adapter: str | None
    prompts: list[list[int]]
    params: list[SamplingParams]
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class _Live:
    """A submitted request: where its deltas go and how many of its sequences are not finished."""

    request: GenerationRequest
    inbox: asyncio.Queue
    rows_left: int
    admitted: bool = False
    first_token: bool = False
    last_token: float = 0.0  # when its latest token came (monotonic), for the inter-token latency
    tokens: int = 0
    closed: bool = False  # the consumer went away, or generation failed: its rows leave


@dataclass
class _Slice:
    """Sequences of one request waiting for admission; a row's tag is (request, index in the request)."""

    live: _Live
    rows: list[int]
    queued: float = field(default_factory=time.monotonic)


class AdapterCache:
    """LRU of loaded adapters with a use count each; loads and unloads run on the engine thread."""

    def __init__(
        self, engine: Engine, catalog: dict[str, str], max_loaded: int, executor: ThreadPoolExecutor
    ):
        self.engine, self.catalog, self.max_loaded, self.executor = engine, catalog, max_loaded, executor
        self.loaded: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self.users: Counter[str] = Counter()
        self.lock = asyncio.Lock()

    async def acquire(self, name: str) -> None:
        """Load the adapter if needed and count one more user; it stays loaded until released."""
        self.users[name] += 1
        try:
            async with self.lock:
                if name not in self.loaded:
                    await asyncio.get_running_loop().run_in_executor(
                        self.executor, self.engine.load_adapter, name, self.catalog[name]
                    )
                    metrics.record(metrics.SERVE_ADAPTER_LOADS, 1, {"model": name})
                self.loaded[name] = None
                self.loaded.move_to_end(name)
        except BaseException:
            self.users[name] -= 1
            raise
        self._evict()

    def release(self, name: str) -> None:
        self.users[name] -= 1
        self._evict()

    def _evict(self) -> None:
        for name in list(self.loaded):
            if len(self.loaded) <= self.max_loaded:
                return
            if self.users[name] <= 0:
                del self.loaded[name]
                # queued on the engine thread: it runs after the steps already queued there
                self.executor.submit(self._unload, name)

    def _unload(self, name: str) -> None:
        try:
            self.engine.unload_adapter(name)
        except Exception:
            log.exception("unloading adapter %s failed", name)


class AsyncEngine:
    """Scheduling around one `Engine`: admission queue, running batches per adapter, adapters."""

    def __init__(
        self,
        engine: Engine,
        model_id: str,
        adapters: dict[str, str] | None = None,
        max_loaded: int = 4,
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.005,
    ):
        self.engine, self.model_id = engine, model_id
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raylm-engine")
        self.adapters = AdapterCache(engine, dict(adapters or {}), max_loaded, self.executor)
        self.max_batch_size, self.batch_wait_timeout_s = max_batch_size, batch_wait_timeout_s
        self.batch_sizes: Counter[int] = Counter()  # rows per forward pass, for stats() and tests
        self._queue: deque[_Slice] = deque()
        self._running: dict[str | None, DecodeBatch] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def reconfigure(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        """New batching settings; they apply from the next admission (no asyncio here: any thread)."""
        self.max_batch_size, self.batch_wait_timeout_s = max_batch_size, batch_wait_timeout_s

    # ---- requests ---------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[tuple[int, Delta]]:
        """(sequence index in the request, Delta) as they are decoded, for all of the request's sequences."""
        stream = await self.submit(request)
        try:
            async for item in stream:
                yield item
        finally:
            await stream.aclose()

    async def submit(self, request: GenerationRequest) -> AsyncGenerator[tuple[int, Delta], None]:
        """Queue the request (its adapter loaded first: whatever can fail fails here, before a caller starts
        a stream) and return the iterator of its deltas. Closing the iterator early ends its sequences."""
        if request.adapter is not None:
            await self.adapters.acquire(request.adapter)
        live = _Live(request, asyncio.Queue(), rows_left=len(request.prompts))
        size = self.max_batch_size
        for start in range(0, len(request.prompts), size):
            self._queue.append(_Slice(live, list(range(start, min(start + size, len(request.prompts))))))
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())
        return self._deltas(live)

    @staticmethod
    async def _deltas(live: _Live) -> AsyncGenerator[tuple[int, Delta], None]:
        try:
            while (item := await live.inbox.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                for pair in item:
                    yield pair
        finally:
            live.closed = True  # no-op once all its rows finished; otherwise they leave at the next step

    def stats(self) -> dict[str, Any]:
        return {
            "batch_sizes": dict(self.batch_sizes),
            "max_batch_size": self.max_batch_size,
            "batch_wait_timeout_s": self.batch_wait_timeout_s,
            "loaded_adapters": list(self.engine.adapters),
        }

    # ---- the scheduling loop ----------------------------------------------------------------------
    async def _loop(self) -> None:
        try:
            while self._queue or self._running:
                if not self._running:
                    await self._wait_for_company()
                for adapter, slices in self._admit().items():
                    await self._prefill(adapter, slices)
                for batch in list(self._running.values()):
                    await self._step(batch)
        except BaseException as exc:  # a bug here must not leave every request waiting forever
            log.exception("the scheduling loop failed")
            self._fail_all(exc)
            raise

    async def _wait_for_company(self) -> None:
        """Idle engine: let the oldest queued request wait up to batch_wait_timeout_s for others to batch
        with, unless max_batch_size sequences are queued already."""
        while self._queue:
            rows = sum(len(s.rows) for s in self._queue if not s.live.closed)
            left = self._queue[0].queued + self.batch_wait_timeout_s - time.monotonic()
            if rows >= self.max_batch_size or left <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except TimeoutError:
                return

    def _admit(self) -> dict[str | None, list[_Slice]]:
        """Take the queued slices that fit next to the running rows, in arrival order, grouped per adapter:
        everything that arrived during the last step is prefilled together."""
        rows = sum(len(b.seqs) for b in self._running.values())
        groups: dict[str | None, list[_Slice]] = {}
        now = time.monotonic()
        while self._queue and (rows == 0 or rows + len(self._queue[0].rows) <= self.max_batch_size):
            piece = self._queue.popleft()
            live = piece.live
            if live.closed:
                self._retire(live, len(piece.rows))
                continue
            if not live.admitted:
                live.admitted = True
                metrics.record(
                    metrics.SERVE_QUEUE_WAIT_SECONDS,
                    now - live.request.arrived,
                    {"model": live.request.model_id},
                )
            rows += len(piece.rows)
            groups.setdefault(live.request.adapter, []).append(piece)
        return groups

    async def _prefill(self, adapter: str | None, slices: list[_Slice]) -> None:
        prompts = [s.live.request.prompts[r] for s in slices for r in s.rows]
        params = [s.live.request.params[r] for s in slices for r in s.rows]
        tags = [(s.live, r) for s in slices for r in s.rows]
        try:
            deltas = await self._on_engine(self._prefill_and_merge, adapter, prompts, params, tags)
        except Exception as exc:
            self._fail(tags, exc)
            return
        self._record_batch(len(prompts), adapter)
        self._deliver(deltas)

    def _prefill_and_merge(
        self, adapter: str | None, prompts: list[list[int]], params: list[SamplingParams], tags: list[Any]
    ) -> list[tuple[Any, Delta]]:
        """On the engine thread: prefill, then join the adapter's running batch (or start it)."""
        batch, deltas = self.engine.prefill(prompts, params, adapter, tags)
        if batch.seqs:
            running = self._running.get(adapter)
            if running is None:
                self._running[adapter] = batch
            else:
                self.engine.merge(running, batch)
        return deltas

    async def _step(self, batch: DecodeBatch) -> None:
        if any(live.closed for live, _ in batch.tags):
            keep = [i for i, (live, _) in enumerate(batch.tags) if not live.closed]
            for live, _ in await self._on_engine(self.engine.keep_rows, batch, keep):
                self._retire(live, 1)
        if batch.seqs:
            rows, t0 = len(batch.seqs), time.monotonic()
            self._record_batch(rows, batch.adapter)
            try:
                self._deliver(await self._on_engine(self.engine.step, batch))
                rate = rows / max(time.monotonic() - t0, 1e-9)
                metrics.record(
                    metrics.SERVE_TOKENS_PER_SECOND, rate, {"model": batch.adapter or self.model_id}
                )
            except Exception as exc:
                self._fail(batch.tags, exc)
                batch.seqs = []
        if not batch.seqs:
            del self._running[batch.adapter]

    async def _on_engine(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # ---- results ----------------------------------------------------------------------------------
    def _deliver(self, deltas: list[tuple[Any, Delta]]) -> None:
        """Hand each request its rows' deltas (one inbox item per request per step)."""
        by_request: dict[int, tuple[_Live, list[tuple[int, Delta]]]] = {}
        now = time.monotonic()
        for (live, index), delta in deltas:
            by_request.setdefault(id(live), (live, []))[1].append((index, delta))
            if not live.first_token and delta.completion_tokens:
                live.first_token = True
                metrics.record(
                    metrics.SERVE_TIME_TO_FIRST_TOKEN_SECONDS,
                    now - live.request.arrived,
                    {"model": live.request.model_id},
                )
        for live, items in by_request.values():
            self._token_gap(live, now)
            if not live.closed:
                live.inbox.put_nowait(items)
            done = [d for _, d in items if d.finish_reason is not None]
            live.tokens += sum(d.completion_tokens for d in done)
            if done:
                self._retire(live, len(done))

    @staticmethod
    def _token_gap(live: _Live, now: float) -> None:
        """Time since the request's previous token (its rows decode in step, so one gap per step)."""
        if live.last_token:
            tags = {"model": live.request.model_id}
            metrics.record(metrics.SERVE_INTER_TOKEN_LATENCY_SECONDS, now - live.last_token, tags)
        if live.first_token:
            live.last_token = now

    def _retire(self, live: _Live, rows: int) -> None:
        """`rows` of the request's sequences are over (finished, failed or dropped); the last one ends it."""
        live.rows_left -= rows
        if live.rows_left > 0:
            return
        if live.request.adapter is not None:
            self.adapters.release(live.request.adapter)
        if not live.closed:
            metrics.record(metrics.SERVE_TOKENS_GENERATED, live.tokens, {"model": live.request.model_id})
        live.inbox.put_nowait(_DONE)

    def _fail(self, tags: list[Any], exc: BaseException) -> None:
        log.error("generation failed: %s", exc)
        rows = Counter(id(live) for live, _ in tags)
        for live in {id(live): live for live, _ in tags}.values():
            if not live.closed:
                live.inbox.put_nowait(exc)
            live.closed = True  # its other rows (queued, or in a batch) leave too
            self._retire(live, rows[id(live)])

    def _fail_all(self, exc: BaseException) -> None:
        tags = [(s.live, r) for s in self._queue for r in s.rows]
        tags += [tag for batch in self._running.values() for tag in batch.tags]
        self._queue.clear()
        self._running.clear()
        self._fail(tags, exc)

    def _record_batch(self, rows: int, adapter: str | None) -> None:
        self.batch_sizes[rows] += 1
        metrics.record(metrics.SERVE_BATCH_SIZE, rows, {"model": adapter or self.model_id})

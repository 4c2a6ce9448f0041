"""A request scheduler for serving: a bounded queue and one worker thread that decodes admitted requests together.

Knows nothing of HTTP. A server calls :meth:`Scheduler.submit` (which validates the request and refuses it with
:class:`QueueFullError` when the queue is full, before any compute) and reads the returned :class:`RequestHandle`
chunk by chunk, synchronously or with ``async for``. A client that goes away calls :meth:`RequestHandle.cancel`,
which frees its batch slot at the next step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .outputs import GenerationResult, Prompt, StreamChunk, collect_chunks
from .sampling import SamplingParams

if TYPE_CHECKING:  # pragma: no cover
    from .engine import LookaheadGenerator


class QueueFullError(RuntimeError):
    """The scheduler's queue is full: try again later (HTTP 429)."""


class SchedulerClosedError(RuntimeError):
    """The scheduler is shut down and takes no more requests."""


_DONE = object()


@dataclass
class SchedulerStats:
    """Counters since start (for /metrics)."""

    requests_submitted: int = 0
    requests_finished: int = 0
    requests_cancelled: int = 0
    requests_rejected: int = 0
    requests_failed: int = 0
    tokens_generated: int = 0
    decoding_steps: int = 0  # batched forward passes (prefills excluded)
    busy_seconds: float = 0.0  # time the worker spent decoding
    started: float = field(default_factory=time.time)


class RequestHandle:
    """One submitted request: iterate it (``for`` or ``async for``) to get its :class:`StreamChunk` s."""

    def __init__(self, request_id: str, prompt_tokens: int) -> None:
        self.id = request_id
        self.prompt_tokens = prompt_tokens
        self._chunks: queue.Queue[Any] = queue.Queue()
        self._cancelled = threading.Event()
        self.error: BaseException | None = None
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None

    # --- producer side (the worker)
    def _put(self, chunk: StreamChunk) -> None:
        self._chunks.put(chunk)
        self._wake()

    def _finish(self, error: BaseException | None = None) -> None:
        self.error = error
        self._chunks.put(_DONE)
        self._wake()

    def _wake(self) -> None:
        """Wake an ``async for`` reader (its event loop runs in another thread)."""
        waiter = self._waiter
        if waiter is not None:
            loop, event = waiter
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the reader's loop is closed: nobody is waiting
                pass

    # --- consumer side
    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop generating for this request; its slot is freed at the next step."""
        self._cancelled.set()

    def __iter__(self) -> Iterator[StreamChunk]:
        while True:
            item = self._chunks.get()
            if item is _DONE:
                if self.error is not None:
                    raise self.error
                return
            yield item

    async def __aiter__(self) -> AsyncIterator[StreamChunk]:
        """Chunks without holding a thread while waiting: the worker wakes this loop when it adds one."""
        event = asyncio.Event()
        self._waiter = (asyncio.get_running_loop(), event)
        while True:
            try:
                item = self._chunks.get_nowait()
            except queue.Empty:
                event.clear()
                try:  # a chunk may have arrived before the clear: look again before sleeping
                    item = self._chunks.get_nowait()
                except queue.Empty:
                    await event.wait()
                    continue
            if item is _DONE:
                if self.error is not None:
                    raise self.error
                return
            yield item

    def result(self) -> GenerationResult:
        """Block until the request ends and return it whole."""
        return collect_chunks(self)


class Scheduler:
    """Bounded queue + one decoding thread running up to ``max_batch_size`` requests in each batched pass.

    Args:
        generator: the engine (its trie is shared by all requests).
        max_batch_size: most requests decoded together.
        max_queue: most requests waiting (not yet admitted); past it :meth:`submit` raises QueueFullError.
    """

    def __init__(self, generator: LookaheadGenerator, max_batch_size: int = 8, max_queue: int = 64) -> None:
        for name, value in (("max_batch_size", max_batch_size), ("max_queue", max_queue)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.generator = generator
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.stats = SchedulerStats()
        self._waiting: queue.Queue[tuple[Any, RequestHandle]] = queue.Queue(maxsize=max_queue)
        self._closed = threading.Event()
        self._count_lock = threading.Lock()
        self._active = 0
        self._thread = threading.Thread(target=self._work, name="lookahead-scheduler", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return self._waiting.qsize()

    @property
    def active(self) -> int:
        return self._active

    def submit(self, prompt: Prompt, *, max_new_tokens: int = 128, stop: Sequence[str] | None = None,
               documents: Sequence[str] | None = None, sampling: SamplingParams | None = None,
               eos_token_id: int | Sequence[int] | None = None) -> RequestHandle:
        """Validate and enqueue one request. Raises ValueError/TypeError for bad input (nothing is queued),
        QueueFullError when the queue is full, SchedulerClosedError after :meth:`close`."""
        if self._closed.is_set():
            raise SchedulerClosedError("the scheduler is shut down")
        request = self.generator.prepare(prompt, max_new_tokens=max_new_tokens, stop=stop, documents=documents,
                                         sampling=sampling, eos_token_id=eos_token_id)
        handle = RequestHandle(request.request_id, len(request.prompt_ids))
        try:
            self._waiting.put_nowait((request, handle))
        except queue.Full:
            with self._count_lock:
                self.stats.requests_rejected += 1
            raise QueueFullError(f"the request queue is full ({self.max_queue} waiting); retry later") from None
        with self._count_lock:
            self.stats.requests_submitted += 1
        return handle

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop taking requests, cancel the waiting ones and let the worker end."""
        self._closed.set()
        while True:
            try:
                _, handle = self._waiting.get_nowait()
            except queue.Empty:
                break
            handle._finish(SchedulerClosedError("the scheduler shut down before this request ran"))
        self._thread.join(timeout)

    # ------------------------------------------------------------------ worker

    def _admit(self, batch: Any, block: bool) -> None:
        while len(batch) < self.max_batch_size:
            try:
                request, handle = self._waiting.get(timeout=0.05) if block and not len(batch) else \
                    self._waiting.get_nowait()
            except queue.Empty:
                return
            if handle.cancelled:
                self._finished(handle, cancelled=True)
                continue
            try:
                batch.add(request, handle)
            except Exception as error:  # noqa: BLE001 - reported to the one request that caused it
                with self._count_lock:
                    self.stats.requests_failed += 1
                handle._finish(error)

    def _finished(self, handle: RequestHandle, cancelled: bool = False, error: BaseException | None = None) -> None:
        with self._count_lock:
            if cancelled:
                self.stats.requests_cancelled += 1
            elif error is not None:
                self.stats.requests_failed += 1
            else:
                self.stats.requests_finished += 1
        handle._finish(error)

    def _work(self) -> None:
        batch = self.generator.new_batch()
        while not self._closed.is_set() or len(batch):
            try:
                self._cycle(batch)
            except Exception as error:  # noqa: BLE001 - fail the requests of this batch, keep serving
                for handle in batch.keys():
                    self._finished(handle, error=error)
                batch.close()
                batch = self.generator.new_batch()
            self._active = len(batch)

    def _cycle(self, batch: Any) -> None:
        """Admit waiting requests, drop cancelled ones, run one batched step and deliver its chunks."""
        if not self._closed.is_set():
            self._admit(batch, block=True)
        for handle in [h for h in batch.keys() if h.cancelled]:
            batch.remove(handle)
            self._finished(handle, cancelled=True)
        self._active = len(batch)
        if not len(batch):
            return
        t0 = time.perf_counter()
        try:
            events = batch.step()
        finally:
            self.stats.busy_seconds += time.perf_counter() - t0
        self.stats.decoding_steps += 1
        for handle, chunk in events:
            self.stats.tokens_generated += len(chunk.token_ids)
            handle._put(chunk)
            if chunk.finish_reason is not None:
                self._finished(handle)  # the batch has already dropped the finished row

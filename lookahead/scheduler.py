"""A request scheduler for serving: a bounded queue and one worker thread that decodes admitted requests together.

Knows nothing of HTTP. A server calls :meth:`Scheduler.submit` (which validates the request and refuses it with
:class:`QueueFullError` when the queue is full, before any compute) and reads the returned :class:`RequestHandle`
chunk by chunk, synchronously or with ``async for``. A client that goes away calls :meth:`RequestHandle.cancel`,
which frees its batch slot at the next step.

Admission is by count (``max_batch_size``) and by KV-cache bytes (``max_kv_bytes``): each admitted request reserves
the cache its longest possible sequence needs (:func:`kv_cache_bytes_per_token`), and the queue's head waits (FIFO)
until the reservations of the running requests leave room for it. When a step runs out of device memory anyway, the
newest request leaves the batch with :class:`OutOfMemoryRequestError` and the others go on decoding. Any other fault
of a row (a chunk with ``finish_reason`` "error") ends that request with its error; the others go on.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .batch import is_out_of_memory
from .inputs import RequestOptions
from .outputs import GenerationResult, Prompt, Request, StreamChunk, collect_chunks

if TYPE_CHECKING:  # pragma: no cover
    from .engine import LookaheadGenerator

#: share of the free device memory (at scheduler start) that ``max_kv_bytes=None`` lets KV caches reserve on CUDA
CUDA_KV_SHARE = 0.9


class QueueFullError(RuntimeError):
    """The scheduler's queue is full: try again later (HTTP 429)."""


class SchedulerClosedError(RuntimeError):
    """The scheduler is shut down and takes no more requests."""


class OutOfMemoryRequestError(RuntimeError):
    """The request was evicted: the device ran out of memory decoding it with the others (retry it; HTTP 503)."""


class RequestFailedError(RuntimeError):
    """A fault ended this request (and only this one) before its answer was complete (HTTP 500)."""


def _config_int(config: Any, name: str) -> int | None:
    value = getattr(config, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def kv_cache_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Bytes of KV cache one token takes: layers x key/value heads x head dim x 2 (K and V) x bytes of ``dtype``.

    Reads ``num_key_value_heads`` (else ``num_attention_heads``) and ``head_dim`` (else ``hidden_size //
    num_attention_heads``) from ``config``, or from its ``text_config`` when it nests one (multimodal models). An
    upper bound for models with sliding-window layers, whose caches stop growing at the window.
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    text = getattr(config, "text_config", None) or config
    layers = _config_int(text, "num_hidden_layers")
    heads = _config_int(text, "num_attention_heads")
    kv_heads = _config_int(text, "num_key_value_heads") or heads
    head_dim = _config_int(text, "head_dim")
    if head_dim is None and heads is not None and _config_int(text, "hidden_size") is not None:
        head_dim = text.hidden_size // heads
    missing = [name for name, value in (("num_hidden_layers", layers), ("num_key_value_heads or num_attention_heads",
                                        kv_heads), ("head_dim or hidden_size", head_dim)) if not value]
    if missing:
        raise ValueError(f"cannot size the KV cache: the model config has no positive {', '.join(missing)}")
    return layers * kv_heads * head_dim * 2 * dtype.itemsize


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
    requests_out_of_memory: int = 0  # evicted when a step ran out of device memory (also counted as failed)
    tokens_generated: int = 0
    decoding_steps: int = 0  # batched forward passes (prefills excluded)
    busy_seconds: float = 0.0  # time the worker spent decoding
    kv_bytes_reserved: int = 0  # KV-cache bytes reserved by the admitted requests now (a gauge)
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
    """Bounded FIFO queue + one decoding thread running up to ``max_batch_size`` requests in each batched pass.

    Args:
        generator: the engine (its trie is shared by all requests).
        max_batch_size: most requests decoded together.
        max_queue: most requests waiting (not yet admitted); past it :meth:`submit` raises QueueFullError.
        max_kv_bytes: most KV-cache bytes the admitted requests may reserve together; each reserves
            ``(prompt tokens + max_new_tokens + decoding_length + 1) x`` :func:`kv_cache_bytes_per_token`. None: on a
            CUDA device ``CUDA_KV_SHARE`` (90%) of the memory free now, on other devices no limit.
    """

    def __init__(self, generator: LookaheadGenerator, max_batch_size: int = 8, max_queue: int = 64,
                 max_kv_bytes: int | None = None) -> None:
        for name, value in (("max_batch_size", max_batch_size), ("max_queue", max_queue)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if max_kv_bytes is not None and (not isinstance(max_kv_bytes, int) or isinstance(max_kv_bytes, bool)
                                         or max_kv_bytes < 1):
            raise ValueError(f"max_kv_bytes must be an integer >= 1 or None (automatic), got {max_kv_bytes!r}")
        self.generator = generator
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.kv_bytes_per_token = kv_cache_bytes_per_token(generator.model.config, generator.model.dtype)
        self.max_kv_bytes = max_kv_bytes if max_kv_bytes is not None else self._default_kv_bytes()
        self.stats = SchedulerStats()
        self._waiting: deque[tuple[Request, RequestHandle, int]] = deque()
        self._queue_lock = threading.Condition()
        self._closed = threading.Event()
        self._count_lock = threading.Lock()
        self._active = 0
        self._reserved: dict[RequestHandle, int] = {}  # admitted handle -> its KV-cache bytes (worker thread only)
        self._admission_held = False  # after an out-of-memory eviction: admit nothing until a row leaves
        self._thread = threading.Thread(target=self._work, name="lookahead-scheduler", daemon=True)
        self._thread.start()

    def _default_kv_bytes(self) -> int | None:
        device = torch.device(self.generator.device)
        if device.type != "cuda":
            return None
        free, _ = torch.cuda.mem_get_info(device)
        return max(1, int(free * CUDA_KV_SHARE))

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return self._active

    def kv_bytes_needed(self, request: Request) -> int:
        """The KV-cache bytes ``request`` reserves while it runs: its longest sequence plus one draft tree."""
        tokens = len(request.prompt_ids) + request.max_new_tokens + self.generator.config.decoding_length + 1
        return tokens * self.kv_bytes_per_token

    def _check_fits(self, request: Request, need: int) -> None:
        if self.max_kv_bytes is not None and need > self.max_kv_bytes:
            raise ValueError(
                f"the request needs {need} bytes of KV cache ({len(request.prompt_ids)} prompt tokens + "
                f"{request.max_new_tokens} max_new_tokens + {self.generator.config.decoding_length + 1} draft tokens, "
                f"x {self.kv_bytes_per_token} bytes per token), more than max_kv_bytes={self.max_kv_bytes} allows "
                f"even alone; shorten the prompt or lower max_new_tokens")

    def submit(self, prompt: Prompt, options: RequestOptions | None = None, **keywords: Any) -> RequestHandle:
        """Validate and enqueue one request. Raises ValueError/TypeError for bad input or a request whose KV cache
        exceeds ``max_kv_bytes`` alone (nothing is queued), QueueFullError when the queue is full,
        SchedulerClosedError after :meth:`close`. ``options`` (or keywords replacing its fields) as in
        :meth:`LookaheadGenerator.prepare` (``trie``: a tenant's own trie)."""
        if self._closed.is_set():
            raise SchedulerClosedError("the scheduler is shut down")
        request = self.generator.prepare(prompt, options, **keywords)
        need = self.kv_bytes_needed(request)
        self._check_fits(request, need)
        handle = RequestHandle(request.request_id, len(request.prompt_ids))
        with self._queue_lock:
            full = len(self._waiting) >= self.max_queue
            if not full:
                self._waiting.append((request, handle, need))
                self._queue_lock.notify()
        with self._count_lock:
            if full:
                self.stats.requests_rejected += 1
            else:
                self.stats.requests_submitted += 1
        if full:
            raise QueueFullError(f"the request queue is full ({self.max_queue} waiting); retry later")
        return handle

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop taking requests, cancel the waiting ones and let the worker end."""
        self._closed.set()
        with self._queue_lock:
            waiting = list(self._waiting)
            self._waiting.clear()
            self._queue_lock.notify_all()
        for _, handle, _ in waiting:
            handle._finish(SchedulerClosedError("the scheduler shut down before this request ran"))
        self._thread.join(timeout)

    # ------------------------------------------------------------------ worker

    def _admit(self, batch: Any, block: bool) -> None:
        """Move waiting requests into the batch while count and KV bytes allow (FIFO: a head that does not fit
        waits, and so does everything behind it)."""
        with self._queue_lock:
            if block and not len(batch) and not self._waiting:
                self._queue_lock.wait(timeout=0.05)
            cancelled = [item for item in self._waiting if item[1].cancelled]
            for item in cancelled:
                self._waiting.remove(item)
            taken = self._take(len(batch))
        for _, handle, _ in cancelled:
            self._finished(handle, cancelled=True)
        for request, handle, need in taken:
            self._reserve(handle, need)
            try:
                batch.add(request, handle)
            except Exception as error:  # noqa: BLE001 - reported to the one request that caused it
                self._finished(handle, error=error)

    def _take(self, rows: int) -> list[tuple[Request, RequestHandle, int]]:
        """Pop the waiting requests that fit now (call with the queue lock held)."""
        limit = rows if self._admission_held else self.max_batch_size
        reserved = self.stats.kv_bytes_reserved
        taken = []
        while self._waiting and rows + len(taken) < limit:
            need = self._waiting[0][2]
            if self.max_kv_bytes is not None and reserved + need > self.max_kv_bytes:
                break
            reserved += need
            taken.append(self._waiting.popleft())
        return taken

    def _reserve(self, handle: RequestHandle, need: int) -> None:
        self._reserved[handle] = need
        self.stats.kv_bytes_reserved += need

    def _finished(self, handle: RequestHandle, cancelled: bool = False, error: BaseException | None = None) -> None:
        self.stats.kv_bytes_reserved -= self._reserved.pop(handle, 0)
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
        if not len(batch):
            self._admission_held = False
        if not self._closed.is_set():
            self._admit(batch, block=True)
        for handle in [h for h in batch.keys() if h.cancelled]:
            batch.remove(handle)
            self._finished(handle, cancelled=True)
            self._admission_held = False
        self._active = len(batch)
        if not len(batch):
            return
        t0 = time.perf_counter()
        try:
            events = batch.step()
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            self._evict_newest(batch, error)
            return
        finally:
            self.stats.busy_seconds += time.perf_counter() - t0
        self.stats.decoding_steps += 1
        emptied = False
        for handle, chunk in events:
            self.stats.tokens_generated += len(chunk.token_ids)
            if chunk.finish_reason == "error":  # a fault ended this row alone (the batch has dropped it)
                emptied = self._row_failed(batch, handle, chunk, emptied)
                continue
            handle._put(chunk)
            if chunk.finish_reason is not None:
                self._finished(handle)  # the batch has already dropped the finished row
                self._admission_held = False

    def _row_failed(self, batch: Any, handle: RequestHandle, chunk: StreamChunk, emptied: bool) -> bool:
        """End the request of a row the batch failed: out of memory with :class:`OutOfMemoryRequestError` (the
        allocator's cached blocks freed once per step, admission held until a row leaves), any other fault with its
        own exception (or :class:`RequestFailedError`). Returns whether the cache was emptied."""
        error = chunk.exception
        if error is None or not isinstance(error, Exception):
            error = RequestFailedError(chunk.error or "generation failed")
        if not is_out_of_memory(error):
            self._finished(handle, error=error)
            return emptied
        self._stop_out_of_memory(handle, batch, error, str(chunk.error), emptied)
        return True

    def _evict_newest(self, batch: Any, error: BaseException) -> None:
        """After a step ran out of device memory (and left the batch as it was): fail the newest request, free the
        allocator's cached blocks, and admit nothing new until another row leaves, so the rest can go on."""
        handle = batch.keys()[-1]
        batch.remove(handle)
        self._stop_out_of_memory(handle, batch, error, f"{type(error).__name__}: {error}", emptied=False)

    def _stop_out_of_memory(self, handle: Any, batch: Any, error: BaseException, detail: str, emptied: bool) -> None:
        """Fail ``handle``'s request (no longer in ``batch``) with :class:`OutOfMemoryRequestError` caused by
        ``error``, free the allocator's cached blocks (unless ``emptied`` already this step) and admit nothing new
        until another row leaves."""
        if not emptied and torch.device(self.generator.device).type == "cuda":
            torch.cuda.empty_cache()
        others = f"together with the {len(batch)} other request(s) being decoded" if len(batch) else "even alone"
        evicted = OutOfMemoryRequestError(
            f"out of device memory: this request did not fit in device memory {others} and was stopped; it may be "
            f"retried ({detail})")
        evicted.__cause__ = error
        with self._count_lock:
            self.stats.requests_out_of_memory += 1
        self._finished(handle, error=evicted)
        self._admission_held = len(batch) > 0

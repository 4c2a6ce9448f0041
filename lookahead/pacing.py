"""Stream pacing: how a request's tokens go out to its client.

Drafting changes how fast an answer comes, never what it says, and speed is observable. Streamed one chunk per
accepted run, an answer's chunk sizes and times tell an observer who sees only packets how much of it was drafted,
so whether the draft store had seen it before (published attacks identify queries from such traces: arXiv
2411.01076). :class:`StreamChunking` names the choices:

``run``
    one chunk per step's accepted run, as soon as it is verified (the fastest; shows how much was drafted);
``token`` (``fixed:1``)
    one token per chunk;
``fixed:N``
    ``N`` tokens per chunk;

``token@R``, ``fixed:N@R``
    the same at a rate the operator sets: ``R`` tokens per second, whatever the engine's steps take;

the last four at a steady cadence: one chunk per ``N`` steps of decoding without drafts, a little slower (``slack``,
1.25x) so that decoding, drafted or not, keeps ahead of it, or one chunk every ``N / R`` seconds. A set rate leaks
nothing of the drafts while decoding keeps ahead of it (choose ``R`` below the rate of plain decoding at the busiest
batch); the engine's step estimate follows the context and the batch, and the cost model's error in it. That step
time comes from the engine with each chunk
(``plain_seconds``: its cost model's time of a pass without drafts at that context and batch, the same whatever was
drafted; else the gaps between chunks). A drafted step that accepted five tokens queues them; they go out one step
apart. Chunk sizes and times then follow the answer's length, the context and the batch, not the drafts (a drafted
step's own time would show them: its larger tree takes longer). The client sees about the speed of decoding without
drafts (the server still finishes sooner and serves others with the time saved).

:class:`Pacer` is the schedule alone (chunks in with their arrival times, pieces out when due; no clock of its own),
:func:`pace` and :func:`apace` drive it with a clock for a synchronous or an asynchronous consumer. Pieces are
:class:`~lookahead.outputs.StreamChunk` objects whose ``accepted`` is 0 and whose text is split exactly as the
engine's (the same stop-string and UTF-8 hold-back; the texts joined equal the engine's).
"""

from __future__ import annotations

import asyncio
import queue
import re
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .emitter import Emitter
from .outputs import StreamChunk

_FORM = re.compile(r"(token|fixed:([1-9][0-9]{0,5}))(?:@([0-9]+(?:\.[0-9]*)?|\.[0-9]+))?")
_END = object()


@dataclass(frozen=True)
class StreamChunking:
    """How a stream is cut: ``tokens`` per chunk at a steady cadence, or 0 for one chunk per accepted run; ``rate``
    tokens per second sets the cadence (0: the engine's step without drafts sets it)."""

    tokens: int = 0
    rate: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.tokens, int) or isinstance(self.tokens, bool) or self.tokens < 0:
            raise ValueError(f"stream chunking: tokens must be an integer >= 0 (0: one chunk per run), "
                             f"got {self.tokens!r}")
        if isinstance(self.rate, bool) or not isinstance(self.rate, (int, float)) or not 0 <= self.rate <= 1e6 \
                or self.rate != self.rate:
            raise ValueError(f"stream chunking: rate must be a number of tokens per second in 0..1e6 (0: the "
                             f"engine's pace), got {self.rate!r}")
        if self.rate and not self.tokens:
            raise ValueError("stream chunking: a rate paces 'token' or 'fixed:N' chunks, not 'run'")

    @classmethod
    def parse(cls, text: str | StreamChunking | None) -> StreamChunking:
        """``run``, ``token`` or ``fixed:N`` (N from 1 to 999999), the last two optionally ``@R`` (R tokens per
        second, > 0); None is ``run``."""
        if isinstance(text, StreamChunking):
            return text
        if text is None or text == "run":
            return cls(0)
        found = _FORM.fullmatch(text) if isinstance(text, str) else None
        rate = float(found.group(3)) if found is not None and found.group(3) is not None else 0.0
        if found is None or found.group(3) is not None and not 0 < rate <= 1e6:
            raise ValueError(f"stream chunking {text!r} is not one of 'run' (one chunk per accepted run), 'token' "
                             f"(one token per chunk, steady cadence) or 'fixed:N' (N tokens per chunk, N >= 1), "
                             f"the last two optionally with '@R' (R tokens per second, 0 < R <= 1e6: 'token@20')")
        return cls(1 if found.group(2) is None else int(found.group(2)), rate)

    @property
    def paced(self) -> bool:
        """Whether chunks are re-cut and paced (``token`` or ``fixed:N``)."""
        return self.tokens > 0

    def __str__(self) -> str:
        form = "run" if self.tokens == 0 else "token" if self.tokens == 1 else f"fixed:{self.tokens}"
        return f"{form}@{self.rate:g}" if self.rate else form


class TextSplitter:
    """The text each token adds, with the engine's hold-back (a possible partial stop string, an incomplete UTF-8
    character): the texts of a stream's tokens, joined, are a prefix of the engine's text, and all of it once the
    rest is taken at the end (:meth:`rest`)."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self._emitter = Emitter(tokenizer, (), tuple(stop), 1 << 62)
        self.engine_text = ""  # the engine's text so far (its chunks' texts joined)
        self.sent = 0  # characters of it given out

    def take(self, chunk: StreamChunk) -> list[str]:
        """The text of each token of ``chunk`` (the engine's chunk text counted in first)."""
        self.engine_text += chunk.text
        texts = []
        for token in chunk.token_ids:
            self._emitter.push([token])
            end = min(len(self._emitter.text), len(self.engine_text))
            texts.append(self.engine_text[self.sent:max(end, self.sent)])
            self.sent = max(end, self.sent)
        return texts

    def rest(self) -> str:
        """The engine text not given out yet (at the end of the stream: what was held back)."""
        text = self.engine_text[self.sent:]
        self.sent = len(self.engine_text)
        return text


class Pacer:
    """The schedule of a paced stream: :meth:`feed` the engine's chunks with their arrival times, take what is due
    with :meth:`due`.

    A piece of ``chunking.tokens`` tokens is due one cadence after the previous piece (``tokens`` times the step
    time), and never before its last token arrived; the first piece, and an error, go out as soon as they arrive.
    The step time is ``1 / chunking.rate`` when a rate is set, else a running average of the chunks'
    ``plain_seconds`` (what their step would have taken without drafts), or of the gaps between them where the
    engine does not say (each chunk is one decoding step). The
    last piece carries the finish reason and the stats.
    """

    def __init__(self, chunking: StreamChunking, splitter: TextSplitter, smoothing: float = 0.2,
                 slack: float = 1.25) -> None:
        if not chunking.paced:
            raise ValueError("a Pacer paces 'token' or 'fixed:N' chunking; 'run' needs none")
        self.size = chunking.tokens
        self.rate = chunking.rate
        self.splitter = splitter
        self.smoothing = smoothing
        self.slack = slack
        self.step_time: float | None = None
        self._last_arrival: float | None = None
        self._last_release: float | None = None
        self._tokens: list[int] = []  # tokens not yet in a piece
        self._texts: list[str] = []
        self._ready: deque[tuple[float, StreamChunk]] = deque()  # (earliest release, piece)
        self._final: StreamChunk | None = None  # the engine's last chunk, once it came
        self.finished = False  # the last piece was given out

    def feed(self, chunk: StreamChunk, now: float) -> None:
        """Take the engine's next chunk, arrived at ``now``."""
        if self.rate:  # the operator's cadence: nothing the engine does moves it
            step = 1.0 / self.rate
        elif chunk.plain_seconds is not None:  # the engine's word for a step without drafts
            step = chunk.plain_seconds * self.slack
        elif self._last_arrival is not None:
            step = now - self._last_arrival
        else:
            step = None
        if step is not None:
            old = self.step_time
            self.step_time = step if old is None else old + self.smoothing * (step - old)
        self._last_arrival = now
        for token, text in zip(chunk.token_ids, self.splitter.take(chunk)):
            self._tokens.append(token)
            self._texts.append(text)
            if len(self._tokens) == self.size:
                self._queue(now)
        if chunk.finish_reason is not None:
            self._final = chunk

    def _queue(self, now: float) -> None:
        piece = StreamChunk(self._tokens, "".join(self._texts), 0)
        self._ready.append((now, piece))
        self._tokens, self._texts = [], []

    def next_due(self) -> float | None:
        """When the next piece is due (None: none is waiting)."""
        if self._ready:
            earliest = self._ready[0][0]  # a full piece: when its last token came
        elif self._final is not None and not self.finished:
            earliest = self._last_arrival or 0.0  # the closing piece: when the last chunk came
            if self._final.finish_reason == "error":
                return earliest
        else:
            return None
        if self._last_release is None or self.step_time is None:
            return earliest
        return max(earliest, self._last_release + self.size * self.step_time)

    def due(self, now: float) -> list[StreamChunk]:
        """The pieces due at ``now``, in order (an error flushes everything waiting)."""
        out: list[StreamChunk] = []
        flush = self._final is not None and self._final.finish_reason == "error"
        while not self.finished:
            at = self.next_due()
            if at is None or (at > now and not flush):
                break
            self._last_release = max(at, self._last_release or at) if not flush else now
            if self._ready:
                piece = self._ready.popleft()[1]
                if not self._ready and self._final is not None and not self._tokens:
                    piece = self._closing(piece.token_ids, piece.text)  # the last full piece ends the stream
                out.append(piece)
            else:
                out.append(self._closing(self._tokens, "".join(self._texts)))
        return out

    def _closing(self, tokens: list[int], text: str) -> StreamChunk:
        final = self._final
        assert final is not None
        self.finished = True
        self._tokens, self._texts = [], []
        return StreamChunk(list(tokens), text + self.splitter.rest(), 0, final.finish_reason, final.stats,
                           error=final.error, exception=final.exception)


def pace(chunks: Iterable[StreamChunk], chunking: StreamChunking | str | None, tokenizer: Any,
         stop: Sequence[str] = (), clock: Callable[[], float] = time.monotonic) -> Iterator[StreamChunk]:
    """``chunks`` re-cut and paced by ``chunking`` for a synchronous consumer (``run``: as they come).

    Paced, the chunks are read in a thread of its own, so the engine decodes on while pieces wait for their time;
    a consumer that stops early stops it after its current step (and waits for that step)."""
    chunking = StreamChunking.parse(chunking)
    if not chunking.paced:
        yield from chunks
        return
    pacer = Pacer(chunking, TextSplitter(tokenizer, stop))
    inbox: queue.Queue[tuple[Any, float]] = queue.Queue()
    stopping = threading.Event()

    def produce() -> None:
        source = iter(chunks)
        try:
            for chunk in source:
                inbox.put((chunk, clock()))
                if stopping.is_set():
                    break
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, raised there
            inbox.put((error, clock()))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()
            inbox.put((_END, clock()))

    reader = threading.Thread(target=produce, name="lookahead-pace", daemon=True)
    reader.start()
    ended = False
    try:
        while not pacer.finished:
            at = pacer.next_due()
            wait = None if at is None else max(0.0, at - clock())
            if not ended:
                try:
                    item, arrived = inbox.get(timeout=wait)
                except queue.Empty:
                    item = None
                if item is _END:
                    ended = True
                elif isinstance(item, BaseException):
                    raise item
                elif item is not None:
                    pacer.feed(item, arrived)
            elif wait is None:
                break  # the engine ended without a finish reason: nothing more will come
            else:
                time.sleep(wait)
            yield from pacer.due(clock())
    finally:
        stopping.set()
        reader.join()


async def apace(chunks: AsyncIterator[StreamChunk], chunking: StreamChunking | str | None, tokenizer: Any,
                stop: Sequence[str] = ()) -> AsyncIterator[StreamChunk]:
    """``chunks`` re-cut and paced by ``chunking`` for an asynchronous consumer (a server's stream): the engine's
    chunks are read as they come while pieces go out on time."""
    chunking = StreamChunking.parse(chunking)
    if not chunking.paced:
        async for chunk in chunks:
            yield chunk
        return
    loop = asyncio.get_running_loop()
    pacer = Pacer(chunking, TextSplitter(tokenizer, stop))
    source = chunks.__aiter__()
    pending: asyncio.Task[StreamChunk] | None = None
    exhausted = False
    try:
        while not pacer.finished:
            if pending is None and not exhausted:
                pending = asyncio.ensure_future(source.__anext__())
            at = pacer.next_due()
            timeout = None if at is None else max(0.0, at - loop.time())
            if pending is not None:
                done, _ = await asyncio.wait({pending}, timeout=timeout)
                if done:
                    try:
                        chunk = pending.result()
                    except StopAsyncIteration:
                        exhausted = True
                    else:
                        pacer.feed(chunk, loop.time())
                    pending = None
            elif timeout is not None:
                await asyncio.sleep(timeout)
            elif exhausted:
                break  # the engine ended without a finish reason: nothing more will come
            for piece in pacer.due(loop.time()):
                yield piece
    finally:
        if pending is not None:
            pending.cancel()

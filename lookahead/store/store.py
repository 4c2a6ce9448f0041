"""The draft store: every token sequence the engine drafts from, in flat arrays, drafted by compiled kernels.

What it holds (see :mod:`lookahead.store.segments`):

- **global entries**: past answers (:meth:`DraftStore.insert` without a request id) and documents with ids
  (:meth:`DraftStore.insert_source`); new ones go to a small linear *tail*; a full tail is sealed into a suffix-array
  *segment* in the background, and segments are merged in the background (a log-structured merge: each merge is one
  linear pass over two sorted suffix arrays), so a store of ``N`` tokens is a handful of segments;
- **request-local entries**: one live request's prompt with its output so far (one sequence that grows as the
  output is counted) and its documents; dropped by :meth:`DraftStore.release`.

Drafting matches the longest suffix of the context and expands its continuations best-first with the scores and the
tie-breaking of :class:`lookahead.trie.TokenTrie` (the oracle the tests compare with): the count of an n-gram of at
most ``branch_length + 1`` tokens is the number of its occurrences inside one entry, global and local counts kept
apart and weighted. Policies that differ from the oracle on purpose: there is no decay (whole entries are evicted,
oldest first, once the store passes ``store_bytes``); a slice inserted with ``append`` starts a new sequence.

Deleting (:meth:`DraftStore.remove_source`, eviction) marks entries dead at once (their counts are gone from the next
draft on) and a background compaction drops their tokens. :meth:`DraftStore.save` writes one file of raw arrays
(fsync, rename); :meth:`DraftStore.load` maps it (copy-on-write), so processes on one machine share its pages,
and checks it: the tokenizer's :class:`~lookahead.store.identity.Fingerprint` and the config that shapes drafts
against the reader's (:class:`StoreMismatchError` naming both), every token id against the vocabulary (one pass over
the tokens, not the suffix arrays). Journal entries and deltas (:class:`lookahead.trie.TrieDelta`) are the
oracle trie's, so stores and tries merge each other's deltas.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import math
import os
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from ..files import atomic_path
from ..trie import JOURNAL_LIMIT, MAX_TOKEN_ID, Draft, TrieDelta, check_delta, check_id, derived_sources, derived_text
from . import kernels
from .identity import Fingerprint
from .journal import Journal
from .kernels import NO_HOT_IDX, NO_HOT_KIDS
from .segments import EMPTY, Buffer, Segment, merge_segments

#: what a draft reads of one source: tokens, suffix array, dead prefix, hot-node index, hot-node children
Slot = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]

__all__ = ["DEFAULT_LOCAL_TOKENS", "DEFAULT_STORE_BYTES", "DraftStore", "StagedDocuments", "StoreFileError",
           "StoreMismatchError"]

log = logging.getLogger(__name__)

FORMAT_NAME = "lookahead-store"
FORMAT_VERSION = 1
MAGIC = b"LKSTORE\x01"
DEFAULT_STORE_BYTES = 128 << 20  # 128 MiB: about 10M remembered tokens
SLOTS = kernels.SLOTS  # sources one draft reads: global segments and buffers, then the request's two buffers
_GLOBAL_SLOTS = SLOTS - 2
_MERGE_RATIO = 4  # merge the newest segment into the one before while that one is at most this many times larger
_BACKLOG = 16  # full tails that may wait for the background sealing before inserts seal them themselves
_LINEAR_DOCS = 32_768  # a request's documents past this many tokens get a suffix array of their own
#: per request, the most tokens of its documents, and of its prompt with its output, kept for drafting (the last ones)
DEFAULT_LOCAL_TOKENS = 1 << 16
_BYTES_PER_TOKEN = 13  # token + suffix-array entry + separator + busy-node tables (~3.5), amortised


class StoreFileError(ValueError):
    """A store file that cannot be read: corrupt, truncated, foreign or from another version."""


class StoreMismatchError(StoreFileError):
    """A sound store file made for another tokenizer, vocabulary or config than the reader's (the message names
    both): not corrupt, so never moved aside, but never read as this engine's either."""

#: the config values that shape what a store holds and drafts; a file with others is refused
SHAPING = ("branch_length", "max_query_length")


class _Local:
    """One live request's entries: ``stream`` (its prompt, then its output as it is counted) and ``docs``, each
    holding at most the store's ``local_tokens`` last tokens."""

    __slots__ = ("stream", "docs", "docs_index", "indexing")

    def __init__(self) -> None:
        self.stream = Buffer()
        self.docs = Buffer()
        self.docs_index: Segment | None = None  # suffix array of docs once they are large
        self.indexing = False  # a thread is sorting them


class StagedDocuments(tuple):
    """A request's documents (a tuple of token-id tuples, as :class:`~lookahead.outputs.Request` holds them) with
    their request-local drafting state built ahead, off the decode thread, by :meth:`DraftStore.stage_documents`:
    their last ``local_tokens`` tokens in one token array, and its suffix array when they are large.
    :meth:`DraftStore.insert_documents` swaps it in at once; any other reader sees the plain tuple."""

    buffer: Buffer
    index: Segment | None
    shape: tuple[int, int]  # (width, local_tokens) of the store that built it

    @property
    def kept_tokens(self) -> int:
        """Tokens kept for drafting (at most the store's ``local_tokens``)."""
        return len(self.buffer)


def _draft_of(tokens: np.ndarray, parents: np.ndarray, scores: np.ndarray, global_counts: np.ndarray, q: int
              ) -> Draft:
    """A draft kernel's arrays and match length as a :class:`Draft` (no match: the empty draft)."""
    if q <= 0:
        return Draft([], [], [], 0)
    return Draft(tokens.tolist(), parents.tolist(), scores.tolist(), int(q), global_counts.tolist())


def _last_tokens(docs: Sequence[np.ndarray], limit: int) -> list[np.ndarray]:
    """The last ``limit`` tokens of the sequences ``docs`` (later ones are kept whole first; the oldest kept one may
    lose its head)."""
    kept: list[np.ndarray] = []
    room = limit
    for doc in reversed(docs):
        if room <= 0:
            break
        if len(doc):
            kept.append(doc[-room:])
            room -= len(kept[-1])
    return kept[::-1]


def _exact_buffer(docs: Sequence[np.ndarray]) -> Buffer:
    """A buffer holding ``docs`` as its entries (uid 0), sized exactly: its next ``add`` copies it, so one made
    ahead can be shared."""
    buf = Buffer(sum(len(d) + 1 for d in docs) + 2)
    for doc in docs:
        buf.add(doc, 0)
    return buf


def _as_tokens(tokens: Sequence[int] | np.ndarray, where: str) -> np.ndarray:
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"{where}: token ids must be a flat sequence of ints, got shape {arr.shape}")
    if arr.size == 0:
        return EMPTY
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{where}: token ids must be ints, got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() >= 2**31 - 1:
        raise ValueError(f"{where}: token ids must be in 0..2**31-2, got {int(arr.min())}..{int(arr.max())}")
    return arr.astype(np.int32)


def _positive_int(name: str, value: object, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


class DraftStore:
    """Thread-safe store of token sequences that drafts like :class:`lookahead.trie.TokenTrie`, in flat arrays.

    Args:
        branch_length: drafts go at most this deep; n-grams of ``branch_length + 1`` tokens are counted.
        max_query_length: longest context suffix matched.
        store_bytes: memory for global entries; past it the oldest entries are evicted whole.
        local_weight / global_weight: weights of request-local and global counts in a node's score.
        origin: this store's id in the journal entries it makes (default: a random uuid4 hex).
        journal_limit: tokens (plus 16 per entry) the journal keeps.
        tail_tokens: global tokens kept in the linear tail before it is sealed into a segment.
        background: seal, merge and compact in a background thread (False: inside the calls that need it, for
            reproducible tests and one-shot tools).
        local_tokens: per live request, the most tokens of its documents, and of its prompt with its output so far,
            kept for drafting: the last ones (about 13 bytes each; at most ``2 * local_tokens`` per request).
    """

    def __init__(self, branch_length: int = 12, max_query_length: int = 6,
                 store_bytes: int = DEFAULT_STORE_BYTES, local_weight: float = 1.0, global_weight: float = 1.0,
                 origin: str | None = None, journal_limit: int = JOURNAL_LIMIT, tail_tokens: int = 4096,
                 background: bool = True, local_tokens: int = DEFAULT_LOCAL_TOKENS) -> None:
        self.branch_length = _positive_int("branch_length", branch_length)
        self.max_query_length = _positive_int("max_query_length", max_query_length)
        self.store_bytes = _positive_int("store_bytes", store_bytes, 1 << 16)
        self.tail_tokens = _positive_int("tail_tokens", tail_tokens)
        for name, val in (("local_weight", local_weight), ("global_weight", global_weight)):
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val) or val < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {val!r}")
        self.local_weight = float(local_weight)
        self.global_weight = float(global_weight)
        self.width = self.branch_length + 1
        self.local_tokens = _positive_int("local_tokens", local_tokens, 2 * self.width)
        self.background = bool(background)
        kernels.warm_up()  # once per process: never a compile inside a decode step
        self._lock = threading.RLock()
        self._compact_lock = threading.RLock()  # one compaction at a time (eviction may ask for one inside it)
        self._dead_lock = threading.Lock()  # one off-lock dead-prefix update at a time
        self._segments: list[Segment] = []  # oldest first
        self._frozen: list[Buffer] = []  # full tails waiting to be sealed
        self._tail = Buffer(1024)
        self._locals: dict[str, _Local] = {}
        self._entries: dict[int, int] = {}  # live global uid -> tokens (oldest first: uids grow)
        self._entry_source: dict[int, str] = {}  # uid -> source id (documents only)
        self._sources: dict[str, list[int]] = {}
        self._derived: dict[str, set[int]] = {}  # source id -> answers learned with it in their prompt
        self._entry_tags: dict[int, tuple[str, ...]] = {}  # answer uid -> the sources it was derived from
        self._removed: dict[str, int] = {}  # source id -> journal version of its last removal (tombstones)
        self._dead: set[int] = set()  # uids removed but maybe still in a segment
        self._next_uid = 1
        self._live_tokens = 0
        self._journal = Journal(uuid.uuid4().hex if origin is None else check_id("DraftStore", "origin", origin),
                                journal_limit)
        self._wake = threading.Event()
        self._worker_lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._closed = False
        self.meta: dict[str, Any] = {}  # saved with the store
        self.fingerprint: Fingerprint | None = None  # what its token ids mean (None: unknown); see bind
        self._mapped: Any = None  # the memory map a loaded store reads
        self._scratch_scale = 1
        self._scratch_key: tuple[int, int] | None = None
        self._scratch_arrays: tuple[np.ndarray, ...] = (EMPTY, EMPTY, EMPTY, EMPTY)

    # ------------------------------------------------------------------ config and size

    def config(self) -> dict[str, Any]:
        """The constructor arguments that shape drafts (saved with the store)."""
        return {"branch_length": self.branch_length, "max_query_length": self.max_query_length,
                "store_bytes": self.store_bytes, "local_weight": self.local_weight,
                "global_weight": self.global_weight}

    def num_tokens(self) -> int:
        """Live global tokens."""
        with self._lock:
            return self._live_tokens

    num_nodes = num_tokens  # the name the trie's callers use for its size

    def __len__(self) -> int:
        return self.num_tokens()

    def __repr__(self) -> str:
        return f"DraftStore(tokens={self.num_tokens()}, {', '.join(f'{k}={v!r}' for k, v in self.config().items())})"

    @property
    def nbytes(self) -> int:
        """Bytes of global data held (segments and buffers)."""
        with self._lock:
            return sum(s.nbytes for s in self._segments) + sum(b.data.nbytes for b in [*self._frozen, self._tail])

    def stats(self) -> dict[str, Any]:
        """What the store holds: tokens, entries, documents, bytes, segments, live requests."""
        with self._lock:
            return {"tokens": self._live_tokens, "entries": len(self._entries), "sources": len(self._sources),
                    "bytes": self.nbytes, "bytes_per_token": self.nbytes / max(1, self._live_tokens),
                    "segments": [s.num_tokens for s in self._segments],
                    "buffered": sum(len(b) for b in [*self._frozen, self._tail]),
                    "dead_entries": len(self._dead), "requests": len(self._locals), "store_bytes": self.store_bytes}

    # ------------------------------------------------------------------ sources one draft reads

    def _global_slots(self) -> list[Slot]:
        slots = [(s.tokens, s.sa, s.dead, s.hot_idx, s.hot_kids) for s in self._segments]
        views = [b.view() for b in [*self._frozen, self._tail] if b.used]
        if len(slots) + len(views) > _GLOBAL_SLOTS and len(views) > 1:
            views = [np.concatenate(views)]  # the background sealing fell behind: one linear source for now
        return slots + [(v, EMPTY, EMPTY, NO_HOT_IDX, NO_HOT_KIDS) for v in views]

    def _local_slots(self, request_id: str | None) -> list[Slot]:
        loc = self._locals.get(request_id) if request_id is not None else None
        if loc is None:
            return []
        slots: list[Slot] = []
        if loc.stream.used:
            slots.append((loc.stream.view(), EMPTY, EMPTY, NO_HOT_IDX, NO_HOT_KIDS))
        if loc.docs.used:
            index = loc.docs_index
            if index is not None:
                slots.append((index.tokens, index.sa, EMPTY, index.hot_idx, index.hot_kids))
            else:
                slots.append((loc.docs.view(), EMPTY, EMPTY, NO_HOT_IDX, NO_HOT_KIDS))
        return slots

    def _pack(self, request_id: str | None, with_global: bool = True, with_local: bool = True):
        """The kernels' arguments: SLOTS token arrays, suffix arrays, dead prefixes, hot-node tables (index and
        children), weights, global flags."""
        glob = self._global_slots() if with_global else []
        if len(glob) > _GLOBAL_SLOTS:  # compaction keeps segments fewer; never wait for it here
            raise RuntimeError(f"draft store: {len(glob)} segments, at most {_GLOBAL_SLOTS} can be read at once")
        local = self._local_slots(request_id) if with_local else []
        slots = glob + local
        pad = SLOTS - len(slots)
        toks = tuple([s[0] for s in slots] + [EMPTY] * pad)
        sas = tuple([s[1] for s in slots] + [EMPTY] * pad)
        deads = tuple([s[2] for s in slots] + [EMPTY] * pad)
        hot_idx = tuple([s[3] for s in slots] + [NO_HOT_IDX] * pad)
        hot_kids = tuple([s[4] for s in slots] + [NO_HOT_KIDS] * pad)
        weight = np.zeros(SLOTS)
        weight[: len(slots)] = 1.0
        is_global = np.zeros(SLOTS, np.bool_)
        is_global[: len(glob)] = True
        return toks, sas, deads, hot_idx, hot_kids, weight, is_global

    # ------------------------------------------------------------------ draft and counts

    def draft(self, context: Sequence[int], decoding_length: int, request_id: str | None = None,
              branch_length: int | None = None) -> Draft:
        """Draft a tree of at most ``decoding_length`` nodes continuing ``context``, as
        :meth:`lookahead.trie.TokenTrie.draft` does (``request_id`` adds that request's local counts)."""
        depth_limit = self.branch_length if branch_length is None else branch_length
        tail = np.asarray(list(context)[-self.max_query_length:], np.int64)
        if decoding_length <= 0 or depth_limit <= 0 or len(tail) == 0:
            return Draft([], [], [], 0)
        out = self._run_draft(request_id, decoding_length, lambda sources, local_weight, scratch: kernels.draft(
            *sources, tail, decoding_length, depth_limit, self.width, self.global_weight, local_weight, *scratch))
        return _draft_of(*out)

    def draft_ahead(self, context: Sequence[int], decoding_length: int, request_id: str | None, depth_limit: int,
                    limit: int, branch_length: int, max_query_length: int, follow_at_most: int) -> tuple[Draft, int]:
        """One step's drafting in one compiled call: the draft after ``context``'s last ``max_query_length``
        tokens (at most ``decoding_length`` nodes, ``depth_limit`` deep), its best path drafted on past the window
        depth up to ``limit`` tokens, and the follow length (the longest suffix of ``context``, at most
        ``follow_at_most`` tokens, a past output holds). The same draft and length as ``Drafter.extended`` over
        :meth:`draft` and :meth:`longest_global_suffix` give (a test holds them equal)."""
        ctx = np.asarray(list(context)[-self.width:], np.int64)
        out = self._run_draft(request_id, decoding_length, lambda sources, local_weight, scratch: kernels.draft_ahead(
            *sources, ctx, max_query_length, self.max_query_length, decoding_length, depth_limit, branch_length, limit,
            follow_at_most, self.width, self.global_weight, local_weight, *scratch))
        return _draft_of(*out[:5]), int(out[5])

    def _run_draft(self, request_id: str | None, decoding_length: int,
                   run: Callable[[tuple, float, tuple], tuple]) -> tuple:
        """``run(sources, local_weight, scratch)``: a draft kernel under the store lock over the sources a draft for
        ``request_id`` reads (the request-local ones weighted 0 without a request), run again with 4x the scratch
        while it reports (match length -1) that a scratch buffer was too small."""
        with self._lock:
            sources = self._pack(request_id)
            weight, is_global = sources[5], sources[6]
            if request_id is None:
                weight[~is_global] = 0.0
            local_weight = self.local_weight if request_id is not None else 0.0
            while True:
                out = run(sources, local_weight, self._scratch(decoding_length))
                if out[4] >= 0:
                    return out
                self._scratch_scale *= 4  # a node with more children (or occurrences) than the scratch holds

    def _scratch(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The draft kernel's scratch arrays for drafts of ``k`` nodes (made once, reused under the lock)."""
        key = (k, self._scratch_scale)
        if self._scratch_key != key:
            scale = self._scratch_scale
            self._scratch_arrays = (np.empty(scale << 14, np.int64), np.empty((6, scale << 13), np.int64),
                                    np.empty((2, scale << 13)),
                                    np.empty((2, min(k * (k + 1) + 1, scale << 12), SLOTS), np.int64))
            self._scratch_key = key
        return self._scratch_arrays

    def count(self, tokens: Sequence[int], request_id: str | None = None) -> float:
        """Occurrences of the n-gram ``tokens``: in global entries (``request_id`` None) or in that request's."""
        query = np.asarray(list(tokens), np.int64)
        if len(query) == 0 or len(query) > self.width:
            return 0.0
        with self._lock:
            toks, sas, deads, _, _, weight, is_global = self._pack(request_id, request_id is None,
                                                                   request_id is not None)
            return float(sum(kernels.count_occurrences(t, s, d, query) for t, s, d in zip(toks, sas, deads)
                             if len(t)))

    def longest_global_suffix(self, context: Sequence[int], at_most: int) -> int:
        """The longest suffix of ``context`` (at most ``at_most`` tokens, at most a window) some global entry
        holds."""
        ctx = np.asarray(list(context)[-min(at_most, self.width):], np.int64)
        if len(ctx) == 0:
            return 0
        with self._lock:
            toks, sas, deads, _, _, weight, is_global = self._pack(None, True, False)
            return int(kernels.longest_suffix(toks, sas, deads, is_global, ctx, len(ctx)))

    def source_count(self, tokens: Sequence[int], source_id: str) -> float:
        """Occurrences of the n-gram ``tokens`` in document ``source_id``."""
        query = np.asarray(list(tokens), np.int64)
        with self._lock:
            uids = set(self._sources.get(source_id, ()))
            texts = [t for uid, t in self._entry_tokens() if uid in uids]
        if not texts or len(query) == 0 or len(query) > self.width:
            return 0.0
        flat = np.concatenate([np.append(t, kernels.SEP) for t in texts]).astype(np.int32)
        return float(kernels.count_occurrences(flat, EMPTY, EMPTY, query))

    def _entry_tokens(self) -> list[tuple[int, np.ndarray]]:
        """(uid, tokens) of every live global entry, oldest first."""
        out: list[tuple[int, np.ndarray]] = []
        for seg in self._segments:
            out += [(u, seg.tokens[s:e]) for u, s, e in seg.entry_slices() if u in self._entries]
        for buf in [*self._frozen, self._tail]:
            out += [(u, t) for u, t in buf.entries() if u in self._entries]
        return out

    # ------------------------------------------------------------------ request-local entries

    def insert(self, tokens: Sequence[int], request_id: str | None = None, derived_from: Sequence[str] = ()
               ) -> None:
        """Add a sequence: a past answer (``request_id`` None: global, journaled) or a request's prompt (its first
        insert) or one of its documents (later ones). An answer ``derived_from`` documents (ids of documents its
        prompt held) goes when any of them is removed (:meth:`remove_source`)."""
        toks = _as_tokens(tokens, "insert")
        if len(toks) == 0:
            return
        tags = tuple(sorted({check_id("insert", "derived_from", sid) for sid in derived_from}))
        with self._lock:
            if request_id is None:
                self._tag(self._add_global(toks, None), tags)
                self._journal.own("insert", toks, derived_text(tags))
        if request_id is None:
            self._keep_up()
            return
        with self._lock:
            loc = self._locals.setdefault(request_id, _Local())
            prompt = not loc.stream.used
            if prompt:
                loc.stream.add(toks[-self.local_tokens:], 0)
        if not prompt:
            self._add_docs(loc, [toks])

    def stage_documents(self, documents: Sequence[Sequence[int]]) -> StagedDocuments:
        """Build a request's documents' drafting state ahead, before it joins a batch (off the decode thread): their
        last ``local_tokens`` tokens in one array, with a suffix array when those are more than 32768. Reads and
        changes nothing of the store (no lock); :meth:`insert_documents` swaps the result in."""
        kept = _last_tokens([_as_tokens(doc, "stage_documents") for doc in documents], self.local_tokens)
        buffer = _exact_buffer(kept)
        index = None
        if len(buffer) > _LINEAR_DOCS:
            index = Segment.build(buffer.view().copy(), np.array(buffer.starts, np.int64),
                                  np.zeros(len(buffer.starts), np.int64), self.width)
        staged = StagedDocuments(documents)
        staged.buffer, staged.index, staged.shape = buffer, index, (self.width, self.local_tokens)
        return staged

    def insert_documents(self, documents: Sequence[Sequence[int]], request_id: str) -> None:
        """Add a request's documents (as :meth:`insert` after its prompt does, one by one): documents staged by this
        store's :meth:`stage_documents` are swapped in at once, nothing built on the calling thread (the decode
        thread); others are added here, their suffix array sorted in a thread of its own. Either way the request
        keeps the last ``local_tokens`` tokens of its documents."""
        if isinstance(documents, StagedDocuments) and documents.shape == (self.width, self.local_tokens):
            with self._lock:
                loc = self._locals.setdefault(request_id, _Local())
                if not loc.docs.used:
                    staged = documents.buffer  # shared read-only: sized exactly, so any add copies it first
                    loc.docs = Buffer(2)
                    loc.docs.data, loc.docs.used = staged.data, staged.used
                    loc.docs.starts, loc.docs.uids = list(staged.starts), list(staged.uids)
                    loc.docs_index = documents.index
                    return
        arrays = [arr for arr in (_as_tokens(doc, "insert_documents") for doc in documents) if len(arr)]
        if arrays:
            with self._lock:
                loc = self._locals.setdefault(request_id, _Local())
            self._add_docs(loc, arrays)

    def _add_docs(self, loc: _Local, docs: list[np.ndarray]) -> None:
        """Add documents to a request's: in place while it keeps at most ``local_tokens``, else its last
        ``local_tokens`` tokens rebuilt outside the lock and swapped in. Large documents get a suffix array of their
        own, sorted in a thread of its own (numpy's sorts let the decode thread go on); until it is swapped in they
        are scanned."""
        with self._lock:
            old = loc.docs
            fits = len(old) + sum(len(d) for d in docs) <= self.local_tokens
            if fits:
                for doc in docs:
                    old.add(doc, 0)
                held: list[np.ndarray] = []
            else:
                held = [tokens for _, tokens in old.entries()]
        if not fits:
            rebuilt = _exact_buffer(_last_tokens(held + docs, self.local_tokens))
            with self._lock:
                if loc.docs is old:  # only the request's own thread adds: always, unless released meanwhile
                    loc.docs = rebuilt
        with self._lock:
            loc.docs_index = None
            start = len(loc.docs) > _LINEAR_DOCS and not loc.indexing
            loc.indexing = loc.indexing or start
        if start:
            threading.Thread(target=self._index_docs, args=(loc,), name="lookahead-docs", daemon=True).start()

    def local_tokens_held(self, request_id: str) -> dict[str, int]:
        """Tokens a live request keeps for drafting: ``stream`` (its prompt and output so far) and ``documents``
        (each at most ``local_tokens``; zeros for a request not held)."""
        with self._lock:
            loc = self._locals.get(request_id)
            return {"stream": len(loc.stream) if loc else 0, "documents": len(loc.docs) if loc else 0}

    def documents_indexed(self, request_id: str) -> bool:
        """Whether the documents of a live request are read through a suffix array (large ones, once sorted) rather
        than scanned."""
        with self._lock:
            loc = self._locals.get(request_id)
            return loc is not None and loc.docs_index is not None

    def _index_docs(self, loc: _Local) -> None:
        """Sort a request's documents until the index covers all of them (more may come while it sorts)."""
        while True:
            with self._lock:
                buffer, used = loc.docs, loc.docs.used
                docs = buffer.view().copy()
                starts = np.array(buffer.starts, np.int64)
            index = Segment.build(docs, starts, np.zeros(len(starts), np.int64), self.width)
            with self._lock:
                if loc.docs is buffer and buffer.used == used:  # no document came since
                    loc.docs_index = index
                    loc.indexing = False
                    return

    def extend(self, before: Sequence[int], new: Sequence[int], request_id: str | None = None) -> None:
        """Count ``new`` tokens of a sequence whose earlier tokens (``before``) were counted: the sequence that ends
        with ``before`` grows (a request's prompt and output; the last global entry), so ``insert(a)`` then
        ``extend(a, b)`` counts like ``insert(a + b)``. A ``before`` that ends no sequence starts a new one holding
        its last ``branch_length`` tokens and ``new``."""
        if request_id is not None and self._continue_stream(before, new, request_id):
            return
        add = _as_tokens(new, "extend")
        if len(add) == 0:
            return
        tail = _as_tokens(list(before)[-self.branch_length:], "extend")
        with self._lock:
            if request_id is None:
                self._extend_global(tail, add)
                self._journal.own("insert", np.concatenate([tail, add]), skip=len(tail))
                return
            loc = self._locals.setdefault(request_id, _Local())
            stream = loc.stream
            other = False
            if not stream.used:
                stream.add(np.concatenate([tail, add])[-self.local_tokens:], 0)
            elif stream.continue_last(tail, add):
                if len(stream) > self.local_tokens + self.local_tokens // 4:  # keep the last local_tokens
                    loc.stream = Buffer(self.local_tokens + 2)
                    loc.stream.add(stream.last_tail(self.local_tokens).copy(), 0)
            else:
                other = True
        if other:  # another line of the request (multidraft): counted with its documents
            self._add_docs(loc, [np.concatenate([tail, add])])

    def _continue_stream(self, before: Sequence[int], new: Sequence[int], request_id: str) -> bool:
        """The common case of :meth:`extend` in one compiled call: the request's output goes on where its stream
        ends, with room to spare. False (nothing done) for anything else: the general path decides."""
        with self._lock:
            loc = self._locals.get(request_id)
            if loc is None or not len(new) or len(loc.stream) + len(new) > self.local_tokens + self.local_tokens // 4:
                return False
            add = np.asarray(new, np.int64)  # [k]
            if add.ndim != 1 or add.dtype.kind not in "iu":
                return False
            return loc.stream.continue_last(np.asarray(list(before)[-self.branch_length:], np.int64), add)

    def _extend_global(self, tail: np.ndarray, add: np.ndarray) -> None:
        buf = self._tail
        if len(tail) and buf.used and buf.uids[-1] in self._entries and buf.continue_last(tail, add):
            self._entries[buf.uids[-1]] += len(add)
            self._live_tokens += len(add)
            self._after_global_insert()
        else:
            self._add_global(np.concatenate([tail, add]), None)

    def live_requests(self) -> list[str]:
        """Ids of the requests whose local entries are held (not released yet)."""
        with self._lock:
            return sorted(self._locals)

    def release(self, request_id: str) -> None:
        """Drop the local entries of ``request_id``."""
        with self._lock:
            self._locals.pop(request_id, None)

    # ------------------------------------------------------------------ global entries

    def _add_global(self, toks: np.ndarray, source: str | None) -> int:
        uid = self._next_uid
        self._next_uid += 1
        self._tail.add(toks, uid)
        self._entries[uid] = len(toks)
        self._live_tokens += len(toks)
        if source is not None:
            self._entry_source[uid] = source
            self._sources.setdefault(source, []).append(uid)
        self._after_global_insert()
        return uid

    def _tag(self, uid: int, tags: tuple[str, ...]) -> None:
        """Note that answer ``uid`` was derived from the sources ``tags``."""
        if not tags:
            return
        self._entry_tags[uid] = tags
        for sid in tags:
            self._derived.setdefault(sid, set()).add(uid)

    def _after_global_insert(self) -> None:
        if len(self._tail) >= self.tail_tokens:
            self._frozen.append(self._tail)
            self._tail = Buffer(1024)
            self._request_compaction()
        if self._live_tokens * _BYTES_PER_TOKEN > self.store_bytes:
            self._request_compaction()  # eviction runs there, never on the decode thread

    def _evict(self) -> None:
        """Remove the oldest entries until the store is at 90% of ``store_bytes`` (from compaction)."""
        with self._lock:
            target = int(0.9 * self.store_bytes / _BYTES_PER_TOKEN)
            if self._live_tokens * _BYTES_PER_TOKEN <= self.store_bytes:
                return
            gone: set[int] = set()
            left = self._live_tokens
            for uid, length in self._entries.items():
                if left <= target:
                    break
                gone.add(uid)
                left -= length
            self._forget(gone, segments=False)
            held = [seg for seg in self._segments if seg.holds_any(gone)]
        self._mark_dead(held)

    def _mark_dead(self, held: list[Segment]) -> None:
        """Give the segments ``held`` the dead prefixes of every removal so far, computed outside the store lock
        (drafts go on meanwhile), one update at a time; a segment merged away meanwhile got them from the merge."""
        with self._dead_lock:
            with self._lock:
                dead = set(self._dead)
            for seg in held:
                update = seg.dead_after(dead)
                if update is not None:
                    with self._lock:
                        seg.set_dead(*update)

    def _forget(self, uids: set[int], segments: bool = True) -> int:
        """Mark ``uids`` dead: out of every draft from now on (compaction drops their tokens); return their
        tokens. ``segments`` False leaves the segments to the caller (see :meth:`remove_source`)."""
        if not uids:
            return 0
        removed = 0
        for uid in uids:
            removed += self._entries.pop(uid, 0)
            for sid in self._entry_tags.pop(uid, ()):
                derived = self._derived.get(sid)
                if derived is not None:
                    derived.discard(uid)
                    if not derived:
                        del self._derived[sid]
            source = self._entry_source.pop(uid, None)
            if source is not None:
                left = [u for u in self._sources.get(source, []) if u != uid]
                if left:
                    self._sources[source] = left
                else:
                    self._sources.pop(source, None)
        self._live_tokens -= removed
        self._dead |= uids
        for buf in [*self._frozen, self._tail]:
            buf.drop(uids)
        if segments:
            for seg in self._segments:
                seg.mark_dead(uids)
        self._request_compaction()
        return removed

    def insert_source(self, source_id: str, tokens: Sequence[int], append: bool = False) -> None:
        """Add document ``source_id`` as a global entry (it drafts for every request), replacing what that id had
        (its text and the answers derived from it go, as on :meth:`remove_source`) unless ``append`` (then the
        tokens are one more sequence of it)."""
        check_id("insert_source", "source_id", source_id)
        toks = _as_tokens(tokens, "insert_source")  # the conversion, and any sorting below, outside the lock:
        with self._lock:  # under it only O(1) bookkeeping and one copy into the tail, so no draft waits long
            if not append:
                self._drop_source(source_id, segments=False)
            if len(toks):
                self._add_global(toks, source_id)
            self._journal.own("append" if append else "source", toks, source_id)
            held = [] if append else list(self._segments)
        self._mark_dead(held)  # a replaced text's dead prefixes, computed outside the lock
        self._keep_up()

    def remove_source(self, source_id: str, journal: bool = True) -> int:
        """Remove every entry of document ``source_id`` and every answer derived from it (learned with it in its
        prompt); return how many of the document's own tokens went (0: unknown id). Its tokens leave the journal too
        (no delta hands them on) and a tombstone stays (see :meth:`removed_since`). The removal is journaled (even
        of an unknown id) so that it reaches every store a delta of this one is merged into; ``journal`` False
        applies a tombstone that came from elsewhere without journaling it again."""
        check_id("remove_source", "source_id", source_id)
        for seg in list(self._segments):  # each segment's uid set is built here, outside the lock, if not yet
            seg.holds_any(())
        with self._lock:
            removed, uids = self._drop_source(source_id, segments=False)
            if journal:
                self._journal.own("remove", EMPTY, source_id)
            self._removed[source_id] = self._journal.version
            held = [seg for seg in self._segments if seg.holds_any(uids)]
        self._mark_dead(held)
        return removed

    def answers_derived_from(self, source_id: str) -> int:
        """How many held answers were learned as derived from ``source_id`` (see :meth:`insert`)."""
        with self._lock:
            return len(self._derived.get(source_id, ()))

    def removed_since(self, version: int) -> list[str]:
        """Ids of the sources removed at journal positions past ``version`` (tombstones outlive the journal: a
        store too far behind to take a delta applies these with ``remove_source(..., journal=False)``)."""
        with self._lock:
            return sorted(sid for sid, at in self._removed.items() if at > version)

    def _drop_source(self, source_id: str, segments: bool = True) -> tuple[int, set[int]]:
        """Forget document ``source_id``'s text (its entries, the answers derived from it, its journal tokens),
        removed or about to be replaced; return its own tokens and every uid that went. ``segments`` False leaves
        the segments to the caller (as :meth:`_forget`)."""
        own = set(self._sources.get(source_id, ()))
        removed = sum(self._entries.get(u, 0) for u in own)
        uids = own | self._derived.get(source_id, set())
        self._forget(uids, segments=segments)
        self._journal.scrub(source_id)
        return removed, uids

    def sources(self) -> list[str]:
        """Ids of the documents the store holds."""
        with self._lock:
            return sorted(self._sources)

    # ------------------------------------------------------------------ compaction (sealing, merging, dropping)

    def _keep_up(self) -> None:
        """Back-pressure for bulk loads: when more than ``_BACKLOG`` tails wait to be sealed (inserts came faster
        than the background sorts), the inserting thread seals them itself (learning answers one at a time never
        gets here; a bulk insert of documents does)."""
        with self._lock:
            behind = len(self._frozen) > _BACKLOG
        if behind:
            self._compact_now()

    def _request_compaction(self) -> None:
        if not self.background:
            self._compact_now()
            return
        with self._worker_lock:
            self._wake.set()
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="lookahead-store", daemon=True)
                self._worker.start()

    def _work(self) -> None:
        """The background compaction: runs while there is work, ends after 30 s idle (restarted on demand)."""
        while not self._closed:
            if not self._wake.wait(timeout=30.0):
                with self._worker_lock:
                    if not self._wake.is_set():
                        self._worker = None
                        return
                continue
            self._wake.clear()
            try:
                self._compact_now()
            except Exception:  # a failed merge leaves the segments as they were; drafting goes on
                log.exception("draft store: background compaction failed")
        with self._worker_lock:
            self._worker = None

    def flush(self) -> None:
        """Seal, merge and compact now (in this thread); the store is a few segments afterwards."""
        self._compact_now()

    def maintain(self, max_nodes_visited: int = 0) -> int:
        """Compatibility with the trie's between-steps hook: compaction runs in the background; returns 0."""
        return 0

    def close(self) -> None:
        """Stop the background worker."""
        self._closed = True
        self._wake.set()

    def _compact_now(self) -> None:
        """Seal the frozen tails, merge segments (log-structured), drop dead entries; the heavy work runs outside
        the store lock, each result is swapped in under it."""
        with self._compact_lock:
            self._evict()
            while True:
                with self._lock:
                    frozen = list(self._frozen)
                    combined = Buffer(sum(b.used + 1 for b in frozen))
                    for buf in frozen:
                        for uid, toks in buf.entries():
                            combined.add(toks, uid)
                if not frozen:
                    break
                seg = combined.seal(self.width)  # every full tail so far in one segment: merges keep up
                with self._lock:
                    self._frozen = [b for b in self._frozen if all(b is not f for f in frozen)]
                    seg.mark_dead(self._dead)
                    self._segments.append(seg)
            while True:
                with self._lock:
                    job = self._pick_job()
                if job is None:
                    break
                a, b = job
                done = merge_segments(a, b, self.width) if b is not None else a.compacted()
                with self._lock:
                    i = next(i for i, s in enumerate(self._segments) if s is a)
                    self._segments[i: i + (2 if b is not None else 1)] = [done]
                    done.mark_dead(self._dead)
                    if self._dead:  # forget tombstones of entries no longer held anywhere (vectorised: the lock
                        # is held, and a Python loop over every uid of a large store would stall a decode step)
                        held = np.concatenate([seg.uids for seg in self._segments] +
                                              [np.asarray(buf.uids, np.int64) for buf in [*self._frozen, self._tail]])
                        dead = np.fromiter(self._dead, np.int64, len(self._dead))
                        self._dead = set(dead[np.isin(dead, held)].tolist())

    def _pick_job(self) -> tuple[Segment, Segment | None] | None:
        """The next compaction: two adjacent segments to merge, or one to rewrite without its dead entries."""
        segs = self._segments
        for i in range(len(segs) - 1, 0, -1):
            if segs[i - 1].num_tokens <= _MERGE_RATIO * segs[i].num_tokens:
                return segs[i - 1], segs[i]
        for seg in segs:
            if seg.dead_fraction > 0.25:
                return seg, None
        if len(segs) > _GLOBAL_SLOTS - 4:
            sizes = [s.num_tokens + t.num_tokens for s, t in zip(segs, segs[1:])]
            i = int(np.argmin(sizes))
            return segs[i], segs[i + 1]
        return None

    # ------------------------------------------------------------------ journal, deltas and merge

    @property
    def origin(self) -> str:
        """This store's id in the journal entries it makes."""
        return self._journal.origin

    @property
    def journal_limit(self) -> int:
        return self._journal.limit

    @property
    def version(self) -> int:
        """Journal entries appended so far (made here or merged): the position the next one gets."""
        with self._lock:
            return self._journal.version

    def applied(self) -> dict[str, int]:
        """Per origin, the highest entry ``seq`` this store holds (its own origin: the entries it made)."""
        with self._lock:
            return dict(self._journal.applied)

    def export_delta(self, since: int = 0) -> TrieDelta:
        """The journal entries at positions ``>= since`` as a :class:`lookahead.trie.TrieDelta` (see
        :meth:`lookahead.trie.TokenTrie.export_delta`)."""
        with self._lock:
            delta = self._journal.export(since, self.branch_length)
        fp = self.fingerprint
        if fp is None:
            return delta
        return TrieDelta(delta.origin, delta.branch_length, delta.since, delta.version, delta.entries, fp.tokenizer,
                         fp.vocab_size)

    def trim_journal(self, upto: int) -> None:
        """Forget the journal entries before position ``upto``."""
        with self._lock:
            self._journal.trim(upto)

    def merge(self, delta: TrieDelta) -> int:
        """Replay the entries of ``delta`` this store has not applied yet (per origin, by ``seq``); return how many
        were applied. Raises ValueError (before applying anything) for a delta of another ``branch_length``,
        tokenizer or vocabulary, with token ids outside the vocabulary or impossible seqs
        (:func:`lookahead.trie.check_delta`)."""
        fp = self.fingerprint
        check_delta(delta, self.branch_length, "store", fp and fp.tokenizer, fp and fp.vocab_size)
        applied = 0
        for entry in delta.entries:
            with self._lock:
                if not self._journal.is_new(entry):
                    continue
                self._replay(entry)
                self._journal.note_applied(entry)
            applied += 1
            self._keep_up()
        return applied

    def _replay(self, entry: Any) -> None:
        toks = np.asarray(entry.tokens, np.int64)
        if entry.op == "remove":
            self._drop_source(entry.source)
            self._removed[entry.source] = self._journal.version + 1  # the position this entry takes
            return
        end = min(len(toks), entry.stop + self.branch_length)
        body = _as_tokens(toks[entry.start:end], "merge")
        if entry.op == "insert":
            if entry.skip > entry.start:
                self._extend_global(body[: entry.skip - entry.start], body[entry.skip - entry.start:])
            elif len(body):
                self._tag(self._add_global(body, None), derived_sources(entry.source) or ())
            return
        if entry.op == "source":
            self._drop_source(entry.source)
        if len(body):
            self._add_global(body, entry.source)

    # ------------------------------------------------------------------ files

    def token_range(self) -> tuple[int, int] | None:
        """The smallest and largest token id of the global entries (None: none held)."""
        with self._lock:
            arrays = [s.tokens for s in self._segments] + [b.view() for b in [*self._frozen, self._tail] if b.used]
        return _token_range(arrays)

    def bind(self, fingerprint: Fingerprint) -> None:
        """Say what this store's ids mean (saved with it, sent with its deltas). Raises
        :class:`StoreMismatchError` when it is bound to another tokenizer or vocabulary, or holds ids outside
        ``fingerprint``'s vocabulary."""
        if self.fingerprint == fingerprint:
            return
        why = fingerprint.conflict(self.fingerprint)
        if why is not None:
            raise StoreMismatchError(f"this store holds ids of {self.fingerprint.describe()}; "  # type: ignore[union-attr]
                                     f"it cannot be used with {fingerprint.describe()}")
        span = self.token_range()
        if span is not None and span[1] >= fingerprint.vocab_size:
            raise StoreMismatchError(f"this store holds token id {span[1]}, past the vocabulary of "
                                     f"{fingerprint.describe()} (ids 0..{fingerprint.vocab_size - 1})")
        self.fingerprint = fingerprint

    def _snapshot(self) -> tuple[dict[str, Any], list[np.ndarray]]:
        """The header and the arrays of a file holding this store's global entries (as one list of segments)."""
        with self._lock:
            segments = list(self._segments)
            buffers = [b for b in [*self._frozen, self._tail] if b.used]
            header: dict[str, Any] = {
                "format": FORMAT_NAME, "version": FORMAT_VERSION, "config": self.config(), "meta": dict(self.meta),
                "fingerprint": None if self.fingerprint is None else self.fingerprint.to_dict(),
                "origin": self.origin, "applied": dict(sorted(self._journal.applied.items())),
                "journal_version": self._journal.version, "next_uid": self._next_uid,
                "sources": {sid: list(u) for sid, u in sorted(self._sources.items())},
                "derived": {sid: sorted(u) for sid, u in sorted(self._derived.items())},
                "removed": dict(sorted(self._removed.items())),
            }
        segments = [s.compacted() for s in segments]  # dead entries are not written (unchanged when none)
        segments += [b.seal(self.width) for b in buffers]  # small: sorted here, never on the decode thread
        arrays: list[np.ndarray] = []
        described = []
        for seg in segments:
            part = {}
            for name in ("tokens", "sa", "starts", "uids", "hot_idx", "hot_kids"):
                part[name] = len(arrays)
                arrays.append(getattr(seg, name).ravel())  # the hot tables as 1-D: rows are fixed (2 and 5)
            described.append(part)
        header["segments"] = described
        header["max_token"] = int(max((int(s.tokens.max()) for s in segments if len(s.tokens)), default=-1))
        return header, arrays

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the global entries, the config and the journal position to ``path`` atomically (a temporary file,
        fsync, rename; owner-only). The file is raw arrays after a JSON header: :meth:`load` maps it."""
        header, arrays = self._snapshot()
        with atomic_path(path, mode=0o600) as tmp, open(tmp, "wb") as f:
            _write(f, header, arrays)
            f.flush()
            os.fsync(f.fileno())

    def to_bytes(self) -> bytes:
        """The file :meth:`save` writes, as bytes (to ship through Ray or HTTP)."""
        out = io.BytesIO()
        _write(out, *self._snapshot())
        return out.getvalue()

    @classmethod
    def load(cls, path: str | os.PathLike[str], journal_limit: int = JOURNAL_LIMIT, background: bool = True,
             vocab_size: int | None = None, expect: Fingerprint | None = None,
             config: dict[str, Any] | None = None) -> DraftStore:
        """Open a store file written by :meth:`save`: its arrays are memory-mapped copy-on-write, so processes share
        the pages (opening reads the tokens once, to check them).

        Raises :class:`StoreFileError` for a file that is not one, or holds token ids below 0 or at or past the
        vocabulary (``vocab_size``, else ``expect``'s, else the file's own); :class:`StoreMismatchError` for a file
        written for another tokenizer or vocabulary than ``expect`` or with other :data:`SHAPING` values than
        ``config``. A file without a fingerprint (written before they were saved) loads with a warning, as
        ``expect``'s."""
        path = os.fspath(path)
        try:
            mapped = np.memmap(path, dtype=np.uint8, mode="c")
        except (OSError, ValueError) as e:
            if os.path.exists(path) and os.path.getsize(path) == 0:
                raise StoreFileError(f"{path!r} is empty: not a {FORMAT_NAME} file") from e
            raise
        with collector_paused():
            store = cls._from_buffer(mapped, f"{path!r}", journal_limit, background, vocab_size, expect=expect,
                                     config=config)
        store._mapped = mapped
        return store

    @classmethod
    def from_bytes(cls, data: bytes, new_origin: bool = False, journal_limit: int = JOURNAL_LIMIT,
                   background: bool = True, vocab_size: int | None = None, expect: Fingerprint | None = None,
                   config: dict[str, Any] | None = None) -> DraftStore:
        """A store from :meth:`to_bytes`; ``new_origin``: under an origin of its own (a replica of a hub), what it
        holds counted as applied. Checked as :meth:`load` checks a file."""
        buf = np.frombuffer(bytearray(data), dtype=np.uint8)
        with collector_paused():
            return cls._from_buffer(buf, "store bytes", journal_limit, background, vocab_size, new_origin, expect,
                                    config)

    @classmethod
    def _from_buffer(cls, buf: np.ndarray, where: str, journal_limit: int, background: bool,
                     vocab_size: int | None, new_origin: bool = False, expect: Fingerprint | None = None,
                     config: dict[str, Any] | None = None) -> DraftStore:
        bad = f"{where} is not a valid {FORMAT_NAME} file"
        if len(buf) < 16 or bytes(buf[:8]) != MAGIC:
            raise StoreFileError(f"{bad}: it does not start with the store's magic bytes")
        size = int(np.frombuffer(bytes(buf[8:16]), "<u8")[0])
        try:
            header = json.loads(bytes(buf[16: 16 + size]).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StoreFileError(f"{bad}: cannot decode its header ({e})") from e
        if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
            raise StoreFileError(f"{bad}: format {header.get('format') if isinstance(header, dict) else None!r}")
        if header.get("version") != FORMAT_VERSION:
            raise StoreFileError(f"{bad}: version {header.get('version')!r}, this code reads {FORMAT_VERSION}")
        try:
            written = dict(header["config"])
            found = Fingerprint.from_dict(header.get("fingerprint"))
        except (KeyError, TypeError, ValueError) as e:
            raise StoreFileError(f"{bad}: {type(e).__name__}: {e}") from e
        _check_shape(where, written, config)
        if expect is not None and expect.conflict(found) is not None:
            raise StoreMismatchError(f"{where} was written for {found.describe()}, this engine's is "  # type: ignore[union-attr]
                                     f"{expect.describe()}: its token ids would mean other text. Use the "
                                     f"tokenizer that wrote it, or another file")
        try:
            store = cls(**written, origin=None if new_origin else header["origin"], journal_limit=journal_limit,
                        background=background)
            arrays = _read_arrays(buf, header["arrays"])
            applied = {str(k): int(v) for k, v in header["applied"].items()}
            segments = [Segment(arrays[p["tokens"]], arrays[p["sa"]], arrays[p["starts"]], arrays[p["uids"]],
                                width=store.width, hot_idx=_rows(arrays, p.get("hot_idx"), 2),
                                hot_kids=_rows(arrays, p.get("hot_kids"), 5)) for p in header["segments"]]
            sources = {str(k): [int(u) for u in v] for k, v in header["sources"].items()}
            derived = {str(k): [int(u) for u in v] for k, v in (header.get("derived") or {}).items()}
            removed = {str(k): int(v) for k, v in (header.get("removed") or {}).items()}
            next_uid = int(header["next_uid"])
            int(header["max_token"])
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise StoreFileError(f"{bad}: {type(e).__name__}: {e}") from e
        for seg in segments:
            if len(seg.tokens) and seg.tokens[-1] != kernels.SEP or len(seg.starts) != len(seg.uids):
                raise StoreFileError(f"{bad}: a segment is truncated")
        limit = vocab_size or (expect or found or Fingerprint(None, MAX_TOKEN_ID + 1)).vocab_size
        span = _token_range([seg.tokens for seg in segments])  # the real ids, not the header's word for them
        if span is not None and (span[0] < 0 or span[1] >= limit):
            token = span[0] if span[0] < 0 else span[1]
            raise StoreFileError(f"{bad} for this vocabulary: it holds token id {token}, the vocabulary has {limit} "
                                 f"(ids 0..{limit - 1}; written by another tokenizer?)")
        if expect is not None and found is None:
            log.warning("%s has no tokenizer fingerprint (written by an older version): loaded as unknown, its ids "
                        "checked against the vocabulary (%d); it is saved with %s from now on", where, limit,
                        expect.describe())
        store.fingerprint = expect or found
        store.meta = dict(header.get("meta") or {})
        if new_origin:
            applied[header["origin"]] = max(applied.get(header["origin"], 0), 0)
        store._journal.applied.update(applied)
        store._journal.base = int(header["journal_version"])
        store._segments = segments
        for seg in segments:  # oldest first, uids growing: the eviction order
            lengths = np.diff(np.append(seg.starts, len(seg.tokens))) - 1
            store._entries.update(zip(seg.uids.tolist(), lengths.tolist()))
        store._live_tokens = sum(store._entries.values())
        store._sources = sources
        store._entry_source = {u: sid for sid, uids in sources.items() for u in uids}
        for sid, uids in derived.items():
            for uid in uids:
                if uid in store._entries:
                    store._tag(uid, tuple(sorted({*store._entry_tags.get(uid, ()), sid})))
        store._removed = removed
        store._next_uid = next_uid
        return store


_ALIGN = 64


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's garbage collector off for a block that makes many small objects and frees none (a store header's
    entries): its full passes would walk every object of the process, many times over, in the middle of it."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _token_range(arrays: list[np.ndarray]) -> tuple[int, int] | None:
    """The smallest and largest token id in token arrays (separators left out; None: no tokens): one compiled pass
    over each, nothing copied (a mapped file's pages are only read)."""
    low, high = None, None
    for arr in arrays:
        if not len(arr):
            continue
        bottom, top = (int(v) for v in kernels.id_range(arr))
        if bottom > top:
            continue
        low = bottom if low is None else min(low, bottom)
        high = top if high is None else max(high, top)
    return None if low is None else (low, high)


def _check_shape(where: str, written: dict[str, Any], config: dict[str, Any] | None) -> None:
    """Refuse a file whose :data:`SHAPING` config differs from the reader's ``config`` (naming both)."""
    if config is None:
        return
    differ = [name for name in SHAPING if name in config and written.get(name) != config[name]]
    if differ:
        theirs = ", ".join(f"{n}={written.get(n)}" for n in differ)
        ours = ", ".join(f"{n}={config[n]}" for n in differ)
        raise StoreMismatchError(f"{where} was written with {theirs}, this engine uses {ours}: its drafts would be "
                                 f"shaped otherwise. Use the same settings, or another file")


def _rows(arrays: list[np.ndarray], index: int | None, rows: int) -> np.ndarray | None:
    """A hot table saved flat, back in its ``rows`` rows (None: a file without one; the segment builds it)."""
    if index is None:
        return None
    flat = arrays[index]
    if len(flat) % rows:
        raise ValueError(f"a hot-node table of {len(flat)} values cannot have {rows} rows")
    return flat.reshape(rows, -1)


def _write(f: Any, header: dict[str, Any], arrays: list[np.ndarray]) -> None:
    """Magic, header size, JSON header (with each array's offset, dtype and length), then the arrays, aligned."""
    specs = []
    offset = 0
    for arr in arrays:
        offset = -(-offset // _ALIGN) * _ALIGN
        specs.append([offset, arr.dtype.str, int(len(arr))])
        offset += arr.nbytes
    header = dict(header, arrays=specs)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw = raw.ljust(-(-(16 + len(raw)) // _ALIGN) * _ALIGN - 16)  # the arrays start aligned
    f.write(MAGIC + np.array([len(raw)], "<u8").tobytes() + raw)
    written = 0
    for (off, _, _), arr in zip(specs, arrays):
        if off > written:
            f.write(b"\0" * (off - written))
            written = off
        data = np.ascontiguousarray(arr)
        f.write(memoryview(data).cast("B"))
        written += data.nbytes


def _read_arrays(buf: np.ndarray, specs: list[list[Any]]) -> list[np.ndarray]:
    """Views of the arrays in a mapped file (checked to lie inside it)."""
    out = []
    size = int(np.frombuffer(bytes(buf[8:16]), "<u8")[0])
    base = 16 + size
    for off, dtype, n in specs:
        dt = np.dtype(dtype)
        if dt not in (np.dtype("<i4"), np.dtype("<i8")):
            raise ValueError(f"unexpected array dtype {dtype!r}")
        start = base + int(off)
        end = start + int(n) * dt.itemsize
        if int(off) % _ALIGN or end > len(buf) or n < 0:
            raise ValueError("an array lies outside the file")
        out.append(np.asarray(buf[start:end]).view(dt))
    return out

"""The pieces a draft store is built of: sealed segments (suffix-array indexed) and growing linear buffers.

Both hold *entries* (one past answer, one document, one request's prompt and output) as sequences in a token array
(see :mod:`lookahead.store.kernels` for the layout). A :class:`Segment` is immutable once built: merging two makes
a third, deleting entries marks them dead until the next rewrite drops them. A :class:`Buffer` grows in place and is
scanned linearly, so it stays small (a request's own tokens, the last few thousand learned ones).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import kernels
from .kernels import SEP

EMPTY = np.zeros(0, np.int32)


@dataclass
class Segment:
    """An immutable token array with its suffix array and the entries it holds.

    ``starts[i]`` is where entry ``uids[i]`` begins in ``tokens`` (entries are in position order; each is followed
    by ``SEP``); ``dead`` is the dead prefix of the suffix array (empty: no entry deleted)."""

    tokens: np.ndarray  # [n] int32, sequences each followed by SEP
    sa: np.ndarray  # [m] int32, m = non-SEP positions
    starts: np.ndarray  # [e] int64
    uids: np.ndarray  # [e] int64
    dead_uids: set[int] = field(default_factory=set)
    dead: np.ndarray = field(default_factory=lambda: EMPTY)  # [m + 1] int32 or empty
    width: int = 0  # tokens the suffix array is sorted by (0: unknown, no hot-node table)
    hot_idx: np.ndarray | None = None  # [2, h + 1] int64: see kernels.hot_table (None: built here)
    hot_kids: np.ndarray | None = None  # [5, c] int32
    _uids: set[int] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.hot_idx is None or self.hot_kids is None:
            # children are sorted by token below nodes of depth < width only
            depth = min(kernels.HOT_DEPTH, self.width - 1)
            if depth > 0:
                self.hot_idx, self.hot_kids = kernels.hot_table(self.tokens, self.sa, depth, kernels.HOT_CHILDREN)
            else:
                self.hot_idx, self.hot_kids = kernels.NO_HOT_IDX, kernels.NO_HOT_KIDS

    @classmethod
    def build(cls, tokens: np.ndarray, starts: np.ndarray, uids: np.ndarray, width: int) -> Segment:
        return cls(tokens, kernels.build_suffix_array(tokens, width), starts, uids, width=width)

    @property
    def num_tokens(self) -> int:
        """Live tokens (dead entries excluded)."""
        dead = int(self.dead[-1]) if len(self.dead) else 0
        return len(self.sa) - dead

    @property
    def nbytes(self) -> int:
        return int(self.tokens.nbytes + self.sa.nbytes + self.dead.nbytes + self.starts.nbytes + self.uids.nbytes
                   + self.hot_idx.nbytes + self.hot_kids.nbytes)  # type: ignore[union-attr]

    def entry_slices(self) -> list[tuple[int, int, int]]:
        """(uid, start, end) of every entry (end: its SEP)."""
        ends = np.append(self.starts[1:] - 1, len(self.tokens) - 1) if len(self.starts) else self.starts
        return [(int(u), int(s), int(e)) for u, s, e in zip(self.uids, self.starts, ends)]

    @property
    def dead_fraction(self) -> float:
        """Share of the suffix array that is dead."""
        return float(self.dead[-1]) / len(self.sa) if len(self.dead) and len(self.sa) else 0.0

    def mark_dead(self, uids: set[int]) -> None:
        """Mark the entries ``uids`` (those this segment holds) dead (see :meth:`dead_after`)."""
        update = self.dead_after(uids)
        if update is not None:
            self.set_dead(*update)

    def dead_after(self, uids: set[int]) -> tuple[set[int], np.ndarray] | None:
        """The dead entries and dead prefix this segment would have with ``uids`` dead too (None: no change);
        pure, so it can be computed outside the store's lock."""
        mine = {u for u in uids if u in self._uid_set()} - self.dead_uids
        if not mine:
            return None
        dead_uids = self.dead_uids | mine
        ends = np.append(self.starts[1:] - 1, len(self.tokens) - 1)
        chosen = np.isin(self.uids, np.fromiter(dead_uids, np.int64, len(dead_uids)))
        mask = kernels.span_mask(len(self.tokens), self.starts[chosen], ends[chosen])  # [n] inside a dead entry
        return dead_uids, kernels.dead_prefix(self.sa, mask)

    def set_dead(self, dead_uids: set[int], dead: np.ndarray) -> None:
        """Swap in a dead prefix whole (a draft reading the old one keeps a consistent view); nothing moves."""
        self.dead = dead
        self.dead_uids = dead_uids

    def holds_any(self, uids: set[int]) -> bool:
        held = self._uid_set()
        return any(u in held for u in uids)

    def _uid_set(self) -> set[int]:
        if self._uids is None:
            self._uids = set(self.uids.tolist())
        return self._uids

    def compacted(self) -> Segment:
        """This segment without its dead entries (the suffix array filtered, not re-sorted)."""
        if not self.dead_uids:
            return self
        keep = np.ones(len(self.tokens), np.bool_)
        starts, uids = [], []
        removed = 0
        for uid, start, end in self.entry_slices():
            if uid in self.dead_uids:
                keep[start:end + 1] = False
                removed += end + 1 - start
            else:
                starts.append(start - removed)
                uids.append(uid)
        sa = kernels.keep_suffixes(self.sa, keep)
        return Segment(kernels.select(self.tokens, keep), sa, np.array(starts, np.int64),
                       np.array(uids, np.int64), width=self.width)


def merge_segments(a: Segment, b: Segment, width: int) -> Segment:
    """One segment holding the live entries of ``a`` then ``b`` (a linear merge of their suffix arrays)."""
    a, b = a.compacted(), b.compacted()
    sa = kernels.merge_suffix_arrays(a.tokens, a.sa, b.tokens, b.sa, width)
    return Segment(kernels.concat(a.tokens, b.tokens), sa, np.concatenate([a.starts, b.starts + len(a.tokens)]),
                   np.concatenate([a.uids, b.uids]), width=width)


class Buffer:
    """A growing token array of entries, scanned linearly by the kernels; ``view()`` is what they read."""

    __slots__ = ("data", "used", "starts", "uids")

    def __init__(self, capacity: int = 256) -> None:
        self.data = np.full(max(capacity, 2), SEP, np.int32)  # data[used] is always SEP
        self.used = 0
        self.starts: list[int] = []
        self.uids: list[int] = []

    def __len__(self) -> int:
        return self.used - len(self.starts)  # tokens, SEPs excluded

    def view(self) -> np.ndarray:
        """The token array as it stands (ends with SEP)."""
        return self.data[: self.used + 1] if self.used else EMPTY

    def reserve(self, extra: int) -> None:
        """Room for ``extra`` more tokens (and their separators) without growing again."""
        need = self.used + extra + 2
        if need > len(self.data):
            grown = np.full(max(need, 2 * len(self.data)), SEP, np.int32)
            grown[: self.used + 1] = self.data[: self.used + 1]
            self.data = grown  # a reader holding the old array keeps a consistent copy

    def add(self, tokens: np.ndarray, uid: int) -> None:
        """A new entry."""
        self.reserve(len(tokens) + 1)
        self.starts.append(self.used)
        self.uids.append(uid)
        self.data[self.used: self.used + len(tokens)] = tokens
        self.used += len(tokens) + 1
        self.data[self.used - 1] = SEP
        self.data[self.used] = SEP

    def continue_last(self, tail: np.ndarray, tokens: np.ndarray) -> bool:
        """More tokens for the last entry (the sequence goes on) when it ends with ``tail``, in one compiled call;
        False, nothing changed, when there is no entry, it does not end so, or an id is outside 0..2**31-2."""
        if not self.starts:
            return False
        tail, tokens = np.asarray(tail, np.int64), np.asarray(tokens, np.int64)
        used = kernels.continue_entry(self.data, self.used, self.starts[-1], tail, tokens)
        if used == -2:  # it goes on, but the array is full: grow it, then append
            self.reserve(len(tokens))
            used = kernels.continue_entry(self.data, self.used, self.starts[-1], tail, tokens)
        if used < 0:
            return False
        self.used = used
        return True

    def last_tail(self, n: int) -> np.ndarray:
        """The last ``n`` tokens of the last entry."""
        if not self.starts:
            return EMPTY
        start = max(self.starts[-1], self.used - 1 - n)
        return self.data[start: self.used - 1]

    def entries(self) -> list[tuple[int, np.ndarray]]:
        """(uid, tokens) of every entry."""
        ends = self.starts[1:] + [self.used]
        return [(u, self.data[s: e - 1]) for u, s, e in zip(self.uids, self.starts, ends)]

    def drop(self, uids: set[int]) -> None:
        """Remove the entries ``uids`` in place (a new data array: a reader of the old one keeps its view)."""
        if not any(u in uids for u in self.uids):
            return
        kept = [(u, t.copy()) for u, t in self.entries() if u not in uids]
        self.data = np.full(len(self.data), SEP, np.int32)
        self.used = 0
        self.starts, self.uids = [], []
        for uid, toks in kept:
            self.add(toks, uid)

    def seal(self, width: int) -> Segment:
        """A segment holding this buffer's entries."""
        tokens = self.data[: self.used].copy() if self.used else np.full(1, SEP, np.int32)
        return Segment.build(tokens, np.array(self.starts, np.int64), np.array(self.uids, np.int64), width)

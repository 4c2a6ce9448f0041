"""A bounded journal of global inserts, numbered per origin: what one store hands another as a delta.

Entries are kept as (origin, seq, op, source, int32 token array, start, stop, skip) tuples, 4 bytes a token, and
handed out as :class:`lookahead.trie.JournalEntry` values (the same deltas the oracle trie makes and merges); they
sit in a deque from position ``base`` on; ``applied`` holds, per origin, the highest ``seq`` this store has (its own
origin: the entries it made), so merging is idempotent and an echo is ignored.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from typing import Any

import numpy as np

from ..trie import JournalEntry, TrieDelta, check_int, derived_sources

_ENTRY_COST = 16  # what one entry costs against the limit besides its tokens


def _holders(op: str, source: str | None, tokens: np.ndarray) -> list[str]:
    """The sources whose text an entry holds: a document's own insert, or the sources an answer was derived from
    (its ``source`` is their JSON list); none for an entry without tokens."""
    if len(tokens) == 0 or not source:
        return []
    if op != "insert":
        return [source]
    return list(derived_sources(source) or ())


class Journal:
    """Not thread-safe: the store calls it under its lock."""

    def __init__(self, origin: str, limit: int) -> None:
        self.origin = origin
        self.limit = check_int("DraftStore", "journal_limit", limit, 0)
        self.entries: deque[tuple[Any, ...]] = deque()
        self.base = 0
        self.cost = 0
        self.applied: dict[str, int] = {origin: 0}
        self.holding: dict[str, int] = {}  # source -> kept entries holding its text
        self.where: dict[str, list[int]] = {}  # source -> positions of entries that held it (increasing; some stale)

    @property
    def version(self) -> int:
        return self.base + len(self.entries)

    def own(self, op: str, tokens: np.ndarray, source: str | None = None, skip: int = 0) -> None:
        """Append an entry made here (the next seq of this origin)."""
        seq = self.applied[self.origin] + 1
        self.applied[self.origin] = seq
        self.push((self.origin, seq, op, source, np.asarray(tokens, np.int32), 0, len(tokens), skip))

    def is_new(self, entry: JournalEntry) -> bool:
        return entry.seq > self.applied.get(entry.origin, 0)

    def note_applied(self, entry: JournalEntry) -> None:
        self.applied[entry.origin] = entry.seq
        self.push((entry.origin, entry.seq, entry.op, entry.source, np.asarray(entry.tokens, np.int64),
                   entry.start, entry.stop, entry.skip))

    def push(self, entry: tuple[Any, ...]) -> None:
        self.entries.append(entry)
        self.cost += len(entry[4]) + _ENTRY_COST
        self._count(entry, 1, self.version - 1)
        while self.cost > self.limit and self.entries:
            self.pop()

    def pop(self) -> None:
        entry = self.entries.popleft()
        self.base += 1
        self.cost -= len(entry[4]) + _ENTRY_COST
        self._count(entry, -1)

    def _count(self, entry: tuple[Any, ...], step: int, at: int = -1) -> None:
        """Count ``entry`` (at position ``at``, when it is pushed) in or out of its sources' holdings."""
        for source in _holders(entry[2], entry[3], entry[4]):
            left = self.holding.get(source, 0) + step
            if left > 0:
                self.holding[source] = left
                if step > 0:
                    places = self.where.setdefault(source, [])
                    places.append(at)
                    if len(places) > 16 and places[0] < self.base:  # drop the positions popped since
                        del places[:bisect_left(places, self.base)]
            else:
                self.holding.pop(source, None)
                self.where.pop(source, None)

    def scrub(self, source: str) -> None:
        """Empty the tokens of every kept entry that holds ``source``'s text: its inserts, and answers derived from
        it (their ``source`` lists it). The entries keep their place and seq, so positions and ``applied`` stand;
        a store that merges them later adds nothing, then removes. Visits only the entries that held it (a removal
        holds the store's lock: no scan of the whole journal)."""
        if not self.holding.get(source):
            return
        for at in self.where.get(source, []).copy():
            if at < self.base:
                continue  # popped since
            i = at - self.base
            entry = self.entries[i]
            origin, seq, op, src, toks, start, stop, skip = entry
            if source in _holders(op, src, toks):
                self._count(entry, -1)
                self.cost -= len(toks)
                self.entries[i] = (origin, seq, op, src, toks[:0], 0, 0, 0)

    def export(self, since: int, branch_length: int) -> TrieDelta:
        since = check_int("export_delta", "since", since, 0)
        if since < self.base:
            raise ValueError(f"export_delta: the entries before position {self.base} are gone (trim_journal or "
                             f"journal_limit={self.limit}); since must be >= {self.base}, got {since}")
        if since > self.version:
            raise ValueError(f"export_delta: since ({since}) is past this store's version ({self.version})")
        entries = tuple(JournalEntry(o, seq, op, tuple(toks.tolist()), a, b, k, src)
                        for o, seq, op, src, toks, a, b, k in list(self.entries)[since - self.base:])
        return TrieDelta(self.origin, branch_length, since, self.version, entries)

    def trim(self, upto: int) -> None:
        upto = check_int("trim_journal", "upto", upto, 0)
        if upto > self.version:
            raise ValueError(f"trim_journal: upto ({upto}) is past this store's version ({self.version})")
        while self.base < upto:
            self.pop()

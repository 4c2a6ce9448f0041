"""Token trie that drafts speculative continuations from n-gram statistics.

Token sequences (a request's prompt and documents, past outputs) are inserted as sliding windows of
``branch_length + 1`` tokens, so each node counts how often its n-gram occurred. Counts are kept apart by origin:
global (shared by all requests) and request-local (one counter per live request). ``draft`` matches the longest
suffix of the context and expands the subtree below it best-first into a tree-shaped :class:`Draft`.

Suffix matching goes through a :class:`pygtrie.Trie` that maps every n-gram of up to ``max_query_length`` tokens
(a tuple of token ids) to its node. Each node also keeps its own child map, so inserting, drafting and pruning walk
only the nodes they need (never a whole subtree), and deeper n-grams, which are never looked up by key, cost no
index entry.

Pruning is amortised: decay is O(1) (a trie-wide epoch; each node stores its global count as of the epoch it was last
touched at, see :class:`_Node`) and rare subtrees are removed by a resumable sweep that runs in bounded slices from
``insert`` / ``extend`` (and from :meth:`TokenTrie.maintain`, which a caller may run between decoding steps), never as
a whole-trie walk inside one call except as a last resort (the hard cap). Nodes holding local counts of a live
request are never pruned.

Sharing (see :class:`TrieDelta`): every global insert (past outputs, documents) is appended to a journal, one entry
per call holding the call's tokens, so :meth:`TokenTrie.export_delta` can hand the entries to another trie and
:meth:`TokenTrie.merge` can replay them there; entries carry their origin (the trie they were first made in) and a
per-origin sequence number, so replaying is idempotent and an echo of a trie's own entries is ignored. The journal
is bounded (``journal_limit`` tokens, oldest entries dropped first) and :meth:`TokenTrie.trim_journal` forgets what
every reader has pulled.

Documents (see :meth:`TokenTrie.insert_source`): windows inserted under a source id count as global ones, and each
node also remembers how much of its count each source gave, so :meth:`TokenTrie.remove_source` takes exactly that
back (a document deleted from a vector store).
"""

from __future__ import annotations

import gzip
import heapq
import json
import math
import operator
import os
import sys
import threading
import uuid
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import pygtrie

from .files import atomic_write_bytes

__all__ = ["Draft", "JournalEntry", "TokenTrie", "TrieDelta"]

FORMAT_NAME = "lookahead-trie"
FORMAT_VERSION = 1

_PRUNE_THRESHOLD = 1.0  # a globally-only node whose decayed count falls below this is pruned with its subtree
_PRUNE_TARGET = 0.8  # pruning stops once the trie is at or below this fraction of the node budget
_HARD_CAP = 2  # past this many times its budget the trie is pruned fully inside the call (last resort)
_SWEEP_BASE = 64  # node visits an insert / extend call owes the sweep while the trie is over budget ...
_SWEEP_PER_NODE = 4  # ... plus this many per node the call created
_SWEEP_CHUNK = 1024  # owed visits are paid in slices of at least this many, between windows
_GZIP_MAGIC = b"\x1f\x8b"
DELTA_FORMAT = "lookahead-trie-delta"
JOURNAL_LIMIT = 1 << 20  # default journal_limit: tokens (plus _ENTRY_COST per entry) the journal keeps
_ENTRY_COST = 16  # what one journal entry costs against journal_limit besides its tokens
_RESIDUE = 1e-9  # a count left by remove_source below this fraction of what was taken is rounding: it becomes 0
OPS = ("insert", "source", "append", "remove")  # journal entry kinds, see JournalEntry
#: the largest seq or journal position a delta may name (2**53 - 1: exact in JSON and JavaScript); a trie that
#: learned a million entries a second would reach it after 285 years
MAX_SEQ = 2**53 - 1
#: token ids a trie can hold (int32 arrays in the draft store)
MAX_TOKEN_ID = 2**31 - 2


@dataclass(frozen=True)
class Draft:
    """A draft tree in best-first order.

    ``tokens[i]`` is node ``i``'s token, ``parents[i]`` the index of its parent (``-1``: it follows the context
    directly; a parent always comes before its children), ``scores[i]`` its mixed count (non-increasing along any
    root-to-leaf path and over the list), ``match_length`` the number of context tokens the matched suffix had
    (``0``: no match), ``global_counts[i]`` the part of node ``i``'s count that comes from past outputs.
    """

    tokens: list[int]
    parents: list[int]
    scores: list[float]
    match_length: int
    global_counts: list[float] = field(default_factory=list, compare=False)  # auxiliary: not part of equality

    def __len__(self) -> int:
        return len(self.tokens)

    def truncate(self, n: int) -> Draft:
        """First ``n`` nodes: still a valid tree, since parents precede children. ``match_length`` is kept."""
        if n < 0:
            raise ValueError(f"truncate: n must be >= 0, got {n}")
        if n >= len(self.tokens):
            return self
        return Draft(self.tokens[:n], self.parents[:n], self.scores[:n], self.match_length, self.global_counts[:n])

    def depths(self) -> list[int]:
        """Depth of each node: 1 for nodes that follow the context directly."""
        out: list[int] = []
        for p in self.parents:
            out.append(1 if p < 0 else out[p] + 1)
        return out


def _empty_draft() -> Draft:
    return Draft([], [], [], 0)


def _window_range(start: int, stop: int | None, n: int) -> tuple[int, int]:
    """``start`` and ``stop`` of windowed insertion checked and cut to ``0 <= start <= stop <= n``."""
    if isinstance(start, bool) or not hasattr(start, "__index__") or operator.index(start) < 0:
        raise ValueError(f"start must be an int >= 0, got {start!r}")
    start = operator.index(start)
    if stop is None:
        return min(start, n), n
    if isinstance(stop, bool) or not hasattr(stop, "__index__") or operator.index(stop) < start:
        raise ValueError(f"stop must be None or an int >= start ({start}), got {stop!r}")
    stop = min(operator.index(stop), n)
    return min(start, stop), stop


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(where: str, name: str, value: object, low: int) -> int:
    """``value`` as an int >= ``low``, else a ValueError naming ``where`` and ``name``."""
    if not _is_int(value) or value < low:  # type: ignore[operator]
        raise ValueError(f"{where}: {name} must be an int >= {low}, got {value!r}")
    return value  # type: ignore[return-value]


def check_id(where: str, name: str, value: object) -> str:
    """``value`` as a non-empty str, else a ValueError naming ``where`` and ``name``."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: {name} must be a non-empty str, got {value!r}")
    return value


def derived_text(sources: Sequence[str]) -> str | None:
    """How an answer's sources ride in its ``"insert"`` entry's ``source`` (None for none): a JSON list, so any id
    fits."""
    return json.dumps(list(sources)) if sources else None


def derived_sources(text: object) -> tuple[str, ...] | None:
    """The source ids an ``"insert"`` entry's ``source`` names (sorted, each once), or None when ``text`` is not a
    JSON list of non-empty strings (see :func:`derived_text`)."""
    if not isinstance(text, str):
        return None
    try:
        tags = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(tags, list) or not tags or not all(isinstance(t, str) and t for t in tags):
        return None
    return tuple(sorted(set(tags)))


def _pack(tokens: Sequence[int]) -> Sequence[int]:
    """Token ids in a compact array for the journal (8 bytes each); a tuple for ids beyond 64 bits."""
    try:
        return array("q", tokens)
    except OverflowError:
        return tuple(tokens)


@dataclass(frozen=True)
class JournalEntry:
    """One global insert of a trie's journal: enough to replay it in another trie of the same ``branch_length``.

    ``op`` is ``"insert"`` (past outputs), ``"source"`` (the windows of document ``source``, replacing what that
    source had), ``"append"`` (more windows of ``source``) or ``"remove"`` (drop ``source``; no tokens). The windows
    are ``tokens[i : i + branch_length + 1]`` for ``start <= i < stop``, the positions before ``skip`` not counted
    (an ``extend``: an earlier entry counted them). ``seq`` numbers the entries of ``origin`` (the trie the entry was
    first made in) from 1. An ``"insert"``'s ``source`` is None or, for an answer derived from documents (learned
    with them in its prompt), the JSON list of their source ids: removing any of them removes it.
    """

    origin: str
    seq: int
    op: str
    tokens: tuple[int, ...] = ()
    start: int = 0
    stop: int = 0
    skip: int = 0
    source: str | None = None

    def __post_init__(self) -> None:
        where = "journal entry"
        check_id(where, "origin", self.origin)
        if check_int(where, "seq", self.seq, 1) > MAX_SEQ:
            raise ValueError(f"{where}: seq must be <= {MAX_SEQ}, got {self.seq} (no trie makes that many entries)")
        if self.op not in OPS:
            raise ValueError(f"{where}: op must be one of {', '.join(OPS)}, got {self.op!r}")
        if self.op == "insert":
            if self.source is not None and derived_sources(self.source) is None:
                raise ValueError(f"{where}: an 'insert''s source is None or the JSON list of the source ids the answer "
                                 f"was derived from, got {self.source!r}")
        else:
            check_id(where, "source", self.source)
            if self.skip:
                raise ValueError(f"{where}: a {self.op!r} counts all its windows: skip must be 0, got {self.skip!r}")
        n = len(self.tokens)
        if self.op == "remove" and (n or self.start or self.stop or self.skip):
            raise ValueError(f"{where}: a 'remove' has no tokens and no window range")
        start = check_int(where, "start", self.start, 0)
        check_int(where, f"stop (>= start {start})", self.stop, start)
        if self.stop > n or check_int(where, "skip", self.skip, 0) > n:
            raise ValueError(f"{where}: stop ({self.stop}) and skip ({self.skip}) must be <= len(tokens) ({n})")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (lists, ints and strings)."""
        return {"origin": self.origin, "seq": self.seq, "op": self.op, "tokens": list(self.tokens),
                "start": self.start, "stop": self.stop, "skip": self.skip, "source": self.source}

    @classmethod
    def from_dict(cls, data: object) -> JournalEntry:
        """Inverse of :meth:`to_dict`; raises ValueError for anything else."""
        if not isinstance(data, dict):
            raise ValueError(f"journal entry: expected a dict, got {type(data).__name__}")
        fields = {"origin", "seq", "op", "tokens", "start", "stop", "skip", "source"}
        if set(data) != fields:
            raise ValueError(f"journal entry: keys must be {sorted(fields)}, got {sorted(map(str, data))}")
        tokens = data["tokens"]
        if not isinstance(tokens, list) or not all(_is_int(t) for t in tokens):
            raise ValueError("journal entry: tokens must be a list of ints")
        return cls(data["origin"], data["seq"], data["op"], tuple(tokens), data["start"], data["stop"],
                   data["skip"], data["source"])


@dataclass(frozen=True)
class TrieDelta:
    """Journal entries a trie exported (:meth:`TokenTrie.export_delta`), to :meth:`TokenTrie.merge` elsewhere.

    ``origin`` and ``branch_length`` are the exporting trie's, ``entries`` its journal from position ``since`` on,
    ``version`` its journal position at export: the ``since`` of the next export. ``tokenizer`` and ``vocab_size``
    say what its token ids mean (the exporting store's fingerprint, :class:`lookahead.store.Fingerprint`; None:
    unknown), so a receiver of another tokenizer refuses it.
    """

    origin: str
    branch_length: int
    since: int
    version: int
    entries: tuple[JournalEntry, ...] = ()
    tokenizer: str | None = None
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        check_id("trie delta", "origin", self.origin)
        check_int("trie delta", "branch_length", self.branch_length, 1)
        since = check_int("trie delta", "since", self.since, 0)
        if check_int("trie delta", f"version (>= since {since})", self.version, since) > MAX_SEQ:
            raise ValueError(f"trie delta: version must be <= {MAX_SEQ}, got {self.version}")
        if self.tokenizer is not None:
            check_id("trie delta", "tokenizer", self.tokenizer)
        if self.vocab_size is not None:
            check_int("trie delta", "vocab_size", self.vocab_size, 1)

    def __len__(self) -> int:
        return len(self.entries)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (lists, ints and strings), e.g. to send through Ray or HTTP."""
        return {"format": DELTA_FORMAT, "origin": self.origin, "branch_length": self.branch_length,
                "since": self.since, "version": self.version, "entries": [e.to_dict() for e in self.entries],
                "tokenizer": self.tokenizer, "vocab_size": self.vocab_size}

    @classmethod
    def from_dict(cls, data: object) -> TrieDelta:
        """Inverse of :meth:`to_dict` (a dict without ``tokenizer`` and ``vocab_size``, from older code: unknown);
        raises ValueError (naming the bad part) for anything else."""
        if not isinstance(data, dict) or data.get("format") != DELTA_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"trie delta: format is {found!r}, expected {DELTA_FORMAT!r}")
        entries = data.get("entries")
        if not isinstance(entries, list):
            raise ValueError("trie delta: 'entries' must be a list")
        parsed = []
        for i, entry in enumerate(entries):
            try:
                parsed.append(JournalEntry.from_dict(entry))
            except ValueError as e:
                raise ValueError(f"trie delta: entry {i}: {e}") from e
        return cls(data.get("origin"), data.get("branch_length"),  # type: ignore[arg-type]
                   data.get("since"), data.get("version"), tuple(parsed),  # type: ignore[arg-type]
                   data.get("tokenizer"), data.get("vocab_size"))  # type: ignore[arg-type]


def check_delta(delta: object, branch_length: int, what: str, tokenizer: str | None = None,
                vocab_size: int | None = None) -> None:
    """Refuse what cannot be merged into a ``what`` of ``branch_length`` (and, when known, of ``tokenizer`` with
    ``vocab_size`` token ids): not a :class:`TrieDelta` (TypeError); windows of another length, another tokenizer
    or vocabulary, token ids outside the vocabulary (``vocab_size``, else the delta's own) or impossible seqs
    (ValueError naming the cause). Checked before any entry is replayed: a refused delta changes nothing."""
    if not isinstance(delta, TrieDelta):
        raise TypeError(f"merge takes a TrieDelta (TrieDelta.from_dict for a dict), got {type(delta).__name__}")
    if delta.branch_length != branch_length:
        raise ValueError(f"merge: the delta's windows are {delta.branch_length + 1} tokens (branch_length "
                         f"{delta.branch_length}), this {what}'s {branch_length + 1}: they cannot be replayed")
    if tokenizer is not None and delta.tokenizer is not None and delta.tokenizer != tokenizer:
        raise ValueError(f"merge: the delta was made with tokenizer {delta.tokenizer}, this {what} holds ids of "
                         f"tokenizer {tokenizer}: the same ids mean other text")
    if vocab_size is not None and delta.vocab_size is not None and delta.vocab_size != vocab_size:
        raise ValueError(f"merge: the delta's vocabulary has {delta.vocab_size} token ids, this {what}'s "
                         f"{vocab_size}: it was made by another tokenizer")
    limit = min(vocab_size or MAX_TOKEN_ID + 1, delta.vocab_size or MAX_TOKEN_ID + 1)
    last: dict[str, int] = {}
    for i, entry in enumerate(delta.entries):
        where = f"merge: entry {i} (origin {entry.origin!r}, seq {entry.seq})"
        if entry.tokens:
            low, high = min(entry.tokens), max(entry.tokens)
            if low < 0 or high >= limit:
                raise ValueError(f"{where} holds token id {low if low < 0 else high}; token ids must be in "
                                 f"0..{limit - 1} (the vocabulary's size is {limit})")
        if entry.seq <= last.get(entry.origin, 0):
            raise ValueError(f"{where} comes after seq {last[entry.origin]} of the same origin: the seqs of one "
                             f"origin must grow")
        last[entry.origin] = entry.seq
        if entry.origin == delta.origin and entry.seq > delta.version:
            raise ValueError(f"{where} is impossible: a trie's own seq counts its own entries, which never outnumber "
                             f"its journal's entries (version {delta.version})")


class _Node:
    """One trie node: global count, per-request local counts and the child map (token -> node).

    ``count`` is the global count as of decay round ``epoch``: the effective count is
    ``count * decay ** (trie epoch - epoch)``, so decaying every count is one increment of the trie's epoch. A node is
    brought up to date (``count`` rescaled, ``epoch`` set) whenever its global count changes or the sweep visits it.
    ``sources`` (only on nodes documents counted) holds the part of ``count`` each source id gave, as of ``epoch``
    too.
    """

    __slots__ = ("count", "epoch", "local", "children", "sources")

    def __init__(self, epoch: int = 0) -> None:
        self.count = 0.0  # global count as of decay round `epoch`
        self.epoch = epoch
        self.local: dict[str, int] | None = None  # request_id -> count of that request's local inserts
        self.children: dict[int, _Node] | None = None
        self.sources: dict[str, float] | None = None  # source_id -> its part of `count`, as of `epoch`

    def total(self) -> float:
        """Stored global plus local counts: positive exactly when the node holds any count."""
        return self.count + (sum(self.local.values()) if self.local else 0)

    def catch_up(self, epoch: int, decay: float) -> None:
        """Apply the decay rounds since ``self.epoch`` to the stored global count and its per-source parts."""
        factor = decay ** (epoch - self.epoch)
        self.count *= factor
        if self.sources:
            sources = self.sources
            for sid in sources:
                sources[sid] *= factor
        self.epoch = epoch


class _SourceInfo:
    """Where a source's counts are: the first tokens of its windows (where removal starts looking) and how many
    nodes hold a part of its counts."""

    __slots__ = ("starts", "nodes")

    def __init__(self) -> None:
        self.starts: set[int] = set()
        self.nodes = 0


class _Sweep:
    """Where pruning stands: the decay epoch and a resumable depth-first walk (one pass) over the trie."""

    __slots__ = ("epoch", "frames", "active", "stalled", "removed", "global_seen")

    def __init__(self) -> None:
        self.epoch = 0  # decay rounds so far
        self.frames: list[list[Any]] = []  # the walk: [node, key, its child tokens, next position], root first
        self.active = False  # went over budget: sweep until a pass ends with the trie at its target
        self.stalled = False  # the last pass found nothing it could ever prune: wait for a release or global insert
        self.removed = False  # this pass removed a subtree
        self.global_seen = False  # this pass saw a node holding global counts only, or a global insert came

    def start_pass(self, root: _Node) -> None:
        """One decay round (every global count times ``decay``), then a fresh walk from the root."""
        self.epoch += 1
        self.frames = [[root, (), list(root.children or ()), 0]]
        self.removed = self.global_seen = False

    def end_pass(self) -> None:
        if not self.removed and not self.global_seen:
            self.stalled = True  # only nodes of live requests: no number of decay rounds would free anything

    def note_prunable(self) -> None:
        """Nodes may have become prunable (a global insert, a release): the current pass cannot stall."""
        self.global_seen = True
        self.stalled = False

    def revalidate(self) -> None:
        """Cut the walk where a node on it was removed (by release) since the last slice."""
        frames = self.frames
        for i in range(1, len(frames)):
            children = frames[i - 1][0].children
            node, key = frames[i][0], frames[i][1]
            if children is None or children.get(key[-1]) is not node:
                del frames[i:]
                return


class TokenTrie:
    """Thread-safe, bounded trie of token n-grams with global and request-local counts.

    Args:
        branch_length: windows of ``branch_length + 1`` tokens are inserted; default draft depth.
        max_query_length: longest context suffix tried when matching.
        node_budget: once the trie has more nodes than this, global counts decay and rare subtrees are pruned
            (down to about 80% of the budget).
        decay: factor applied to all global counts at each pruning round, in (0, 1).
        local_weight: weight of this request's local counts in a node's score.
        global_weight: weight of global counts in a node's score.
        origin: this trie's id in the journal entries it makes (default: a random uuid4 hex); kept by save / load.
        journal_limit: the journal keeps at most this many tokens (each entry also costs 16), dropping the oldest
            entries first; 0 keeps none. ``origin`` and ``journal_limit`` are not part of :meth:`config`.

    Pruning. Once the trie has more than ``node_budget`` nodes, a sweep walks it in rounds: each round multiplies
    every global count by ``decay`` (O(1): see :class:`_Node`) and then visits every node, removing each subtree whose
    root holds global counts only and fell below 1; rounds follow each other until one ends with the trie at or below
    80% of its budget (the counts are those of the old one-call pruning, rounds run at other moments). The sweep is
    resumable and runs in slices: an ``insert`` / ``extend`` call made while the trie is over budget visits at most
    ``64 + 4 x (nodes it created) x max(1, num_nodes // node_budget)`` nodes (paid between windows), plus the nodes
    of the subtrees it removes, so its pruning work is a constant factor of its own insert work and a short call (a
    decoding step's ``extend``) stays short; :meth:`maintain` does more of it on demand (between decoding steps,
    say). Inserting long prompts in slices (``insert(t, rid, 0, 256)``, ...) keeps every call short.

    Meanwhile the trie may exceed its budget. A pass over ``N`` nodes lets the inserts add at most about
    ``node_budget / 4`` nodes, and the next pass removes every global-only one still at count 1 (the decay took it
    below), so in practice the trie stays within a few percent of its budget; it never ends a call above the hard cap,
    ``2 x node_budget``: a window that takes the trie past it finishes the pruning at once (a whole-trie walk, the
    last resort, also used by :meth:`load`).

    Nodes holding local counts of a live request (not released yet) are never pruned: if only such nodes are left,
    the trie stays over its budget until their requests are released. The hard cap then rises to what is left plus
    the larger of ``node_budget`` and half of it, so a full prune is not retried after every window; ``release``
    lowers it again.

    Journal and merge. Every global insert call (``insert`` / ``extend`` without a request id, ``insert_source``,
    ``remove_source``) appends one :class:`JournalEntry` holding the call's tokens (never one per window), numbered
    per origin from 1. ``version`` is the number of entries appended so far (the next entry's position);
    :meth:`export_delta` returns the entries from a position on, :meth:`merge` replays the entries of a delta this trie
    has not applied yet (per origin, those with a higher ``seq`` than any applied: its own entries count as applied),
    appending them to its own journal, so a hub can pass them on. Replayed windows are counted exactly like inserted
    ones, budget, decay and pruning included: without decay, merging commutes and is idempotent. Entries before
    :meth:`trim_journal`'s position, or dropped for ``journal_limit``, are gone: exporting from before them raises.
    An origin's entries must be merged in ``seq`` order (as exported); after a gap (entries lost to trimming) the
    later ones are applied and the missing ones never will be.

    Sources. :meth:`insert_source` counts a document's windows as global ones and keeps, on each node, the part of
    its count that source gave (decayed with it); :meth:`remove_source` takes that part back and removes the nodes
    left with no count. Inserts and removals of one source id made in different tries replay in the order each trie
    receives them: give each document one owner.
    """

    def __init__(
        self,
        branch_length: int = 12,
        max_query_length: int = 6,
        node_budget: int = 200_000,
        decay: float = 0.5,
        local_weight: float = 1.0,
        global_weight: float = 1.0,
        origin: str | None = None,
        journal_limit: int = JOURNAL_LIMIT,
    ) -> None:
        for name, val in (
            ("branch_length", branch_length),
            ("max_query_length", max_query_length),
            ("node_budget", node_budget),
        ):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be an int >= 1, got {val!r}")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay!r}")
        for name, val in (("local_weight", local_weight), ("global_weight", global_weight)):
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val) or val < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {val!r}")
        self.branch_length = branch_length
        self.max_query_length = max_query_length
        self.node_budget = node_budget
        self.decay = float(decay)
        self.local_weight = float(local_weight)
        self.global_weight = float(global_weight)
        self._lock = threading.RLock()
        self._root = _Node()
        self._size = 0
        # Key index for suffix matching: every node of depth <= _index_depth, keyed by its n-gram tuple.
        self._index: pygtrie.Trie = pygtrie.Trie()
        self._index_depth = min(max_query_length, branch_length + 1)
        # request_id -> first tokens of the windows inserted for it (where release starts looking)
        self._requests: dict[str, set[int]] = {}
        self._sweep_state = _Sweep()
        self._hard_cap = _HARD_CAP * node_budget  # past it, a call prunes fully
        self._origin = uuid.uuid4().hex if origin is None else check_id("TokenTrie", "origin", origin)
        self.journal_limit = check_int("TokenTrie", "journal_limit", journal_limit, 0)
        # the journal: (origin, seq, op, source, tokens, start, stop, skip) from position _journal_base on
        self._journal: deque[tuple[Any, ...]] = deque()
        self._journal_base = 0
        self._journal_cost = 0  # tokens in the journal plus _ENTRY_COST per entry
        self._applied: dict[str, int] = {self._origin: 0}  # origin -> highest seq applied (own: entries made)
        self._sources: dict[str, _SourceInfo] = {}
        self._filling: _SourceInfo | None = None  # the source being inserted: kept even if pruning empties it

    # ------------------------------------------------------------------ config and size

    def config(self) -> dict[str, Any]:
        """The constructor arguments of this trie."""
        return {
            "branch_length": self.branch_length,
            "max_query_length": self.max_query_length,
            "node_budget": self.node_budget,
            "decay": self.decay,
            "local_weight": self.local_weight,
            "global_weight": self.global_weight,
        }

    def live_requests(self) -> list[str]:
        """Ids of the requests whose local counts are held (not released yet)."""
        with self._lock:
            return sorted(self._requests)

    def num_nodes(self) -> int:
        """Number of nodes in the trie (the root excluded)."""
        with self._lock:
            return self._size

    def __len__(self) -> int:
        return self.num_nodes()

    def __repr__(self) -> str:
        return f"TokenTrie(num_nodes={self.num_nodes()}, {', '.join(f'{k}={v!r}' for k, v in self.config().items())})"

    def _find(self, key: tuple[int, ...]) -> _Node | None:
        if len(key) <= self._index_depth:
            return self._index.get(key)
        node: _Node | None = self._root
        for t in key:
            node = node.children.get(t) if node.children else None  # type: ignore[union-attr]
            if node is None:
                return None
        return node

    def _effective(self, node: _Node) -> float:
        """The global count of ``node`` after every decay round so far."""
        epoch = self._sweep_state.epoch
        return node.count if node.epoch == epoch else node.count * self.decay ** (epoch - node.epoch)

    def count(self, tokens: Sequence[int], request_id: str | None = None) -> float:
        """Count of the n-gram ``tokens``: global (decayed, as pruning left it) if ``request_id`` is None, else that
        request's local count."""
        key = tuple(int(t) for t in tokens)
        with self._lock:
            node = self._find(key) if key else None
            if node is None:
                return 0.0
            if request_id is None:
                return self._effective(node)
            return float(node.local.get(request_id, 0)) if node.local else 0.0

    def longest_global_suffix(self, context: Sequence[int], at_most: int) -> int:
        """The longest suffix of ``context`` (at most ``at_most`` tokens) that is a path with a global count."""
        length = min(at_most, len(context))
        while length > 0 and self.count(context[-length:]) <= 0:
            length -= 1
        return length

    def source_count(self, tokens: Sequence[int], source_id: str) -> float:
        """The part of the global count of the n-gram ``tokens`` that source ``source_id`` gave (decayed)."""
        key = tuple(int(t) for t in tokens)
        with self._lock:
            node = self._find(key) if key else None
            if node is None or not node.sources or source_id not in node.sources:
                return 0.0
            epoch = self._sweep_state.epoch
            return node.sources[source_id] * self.decay ** (epoch - node.epoch)

    # ------------------------------------------------------------------ insert

    def insert(self, tokens: Sequence[int], request_id: str | None = None, start: int = 0,
               stop: int | None = None) -> None:
        """Insert every window ``tokens[i : i + branch_length + 1]`` with ``start <= i < stop`` (default: all).

        ``request_id`` None counts the windows as global (past outputs); otherwise as local to that request. Windows
        are cut by the end of ``tokens`` only, never by ``stop``, so a long prompt inserted in slices
        (``insert(t, rid, 0, 256)``, ``insert(t, rid, 256, 512)``, ...) leaves the same counts as ``insert(t, rid)``,
        and each call reads only the tokens its windows cover. ``stop`` past the end is cut to it, like a slice.
        """
        start, stop = _window_range(start, stop, len(tokens))
        end = min(len(tokens), stop + self.branch_length)  # one past the last token a counted window reaches
        toks = [int(t) for t in tokens[start:end]]
        with self._lock:
            self._count_windows(toks, 0, stop - start, 0, request_id)
            if request_id is None and stop > start:
                self._journal_own("insert", toks, 0, stop - start, 0, None)

    def extend(self, before: Sequence[int], new: Sequence[int], request_id: str | None = None) -> None:
        """Count the tokens ``new`` of a stream whose earlier tokens ``before`` were counted already.

        ``insert(a)`` then ``extend(a, b)`` leaves the same counts as ``insert(a + b)``: the windows that ended early
        at the end of ``a`` grow into ``b`` and the windows starting in ``b`` are added. Only the last
        ``branch_length`` tokens of ``before`` matter. This lets a request draft from its own output right away
        (prompt lookup style) instead of once a whole window of it is complete.
        """
        tail = [int(t) for t in before[-self.branch_length:]]
        toks = tail + [int(t) for t in new]
        counted = len(tail)
        first = max(0, counted - self.branch_length)
        with self._lock:
            self._count_windows(toks, first, len(toks), counted, request_id)
            if request_id is None and len(toks) > counted:
                self._journal_own("insert", toks, first, len(toks), counted, None)

    def maintain(self, max_nodes_visited: int = 4096) -> int:
        """Do up to about ``max_nodes_visited`` node visits of pruning now; return how many were done.

        Meant for a caller with idle time (between decoding steps, say): it sweeps whenever the trie holds more than
        80% of its budget or a round is under way, so inserts rarely find pruning to do. Returns 0 when there is
        nothing to do (the trie is small enough, or only nodes of live requests are left); the visits may be
        exceeded by the nodes of the last subtree removed.
        """
        limit = operator.index(max_nodes_visited)
        if limit < 0:
            raise ValueError(f"max_nodes_visited must be >= 0, got {max_nodes_visited!r}")
        with self._lock:
            if self._size > self._prune_target():
                self._sweep_state.active = True
            return self._sweep(limit)

    def _count_windows(self, toks: list[int], first: int, last: int, counted: int, request_id: str | None,
                       source: str | None = None) -> None:
        """Count the windows of ``toks`` starting at ``first..last-1``, their positions ``counted..`` only; the
        positions before ``counted`` were counted by an earlier call and are only walked (or re-created). Global
        counts (``request_id`` None) may come from ``source`` (registered in ``_sources``). Pays the pruning sweep
        its share between windows."""
        n = len(toks)
        width = self.branch_length + 1
        index_depth = self._index_depth
        index = self._index
        sweep = self._sweep_state
        decay = self.decay
        starts = None if request_id is None else self._requests.setdefault(request_id, set())
        src = None if source is None else self._sources[source]
        owed = _SWEEP_BASE
        for i in range(first, last):
            if starts is None:
                sweep.note_prunable()  # new global-only nodes: prunable after some decay rounds
            epoch = sweep.epoch
            node = self._root
            made = self._size
            if starts is not None and i >= counted:
                starts.add(toks[i])
            elif src is not None and i >= counted:
                src.starts.add(toks[i])
            for j in range(i, min(i + width, n)):
                t = toks[j]
                children = node.children
                child = children.get(t) if children is not None else None
                if child is None:
                    child = _Node(epoch)
                    if children is None:
                        node.children = children = {}
                    children[t] = child
                    if j - i < index_depth:
                        index[tuple(toks[i : j + 1])] = child
                    self._size += 1
                if j >= counted:
                    if starts is None:
                        if child.epoch != epoch:
                            child.catch_up(epoch, decay)
                        child.count += 1.0
                        if src is not None:
                            parts = child.sources
                            if parts is None:
                                child.sources = {source: 1.0}  # type: ignore[dict-item]
                                src.nodes += 1
                            elif source in parts:
                                parts[source] += 1.0  # type: ignore[index]
                            else:
                                parts[source] = 1.0  # type: ignore[index]
                                src.nodes += 1
                    else:
                        loc = child.local
                        if loc is None:
                            child.local = {request_id: 1}
                        else:
                            loc[request_id] = loc.get(request_id, 0) + 1
                node = child
            owed = self._pay_sweep(owed, self._size - made)
        if sweep.active:
            self._sweep(owed)

    def _pay_sweep(self, owed: int, created: int) -> int:
        """After a window that created ``created`` nodes: add its share to the visits ``owed`` to the sweep, pay
        them once they make a slice (keeping the call's base share for its end), prune fully past the hard cap;
        return what is still owed."""
        budget = self.node_budget
        sweep = self._sweep_state
        if self._size > budget:
            sweep.active = True
        if sweep.active:  # a pass visits every node: pay more per new node when the trie is far over budget
            owed += _SWEEP_PER_NODE * created * max(1, self._size // budget)
            if owed >= _SWEEP_CHUNK + _SWEEP_BASE:
                self._sweep(owed - _SWEEP_BASE)
                owed = _SWEEP_BASE
        if self._size > self._hard_cap:
            self._prune_fully()
        return owed

    # ------------------------------------------------------------------ draft

    def draft(
        self,
        context: Sequence[int],
        decoding_length: int,
        request_id: str | None = None,
        branch_length: int | None = None,
    ) -> Draft:
        """Draft a tree of at most ``decoding_length`` nodes continuing ``context``.

        The longest suffix of ``context`` (at most ``max_query_length`` tokens) whose node has a child with a
        positive score wins; its subtree is expanded best-first by score, at most ``branch_length`` (default
        ``self.branch_length``) levels deep. Score = ``local_weight`` * this request's local count +
        ``global_weight`` * global count; nodes scoring 0 are left out. Ties go to the shallower node, then to the
        smaller token id, then to the earlier pushed node, so drafts are reproducible.
        """
        depth_limit = self.branch_length if branch_length is None else branch_length
        n = len(context)
        qmax = min(self.max_query_length, n)
        if decoding_length <= 0 or depth_limit <= 0 or qmax <= 0:
            return _empty_draft()
        tail = tuple(int(t) for t in context[n - qmax :])
        with self._lock:
            for q in range(qmax, 0, -1):
                node = self._find(tail[qmax - q :])
                if node is None or not node.children:
                    continue
                draft = self._expand(node, decoding_length, depth_limit, request_id, q)
                if draft is not None:
                    return draft
        return _empty_draft()

    def _expand(self, node: _Node, k: int, depth_limit: int, request_id: str | None, q: int) -> Draft | None:
        """Best-first expansion of the subtree under ``node``; None if no child has a positive score."""
        gw = self.global_weight
        lw = self.local_weight if request_id is not None else 0.0
        epoch = self._sweep_state.epoch
        decay = self.decay
        heap: list[tuple[float, int, int, int, _Node, int, float]] = []
        seq = 0
        for t, c in node.children.items():  # type: ignore[union-attr]
            g = c.count if c.epoch == epoch else c.count * decay ** (epoch - c.epoch)
            s = gw * g
            if lw and c.local:
                s += lw * c.local.get(request_id, 0)  # type: ignore[arg-type]
            if s > 0:
                heap.append((-s, 1, t, seq, c, -1, g))
                seq += 1
        if not heap:
            return None
        heapq.heapify(heap)
        tokens: list[int] = []
        parents: list[int] = []
        scores: list[float] = []
        global_counts: list[float] = []
        push, pop = heapq.heappush, heapq.heappop
        while heap and len(tokens) < k:
            neg, depth, t, _, c, p, g = pop(heap)
            idx = len(tokens)
            tokens.append(t)
            parents.append(p)
            scores.append(-neg)
            global_counts.append(g)
            if depth < depth_limit and c.children:
                d1 = depth + 1
                for t2, c2 in c.children.items():
                    g = c2.count if c2.epoch == epoch else c2.count * decay ** (epoch - c2.epoch)
                    s = gw * g
                    if lw and c2.local:
                        s += lw * c2.local.get(request_id, 0)  # type: ignore[arg-type]
                    if s > 0:
                        push(heap, (-s, d1, t2, seq, c2, idx, g))
                        seq += 1
        return Draft(tokens, parents, scores, q, global_counts)

    # ------------------------------------------------------------------ release and pruning

    def release(self, request_id: str) -> None:
        """Drop all local counts of ``request_id``; nodes left without any count are removed."""
        with self._lock:
            starts = self._requests.pop(request_id, None)
            if not starts or not self._root.children:
                return
            self._sweep_state.note_prunable()  # nodes it held may be global-only now, some visited already
            self._hard_cap = min(self._hard_cap, self._cap_above(self._size))

            def holds(node: _Node) -> bool:
                return bool(node.local) and request_id in node.local  # type: ignore[operator]

            def take(node: _Node) -> bool:
                loc = node.local
                assert loc is not None
                del loc[request_id]
                if loc:
                    return False
                node.local = None
                return node.count <= 0.0

            self._strip(starts, holds, take)

    def _strip(self, starts: Iterable[int], holds: Callable[[_Node], bool], take: Callable[[_Node], bool]) -> int:
        """Take one owner's counts (a request's or a source's) out of the nodes that hold them, and remove the nodes
        left empty with their subtrees; return how many nodes were removed.

        The nodes that ``holds`` form a subtree under the root's children ``starts`` (every window counts its
        prefixes, so an owner's counts shrink with depth). ``take(node)`` subtracts the owner's part and says
        whether the node holds nothing else now (its subtree then holds nothing either)."""
        removed = 0
        stack: list[tuple[_Node, tuple[int, ...], list[int]]] = [(self._root, (), sorted(starts))]
        while stack:
            node, key, tokens = stack.pop()
            for t in tokens:
                child = node.children.get(t) if node.children else None
                if child is None or not holds(child):
                    continue
                ckey = key + (t,)
                if take(child):
                    removed += self._remove(node, t, ckey)
                elif child.children:
                    stack.append((child, ckey, list(child.children)))
        return removed

    def _remove(self, parent: _Node, token: int, key: tuple[int, ...]) -> int:
        """Remove ``parent``'s child ``token`` (at ``key``) with its subtree; return how many nodes went."""
        children = parent.children
        assert children is not None
        node = children.pop(token)
        if not children:
            parent.children = None
        if len(key) <= self._index_depth:
            del self._index[key:]
        removed = 0
        stack = [node]
        while stack:
            cur = stack.pop()
            removed += 1
            if cur.sources:
                for sid in cur.sources:
                    self._source_lost(sid)
            if cur.children:
                stack.extend(cur.children.values())
        self._size -= removed
        return removed

    def _source_lost(self, source_id: str) -> None:
        """A node holding part of ``source_id``'s counts was removed: forget the source once none is left."""
        info = self._sources.get(source_id)
        if info is None:
            return
        info.nodes -= 1
        if info.nodes <= 0 and info is not self._filling:
            del self._sources[source_id]

    def _prune_target(self) -> int:
        return int(self.node_budget * _PRUNE_TARGET)

    def _sweep(self, max_visits: int) -> int:
        """Run the pruning sweep for about ``max_visits`` node visits; return the visits made. A pass over the trie
        starts with one decay round and, once started, runs to its end (removing all it can); a new one starts only
        while the trie is above its target and something may still be pruned."""
        state = self._sweep_state
        target = self._prune_target()
        visited = 0
        while visited < max_visits and not state.stalled and (state.frames or self._size > target):
            if not state.frames:
                state.start_pass(self._root)
            visited += self._sweep_slice(max_visits - visited)
            if not state.frames:
                state.end_pass()
        if not state.frames and self._size <= target:
            state.active = False
        return visited

    def _sweep_slice(self, max_visits: int) -> int:
        """Continue the current pass for up to ``max_visits`` node visits (plus the nodes of removed subtrees);
        return the visits made."""
        state = self._sweep_state
        frames = state.frames
        state.revalidate()
        epoch = state.epoch
        decay = self.decay
        visited = 0
        while frames and visited < max_visits:
            frame = frames[-1]
            node, key, tokens, pos = frame
            end = len(tokens)
            while pos < end:  # the children of one node, until the walk goes deeper or the slice is done
                t = tokens[pos]
                pos += 1
                children = node.children
                child = children.get(t) if children is not None else None
                if child is None:
                    continue  # removed since the frame was listed
                visited += 1
                if child.epoch != epoch:
                    child.catch_up(epoch, decay)
                if child.local is None:
                    if child.count < _PRUNE_THRESHOLD:
                        visited += self._remove(node, t, key + (t,))
                        state.removed = True
                        if visited >= max_visits:
                            break
                        continue
                    state.global_seen = True
                if child.children:
                    frames.append([child, key + (t,), list(child.children), 0])
                    break
                if visited >= max_visits:
                    break
            frame[3] = pos
            if pos >= end and frames[-1] is frame:
                frames.pop()
        return visited

    def _prune_fully(self) -> None:
        """Last resort (the trie passed its hard cap): sweep, unbounded, until the trie is at its target or only
        nodes of live requests are left; then put the hard cap ``node_budget`` above what is left."""
        self._sweep_state.active = True
        self._sweep_state.stalled = False
        self._sweep(sys.maxsize)
        self._hard_cap = self._cap_above(self._size)

    def _cap_above(self, left: int) -> int:
        """The hard cap over ``left`` nodes that pruning cannot remove (live requests' nodes): ``2 x node_budget``,
        or ``left`` plus the larger of ``node_budget`` and ``left / 2`` (room for the sweep to keep pace)."""
        return max(_HARD_CAP * self.node_budget, left + max(self.node_budget, left // 2))

    # ------------------------------------------------------------------ sources (documents with ids)

    def insert_source(self, source_id: str, tokens: Sequence[int], start: int = 0, stop: int | None = None,
                      append: bool = False) -> None:
        """Insert the windows of document ``source_id`` like ``insert(tokens, None, start, stop)`` (global counts:
        they draft for every request), remembering which counts it gave so :meth:`remove_source` can take them back.

        A source id inserted again is replaced (what it had is removed first), unless ``append`` is true: then the
        windows add to what it has (a long document inserted in slices, ``append=True`` from the second slice on).
        """
        check_id("insert_source", "source_id", source_id)
        start, stop = _window_range(start, stop, len(tokens))
        end = min(len(tokens), stop + self.branch_length)
        toks = [int(t) for t in tokens[start:end]]
        with self._lock:
            self._add_source(source_id, toks, 0, stop - start, replace=not append)
            self._journal_own("append" if append else "source", toks, 0, stop - start, 0, source_id)

    def remove_source(self, source_id: str) -> int:
        """Take back every count source ``source_id`` gave and remove the nodes left with no count (global, other
        sources' or live requests'); return how many nodes were removed. An unknown id removes nothing (0), but the
        removal is journaled all the same, so it reaches the tries a delta carries it to."""
        check_id("remove_source", "source_id", source_id)
        with self._lock:
            removed = self._drop_source(source_id)
            self._journal_own("remove", [], 0, 0, 0, source_id)
            return removed

    def sources(self) -> list[str]:
        """The ids of the sources that still hold counts in some node (pruning may have removed all of a source's)."""
        with self._lock:
            return sorted(self._sources)

    def _add_source(self, source_id: str, toks: list[int], first: int, last: int, replace: bool) -> None:
        """Count the windows ``first..last-1`` of ``toks`` as global counts of ``source_id`` (after removing what
        it had, if ``replace``)."""
        if replace:
            self._drop_source(source_id)
        info = self._sources.setdefault(source_id, _SourceInfo())
        self._filling = info
        try:
            self._count_windows(toks, first, last, 0, None, source_id)
        finally:
            self._filling = None
            if info.nodes <= 0:
                self._sources.pop(source_id, None)

    def _drop_source(self, source_id: str) -> int:
        """Subtract ``source_id``'s parts from the counts of its nodes (clamped at 0), removing the nodes left with
        no count; return how many nodes were removed."""
        info = self._sources.pop(source_id, None)
        if info is None or not self._root.children:
            return 0
        self._sweep_state.note_prunable()  # lowered counts may be prunable now
        epoch, decay = self._sweep_state.epoch, self.decay

        def holds(node: _Node) -> bool:
            return bool(node.sources) and source_id in node.sources  # type: ignore[operator]

        def take(node: _Node) -> bool:
            if node.epoch != epoch:
                node.catch_up(epoch, decay)
            parts = node.sources
            assert parts is not None
            taken = parts.pop(source_id)
            if not parts:
                node.sources = None
            left = node.count - taken
            node.count = left if left > taken * _RESIDUE else 0.0
            return node.count <= 0.0 and node.local is None

        return self._strip(info.starts, holds, take)

    # ------------------------------------------------------------------ journal, deltas and merge

    @property
    def origin(self) -> str:
        """This trie's id in the journal entries it makes."""
        return self._origin

    @property
    def version(self) -> int:
        """Journal entries appended so far (made here or merged): the position the next one gets."""
        with self._lock:
            return self._journal_base + len(self._journal)

    def applied(self) -> dict[str, int]:
        """Per origin, the highest entry ``seq`` this trie holds (its own origin: the entries it made)."""
        with self._lock:
            return dict(self._applied)

    def export_delta(self, since: int = 0) -> TrieDelta:
        """The journal entries at positions ``>= since`` (made here or merged), as a :class:`TrieDelta` whose
        ``version`` is the ``since`` of the next export. Raises ValueError if ``since`` is past :attr:`version` or
        before the entries still kept (trimmed by :meth:`trim_journal` or dropped for ``journal_limit``)."""
        since = check_int("export_delta", "since", since, 0)
        with self._lock:
            base, version = self._journal_base, self._journal_base + len(self._journal)
            if since < base:
                raise ValueError(f"export_delta: the entries before position {base} are gone (trim_journal or "
                                 f"journal_limit={self.journal_limit}); since must be >= {base}, got {since}")
            if since > version:
                raise ValueError(f"export_delta: since ({since}) is past this trie's version ({version})")
            raw = list(islice(self._journal, since - base, None))
        entries = tuple(JournalEntry(o, seq, op, tuple(toks), a, b, k, src) for o, seq, op, src, toks, a, b, k in raw)
        return TrieDelta(self._origin, self.branch_length, since, version, entries)

    def merge(self, delta: TrieDelta) -> int:
        """Replay the entries of ``delta`` this trie has not applied yet; return how many were applied.

        Per origin, an entry is applied when its ``seq`` is above the highest applied so far (this trie's own
        entries count as applied), so merging a delta twice, overlapping deltas or an echo of this trie's own
        entries is harmless. Applied entries join this trie's journal (with their origin and seq). Budget, decay and
        pruning work as after inserts. Raises ValueError if ``delta`` comes from a trie of another branch_length.
        """
        check_delta(delta, self.branch_length, "trie")
        applied = 0
        for entry in delta.entries:
            with self._lock:  # one entry at a time: decoding threads get the trie between entries
                if entry.seq <= self._applied.get(entry.origin, 0):
                    continue
                self._replay(entry)
                self._applied[entry.origin] = entry.seq
                self._journal_push((entry.origin, entry.seq, entry.op, entry.source, _pack(entry.tokens),
                                    entry.start, entry.stop, entry.skip))
            applied += 1
        return applied

    def trim_journal(self, upto: int) -> None:
        """Forget the journal entries before position ``upto`` (e.g. those every reader has exported); raises
        ValueError if ``upto`` is past :attr:`version`."""
        upto = check_int("trim_journal", "upto", upto, 0)
        with self._lock:
            version = self._journal_base + len(self._journal)
            if upto > version:
                raise ValueError(f"trim_journal: upto ({upto}) is past this trie's version ({version})")
            while self._journal_base < upto:
                self._journal_pop()

    def _replay(self, entry: JournalEntry) -> None:
        """Apply one journal entry to the counts."""
        if entry.op == "remove":
            self._drop_source(entry.source)  # type: ignore[arg-type]
            return
        toks = list(entry.tokens)
        if entry.op == "insert":
            self._count_windows(toks, entry.start, entry.stop, entry.skip, None)
        else:
            source: str = entry.source  # type: ignore[assignment]
            self._add_source(source, toks, entry.start, entry.stop, replace=entry.op == "source")

    def _journal_own(self, op: str, toks: list[int], start: int, stop: int, skip: int, source: str | None) -> None:
        """Append an entry made by this trie (the next seq of its origin)."""
        seq = self._applied[self._origin] + 1
        self._applied[self._origin] = seq
        self._journal_push((self._origin, seq, op, source, _pack(toks), start, stop, skip))

    def _journal_push(self, entry: tuple[Any, ...]) -> None:
        """Append ``entry``; drop the oldest entries while the journal is over ``journal_limit``."""
        self._journal.append(entry)
        self._journal_cost += len(entry[4]) + _ENTRY_COST
        while self._journal_cost > self.journal_limit:
            self._journal_pop()

    def _journal_pop(self) -> None:
        entry = self._journal.popleft()
        self._journal_base += 1
        self._journal_cost -= len(entry[4]) + _ENTRY_COST

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the config and global counts to ``path`` atomically (JSON; gzip-compressed if it ends in .gz).

        Nodes are stored in preorder as ``[parent_index, token, count]`` (``-1``: child of the root) with their
        effective (decayed) global counts; request-local counts are not saved. ``sources`` maps each source id to
        ``[node_index, part]`` pairs. The journal is not saved, but ``origin``, the per-origin applied ``seq``
        (``applied``) and the journal position (``journal_version``) are, so a loaded trie neither re-applies the
        entries it holds nor reuses its own seq numbers or positions.
        """
        with self._lock:
            nodes: list[list[float | int]] = []
            parts: dict[str, list[list[float | int]]] = {}
            stack: list[tuple[int, int, _Node]] = [(-1, t, c) for t, c in _sorted_children(self._root, reverse=True)]
            while stack:
                parent_idx, t, node = stack.pop()
                count = self._effective(node)
                if count <= 0.0:
                    continue  # local-only (or decayed to nothing): so is its subtree
                if parent_idx >= 0:
                    count = min(count, nodes[parent_idx][2])  # never above the parent's, whatever the rounding
                idx = len(nodes)
                nodes.append([parent_idx, t, count])
                if node.sources:
                    factor = count / node.count if node.count > 0 else 0.0  # the node's decay (and clamp)
                    for sid, part in node.sources.items():
                        parts.setdefault(sid, []).append([idx, min(part * factor, count)])
                stack.extend((idx, t2, c2) for t2, c2 in _sorted_children(node, reverse=True))
            doc = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": self.config(), "nodes": nodes,
                   "origin": self._origin, "applied": dict(sorted(self._applied.items())),
                   "journal_version": self._journal_base + len(self._journal),
                   "sources": {sid: parts[sid] for sid in sorted(parts)}}
        data = json.dumps(doc, separators=(",", ":")).encode("utf-8")
        path = os.fspath(path)
        if path.endswith(".gz"):
            data = gzip.compress(data, mtime=0)
        atomic_write_bytes(path, data, mode=0o600)  # owner-only: the learned outputs may be private

    @classmethod
    def load(cls, path: str | os.PathLike[str], journal_limit: int = JOURNAL_LIMIT) -> TokenTrie:
        """Read a trie written by :meth:`save` (its journal starts empty, at the saved position). Raises ValueError
        for a corrupt, foreign or wrong-version file."""
        path = os.fspath(path)
        where = f"{path!r} is not a valid {FORMAT_NAME} file"
        doc = _read_doc(path, where)
        config = doc.get("config")
        if not isinstance(config, dict):
            raise ValueError(f"{where}: missing 'config' object")
        origin, applied, position = _journal_state(doc, where)
        try:
            trie = cls(**config, origin=origin, journal_limit=journal_limit)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: bad config ({e})") from e
        trie._applied.update(applied)
        trie._journal_base = position
        built, parents = trie._build_nodes(doc.get("nodes"), where)
        trie._load_sources(doc.get("sources", {}), built, parents, doc["nodes"], where)
        if trie._size > trie.node_budget:
            trie._prune_fully()  # loading is not a hot path: get within the budget at once
        return trie

    def _build_nodes(self, nodes: object, where: str) -> tuple[list[_Node], list[int]]:
        """Build the saved ``[parent, token, count]`` nodes into this (empty) trie; return them and their parents'
        indices."""
        if not isinstance(nodes, list):
            raise ValueError(f"{where}: missing 'nodes' list")
        built: list[_Node] = []
        parents: list[int] = []
        keys: list[tuple[int, ...]] = []
        for i, entry in enumerate(nodes):
            if not (isinstance(entry, list) and len(entry) == 3):
                raise ValueError(f"{where}: node {i} is not a [parent, token, count] triple")
            p, t, c = entry
            if not _is_int(p) or not -1 <= p < i:
                raise ValueError(f"{where}: node {i} has a bad parent index {p!r}")
            if not _is_int(t):
                raise ValueError(f"{where}: node {i} has a bad token {t!r}")
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c <= 0:
                raise ValueError(f"{where}: node {i} has a bad count {c!r}")
            parent = self._root if p < 0 else built[p]
            if p >= 0 and c > parent.count:
                raise ValueError(f"{where}: node {i} has a larger count than its parent")
            if parent.children is None:
                parent.children = {}
            if t in parent.children:
                raise ValueError(f"{where}: node {i} repeats token {t} under the same parent")
            node = _Node()
            node.count = float(c)
            parent.children[t] = node
            key = (keys[p] if p >= 0 else ()) + (t,)
            if len(key) > self.branch_length + 1:
                raise ValueError(f"{where}: node {i} is deeper than branch_length + 1")
            if len(key) <= self._index_depth:
                self._index[key] = node
            built.append(node)
            parents.append(p)
            keys.append(key)
        self._size = len(built)
        return built, parents

    def _load_sources(self, saved: object, built: list[_Node], parents: list[int], nodes: list[list[Any]],
                      where: str) -> None:
        """Attach the saved per-source parts (``{source_id: [[node_index, part], ...]}``) to the ``built`` nodes
        (built from the saved ``nodes``)."""
        if not isinstance(saved, dict):
            raise ValueError(f"{where}: 'sources' must be an object")
        for sid, pairs in saved.items():
            if not sid or not isinstance(pairs, list) or not pairs:
                raise ValueError(f"{where}: source {sid!r} must have a non-empty list of [node, part] pairs")
            info = self._sources[sid] = _SourceInfo()
            for pair in pairs:
                if not (isinstance(pair, list) and len(pair) == 2 and _is_int(pair[0]) and 0 <= pair[0] < len(built)):
                    raise ValueError(f"{where}: source {sid!r} has a bad [node, part] pair {pair!r}")
                i, part = pair
                node, p = built[i], parents[i]
                if isinstance(part, bool) or not isinstance(part, (int, float)) or not 0 < part <= node.count:
                    raise ValueError(f"{where}: source {sid!r} has a bad part {part!r} at node {i}")
                if node.sources and sid in node.sources:
                    raise ValueError(f"{where}: source {sid!r} names node {i} twice")
                if p >= 0 and not (built[p].sources and sid in built[p].sources):
                    raise ValueError(f"{where}: source {sid!r} has node {i} but not its parent (node {p})")
                if node.sources is None:
                    node.sources = {}
                node.sources[sid] = float(part)
                info.nodes += 1
                if p < 0:
                    info.starts.add(nodes[i][1])


def _read_doc(path: str, where: str) -> dict[str, Any]:
    """The JSON object of a saved trie file (gzip or not), its format and version checked."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if raw[:2] == _GZIP_MAGIC:
            raw = gzip.decompress(raw)
        doc = json.loads(raw.decode("utf-8"))
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: cannot decode JSON ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"{where}: format is {found!r}, expected {FORMAT_NAME!r}")
    if doc.get("version") != FORMAT_VERSION:
        raise ValueError(f"{where}: unsupported version {doc.get('version')!r} (this code reads {FORMAT_VERSION})")
    return doc


def _journal_state(doc: dict[str, Any], where: str) -> tuple[str | None, dict[str, int], int]:
    """``origin`` (None: not saved, a new one), ``applied`` and ``journal_version`` of a saved trie (files of older
    code have none of them)."""
    origin = doc.get("origin")
    if origin is not None and (not isinstance(origin, str) or not origin):
        raise ValueError(f"{where}: 'origin' must be a non-empty string, got {origin!r}")
    applied = doc.get("applied", {})
    if not isinstance(applied, dict) or not all(isinstance(k, str) and k and _is_int(v) and v >= 0
                                                for k, v in applied.items()):
        raise ValueError(f"{where}: 'applied' must map origins to ints >= 0")
    position = doc.get("journal_version", 0)
    if not _is_int(position) or position < 0:
        raise ValueError(f"{where}: 'journal_version' must be an int >= 0, got {position!r}")
    return origin, applied, position


def _sorted_children(node: _Node, reverse: bool = False) -> list[tuple[int, _Node]]:
    return sorted(node.children.items(), key=lambda kv: kv[0], reverse=reverse) if node.children else []

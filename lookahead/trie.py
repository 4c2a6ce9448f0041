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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pygtrie

from .files import atomic_write_bytes

__all__ = ["Draft", "TokenTrie"]

FORMAT_NAME = "lookahead-trie"
FORMAT_VERSION = 1

_PRUNE_THRESHOLD = 1.0  # a globally-only node whose decayed count falls below this is pruned with its subtree
_PRUNE_TARGET = 0.8  # pruning stops once the trie is at or below this fraction of the node budget
_HARD_CAP = 2  # past this many times its budget the trie is pruned fully inside the call (last resort)
_SWEEP_BASE = 64  # node visits an insert / extend call owes the sweep while the trie is over budget ...
_SWEEP_PER_NODE = 4  # ... plus this many per node the call created
_SWEEP_CHUNK = 1024  # owed visits are paid in slices of at least this many, between windows
_GZIP_MAGIC = b"\x1f\x8b"


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


class _Node:
    """One trie node: global count, per-request local counts and the child map (token -> node).

    ``count`` is the global count as of decay round ``epoch``: the effective count is
    ``count * decay ** (trie epoch - epoch)``, so decaying every count is one increment of the trie's epoch. A node is
    brought up to date (``count`` rescaled, ``epoch`` set) whenever its global count changes or the sweep visits it.
    """

    __slots__ = ("count", "epoch", "local", "children")

    def __init__(self, epoch: int = 0) -> None:
        self.count = 0.0  # global count as of decay round `epoch`
        self.epoch = epoch
        self.local: dict[str, int] | None = None  # request_id -> count of that request's local inserts
        self.children: dict[int, _Node] | None = None

    def total(self) -> float:
        """Stored global plus local counts: positive exactly when the node holds any count."""
        return self.count + (sum(self.local.values()) if self.local else 0)


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
    """

    def __init__(
        self,
        branch_length: int = 12,
        max_query_length: int = 6,
        node_budget: int = 200_000,
        decay: float = 0.5,
        local_weight: float = 1.0,
        global_weight: float = 1.0,
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
        with self._lock:
            self._count_windows(toks, max(0, counted - self.branch_length), len(toks), counted, request_id)

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

    def _count_windows(self, toks: list[int], first: int, last: int, counted: int, request_id: str | None) -> None:
        """Count the windows of ``toks`` starting at ``first..last-1``, their positions ``counted..`` only; the
        positions before ``counted`` were counted by an earlier call and are only walked (or re-created). Pays the
        pruning sweep its share between windows."""
        n = len(toks)
        width = self.branch_length + 1
        index_depth = self._index_depth
        index = self._index
        sweep = self._sweep_state
        decay = self.decay
        starts = None if request_id is None else self._requests.setdefault(request_id, set())
        owed = _SWEEP_BASE
        for i in range(first, last):
            if starts is None:
                sweep.note_prunable()  # new global-only nodes: prunable after some decay rounds
            epoch = sweep.epoch
            node = self._root
            made = self._size
            if starts is not None and i >= counted:
                starts.add(toks[i])
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
                            child.count *= decay ** (epoch - child.epoch)
                            child.epoch = epoch
                        child.count += 1.0
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
            # The nodes holding this request's counts form a subtree under the root (counts shrink with depth).
            stack: list[tuple[_Node, tuple[int, ...], list[int]]] = [(self._root, (), sorted(starts))]
            while stack:
                node, key, tokens = stack.pop()
                for t in tokens:
                    child = node.children.get(t) if node.children else None
                    loc = child.local if child is not None else None
                    if not loc or request_id not in loc:
                        continue
                    del loc[request_id]
                    ckey = key + (t,)
                    if not loc:
                        child.local = None  # type: ignore[union-attr]
                        if child.count <= 0.0:  # type: ignore[union-attr]
                            self._remove(node, t, ckey)  # its whole subtree is empty too
                            continue
                    if child.children:  # type: ignore[union-attr]
                        stack.append((child, ckey, list(child.children)))  # type: ignore[union-attr,arg-type]

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
            if cur.children:
                stack.extend(cur.children.values())
        self._size -= removed
        return removed

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
                    child.count *= decay ** (epoch - child.epoch)
                    child.epoch = epoch
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

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the config and global counts to ``path`` atomically (JSON; gzip-compressed if it ends in .gz).

        Nodes are stored in preorder as ``[parent_index, token, count]`` (``-1``: child of the root) with their
        effective (decayed) global counts; request-local counts are not saved.
        """
        with self._lock:
            nodes: list[list[float | int]] = []
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
                stack.extend((idx, t2, c2) for t2, c2 in _sorted_children(node, reverse=True))
            doc = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": self.config(), "nodes": nodes}
        data = json.dumps(doc, separators=(",", ":")).encode("utf-8")
        path = os.fspath(path)
        if path.endswith(".gz"):
            data = gzip.compress(data, mtime=0)
        atomic_write_bytes(path, data, mode=0o600)  # owner-only: the learned outputs may be private


    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TokenTrie:
        """Read a trie written by :meth:`save`. Raises ValueError for a corrupt, foreign or wrong-version file."""
        path = os.fspath(path)
        with open(path, "rb") as f:
            raw = f.read()
        where = f"{path!r} is not a valid {FORMAT_NAME} file"
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
        config = doc.get("config")
        if not isinstance(config, dict):
            raise ValueError(f"{where}: missing 'config' object")
        try:
            trie = cls(**config)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: bad config ({e})") from e
        nodes = doc.get("nodes")
        if not isinstance(nodes, list):
            raise ValueError(f"{where}: missing 'nodes' list")
        built: list[_Node] = []
        keys: list[tuple[int, ...]] = []
        for i, entry in enumerate(nodes):
            if not (isinstance(entry, list) and len(entry) == 3):
                raise ValueError(f"{where}: node {i} is not a [parent, token, count] triple")
            p, t, c = entry
            if isinstance(p, bool) or not isinstance(p, int) or not -1 <= p < i:
                raise ValueError(f"{where}: node {i} has a bad parent index {p!r}")
            if isinstance(t, bool) or not isinstance(t, int):
                raise ValueError(f"{where}: node {i} has a bad token {t!r}")
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c <= 0:
                raise ValueError(f"{where}: node {i} has a bad count {c!r}")
            parent = trie._root if p < 0 else built[p]
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
            if len(key) > trie.branch_length + 1:
                raise ValueError(f"{where}: node {i} is deeper than branch_length + 1")
            if len(key) <= trie._index_depth:
                trie._index[key] = node
            built.append(node)
            keys.append(key)
        trie._size = len(built)
        if trie._size > trie.node_budget:
            trie._prune_fully()  # loading is not a hot path: get within the budget at once
        return trie


def _sorted_children(node: _Node, reverse: bool = False) -> list[tuple[int, _Node]]:
    return sorted(node.children.items(), key=lambda kv: kv[0], reverse=reverse) if node.children else []

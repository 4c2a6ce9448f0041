"""Compiled kernels of the draft store: pure functions over flat numpy arrays (numba, ``nogil``).

Layout shared by every kernel. A *token array* (int32) holds sequences one after another, each followed by ``SEP``
(-1); the array ends with ``SEP``. An n-gram *occurs* at position ``p`` when the tokens from ``p`` on equal it inside
one sequence. A *suffix array* (int32) lists every non-``SEP`` position of a token array, sorted by the tokens from
there up to the first ``SEP`` (at most ``width`` tokens are compared; suffixes equal that far are in position
order), so the occurrences of any n-gram of at most ``width`` tokens are one contiguous range of it, and the next
tokens after that n-gram are sorted within the range. An empty suffix array marks a *linear* source: occurrences are
found by a scan (small, growing buffers). A *dead prefix* (int32, ``len(sa) + 1`` or empty) counts the suffix-array
entries before each index whose position was deleted (a tombstoned entry), so a range's live count is one
subtraction.

Drafting (:func:`draft`) matches the longest context suffix that has a continuation with a positive score and expands
its continuations best-first, exactly as :meth:`lookahead.trie.TokenTrie.draft` does over the same sequences
(windows of ``width`` tokens; the score of a node is ``global_weight * global count + local_weight * local count``;
ties go to the shallower node, then the smaller token, then the earlier pushed node).
"""

from __future__ import annotations

import heapq

import numba as nb
import numpy as np

SEP = -1
SLOTS = 16  # sources one draft call reads (a fixed-size tuple: one compiled signature)

_JIT = {"nogil": True, "cache": True}


def build_suffix_array(tokens: np.ndarray, width: int) -> np.ndarray:
    """The suffix array (int32) of ``tokens`` (a token array), suffixes compared over at most ``width`` tokens.

    Prefix doubling with numpy sorts: ``ceil(log2(width))`` sorts of the positions, each by (rank of the first
    ``k`` tokens, rank of the next ``k``)."""
    toks = np.asarray(tokens, dtype=np.int64)  # [n]
    n = len(toks)
    pos = np.flatnonzero(toks >= 0)  # [m] suffix starts
    if len(pos) == 0:
        return np.zeros(0, np.int32)
    seps = np.flatnonzero(toks < 0)
    to_end = seps[np.searchsorted(seps, pos)] - pos  # [m] tokens left in each suffix's sequence
    rank = np.zeros(n + 1, np.int64)  # rank of the prefix at each position; 0 at SEP and past the end
    uniq, inv = np.unique(toks[pos], return_inverse=True)
    rank[pos] = inv + 1
    order = np.argsort(rank[pos], kind="stable")
    k = 1
    while k < width:
        nxt = pos + k
        second = np.where(to_end > k, rank[np.minimum(nxt, n)], 0)  # the next k tokens' rank, 0 once ended
        key = rank[pos] * (len(pos) + 1) + second  # ranks are <= m: no overflow below 3e9 tokens
        order = np.argsort(key, kind="stable")
        sorted_key = key[order]
        fresh = np.empty(len(pos), np.int64)
        fresh[0] = 1
        np.cumsum(sorted_key[1:] != sorted_key[:-1], out=fresh[1:])
        fresh[1:] += 1
        rank[pos[order]] = fresh
        if fresh[-1] == len(pos):
            break  # every prefix distinct: longer ones sort the same
        k *= 2
    return pos[order].astype(np.int32)


@nb.njit(**_JIT)
def _compare(ta, pa, tb, pb, width):  # pragma: no cover - compiled
    """-1, 0 or 1: the suffix of ``ta`` at ``pa`` against the suffix of ``tb`` at ``pb`` (``width`` tokens)."""
    for i in range(width):
        x = ta[pa + i]
        y = tb[pb + i]
        if x != y:
            return -1 if x < y else 1
        if x < 0:
            return 0
    return 0


@nb.njit(**_JIT)
def merge_suffix_arrays(ta, sa, tb, sb, width):  # pragma: no cover - compiled
    """The suffix array of ``ta`` followed by ``tb`` (positions of ``tb`` shifted by ``len(ta)``), merged in one
    linear pass from the two sorted ones; on a tie the first array's suffix comes first."""
    out = np.empty(len(sa) + len(sb), np.int32)
    off = len(ta)
    i = j = o = 0
    while i < len(sa) and j < len(sb):
        if _compare(ta, sa[i], tb, sb[j], width) <= 0:
            out[o] = sa[i]
            i += 1
        else:
            out[o] = sb[j] + off
            j += 1
        o += 1
    while i < len(sa):
        out[o] = sa[i]
        i += 1
        o += 1
    while j < len(sb):
        out[o] = sb[j] + off
        j += 1
        o += 1
    return out


@nb.njit(**_JIT)
def keep_suffixes(sa, keep):  # pragma: no cover - compiled
    """The suffix array of a token array with only the positions where ``keep`` is true left (their order kept)."""
    new_pos = np.empty(len(keep), np.int32)
    c = 0
    for p in range(len(keep)):
        new_pos[p] = c
        if keep[p]:
            c += 1
    m = 0
    for i in range(len(sa)):
        if keep[sa[i]]:
            m += 1
    out = np.empty(m, np.int32)
    o = 0
    for i in range(len(sa)):
        p = sa[i]
        if keep[p]:
            out[o] = new_pos[p]
            o += 1
    return out


@nb.njit(**_JIT)
def span_mask(n, starts, ends):  # pragma: no cover - compiled
    """A boolean mask of ``n`` positions, true inside every ``[starts[i], ends[i])``."""
    mask = np.zeros(n, np.bool_)
    for i in range(len(starts)):
        mask[starts[i]: ends[i]] = True
    return mask


@nb.njit(**_JIT)
def concat(a, b):  # pragma: no cover - compiled
    """``a`` then ``b`` (int32), without holding the GIL (a merge of large segments runs beside decoding)."""
    out = np.empty(len(a) + len(b), np.int32)
    out[: len(a)] = a
    out[len(a):] = b
    return out


@nb.njit(**_JIT)
def select(tokens, keep):  # pragma: no cover - compiled
    """``tokens[keep]`` without holding the GIL."""
    m = 0
    for i in range(len(keep)):
        if keep[i]:
            m += 1
    out = np.empty(m, np.int32)
    o = 0
    for i in range(len(keep)):
        if keep[i]:
            out[o] = tokens[i]
            o += 1
    return out


@nb.njit(**_JIT)
def dead_prefix(sa, dead):  # pragma: no cover - compiled
    """``out[i]`` = how many of ``sa[:i]`` are dead positions (``dead`` is per token position)."""
    out = np.empty(len(sa) + 1, np.int32)
    out[0] = 0
    c = 0
    for i in range(len(sa)):
        if dead[sa[i]]:
            c += 1
        out[i + 1] = c
    return out


@nb.njit(**_JIT)
def _lower(toks, sa, lo, hi, offset, token):  # pragma: no cover - compiled
    """First index in ``sa[lo:hi]`` whose token at ``offset`` is >= ``token`` (the range is sorted there)."""
    while lo < hi:
        mid = (lo + hi) >> 1
        if toks[sa[mid] + offset] < token:
            lo = mid + 1
        else:
            hi = mid
    return lo


@nb.njit(**_JIT)
def _upper(toks, sa, lo, hi, offset, token):  # pragma: no cover - compiled
    """First index in ``sa[lo:hi]`` whose token at ``offset`` is > ``token``; gallops from ``lo`` (runs are short
    near the start more often than not)."""
    step = 1
    base = lo
    while base + step < hi and toks[sa[base + step] + offset] <= token:
        base += step
        step <<= 1
    hi = min(hi, base + step)
    lo = base + 1
    while lo < hi:
        mid = (lo + hi) >> 1
        if toks[sa[mid] + offset] <= token:
            lo = mid + 1
        else:
            hi = mid
    return lo


@nb.njit(**_JIT)
def sa_range(toks, sa, query, q0, q):  # pragma: no cover - compiled
    """The range of ``sa`` whose suffixes start with ``query[q0:q0 + q]``."""
    lo, hi = 0, len(sa)
    for d in range(q):
        t = query[q0 + d]
        lo = _lower(toks, sa, lo, hi, d, t)
        hi = _upper(toks, sa, lo, hi, d, t) if lo < hi and toks[sa[lo] + d] == t else lo
        if lo >= hi:
            return lo, lo
    return lo, hi


@nb.njit(**_JIT)
def _match_lengths(toks, query, qmax):  # pragma: no cover - compiled
    """Ends ``e`` of occurrences of the query's last token in a linear token array, and per end the longest
    ``l <= qmax`` for which ``toks[e - l + 1 : e + 1]`` equals the query's last ``l`` tokens in one sequence."""
    n = len(toks)
    last = query[qmax - 1]
    c = 0
    for e in range(n):
        if toks[e] == last:
            c += 1
    ends = np.empty(c, np.int64)
    lens = np.empty(c, np.int64)
    c = 0
    for e in range(n):
        if toks[e] == last:
            m = 1
            while m < qmax and e - m >= 0 and toks[e - m] == query[qmax - 1 - m]:
                m += 1
            ends[c] = e
            lens[c] = m
            c += 1
    return ends, lens


@nb.njit(**_JIT)
def count_occurrences(toks, sa, dead, query):  # pragma: no cover - compiled
    """Live occurrences of ``query`` in one source (suffix array or linear)."""
    q = len(query)
    if q == 0:
        return 0
    if len(sa) > 0:
        lo, hi = sa_range(toks, sa, query, 0, q)
        if len(dead) > 0:
            return (hi - lo) - (dead[hi] - dead[lo])
        return hi - lo
    ends, lens = _match_lengths(toks, query, q)
    c = 0
    for i in range(len(ends)):
        if lens[i] >= q:
            c += 1
    return c


@nb.njit(**_JIT)
def longest_suffix(toks_list, sa_list, dead_list, use, context, at_most):  # pragma: no cover - compiled
    """The longest suffix of ``context`` (at most ``at_most`` tokens) that occurs in a source where ``use`` is set."""
    n = len(context)
    m = min(at_most, n)
    while m > 0:
        total = 0
        for s in range(len(toks_list)):
            if use[s]:
                total += count_occurrences(toks_list[s], sa_list[s], dead_list[s], context[n - m:])
                if total > 0:
                    return m
        m -= 1
    return 0


@nb.njit(**_JIT)
def _children(toks_list, sa_list, dead_list, work, s, lo, hi, m, out_tok, out_lo, out_hi, out_cnt, o):
    # pragma: no cover - compiled
    """Append the children of one source's node (its occurrences ``[lo, hi)``, n-gram length ``m``) to the
    ``out_*`` buffers from index ``o``; return the new end. Linear sources regroup their occurrence starts (in
    ``work``) by next token and append the groups to ``work``."""
    toks = toks_list[s]
    sa = sa_list[s]
    if len(sa) > 0:
        dead = dead_list[s]
        i = _upper(toks, sa, lo, hi, m, SEP) if toks[sa[lo] + m] == SEP else lo  # SEP sorts first: skip ended
        while i < hi:
            t = toks[sa[i] + m]
            j = _upper(toks, sa, i, hi, m, t)
            c = j - i
            if len(dead) > 0:
                c -= dead[j] - dead[i]
            if c > 0:
                if o >= len(out_tok):
                    return -1
                out_tok[o] = t
                out_lo[o] = i
                out_hi[o] = j
                out_cnt[o] = c
                o += 1
            i = j
        return o
    # linear: occurrence starts are work[lo:hi]
    k = hi - lo
    nxt = np.empty(k, np.int64)
    for i in range(k):
        nxt[i] = toks[work[lo + i] + m]
    order = np.argsort(nxt, kind="mergesort")
    i = 0
    while i < k and nxt[order[i]] < 0:
        i += 1
    while i < k:
        t = nxt[order[i]]
        j = i
        start = work[-1]  # work[-1] holds the used length of work
        while j < k and nxt[order[j]] == t:
            if start + (j - i) >= len(work) - 1:
                return -2
            work[start + (j - i)] = work[lo + order[j]]
            j += 1
        if o >= len(out_tok):
            return -1
        out_tok[o] = t
        out_lo[o] = start
        out_hi[o] = start + (j - i)
        out_cnt[o] = j - i
        work[-1] = start + (j - i)
        o += 1
        i = j
    return o


@nb.njit(**_JIT)
def draft(toks_list, sa_list, dead_list, weight, is_global, context, k, depth_limit, width,
          global_weight, local_weight, work, kids, node_ranges):  # pragma: no cover - compiled
    """Best-first draft of at most ``k`` nodes after ``context`` (its last ``max_query_length`` tokens) over the
    sources; returns (tokens, parents, scores, global counts, match length) or ``match length -1`` when a work buffer
    was too small (the caller retries with larger ones).

    Scratch space comes from the caller, so a call allocates next to nothing: ``work`` (int64, occurrence starts of
    linear sources; its last element holds the used length), ``kids`` (int64 ``[5, c]``: the children of one node
    over every source) and ``node_ranges`` (int64 ``[2, n, S]``: the pushed nodes' occurrence ranges, ``n`` at least
    ``k * (k + 1)``).

    A source with ``weight[s] == 0`` is skipped. The matched suffix is the longest one (at most ``width - 1``
    tokens, so its continuations fit a window) with a continuation of positive score; nodes are at most
    ``min(depth_limit, width - q)`` deep. Among the children of one node only the best ``k`` by (score, smaller
    token) can ever be drafted, so only they are pushed."""
    S = len(toks_list)
    qmax = min(len(context), width - 1)
    e_tok = np.empty(0, np.int64)
    e_f = np.empty(0, np.float64)
    if k <= 0 or depth_limit <= 0 or qmax <= 0:
        return e_tok, e_tok, e_f, e_f, 0
    query = context[len(context) - qmax:]
    cap = len(work)
    # per source, the occurrences of each suffix length: SA ranges directly, linear ones as lists in work
    match_lo = np.zeros((qmax + 1, S), np.int64)
    match_hi = np.zeros((qmax + 1, S), np.int64)
    used = 0
    for s in range(S):
        if weight[s] == 0.0:
            continue
        toks = toks_list[s]
        sa = sa_list[s]
        if len(sa) > 0:
            for q in range(1, qmax + 1):
                lo, hi = sa_range(toks, sa, query, qmax - q, q)
                match_lo[q, s] = lo
                match_hi[q, s] = hi
                if lo >= hi:
                    break
        else:
            ends, lens = _match_lengths(toks, query, qmax)
            for q in range(1, qmax + 1):
                start = used
                for i in range(len(ends)):
                    if lens[i] >= q:
                        if used >= cap - 1:
                            return e_tok, e_tok, e_f, e_f, -1
                        work[used] = ends[i] - q + 1
                        used += 1
                match_lo[q, s] = start
                match_hi[q, s] = used
    work[-1] = used
    # children buffers (per node expansion)
    c_tok = kids[0]
    c_lo = kids[1]
    c_hi = kids[2]
    c_cnt = kids[3]
    c_src = kids[4]
    # pushed nodes: per source occurrence range
    n_lo = node_ranges[0]
    n_hi = node_ranges[1]
    ncap = n_lo.shape[0]
    n_tok = np.empty(ncap, np.int64)
    n_depth = np.empty(ncap, np.int64)
    n_parent = np.empty(ncap, np.int64)
    n_score = np.empty(ncap, np.float64)
    n_glob = np.empty(ncap, np.float64)
    out_tok = np.empty(k, np.int64)
    out_par = np.empty(k, np.int64)
    out_score = np.empty(k, np.float64)
    out_glob = np.empty(k, np.float64)
    for q in range(qmax, 0, -1):
        # the matched node: its occurrences per source
        pushed = 0
        heap = [(0.0, 0, 0, 0, 0)]
        heap.pop()
        seq = 0
        n_out = 0
        # expand node "root" (index -1) and then popped ones
        cur_lo = match_lo[q]
        cur_hi = match_hi[q]
        cur_m = q
        cur_depth = 0
        cur_idx = -1
        first = True
        while True:
            if n_out < k and cur_depth < depth_limit and cur_m < width:
                # children of the current node over every source
                o = 0
                for s in range(S):
                    if weight[s] == 0.0 or cur_lo[s] >= cur_hi[s]:
                        continue
                    o0 = o
                    o = _children(toks_list, sa_list, dead_list, work, s, cur_lo[s], cur_hi[s], cur_m,
                                  c_tok, c_lo, c_hi, c_cnt, o)
                    if o < 0:
                        return e_tok, e_tok, e_f, e_f, -1
                    for i in range(o0, o):
                        c_src[i] = s
                if o > 0:
                    order = np.argsort(c_tok[:o], kind="mergesort")
                    # combine entries of one token; score them
                    u_first = np.empty(o, np.int64)
                    u_score = np.empty(o, np.float64)
                    u_glob = np.empty(o, np.float64)
                    u = 0
                    i = 0
                    while i < o:
                        t = c_tok[order[i]]
                        g = 0.0
                        loc = 0.0
                        j = i
                        while j < o and c_tok[order[j]] == t:
                            e = order[j]
                            if is_global[c_src[e]]:
                                g += c_cnt[e]
                            else:
                                loc += c_cnt[e]
                            j += 1
                        sc = global_weight * g
                        if loc > 0:
                            sc += local_weight * loc
                        if sc > 0:
                            u_first[u] = i
                            u_score[u] = sc
                            u_glob[u] = g
                            u += 1
                        i = j
                    if u > 0:
                        # best k siblings by (score desc, token asc): stable sort of the token-sorted list
                        best = np.argsort(-u_score[:u], kind="mergesort")[:k]
                        for b in best:
                            if pushed >= ncap:
                                return e_tok, e_tok, e_f, e_f, -1
                            i = u_first[b]
                            t = c_tok[order[i]]
                            for s in range(S):
                                n_lo[pushed, s] = 0
                                n_hi[pushed, s] = 0
                            j = i
                            while j < o and c_tok[order[j]] == t:
                                e = order[j]
                                n_lo[pushed, c_src[e]] = c_lo[e]
                                n_hi[pushed, c_src[e]] = c_hi[e]
                                j += 1
                            n_tok[pushed] = t
                            n_depth[pushed] = cur_depth + 1
                            n_parent[pushed] = cur_idx
                            n_score[pushed] = u_score[b]
                            n_glob[pushed] = u_glob[b]
                            heapq.heappush(heap, (-u_score[b], cur_depth + 1, t, seq, pushed))
                            seq += 1
                            pushed += 1
            if first:
                first = False
                if pushed == 0:
                    break  # no continuation with a positive score: try a shorter suffix
            if len(heap) == 0 or n_out >= k:
                break
            item = heapq.heappop(heap)
            node = item[4]
            out_tok[n_out] = n_tok[node]
            out_par[n_out] = n_parent[node]
            out_score[n_out] = n_score[node]
            out_glob[n_out] = n_glob[node]
            cur_idx = n_out
            n_out += 1
            cur_lo = n_lo[node]
            cur_hi = n_hi[node]
            cur_depth = n_depth[node]
            cur_m = q + cur_depth
        if n_out > 0:
            return out_tok[:n_out].copy(), out_par[:n_out].copy(), out_score[:n_out].copy(), \
                out_glob[:n_out].copy(), q
    return e_tok, e_tok, e_f, e_f, 0


_warm = False


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel now, on tiny inputs: the first call of each would
    otherwise hold the GIL for up to a few hundred milliseconds inside whichever thread makes it, a decode step
    included. Idempotent; the draft store calls it when the first store of a process is made."""
    global _warm
    if _warm:
        return
    toks = np.array([1, 2, 1, 3, SEP, 1, 2, SEP], np.int32)
    sa = build_suffix_array(toks, 3)
    empty = np.zeros(0, np.int32)
    merge_suffix_arrays(toks, sa, toks, sa, 3)
    dead = dead_prefix(sa, np.zeros(len(toks), np.bool_))
    keep_suffixes(sa, np.ones(len(toks), np.bool_))
    concat(toks, toks)
    span_mask(len(toks), np.zeros(1, np.int64), np.ones(1, np.int64))
    select(toks, np.ones(len(toks), np.bool_))
    slots = SLOTS
    tl = tuple([toks, toks] + [empty] * (slots - 2))
    sl = tuple([sa, empty] + [empty] * (slots - 2))
    dl = tuple([dead, empty] + [empty] * (slots - 2))
    weight = np.zeros(slots)
    weight[:2] = 1.0
    is_global = np.zeros(slots, np.bool_)
    is_global[0] = True
    ctx = np.array([1, 2], np.int64)
    draft(tl, sl, dl, weight, is_global, ctx, 4, 3, 3, 1.0, 1.0, np.empty(64, np.int64), np.empty((5, 64), np.int64),
          np.empty((2, 21, slots), np.int64))
    longest_suffix(tl, sl, dl, is_global, ctx, 2)
    count_occurrences(toks, sa, dead, ctx)
    _warm = True

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
def id_range(tokens):  # pragma: no cover - compiled
    """(smallest, largest) token id of a token array in one pass, separators left out; smallest > largest when it
    holds none."""
    low = np.int64(1) << 62
    high = -(np.int64(1) << 62)
    for t in tokens:
        if t != SEP:
            if t < low:
                low = t
            if t > high:
                high = t
    return low, high


@nb.njit(**_JIT)
def continue_entry(data, used, entry_start, tail, add):  # pragma: no cover - compiled
    """Append ``add`` to the last entry of a linear buffer (``data[:used]``, the entry from ``entry_start``) when
    that entry ends with ``tail``; returns the new used length, -1 when it does not end so, -2 when ``data`` has no
    room, -3 when an id of ``add`` is outside ``0..2**31-2`` (see ``Buffer.continue_last``)."""
    end = used - 1  # the last entry's SEP
    n_tail = len(tail)
    if end - entry_start < n_tail:
        return -1
    for i in range(n_tail):
        if data[end - n_tail + i] != tail[i]:
            return -1
    for i in range(len(add)):
        if add[i] < 0 or add[i] >= 2**31 - 1:
            return -3
    if used + len(add) + 2 > len(data):
        return -2
    for i in range(len(add)):
        data[end + i] = add[i]
    used += len(add)
    data[used - 1] = SEP
    data[used] = SEP
    return used


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
def _present(toks, sa, dead, query, n, q):  # pragma: no cover - compiled
    """(lo, hi, live): the suffix-array range of the last ``q`` of the ``n`` query tokens and its live count."""
    lo, hi = sa_range(toks, sa, query, n - q, q)
    live = hi - lo
    if len(dead) > 0:
        live -= dead[hi] - dead[lo]
    return lo, hi, live


@nb.njit(**_JIT)
def count_occurrences(toks, sa, dead, query):  # pragma: no cover - compiled
    """Live occurrences of ``query`` in one source (suffix array or linear)."""
    q = len(query)
    if q == 0:
        return 0
    if len(sa) > 0:
        return _present(toks, sa, dead, query, q, q)[2]
    ends, lens = _match_lengths(toks, query, q)
    c = 0
    for i in range(len(ends)):
        if lens[i] >= q:
            c += 1
    return c


@nb.njit(**_JIT)
def _longest_in(toks, sa, dead, query, n, at_least, at_most):  # pragma: no cover - compiled
    """(longest q in ``at_least..at_most`` whose last-``q``-token suffix of ``query[:n]`` is live in this suffix
    array, its lo, its hi); q is ``at_least - 1`` (range empty) when even ``at_least`` tokens are not.

    A suffix occurs only where its shorter suffixes do, so the lengths are searched top first (a repeated passage
    matches whole in one search), then by bisection: about ``log2(at_most - at_least)`` range searches, not one per
    length."""
    lo, hi, live = _present(toks, sa, dead, query, n, at_least)
    if live <= 0:
        return at_least - 1, lo, lo
    if at_most == at_least:
        return at_least, lo, hi
    top_lo, top_hi, top_live = _present(toks, sa, dead, query, n, at_most)
    if top_live > 0:
        return at_most, top_lo, top_hi
    good = at_least  # present
    bad = at_most  # absent
    while bad - good > 1:
        mid = (good + bad) >> 1
        m_lo, m_hi, m_live = _present(toks, sa, dead, query, n, mid)
        if m_live > 0:
            good, lo, hi = mid, m_lo, m_hi
        else:
            bad = mid
    return good, lo, hi


@nb.njit(**_JIT)
def longest_suffix(toks_list, sa_list, dead_list, use, context, at_most):  # pragma: no cover - compiled
    """The longest suffix of ``context`` (at most ``at_most`` tokens) that occurs in a source where ``use`` is set.

    Each source is asked only for lengths past the best found so far (suffix arrays: top first, then by
    bisection, see :func:`_longest_in`; linear ones are scanned once for their longest match)."""
    n = len(context)
    m = min(at_most, n)
    if m <= 0:
        return 0
    query = context[n - m:]
    best = 0
    for s in range(len(toks_list)):
        if not use[s] or len(toks_list[s]) == 0:
            continue
        toks, sa, dead = toks_list[s], sa_list[s], dead_list[s]
        if len(sa) > 0:
            q, _, _ = _longest_in(toks, sa, dead, query, m, best + 1, m)
            best = max(best, q)
        else:
            ends, lens = _match_lengths(toks, query, m)
            for i in range(len(lens)):
                if lens[i] > best:
                    best = lens[i]
        if best == m:
            break
    return best


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


# ---------------------------------------------------------------------------------------------- hot-node tables
#
# A node with many distinct children (a frequent token: every word that ever followed "the") costs a gallop per child
# to enumerate from the suffix array, and a draft needs only its best few. A segment therefore keeps, for every node
# of depth 1..HOT_DEPTH with at least HOT_CHILDREN children, the children's ranges in token order (the suffix
# array's own order) and their order by raw count, so the best children come first and any child is found by a
# binary search over a compact array (:func:`draft` merges these lists over the sources with the threshold
# algorithm: it stops once no child not yet seen can reach the best ones).
#
# ``hot_idx`` (int64 ``[2, h + 1]``): row 0 the keys ``lo * 16 + m`` of the hot nodes (range start, depth) in
# increasing order, row 1 the start of each node's children in ``hot_kids``; the last column holds the table's
# threshold (row 0) and closes the last node (row 1).
# ``hot_kids`` (int32 ``[5, c]``): token, range start, range end; row 3 the node's children by decreasing raw count
# then token (absolute column indices), row 4 each child's place in that order (counted from the node's first).

HOT_DEPTH = 8  # nodes deeper than this rarely have many children (whitespace runs); at most 15 (keys)
HOT_CHILDREN = 24
NO_HOT_IDX = np.zeros((2, 1), np.int64)  # a source without hot nodes (linear sources, tiny segments)
NO_HOT_KIDS = np.zeros((5, 0), np.int32)


@nb.njit(**_JIT)
def _capped_lcp(tokens, sa, cap):  # pragma: no cover - compiled
    """Per suffix-array index ``i > 0``: how many tokens (at most ``cap``, stopping at ``SEP``) the suffixes at
    ``i - 1`` and ``i`` share."""
    n = len(sa)
    lcp = np.zeros(n, np.int8)
    for i in range(1, n):
        a = sa[i - 1]
        b = sa[i]
        k = 0
        while k < cap and tokens[a + k] == tokens[b + k] and tokens[a + k] != SEP:
            k += 1
        lcp[i] = k
    return lcp


@nb.njit(**_JIT)
def _node_end(lcp, lo, n, m):  # pragma: no cover - compiled
    hi = lo + 1
    while hi < n and lcp[hi] >= m:
        hi += 1
    return hi


@nb.njit(**_JIT)
def _full_node(tokens, sa, lo, m):  # pragma: no cover - compiled
    """Whether the suffix at ``sa[lo]`` has ``m`` tokens before a ``SEP`` (its range is an n-gram node)."""
    for k in range(m):
        if tokens[sa[lo] + k] == SEP:
            return False
    return True


@nb.njit(**_JIT)
def hot_table(tokens, sa, max_depth, min_children):  # pragma: no cover - compiled
    """The hot-node table (``hot_idx``, ``hot_kids``) of one segment: see the section comment above."""
    n = len(sa)
    lcp = _capped_lcp(tokens, sa, max_depth + 1)
    count_nodes = 0
    count_kids = 0
    for fill in range(2):
        if fill == 1:
            keys = np.empty(count_nodes, np.int64)
            starts = np.empty(count_nodes + 1, np.int64)
            kids = np.empty((5, count_kids), np.int32)
            count_nodes = 0
            count_kids = 0
        for m in range(1, max_depth + 1):
            lo = 0
            while lo < n:
                hi = _node_end(lcp, lo, n, m)
                if hi - lo >= min_children and _full_node(tokens, sa, lo, m):
                    c = 0
                    for i in range(lo, hi):
                        if (i == lo or lcp[i] <= m) and tokens[sa[i] + m] != SEP:
                            c += 1
                    if c >= min_children:
                        if fill == 1:
                            keys[count_nodes] = lo * 16 + m
                            starts[count_nodes] = count_kids
                            first = count_kids
                            i = lo
                            while i < hi:
                                j = _node_end(lcp, i, hi, m + 1)
                                t = tokens[sa[i] + m]
                                if t != SEP:
                                    kids[0, count_kids] = t
                                    kids[1, count_kids] = i
                                    kids[2, count_kids] = j
                                    count_kids += 1
                                i = j
                            raw = kids[2, first:count_kids] - kids[1, first:count_kids]
                            by_count = np.argsort(-raw, kind="mergesort")  # stable: token order on a tie
                            for r in range(len(by_count)):
                                kids[3, first + r] = first + by_count[r]
                                kids[4, first + by_count[r]] = r
                        else:
                            count_kids += c
                        count_nodes += 1
                lo = hi
    order = np.argsort(keys, kind="mergesort")
    hot_idx = np.empty((2, count_nodes + 1), np.int64)
    for r in range(count_nodes):
        hot_idx[0, r] = keys[order[r]]
        hot_idx[1, r] = starts[order[r]]
    hot_idx[0, count_nodes] = min_children  # the sentinel column: smaller nodes are never hot
    hot_idx[1, count_nodes] = count_kids
    # the children of the node at sorted position r end where the next node's begin in ``kids``: keep them in
    # key order so that holds
    if count_nodes > 1:
        moved = np.empty_like(kids)
        at = 0
        for r in range(count_nodes):
            s = starts[order[r]]
            e = starts[order[r] + 1] if order[r] + 1 < count_nodes else count_kids
            for j in range(s, e):
                moved[0, at + j - s] = kids[0, j]
                moved[1, at + j - s] = kids[1, j]
                moved[2, at + j - s] = kids[2, j]
                moved[3, at + j - s] = kids[3, j] - s + at
                moved[4, at + j - s] = kids[4, j]
            hot_idx[1, r] = at
            at += e - s
        kids = moved
    return hot_idx, kids


@nb.njit(**_JIT)
def _find_in_row(table, row, first, end, value):  # pragma: no cover - compiled
    """Column of ``value`` in ``table[row, first:end]`` (increasing), or -1: a binary search."""
    a = first
    b = end
    while a < b:
        mid = (a + b) >> 1
        if table[row, mid] < value:
            a = mid + 1
        else:
            b = mid
    if a < end and table[row, a] == value:
        return a
    return -1


@nb.njit(**_JIT)
def _hot_slice(hot_idx, lo, hi, m):  # pragma: no cover - compiled
    """(first, end) columns of the children of the node ``[lo, hi)`` of depth ``m`` in ``hot_kids``, or (-1, -1)."""
    h = hot_idx.shape[1] - 1
    if h <= 0 or m > HOT_DEPTH or hi - lo < hot_idx[0, h]:  # a node with fewer occurrences has fewer children
        return -1, -1
    a = _find_in_row(hot_idx, 0, 0, h, lo * 16 + m)
    if a < 0:
        return -1, -1
    return hot_idx[1, a], hot_idx[1, a + 1]


@nb.njit(**_JIT)
def _hot_find(kids, first, end, token):  # pragma: no cover - compiled
    """Column of the child with ``token`` among ``kids[:, first:end]`` (token order), or -1."""
    return _find_in_row(kids, 0, first, end, token)


@nb.njit(**_JIT)
def _live(kids, col, dead):  # pragma: no cover - compiled
    """Live occurrences of the hot child at column ``col``."""
    lo = kids[1, col]
    hi = kids[2, col]
    c = hi - lo
    if len(dead) > 0:
        c -= dead[hi] - dead[lo]
    return c


@nb.njit(**_JIT)
def _hot_counts(token, nh, hot_s, hot_a, hot_b, pos, hot_kids_list, dead_list, is_global, known, known_col, cols):
    # pragma: no cover - compiled
    """(global, local) live occurrences of ``token`` over the hot sources, and whether a list read it already (its
    place in that list's count order is before the list's read position ``pos``). Hot list ``known`` (-1: none)
    holds it at column ``known_col`` (no search there); ``cols[h]`` gets its column in list ``h`` (-1: absent)."""
    g = 0.0
    loc = 0.0
    read = False
    for h in range(nh):
        s = hot_s[h]
        kids = hot_kids_list[s]
        col = known_col if h == known else _hot_find(kids, hot_a[h], hot_b[h], token)
        cols[h] = col
        if col >= 0:
            if hot_a[h] + kids[4, col] < pos[h]:
                read = True
            c = _live(kids, col, dead_list[s])
            if is_global[s]:
                g += c
            else:
                loc += c
    return g, loc, read


@nb.njit(**_JIT)
def _add_candidate(t, g, loc, global_weight, local_weight, cand_tok, cand_score, cand_glob, nc, top, k):
    # pragma: no cover - compiled
    """Score a child and keep it when positive (``top``: a min-heap of the best ``k`` (score, -token) pairs, the
    worst of them first); the new count."""
    sc = global_weight * g
    if loc > 0:
        sc += local_weight * loc
    if sc <= 0:
        return nc
    cand_tok[nc] = t
    cand_score[nc] = sc
    cand_glob[nc] = g
    if k > 0:
        heapq.heappush(top, (sc, -t))
        if len(top) > k:
            heapq.heappop(top)
    return nc + 1


@nb.njit(**_JIT)
def _best_children(toks_list, sa_list, dead_list, hot_idx_list, hot_kids_list, weight, is_global, work, cur_lo,
                   cur_hi, m, want, need, skip, global_weight, local_weight, kids, cand_tok, cand_score, cand_glob,
                   hot_s, hot_a, hot_b, n_lo, n_hi, pushed, sel_tok, sel_score, sel_glob):
    # pragma: no cover - compiled
    """The best ``k`` children (by score, then smaller token) of one node over every source: their tokens, scores
    and global counts in ``sel_*`` (best first) and the per-source ranges of all but the first ``skip`` in rows
    ``pushed...`` of ``n_lo``/``n_hi``. ``k`` is ``want`` where the node is hot in some source (its children are
    read lazily), else ``need`` (they are all listed anyway). Returns (how many, or -1 when a scratch array is too
    small; whether ``k`` was cut to ``want``).

    Sources where the node is hot (:func:`hot_table`) are read best-first (the threshold algorithm): children are
    taken from the heads of those lists, round-robin, until the ``k``-th best score found beats what any child not
    yet seen could score; the other sources' children are all listed. ``kids`` ``[5, c]`` and ``cand_*`` ``[c]``
    are scratch, ``hot_*`` ``[S]`` too."""
    S = len(toks_list)
    c_tok = kids[0]
    c_lo = kids[1]
    c_hi = kids[2]
    c_cnt = kids[3]
    c_src = kids[4]
    cap = len(cand_tok)
    nh = 0
    o = 0
    for s in range(S):
        if weight[s] == 0.0 or cur_lo[s] >= cur_hi[s]:
            continue
        if len(sa_list[s]) > 0:
            a, b = _hot_slice(hot_idx_list[s], cur_lo[s], cur_hi[s], m)
            if a >= 0:
                hot_s[nh] = s
                hot_a[nh] = a
                hot_b[nh] = b
                nh += 1
                continue
        o0 = o
        o = _children(toks_list, sa_list, dead_list, work, s, cur_lo[s], cur_hi[s], m, c_tok, c_lo, c_hi, c_cnt, o)
        if o < 0:
            return -1, False
        for i in range(o0, o):
            c_src[i] = s
    k = want if nh > 0 else need
    limited = nh > 0 and want < need
    order = np.argsort(c_tok[:o], kind="mergesort")
    small = c_tok[:o][order]  # the listed children's tokens, sorted (one entry per source)
    pos = hot_a[:nh].copy()  # per hot source: the next child to read, in count order
    cand_cols = np.empty((cap, nh), np.int32)  # [cap, nh]: each candidate's column in each hot list
    nc = 0
    top = [(0.0, np.int64(0))]  # min-heap of the best k (score, -token) so far: the k-th best first
    top.pop()
    i = 0
    while i < o:
        t = small[i]
        if nc >= cap:
            return -1, False
        g, loc, _ = _hot_counts(t, nh, hot_s, hot_a, hot_b, pos, hot_kids_list, dead_list, is_global, -1, -1,
                                cand_cols[nc])
        j = i
        while j < o and small[j] == t:
            e = order[j]
            if is_global[c_src[e]]:
                g += c_cnt[e]
            else:
                loc += c_cnt[e]
            j += 1
        nc = _add_candidate(t, g, loc, global_weight, local_weight, cand_tok, cand_score, cand_glob, nc, top,
                            k if nh > 0 else 0)  # the best k scores matter to hot lists only
        i = j
    while nh > 0:
        bound = 0.0  # what a child not read yet can score at most
        head = np.int64(-1)  # reaching the bound takes a head's raw count in every list: a token >= each head's
        active = False
        for h in range(nh):
            if pos[h] < hot_b[h]:
                active = True
                hk = hot_kids_list[hot_s[h]]
                col = hk[3, pos[h]]
                bound += (global_weight if is_global[hot_s[h]] else local_weight) * (hk[2, col] - hk[1, col])
                head = max(head, np.int64(hk[0, col]))
        if not active:
            break
        if len(top) >= k and (top[0][0] > bound or (top[0][0] == bound and -top[0][1] < head)):
            break  # no child not read yet can beat the k-th best (a tie loses on its larger token)
        for h in range(nh):
            if pos[h] >= hot_b[h]:
                continue
            hk = hot_kids_list[hot_s[h]]
            t = np.int64(hk[0, hk[3, pos[h]]])
            at = np.searchsorted(small, t)
            if at < o and small[at] == t:
                pos[h] += 1
                continue  # listed already, with every source's count
            if nc >= cap:
                return -1, False
            g, loc, read = _hot_counts(t, nh, hot_s, hot_a, hot_b, pos, hot_kids_list, dead_list, is_global, h,
                                       hk[3, pos[h]], cand_cols[nc])
            pos[h] += 1
            if read:
                continue
            nc = _add_candidate(t, g, loc, global_weight, local_weight, cand_tok, cand_score, cand_glob, nc, top, k)
    by_token = np.argsort(cand_tok[:nc], kind="mergesort")
    best = by_token[np.argsort(-cand_score[:nc][by_token], kind="mergesort")][:k]
    if pushed + len(best) - skip > n_lo.shape[0]:
        return -1, False
    for r in range(len(best)):
        b = best[r]
        t = cand_tok[b]
        sel_tok[r] = t
        sel_score[r] = cand_score[b]
        sel_glob[r] = cand_glob[b]
        if r < skip:
            continue
        row = pushed + r - skip
        for s in range(S):
            n_lo[row, s] = 0
            n_hi[row, s] = 0
        j = np.searchsorted(small, t)
        while j < o and small[j] == t:
            e = order[j]
            n_lo[row, c_src[e]] = c_lo[e]
            n_hi[row, c_src[e]] = c_hi[e]
            j += 1
        for h in range(nh):
            s = hot_s[h]
            hk = hot_kids_list[s]
            col = cand_cols[b, h]  # found while counting
            if col >= 0 and _live(hk, col, dead_list[s]) > 0:
                n_lo[row, s] = hk[1, col]
                n_hi[row, s] = hk[2, col]
    return len(best), limited


FIRST_SIBLINGS = 8  # children pushed when a node is expanded; the rest when the last of them could be drafted


@nb.njit(**_JIT)
def draft(toks_list, sa_list, dead_list, hot_idx_list, hot_kids_list, weight, is_global, context, k, depth_limit,
          width, global_weight, local_weight, work, kids, scores, node_ranges, at_least=1):
    # pragma: no cover - compiled
    """Best-first draft of at most ``k`` nodes after ``context`` (its last ``max_query_length`` tokens) over the
    sources; returns (tokens, parents, scores, global counts, match length) or ``match length -1`` when a work buffer
    was too small (the caller retries with larger ones).

    Scratch space comes from the caller, so a call allocates little: ``work`` (int64, occurrence starts of linear
    sources; its last element holds the used length), ``kids`` (int64 ``[5, c]``: the children of one node over
    every source) and ``node_ranges`` (int64 ``[2, n, S]``: the pushed nodes' occurrence ranges, ``n`` at least
    ``k * (k + 1) + 1``).

    A source with ``weight[s] == 0`` is skipped. The matched suffix is the longest one (at most ``width - 1``
    tokens, so its continuations fit a window, and at least ``at_least``: a shorter match drafts nothing) with a
    continuation of positive score; nodes are at most
    ``min(depth_limit, width - q)`` deep. Children are ranked by (score, smaller token); a node's ``r``-th child can
    be drafted only after its ``r - 1`` better siblings, so with ``n`` nodes drafted only the best ``k - n`` are
    ever pushed, and only the best ``FIRST_SIBLINGS`` at first: a marker that sorts just before the next sibling
    asks for the others when they could be next. Every node keeps the order key (score, depth, token, sequence
    number) it would have had if all were pushed at once, so the draft is the same."""
    S = len(toks_list)
    qmax = min(len(context), width - 1)
    e_tok = np.empty(0, np.int64)
    e_f = np.empty(0, np.float64)
    if k <= 0 or depth_limit <= 0 or qmax <= 0 or at_least > qmax:
        return e_tok, e_tok, e_f, e_f, 0
    query = context[len(context) - qmax:]
    cap = len(work)
    # per source, the occurrences of the suffix of each length where known: SA ranges (found lazily: first only
    # the longest length any source holds), linear sources' as lists in work (all lengths in one scan)
    known = np.zeros((qmax + 1, S), np.bool_)
    absent = np.full(S, qmax + 1, np.int64)  # per source: a length known not to occur (so no longer one does)
    match_lo = np.zeros((qmax + 1, S), np.int64)
    match_hi = np.zeros((qmax + 1, S), np.int64)
    best = at_least - 1
    used = 0
    for s in range(S):
        if weight[s] == 0.0 or len(toks_list[s]) == 0:
            absent[s] = 0
            continue
        toks = toks_list[s]
        sa = sa_list[s]
        if len(sa) > 0:
            low = max(best, at_least)  # shorter lengths matter only if the longest finds no continuation
            q, lo, hi = _longest_in(toks, sa, dead_list[s], query, qmax, low, qmax)
            if q >= low:
                known[q, s] = True
                match_lo[q, s] = lo
                match_hi[q, s] = hi
                best = max(best, q)
            if q < qmax:
                absent[s] = q + 1
        else:
            ends, lens = _match_lengths(toks, query, qmax)
            absent[s] = 1
            for q in range(1, qmax + 1):
                start = used
                for i in range(len(ends)):
                    if lens[i] >= q:
                        if used >= cap - 1:
                            return e_tok, e_tok, e_f, e_f, -1
                        work[used] = ends[i] - q + 1
                        used += 1
                known[q, s] = True
                match_lo[q, s] = start
                match_hi[q, s] = used
                if used > start:
                    absent[s] = q + 1
            best = max(best, absent[s] - 1)
    work[-1] = used
    n_lo = node_ranges[0]  # [rows, S]: row 0 the matched node, then one row per pushed node
    n_hi = node_ranges[1]
    ncap = n_lo.shape[0]
    n_tok = np.empty(ncap, np.int64)
    n_depth = np.empty(ncap, np.int64)
    n_out = np.empty(ncap, np.int64)  # the row's node's index in the draft (-1: the matched node)
    n_par = np.empty(ncap, np.int64)  # the row's node's parent's index in the draft
    n_seq = np.empty(ncap, np.int64)  # the first sequence number of the row's node's children
    n_done = np.empty(ncap, np.int64)  # children of the row's node pushed so far (at least 1 once expanded)
    n_need = np.empty(ncap, np.int64)  # how many of its children can ever be drafted
    n_score = np.empty(ncap, np.float64)
    n_glob = np.empty(ncap, np.float64)
    out_tok = np.empty(k, np.int64)
    out_par = np.empty(k, np.int64)
    out_score = np.empty(k, np.float64)
    out_glob = np.empty(k, np.float64)
    sel_tok = np.empty(k, np.int64)
    sel_score = np.empty(k, np.float64)
    sel_glob = np.empty(k, np.float64)
    cand_tok = kids[5]  # the candidate children of one node (see _best_children)
    cand_score = scores[0]
    cand_glob = scores[1]
    hot_s = np.empty(S, np.int64)
    hot_a = np.empty(S, np.int64)
    hot_b = np.empty(S, np.int64)
    for q in range(best, at_least - 1, -1):
        for s in range(S):
            if q >= absent[s]:
                n_lo[0, s] = 0
                n_hi[0, s] = 0
            elif known[q, s]:
                n_lo[0, s] = match_lo[q, s]
                n_hi[0, s] = match_hi[q, s]
            else:  # a shorter suffix, asked for only now: the longer ones found no continuation
                lo, hi = sa_range(toks_list[s], sa_list[s], query, qmax - q, q)
                n_lo[0, s] = lo
                n_hi[0, s] = hi
        n_depth[0] = 0
        n_out[0] = -1
        n_done[0] = 0
        pushed = 1
        heap = [(0.0, 0, 0, 0, 0)]
        heap.pop()
        seq = 0
        done = 0  # nodes drafted
        row = 0  # the row whose (next) children are wanted
        while True:
            if row >= 0:
                depth = n_depth[row]
                m = q + depth
                first = n_done[row] == 0
                if first:
                    n_need[row] = k - done  # its r-th child needs r - 1 siblings and itself drafted
                    n_seq[row] = seq
                    seq += k  # child r keeps number n_seq + r however late it is pushed
                # later: only the siblings drafted so far plus the nodes still to draft can be reached
                need = n_need[row] if first else min(n_need[row], n_done[row] + k - done)
                if need > n_done[row] and depth < depth_limit and m < width:
                    want = min(need, FIRST_SIBLINGS) if first else need
                    skip = n_done[row]
                    u, limited = _best_children(toks_list, sa_list, dead_list, hot_idx_list, hot_kids_list, weight,
                                                is_global, work, n_lo[row], n_hi[row], m, want, need, skip,
                                                global_weight, local_weight, kids, cand_tok, cand_score, cand_glob,
                                                hot_s, hot_a, hot_b, n_lo, n_hi, pushed, sel_tok, sel_score,
                                                sel_glob)
                    if u < 0:
                        return e_tok, e_tok, e_f, e_f, -1
                    for r in range(skip, u):  # _best_children put child r's ranges in row pushed + r - skip
                        n_tok[pushed] = sel_tok[r]
                        n_depth[pushed] = depth + 1
                        n_par[pushed] = n_out[row]
                        n_done[pushed] = 0
                        n_score[pushed] = sel_score[r]
                        n_glob[pushed] = sel_glob[r]
                        heapq.heappush(heap, (-sel_score[r], depth + 1, sel_tok[r], n_seq[row] + r, pushed))
                        pushed += 1
                    if first and limited and u == want:  # more children may be wanted: a marker just
                        # before the next one (any next child sorts after the last one pushed)
                        heapq.heappush(heap, (-sel_score[u - 1], depth + 1, sel_tok[u - 1], n_seq[row] + u - 1,
                                              -1 - row))
                    n_done[row] = max(u, 1)
                else:
                    n_done[row] = max(n_done[row], 1)
            if done == 0 and pushed == 1:
                break  # no continuation with a positive score: try a shorter suffix
            if len(heap) == 0 or done >= k:
                break
            item = heapq.heappop(heap)
            node = item[4]
            if node < 0:
                row = -1 - node  # a marker: that node's next children
                continue
            out_tok[done] = n_tok[node]
            out_par[done] = n_par[node]
            out_score[done] = n_score[node]
            out_glob[done] = n_glob[node]
            n_out[node] = done
            done += 1
            row = node
        if done > 0:
            return out_tok[:done].copy(), out_par[:done].copy(), out_score[:done].copy(), \
                out_glob[:done].copy(), q
    return e_tok, e_tok, e_f, e_f, 0



@nb.njit(**_JIT)
def top_path(parents):  # pragma: no cover - compiled
    """Indices of a best-first draft's best path: its first root node, then always that node's first child."""
    n = len(parents)
    first = np.full(n + 1, -1, np.int64)  # [n + 1]: the first child of node p at p + 1 (the context at 0)
    for i in range(n - 1, -1, -1):
        first[parents[i] + 1] = i
    path = np.empty(n, np.int64)
    m = 0
    node = first[0]
    while node >= 0:
        path[m] = node
        m += 1
        node = first[node + 1]
    return path[:m]


@nb.njit(**_JIT)
def draft_ahead(toks_list, sa_list, dead_list, hot_idx_list, hot_kids_list, weight, is_global, context, max_query,
                store_query, k, depth_limit, branch_length, limit, follow_at_most, width, global_weight,
                local_weight, work, kids, scores, node_ranges):  # pragma: no cover - compiled
    """One step's drafting in one call: :func:`draft` after the last ``max_query`` tokens of ``context``, its best
    path drafted on past the window depth, and the follow length, exactly as ``Drafter.extended`` and
    ``Drafter.follow_length`` do with separate calls.

    While the best path is shorter than ``limit`` and its last piece reached its window's depth (``branch_length +
    1`` minus its match), the sources are asked again after ``context`` plus the path (a match of the whole tail,
    at most ``max_query`` tokens) and the answer is hung below the path's end, its scores capped at that node's.
    The follow length is the longest suffix of ``context`` (at most ``follow_at_most`` tokens) a global source
    holds. ``store_query`` is the store's own query limit. Returns (tokens, parents, scores, global counts, match
    length, follow); match length -1: a scratch buffer was too small (the caller retries with larger ones)."""
    n = len(context)
    q_first = min(max_query, store_query)
    tok, par, sc, gl, q = draft(toks_list, sa_list, dead_list, hot_idx_list, hot_kids_list, weight, is_global,
                                context[max(0, n - q_first):], k, depth_limit, width, global_weight, local_weight,
                                work, kids, scores, node_ranges)
    if q < 0:
        return tok, par, sc, gl, -1, 0
    if q > 0:
        path = top_path(par)
        piece_depth = len(path)
        piece_match = q
        while 0 < len(path) < limit and piece_depth >= branch_length + 1 - piece_match:
            grown = np.empty(n + len(path), np.int64)  # the context, then the path's tokens
            grown[:n] = context
            for i in range(len(path)):
                grown[n + i] = tok[path[i]]
            tail_len = min(max_query, len(grown))
            want = limit - len(path)
            mt, mp, ms, mg, mq = draft(toks_list, sa_list, dead_list, hot_idx_list, hot_kids_list, weight,
                                       is_global, grown[len(grown) - min(tail_len, store_query):], want,
                                       min(branch_length, want), width, global_weight, local_weight, work, kids,
                                       scores, node_ranges, tail_len)
            if mq < 0:
                return tok, par, sc, gl, -1, 0
            if mq < tail_len:  # only a shorter suffix matched: not the same text going on
                break
            first = len(tok)
            at = path[len(path) - 1]
            cap = sc[at]
            hung = np.empty(len(mp), np.int64)
            capped = np.empty(len(ms), np.float64)
            for i in range(len(mp)):
                hung[i] = at if mp[i] < 0 else mp[i] + first
                capped[i] = min(ms[i], cap)
            tok = np.concatenate((tok, mt))
            par = np.concatenate((par, hung))
            sc = np.concatenate((sc, capped))
            gl = np.concatenate((gl, mg))
            piece = top_path(mp)
            path = np.concatenate((path, piece + first))
            piece_depth = len(piece)
            piece_match = mq
    follow = longest_suffix(toks_list, sa_list, dead_list, is_global, context, follow_at_most)
    return tok, par, sc, gl, q, follow


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
    id_range(toks)
    continue_entry(toks.copy(), 4, 0, np.array([1], np.int64), np.array([2], np.int64))
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
    hot_idx, hot_kids = hot_table(toks, sa, HOT_DEPTH, 1)
    hil = tuple([hot_idx] + [NO_HOT_IDX] * (slots - 1))
    hkl = tuple([hot_kids] + [NO_HOT_KIDS] * (slots - 1))
    draft(tl, sl, dl, hil, hkl, weight, is_global, ctx, 4, 3, 3, 1.0, 1.0, np.empty(64, np.int64),
          np.empty((6, 64), np.int64), np.empty((2, 64)), np.empty((2, 21, slots), np.int64))
    longest_suffix(tl, sl, dl, is_global, ctx, 2)
    draft_ahead(tl, sl, dl, hil, hkl, weight, is_global, ctx, 2, 2, 4, 3, 3, 8, 2, 3, 1.0, 1.0,
                np.empty(64, np.int64), np.empty((6, 64), np.int64), np.empty((2, 64)),
                np.empty((2, 21, slots), np.int64))
    count_occurrences(toks, sa, dead, ctx)
    _warm = True

"""Tests for lookahead.trie: counts, drafting, release, pruning, threads and persistence."""

from __future__ import annotations

import gzip
import json
import os
import random
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lookahead.trie import Draft, TokenTrie

# ---------------------------------------------------------------------------------------------------- helpers


def ngram_counts(seqs: list[list[int]], width: int) -> Counter[tuple[int, ...]]:
    """Brute force: how often each n-gram of length <= width occurs in seqs."""
    out: Counter[tuple[int, ...]] = Counter()
    for s in seqs:
        for i in range(len(s)):
            for j in range(i + 1, min(i + width, len(s)) + 1):
                out[tuple(s[i:j])] += 1
    return out


def walk(trie: TokenTrie):
    """Yield (key, node, parent) for every node of the trie (reads internals)."""
    stack = [((), trie._root, None)]
    while stack:
        key, node, parent = stack.pop()
        if parent is not None:
            yield key, node, parent
        for t, c in (node.children or {}).items():
            stack.append((key + (t,), c, node))


def check_invariants(trie: TokenTrie) -> None:
    """Structural invariants: size, monotone counts, no empty nodes, index in sync with the tree."""
    nodes = list(walk(trie))
    assert trie.num_nodes() == len(nodes) == len(trie)
    for key, node, parent in nodes:
        assert len(key) <= trie.branch_length + 1
        assert node.total() > 0, key
        if parent is not trie._root:
            assert trie._effective(node) <= trie._effective(parent) * (1 + 1e-12), key
            for rid, c in (node.local or {}).items():
                assert c <= (parent.local or {}).get(rid, 0), (key, rid)
        assert node.children is None or node.children
    indexed = {k: v for k, v in trie._index.items()}
    expected = {k: n for k, n, _ in nodes if len(k) <= trie._index_depth}
    assert indexed.keys() == expected.keys()
    assert all(indexed[k] is expected[k] for k in expected)


def check_draft(d: Draft, decoding_length: int, depth_limit: int) -> None:
    """Draft invariants: tree shape, parents first, scores sorted and non-increasing along paths."""
    assert len(d) == len(d.tokens) == len(d.parents) == len(d.scores) <= max(decoding_length, 0)
    if len(d) == 0:
        return
    assert d.match_length >= 1
    for i, p in enumerate(d.parents):
        assert -1 <= p < i
        if p >= 0:
            assert d.scores[i] <= d.scores[p]
    assert all(a >= b for a, b in zip(d.scores, d.scores[1:], strict=False))
    assert all(s > 0 for s in d.scores)
    assert max(d.depths()) <= depth_limit
    siblings = {(p, t) for p, t in zip(d.parents, d.tokens, strict=True)}
    assert len(siblings) == len(d), "two siblings with the same token"


def hard_bound(trie: TokenTrie, pinned: int = 0) -> int:
    """Most nodes a trie may hold between calls: twice its budget, or ``pinned`` nodes of live requests plus the
    larger of its budget and half of them."""
    return max(2 * trie.node_budget, pinned + max(trie.node_budget, pinned // 2))


def settle(trie: TokenTrie) -> None:
    """Run the pruning sweep until it has nothing left to do."""
    while trie.maintain(1000):
        pass


def build(*seqs: list[int], **kw) -> TokenTrie:
    t = TokenTrie(**kw)
    for s in seqs:
        t.insert(s)
    return t


# ---------------------------------------------------------------------------------------------------- exact examples


def test_two_sequence_example():
    t = build([1, 2, 3], [1, 2, 4], branch_length=2)
    assert t.num_nodes() == 9  # 1, 12, 123, 124, 2, 23, 24, 3, 4
    d = t.draft([1], decoding_length=10)
    assert d == Draft(tokens=[2, 3, 4], parents=[-1, 0, 0], scores=[2.0, 1.0, 1.0], match_length=1)
    assert d.depths() == [1, 2, 2]
    assert t.draft([5, 1], 10) == d  # (5, 1) unknown: falls back to the suffix (1,)
    assert t.draft([1, 2], 10) == Draft([3, 4], [-1, -1], [1.0, 1.0], 2)
    assert t.draft([7, 1, 2], 10).match_length == 2
    assert t.draft([2], 10) == Draft([3, 4], [-1, -1], [1.0, 1.0], 1)
    assert t.draft([1], 2) == Draft([2, 3], [-1, 0], [2.0, 1.0], 1)
    check_invariants(t)


@pytest.mark.parametrize(
    "context",
    [[], [9], [3], [2, 3], [1, 2, 3]],  # empty, unknown, leaves only (no continuation anywhere)
)
def test_no_match_gives_empty_draft(context):
    t = build([1, 2, 3], [1, 2, 4], branch_length=2)
    d = t.draft(context, 10)
    assert d == Draft([], [], [], 0) and len(d) == 0


def test_zero_decoding_length_or_depth():
    t = build([1, 2, 3], branch_length=2)
    assert t.draft([1], 0) == Draft([], [], [], 0)
    assert t.draft([1], -3) == Draft([], [], [], 0)
    assert t.draft([1], 5, branch_length=0) == Draft([], [], [], 0)


def test_sliding_window_counts():
    t = build([1, 2, 1, 2, 1], branch_length=3)  # windows of 4 tokens
    assert t.count([1]) == 3
    assert t.count([2]) == 2
    assert t.count([1, 2]) == 2
    assert t.count([2, 1]) == 2
    assert t.count([1, 2, 1]) == 2
    assert t.count([1, 2, 1, 2]) == 1
    assert t.count([2, 1, 2, 1]) == 1
    assert t.count([1, 2, 1, 2, 1]) == 0  # longer than a window
    assert t.count([3]) == 0 and t.count([]) == 0
    t.insert([1, 2])
    assert t.count([1, 2]) == 3
    check_invariants(t)


def test_tie_break_by_token_id_and_shallower_first():
    t = build([1, 5], [1, 3, 9], [1, 4], branch_length=3)
    d = t.draft([1], 10)
    assert d.tokens == [3, 4, 5, 9]  # ties at score 1: depth 1 first, then token id
    assert d.parents == [-1, -1, -1, 0]
    # reproducible: same trie built in another order gives the same draft
    assert build([1, 4], [1, 3, 9], [1, 5], branch_length=3).draft([1], 10) == d


def test_longest_suffix_first():
    t = build([7, 1, 2], [8, 1, 3], branch_length=3)
    assert t.draft([7, 1], 10) == Draft([2], [-1], [1.0], 2)
    assert t.draft([8, 1], 10) == Draft([3], [-1], [1.0], 2)
    assert t.draft([9, 1], 10) == Draft([2, 3], [-1, -1], [1.0, 1.0], 1)
    # max_query_length bounds the suffix tried
    short = build([7, 1, 2], [8, 1, 3], branch_length=3, max_query_length=1)
    assert short.draft([7, 1], 10) == Draft([2, 3], [-1, -1], [1.0, 1.0], 1)


def test_matched_node_without_children_falls_back():
    t = build([5, 6], [6, 7], branch_length=3)
    # (5, 6) exists but has no continuation: the shorter suffix (6,) wins
    assert t.draft([5, 6], 10) == Draft([7], [-1], [1.0], 1)


def test_decoding_length_and_branch_length_limits():
    seq = list(range(20))
    t = build(seq, branch_length=12)
    assert t.draft([0], 5).tokens == [1, 2, 3, 4, 5]
    assert t.draft([0], 64, branch_length=3).tokens == [1, 2, 3]
    d = t.draft([0], 64)
    assert d.tokens == list(range(1, 13))  # windows of 13 tokens: 12 levels below (0,)
    assert d.parents == [-1] + list(range(11))
    assert d.depths() == list(range(1, 13))
    assert t.draft([5, 6], 64).tokens == list(range(7, 18))  # 11 levels left below a depth-2 match
    assert t.draft([19], 64) == Draft([], [], [], 0)


def test_draft_accepts_tensor_like_contexts():
    t = build([1, 2, 3], branch_length=2)
    t.insert(np.array([1, 2, 3], dtype=np.int64))
    d = t.draft(np.array([0, 1]), 4)
    assert d.tokens == [2, 3] and all(type(x) is int for x in d.tokens)
    assert d.scores == [2.0, 2.0]


# ---------------------------------------------------------------------------------------------------- local / global


def test_local_and_global_scores():
    t = TokenTrie(branch_length=2)
    t.insert([1, 2, 3])  # global
    t.insert([1, 2, 4], request_id="r")
    t.insert([1, 2, 4], request_id="r")
    assert t.count([1, 2, 4]) == 0 and t.count([1, 2, 4], "r") == 2
    assert t.count([1, 2], "r") == 2 and t.count([1, 2]) == 1
    assert t.draft([1, 2], 10, request_id="r") == Draft([4, 3], [-1, -1], [2.0, 1.0], 2)
    # no request, or another request: local counts of "r" are invisible
    assert t.draft([1, 2], 10) == Draft([3], [-1], [1.0], 2)
    assert t.draft([1, 2], 10, request_id="s") == Draft([3], [-1], [1.0], 2)
    assert t.draft([4], 10, request_id="s") == Draft([], [], [], 0)
    assert t.draft([1], 10, request_id="r") == Draft([2, 4, 3], [-1, 0, 0], [3.0, 2.0, 1.0], 1)


def test_weights_change_order():
    def make(**kw):
        t = TokenTrie(branch_length=2, **kw)
        t.insert([1, 2, 3])
        t.insert([1, 2, 3])
        t.insert([1, 2, 4], request_id="r")
        return t

    assert make().draft([2], 10, "r").tokens == [3, 4]  # 2 global vs 1 local
    assert make(local_weight=3.0).draft([2], 10, "r") == Draft([4, 3], [-1, -1], [3.0, 2.0], 1)
    assert make(global_weight=0.25).draft([2], 10, "r") == Draft([4, 3], [-1, -1], [1.0, 0.5], 1)
    assert make(global_weight=0.0).draft([2], 10, "r") == Draft([4], [-1], [1.0], 1)
    assert make(local_weight=0.0).draft([2], 10, "r") == Draft([3], [-1], [2.0], 1)
    assert make(global_weight=0.0).draft([2], 10) == Draft([], [], [], 0)


def test_release_drops_local_counts_and_empty_nodes():
    t = TokenTrie(branch_length=2)
    t.insert([1, 2, 3])
    n_global = t.num_nodes()
    t.insert([1, 2, 4, 5], request_id="r")
    t.insert([1, 2, 4], request_id="s")
    check_invariants(t)
    assert t.num_nodes() > n_global
    t.release("r")
    check_invariants(t)
    assert t.count([2, 4, 5], "r") == 0 and t.count([1, 2], "r") == 0
    assert t.count([1, 2, 4], "s") == 1  # the other request keeps its counts
    assert t.count([4, 5]) == 0 and t._find((4, 5)) is None
    assert t.count([1, 2]) == 1  # shared node keeps its global count
    t.release("s")
    t.release("s")  # twice, and unknown ids, are no-ops
    t.release("nobody")
    check_invariants(t)
    assert t.num_nodes() == n_global
    assert t.draft([1, 2], 10, "s") == Draft([3], [-1], [1.0], 2)


def counts_of(trie: TokenTrie) -> dict[tuple[int, ...], tuple[float, dict]]:
    return {key: (node.count, dict(node.local or {})) for key, node, _ in walk(trie)}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    stream=st.lists(st.integers(0, 5), max_size=30),
    cuts=st.lists(st.integers(0, 30), max_size=6),
    branch=st.integers(1, 5),
    request=st.sampled_from([None, "r"]),
)
def test_extend_piece_by_piece_counts_like_one_insert(stream, cuts, branch, request):
    whole = TokenTrie(branch_length=branch, max_query_length=3)
    whole.insert(stream, request_id=request)
    pieces = TokenTrie(branch_length=branch, max_query_length=3)
    bounds = sorted({min(c, len(stream)) for c in cuts} | {len(stream)})
    pieces.insert(stream[: bounds[0]], request_id=request)
    for a, b in zip(bounds, bounds[1:]):
        pieces.extend(stream[:a], stream[a:b], request_id=request)
    check_invariants(pieces)
    assert counts_of(pieces) == counts_of(whole)
    pieces.release("r")
    whole.release("r")
    assert counts_of(pieces) == counts_of(whole)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    stream=st.lists(st.integers(0, 5), max_size=40),
    cuts=st.lists(st.integers(0, 45), max_size=6),
    branch=st.integers(1, 5),
    request=st.sampled_from([None, "r"]),
)
def test_windowed_insert_in_slices_counts_like_one_insert(stream, cuts, branch, request):
    whole = TokenTrie(branch_length=branch, max_query_length=3)
    whole.insert(stream, request_id=request)
    pieces = TokenTrie(branch_length=branch, max_query_length=3)
    bounds = sorted({0, len(stream) + 3} | set(cuts))  # a last stop past the end is cut to it
    for a, b in zip(bounds, bounds[1:]):
        pieces.insert(stream, request, a, b)
        check_invariants(pieces)
    assert counts_of(pieces) == counts_of(whole)
    pieces.release("r")
    whole.release("r")
    assert counts_of(pieces) == counts_of(whole)


@settings(max_examples=100, deadline=None)
@given(stream=st.lists(st.integers(0, 4), max_size=30), start=st.integers(0, 32), span=st.integers(0, 32))
def test_windowed_insert_counts_the_windows_starting_in_the_range(stream, start, span):
    t = TokenTrie(branch_length=3, max_query_length=2)
    t.insert(stream, None, start, start + span)
    windows = [stream[i : i + 4] for i in range(start, min(start + span, len(stream)))]
    expected = Counter(tuple(w[:j]) for w in windows for j in range(1, len(w) + 1))
    assert {k: n.count for k, n, _ in walk(t)} == dict(expected)
    check_invariants(t)


def test_windowed_insert_reads_array_slices_and_checks_its_range():
    t = TokenTrie(branch_length=2)
    t.insert(np.array([1, 2, 3, 4, 5]), "r", np.int64(1), 2)  # numpy ids and a numpy start
    assert {k for k, _, _ in walk(t)} == {(2,), (2, 3), (2, 3, 4)}
    t.insert([1, 2, 3], None, 5)  # start past the end: nothing
    t.insert([1, 2, 3], None, 1, 1)  # empty range: nothing
    assert t.num_nodes() == 3
    for start, stop, message in [(-1, None, "start must be an int >= 0"), (True, None, "start"), (1.5, None, "start"),
                                 (2, 1, r"stop must be None or an int >= start \(2\)"), (0, "3", "stop")]:
        with pytest.raises(ValueError, match=message):
            t.insert([1, 2, 3], None, start, stop)
    assert t.num_nodes() == 3


def test_extend_lets_a_stream_draft_from_its_own_last_tokens():
    t = TokenTrie(branch_length=8)
    t.insert([9, 9], request_id="r")
    t.extend([9, 9], [1, 2, 3, 4], request_id="r")
    assert t.draft([4, 1], 5, "r").tokens == [2, 3, 4]  # no complete 9-token window needed
    assert t.count([9, 1, 2], "r") == 1  # the prompt's windows grew into the output


def test_release_keeps_nodes_with_global_counts():
    t = TokenTrie(branch_length=3)
    t.insert([1, 2, 3, 4], request_id="r")
    t.insert([2, 3])
    t.release("r")
    check_invariants(t)
    assert t.num_nodes() == 3  # (2,), (2, 3), (3,)
    assert t.draft([2], 10) == Draft([3], [-1], [1.0], 1)


# ---------------------------------------------------------------------------------------------------- Draft


def test_truncate_keeps_a_valid_tree():
    t = build([1, 2, 3, 4], [1, 2, 5], [1, 6, 7], branch_length=3)
    d = t.draft([1], 10)
    check_draft(d, 10, 3)
    for n in range(len(d) + 2):
        s = d.truncate(n)
        assert len(s) == min(n, len(d))
        assert s.tokens == d.tokens[:n] and s.parents == d.parents[:n] and s.scores == d.scores[:n]
        assert s.match_length == d.match_length
        assert all(p < i for i, p in enumerate(s.parents))
        assert s.depths() == d.depths()[:n]
    assert d.truncate(100) is d
    with pytest.raises(ValueError):
        d.truncate(-1)


# ---------------------------------------------------------------------------------------------------- properties

seqs_strategy = st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=25), min_size=1, max_size=5)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seqs=seqs_strategy,
    local_seqs=seqs_strategy,
    context=st.lists(st.integers(0, 6), max_size=8),
    branch_length=st.integers(1, 5),
    max_query_length=st.integers(1, 4),
    decoding_length=st.integers(0, 20),
    draft_depth=st.none() | st.integers(1, 6),
    weights=st.sampled_from([(1.0, 1.0), (2.0, 0.5), (0.0, 1.0), (1.0, 0.0)]),
)
def test_property_counts_and_drafts(
    seqs, local_seqs, context, branch_length, max_query_length, decoding_length, draft_depth, weights
):
    lw, gw = weights
    t = TokenTrie(branch_length=branch_length, max_query_length=max_query_length, local_weight=lw, global_weight=gw)
    for s in seqs:
        t.insert(s)
    for s in local_seqs:
        t.insert(s, request_id="r")
    width = branch_length + 1
    g_counts = ngram_counts(seqs, width)
    l_counts = ngram_counts(local_seqs, width)
    check_invariants(t)
    assert t.num_nodes() == len(g_counts.keys() | l_counts.keys())
    for key in g_counts.keys() | l_counts.keys():
        assert t.count(key) == g_counts[key]
        assert t.count(key, "r") == l_counts[key]

    def score(key: tuple[int, ...]) -> float:
        return lw * l_counts[key] + gw * g_counts[key]

    depth = branch_length if draft_depth is None else draft_depth
    d = t.draft(context, decoding_length, request_id="r", branch_length=draft_depth)
    check_draft(d, decoding_length, depth)

    # brute-force reference: the longest suffix with a positive-score continuation, then the top scores below it
    expected_q, candidates = 0, []
    if decoding_length > 0:
        for q in range(min(max_query_length, len(context)), 0, -1):
            suffix = tuple(context[-q:])
            below = [
                (k, score(k))
                for k in g_counts.keys() | l_counts.keys()
                if len(k) > q and k[:q] == suffix and len(k) - q <= depth and score(k) > 0
            ]
            if below:
                expected_q, candidates = q, below
                break
    assert d.match_length == expected_q
    assert d.scores == sorted((s for _, s in candidates), reverse=True)[:decoding_length]
    # every drafted path exists with the score it claims
    paths: list[tuple[int, ...]] = []
    for tok, p, s in zip(d.tokens, d.parents, d.scores, strict=True):
        path = (paths[p] if p >= 0 else ()) + (tok,)
        paths.append(path)
        assert score(tuple(context[len(context) - d.match_length :]) + path) == s

    # a request that inserted nothing sees the global part only
    d2 = t.draft(context, decoding_length, request_id="other")
    check_draft(d2, decoding_length, branch_length)
    assert d2 == t.draft(context, decoding_length)

    # release brings the trie back to the global-only state
    t.release("r")
    check_invariants(t)
    assert t.num_nodes() == len(g_counts)


@settings(max_examples=40, deadline=None)
@given(
    seqs=st.lists(st.lists(st.integers(0, 30), min_size=1, max_size=60), min_size=1, max_size=8),
    local=st.lists(st.integers(0, 30), max_size=40),
    budget=st.integers(5, 60),
)
def test_property_pruning_keeps_invariants(seqs, local, budget):
    t = TokenTrie(branch_length=4, max_query_length=3, node_budget=budget)
    t.insert(local, request_id="r")
    pinned = t.num_nodes()  # a live request's nodes are never pruned
    assert pinned == len(ngram_counts([local], 5))
    for s in seqs:
        t.insert(s)
        assert t.num_nodes() <= hard_bound(t, pinned)
        check_invariants(t)
    for ctx in seqs:
        check_draft(t.draft(ctx, 16, "r"), 16, 4)
    settle(t)
    assert t.num_nodes() <= max(int(0.8 * budget), pinned)
    check_invariants(t)
    t.release("r")
    check_invariants(t)
    settle(t)
    assert t.num_nodes() <= int(0.8 * budget)


# ---------------------------------------------------------------------------------------------------- node budget


def test_node_budget_bounds_memory_under_100k_random_windows():
    rng = random.Random(1234)
    budget = 20_000
    t = TokenTrie(branch_length=6, max_query_length=3, node_budget=budget)
    tokens = [rng.randrange(1000) for _ in range(100_000)]
    for i in range(0, len(tokens), 2_000):
        t.insert(tokens[i : i + 2_000])
        assert t.num_nodes() <= budget
    assert 0 < t.num_nodes() <= budget
    check_invariants(t)
    # the trie still drafts from recent text
    assert len(t.draft(tokens[-3:-1], 8)) >= 1


def test_pruning_prefers_global_rare_subtrees_over_live_local_counts():
    t = TokenTrie(branch_length=3, max_query_length=2, node_budget=200)
    doc = list(range(1000, 1040))  # 40 tokens -> 154 local nodes
    t.insert(doc, request_id="r")
    rng = random.Random(0)
    for _ in range(20):
        t.insert([rng.randrange(50) for _ in range(50)])
        assert t.num_nodes() <= 200
    # the live request's document survived every pruning round
    for i in range(len(doc) - 3):
        assert t.count(doc[i : i + 4], "r") == 1
    assert t.draft(doc[:2], 10, "r").tokens == doc[2:4]  # windows of 4: two levels below a depth-2 match
    check_invariants(t)


def test_pruning_frequent_global_ngrams_survive():
    t = TokenTrie(branch_length=3, max_query_length=2, node_budget=300)
    frequent = [1, 2, 3, 4]
    rng = random.Random(7)
    for _ in range(60):
        t.insert(frequent)
        t.insert([rng.randrange(100, 400) for _ in range(30)])
        assert t.num_nodes() <= 300
    assert t.count(frequent) >= 1
    assert t.draft([1], 10).tokens[:3] == [2, 3, 4]
    check_invariants(t)


def test_live_local_counts_alone_over_budget_are_kept_until_release(monkeypatch: pytest.MonkeyPatch):
    t = TokenTrie(branch_length=4, node_budget=100)
    doc = list(range(500))
    t.insert(doc, request_id="r")  # 2490 distinct local nodes: over budget, yet none may go while "r" is live
    assert t.num_nodes() == len(ngram_counts([doc], 5)) == 2490
    assert t.maintain(10_000) == 0  # nothing it could ever prune
    full_prunes = []
    monkeypatch.setattr(t, "_prune_fully", lambda real=t._prune_fully: full_prunes.append(1) or real())
    rng = random.Random(3)
    for _ in range(30):
        t.insert([rng.randrange(1000, 1100) for _ in range(40)])  # global text: prunable
        assert t.num_nodes() <= hard_bound(t, 2490)
    assert len(full_prunes) <= 2  # the hard cap rose above the live nodes: no full prune after every window
    settle(t)
    assert t.num_nodes() == 2490 and all(t.count(doc[i : i + 5], "r") == 1 for i in range(496))
    check_invariants(t)
    t.release("r")
    settle(t)
    assert t.num_nodes() <= 80
    check_invariants(t)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    local=st.lists(st.integers(0, 8), max_size=30),
    other=st.lists(st.integers(0, 8), max_size=30),
    seqs=st.lists(st.lists(st.integers(0, 20), min_size=1, max_size=25), min_size=1, max_size=4),
    budget=st.integers(5, 60),
    decay=st.sampled_from([0.5, 0.3, 0.9]),
    release_other_at=st.integers(0, 100),
    maintain=st.lists(st.integers(0, 40), max_size=8),
)
def test_property_amortised_pruning_matches_the_old_semantics(local, other, seqs, budget, decay, release_other_at,
                                                              maintain):
    """Global counts after amortised pruning: every count decayed by ``decay`` at each round, exactly, for the nodes
    still there; a live request's windows all stay; a request released mid-sweep does not confuse the sweep."""
    width = 4
    t = TokenTrie(branch_length=width - 1, max_query_length=2, node_budget=budget, decay=decay)
    t.insert(local, "r")
    t.insert(other, "s")
    live = ngram_counts([local], width)
    reference: dict[tuple[int, ...], float] = {}  # the old semantics: +1 per window, x decay per round
    step = 0
    for s_ in seqs:
        for i in range(len(s_)):
            epoch = t._sweep_state.epoch
            t.insert(s_, None, i, i + 1)  # one window per call: rounds run after it is counted
            for j in range(1, len(s_[i : i + width]) + 1):
                reference[tuple(s_[i : i + j])] = reference.get(tuple(s_[i : i + j]), 0.0) + 1.0
            if maintain:
                t.maintain(maintain[step % len(maintain)])
            if step == release_other_at:
                t.release("s")
            step += 1
            factor = decay ** (t._sweep_state.epoch - epoch)
            present = {k for k, _, _ in walk(t)}
            reference = {k: v * factor for k, v in reference.items() if k in present}  # the rest was pruned
            for key in present:
                assert t.count(key) == pytest.approx(reference.get(key, 0.0), rel=1e-9, abs=1e-12), key
            assert all(t.count(k, "r") == c for k, c in live.items())  # never pruned while live
            assert t.num_nodes() <= hard_bound(t, len(live) + len(ngram_counts([other], width)))
    check_invariants(t)
    t.release("r")
    t.release("s")
    settle(t)
    assert t.num_nodes() <= int(0.8 * budget)
    check_invariants(t)


def test_no_call_walks_the_whole_trie():
    """Over budget, an insert's pruning work is bounded by the nodes it creates (plus the subtrees it removes)."""
    t = TokenTrie(branch_length=6, max_query_length=3, node_budget=3000)
    visits, removed = [0], [0]

    def counting(method, total: list[int]):
        def wrapped(*args):
            n = method(*args)
            total[0] += n
            return n
        return wrapped

    t._sweep_slice = counting(t._sweep_slice, visits)  # type: ignore[method-assign]
    t._remove = counting(t._remove, removed)  # type: ignore[method-assign]
    t._prune_fully = None  # type: ignore[assignment]  # the last resort must not be needed here
    rng = random.Random(11)
    swept = unfinished = 0
    for _ in range(400):
        seq = [rng.randrange(300) for _ in range(rng.randrange(1, 40))]
        before, visits[0], removed[0] = t.num_nodes(), 0, 0
        t.insert(seq)
        created = t.num_nodes() - before + removed[0]
        assert visits[0] - removed[0] <= 64 + 4 * created  # within its share (the trie stays under 2x its budget)
        assert visits[0] < before or before < 100
        swept += visits[0] > 0
        unfinished += bool(t._sweep_state.frames)  # a pass left for later calls
        assert t.num_nodes() <= 1.25 * t.node_budget
    assert swept >= 10 and unfinished >= 10  # the sweep ran, and its passes were spread over several calls
    check_invariants(t)


def test_maintain_prunes_between_calls():
    t = TokenTrie(branch_length=3, max_query_length=2, node_budget=1000)
    rng = random.Random(5)
    while t.num_nodes() <= 850:
        t.insert([rng.randrange(200) for _ in range(10)])
    assert t.num_nodes() <= 1000  # above the 80% target, within the budget: inserts leave it alone
    assert t.maintain(0) == 0
    first = t.maintain(100)
    assert 100 <= first < 100 + 4  # at most one removed subtree (here at most 4 nodes deep) past the limit
    settle(t)
    assert t.num_nodes() <= 800 and t.maintain(100) == 0
    check_invariants(t)
    with pytest.raises(ValueError, match="max_nodes_visited must be >= 0"):
        t.maintain(-1)
    with pytest.raises(TypeError):
        t.maintain(1.5)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------- threads


def test_thread_safety_matches_single_threaded_result():
    rng = random.Random(42)
    n_threads = 8
    global_seqs = [[[rng.randrange(40) for _ in range(80)] for _ in range(10)] for _ in range(n_threads)]
    local_seqs = [[[rng.randrange(40) for _ in range(80)] for _ in range(5)] for _ in range(n_threads)]
    kw = dict(branch_length=5, max_query_length=3)

    reference = TokenTrie(**kw)
    for k in range(n_threads):
        for s in global_seqs[k]:
            reference.insert(s)

    t = TokenTrie(**kw)
    errors: list[BaseException] = []
    barrier = threading.Barrier(n_threads + 2)

    def worker(k: int) -> None:
        try:
            barrier.wait()
            rid = f"req{k}"
            for s in local_seqs[k]:
                t.insert(s, request_id=rid)
            for s in global_seqs[k]:
                t.insert(s)
                check_draft(t.draft(s[:7], 32, request_id=rid), 32, 5)
            # while this request is live its local counts are all there
            for s in local_seqs[k]:
                assert t.count(s[:3], rid) >= 1
            t.release(rid)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    def drafter() -> None:
        try:
            barrier.wait()
            for i in range(300):
                ctx = global_seqs[i % n_threads][i % 10][:5]
                check_draft(t.draft(ctx, 64), 64, 5)
                t.num_nodes()
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_threads)]
    threads += [threading.Thread(target=drafter) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    check_invariants(t)
    assert t.num_nodes() == reference.num_nodes()
    for (key, node, _), (rkey, rnode, _) in zip(
        sorted(walk(t), key=lambda x: x[0]), sorted(walk(reference), key=lambda x: x[0]), strict=True
    ):
        assert key == rkey and node.count == rnode.count and node.local is None
    for seqs in global_seqs:
        for s in seqs:
            assert t.draft(s[:4], 64) == reference.draft(s[:4], 64)


def test_thread_safety_under_pruning():
    budget = 500
    t = TokenTrie(branch_length=4, max_query_length=2, node_budget=budget)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        rng = random.Random(k)
        try:
            for i in range(40):
                seq = [rng.randrange(60) for _ in range(40)]
                t.insert(seq, request_id=f"req{k}-{i // 10}" if i % 2 else None)
                assert t.num_nodes() <= hard_bound(t, pinned=6 * 5 * 40 * 5)  # 6 live requests of 5 x 40 tokens
                check_draft(t.draft(seq[:3], 16, request_id=f"req{k}-{i // 10}"), 16, 4)
                if i % 10 == 9:
                    t.release(f"req{k}-{i // 10}")
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    check_invariants(t)
    assert all(node.local is None for _, node, _ in walk(t))  # every request was released
    settle(t)
    assert t.num_nodes() <= 0.8 * budget
    check_invariants(t)


# ---------------------------------------------------------------------------------------------------- persistence


def _sample_trie() -> TokenTrie:
    rng = random.Random(3)
    t = TokenTrie(branch_length=5, max_query_length=3, node_budget=5000, decay=0.25, local_weight=2.0)
    for _ in range(30):
        t.insert([rng.randrange(30) for _ in range(40)])
    return t


@pytest.mark.parametrize("name", ["trie.json", "trie.json.gz"])
def test_save_load_round_trip(tmp_path: Path, name: str):
    t = _sample_trie()
    t.insert([100, 101, 102, 103], request_id="r")  # local counts are not saved
    path = tmp_path / name
    t.save(path)
    assert os.listdir(tmp_path) == [name]  # no temporary file left behind
    raw = path.read_bytes()
    doc = json.loads(gzip.decompress(raw) if name.endswith(".gz") else raw)
    assert doc["format"] == "lookahead-trie" and doc["version"] == 1
    assert doc["config"] == t.config()

    u = TokenTrie.load(str(path))
    check_invariants(u)
    assert u.config() == t.config()
    assert u.count([100, 101]) == 0 and u.num_nodes() == t.num_nodes() - 10
    rng = random.Random(5)
    for _ in range(300):
        ctx = [rng.randrange(30) for _ in range(rng.randrange(1, 6))]
        assert u.draft(ctx, 64) == t.draft(ctx, 64)
    # save -> load -> save is stable
    path2 = tmp_path / ("again-" + name)
    u.save(path2)
    assert json.loads(gzip.decompress(path2.read_bytes()) if name.endswith(".gz") else path2.read_bytes()) == doc


def test_save_overwrites_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "t.json"
    build([1, 2, 3], branch_length=2).save(path)
    before = path.read_bytes()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        build([4, 5, 6], branch_length=2).save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before  # old file intact
    assert os.listdir(tmp_path) == ["t.json"]  # temp file cleaned up
    build([4, 5, 6], branch_length=2).save(path)
    assert TokenTrie.load(path).draft([4], 5).tokens == [5, 6]
    assert os.listdir(tmp_path) == ["t.json"]


def test_empty_trie_round_trip(tmp_path: Path):
    t = TokenTrie()
    t.save(tmp_path / "e.json")
    u = TokenTrie.load(tmp_path / "e.json")
    assert u.num_nodes() == 0 and u.config() == t.config()


def _write_json(path: Path, doc) -> Path:
    path.write_text(json.dumps(doc))
    return path


def _valid_doc() -> dict:
    return {
        "format": "lookahead-trie",
        "version": 1,
        "config": TokenTrie(branch_length=2).config(),
        "nodes": [[-1, 1, 2.0], [0, 2, 1.0]],
    }


def test_load_valid_handmade_file(tmp_path: Path):
    t = TokenTrie.load(_write_json(tmp_path / "ok.json", _valid_doc()))
    assert t.draft([1], 5) == Draft([2], [-1], [1.0], 1)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(format="something-else"), "format is 'something-else'"),
        (lambda d: d.update(version=2), "unsupported version 2"),
        (lambda d: d.pop("version"), "unsupported version None"),
        (lambda d: d.update(config=[1]), "config"),
        (lambda d: d["config"].update(decay=2.0), "bad config"),
        (lambda d: d["config"].update(colour="red"), "bad config"),
        (lambda d: d.update(nodes={}), "nodes"),
        (lambda d: d["nodes"].append([5, 3, 1.0]), "bad parent index"),
        (lambda d: d["nodes"].append([0, "x", 1.0]), "bad token"),
        (lambda d: d["nodes"].append([0, 3, -1.0]), "bad count"),
        (lambda d: d["nodes"].append([0, 3, 5.0]), "larger count than its parent"),
        (lambda d: d["nodes"].append([0, 2, 1.0]), "repeats token"),
        (lambda d: d["nodes"].append([1, 3]), "triple"),
        (lambda d: d["nodes"].extend([[1, 3, 1.0], [2, 4, 1.0]]), "deeper than branch_length"),
    ],
)
def test_load_rejects_bad_content(tmp_path: Path, mutate, message):
    doc = _valid_doc()
    mutate(doc)
    with pytest.raises(ValueError, match=message):
        TokenTrie.load(_write_json(tmp_path / "bad.json", doc))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not json at all", "cannot decode JSON"),
        (b"", "cannot decode JSON"),
        (b"\xff\xfe\x00garbage", "cannot decode JSON"),
        (gzip.compress(b'{"format": "lookahead-trie"')[:-6], "cannot decode JSON"),  # truncated gzip
        (b"[1, 2, 3]", "format is 'list'"),
        (b'{"hello": "world"}', "format is None"),
    ],
)
def test_load_rejects_corrupt_or_foreign_files(tmp_path: Path, data: bytes, message: str):
    path = tmp_path / "x.bin"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=message) as info:
        TokenTrie.load(path)
    assert "x.bin" in str(info.value) and "not a valid lookahead-trie file" in str(info.value)


def test_load_missing_file_is_not_a_value_error(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        TokenTrie.load(tmp_path / "missing.json")


# Saved by the code before amortised pruning: TokenTrie(branch_length=2, max_query_length=2, node_budget=8), three
# inserts of [1, 2, 3] then [4, 5]: one pruning round halved every count and removed the 4, 5 n-grams.
OLD_FILE = (
    '{"format":"lookahead-trie","version":1,"config":{"branch_length":2,"max_query_length":2,"node_budget":8,'
    '"decay":0.5,"local_weight":1.0,"global_weight":1.0},"nodes":[[-1,1,1.5],[0,2,1.5],[1,3,1.5],[-1,2,1.5],'
    '[3,3,1.5],[-1,3,1.5]]}'
)


def test_files_of_the_old_code_load_and_the_same_inserts_save_the_same_file(tmp_path: Path):
    old = tmp_path / "old.json"
    old.write_text(OLD_FILE)
    t = TokenTrie.load(old)
    assert t.count([1, 2, 3]) == 1.5 and t.count([4]) == 0 and t.num_nodes() == 6
    t.save(tmp_path / "again.json")
    # the same bytes, then the sharing state old files lack (origin, applied seqs, journal position, sources)
    assert (tmp_path / "again.json").read_text().startswith(OLD_FILE[:-1] + ',"origin":')
    u = TokenTrie(branch_length=2, max_query_length=2, node_budget=8)
    for seq in ([1, 2, 3], [1, 2, 3], [1, 2, 3], [4, 5]):
        u.insert(seq)
    u.save(tmp_path / "new.json")
    assert (tmp_path / "new.json").read_text().startswith(OLD_FILE[:-1] + ',"origin":')


def test_save_mid_sweep_writes_the_decayed_counts(tmp_path: Path):
    t = TokenTrie(branch_length=4, max_query_length=2, node_budget=400, decay=0.3)
    rng = random.Random(8)
    for _ in range(40):
        t.insert([rng.randrange(40) for _ in range(30)])
    t.maintain(50)  # leave a pass half done: nodes of two epochs
    epochs = {node.epoch for _, node, _ in walk(t)}
    assert len(epochs) == 2, epochs
    t.save(tmp_path / "t.json")
    u = TokenTrie.load(tmp_path / "t.json")
    keys = [k for k, _, _ in walk(t)]
    assert {k for k, _, _ in walk(u)} == set(keys)
    for key in keys:
        assert u.count(key) == pytest.approx(t.count(key), rel=1e-12)
    check_invariants(u)


def test_loaded_trie_over_budget_is_pruned(tmp_path: Path):
    doc = _valid_doc()
    doc["config"]["node_budget"] = 1
    t = TokenTrie.load(_write_json(tmp_path / "b.json", doc))
    assert t.num_nodes() <= 1
    check_invariants(t)


# ---------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kw",
    [
        {"branch_length": 0},
        {"max_query_length": 0},
        {"node_budget": 0},
        {"branch_length": 2.5},
        {"decay": 0.0},
        {"decay": 1.0},
        {"local_weight": -1.0},
        {"global_weight": float("nan")},
    ],
)
def test_invalid_config(kw):
    with pytest.raises(ValueError):
        TokenTrie(**kw)


def test_repr_and_len():
    t = build([1, 2], branch_length=1)
    assert len(t) == 3 and "num_nodes=3" in repr(t)


def test_draft_reports_the_global_part_of_each_count():
    trie = TokenTrie(branch_length=3)
    trie.insert([1, 2, 3])  # a past output: global
    trie.insert([1, 2, 4], request_id="r")  # this request's document: local
    draft = trie.draft([1], decoding_length=8, request_id="r")
    by_token = dict(zip(draft.tokens, draft.global_counts))
    assert by_token[2] == 1.0 and by_token[3] == 1.0 and by_token[4] == 0.0
    assert dict(zip(draft.tokens, draft.scores))[2] == 2.0
    assert draft.truncate(1).global_counts == draft.global_counts[:1]

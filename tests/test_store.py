"""The draft store against the oracle trie: the same inserts, releases and removals give the same drafts, scores
and counts (no decay: the oracle's node budget is never reached). Policies that differ on purpose are not exercised
here: eviction (tested on its own below) and ``append`` slices."""

from __future__ import annotations

import contextlib
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lookahead.store import DraftStore, StoreFileError, kernels
from lookahead.store.segments import Segment
from lookahead.trie import TokenTrie, TrieDelta

VOCAB = 5
tokens_st = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=14)
op_st = st.one_of(
    st.tuples(st.just("insert"), tokens_st),
    st.tuples(st.just("prompt"), st.sampled_from(["a", "b"]), tokens_st),
    st.tuples(st.just("doc"), st.sampled_from(["a", "b"]), tokens_st),
    st.tuples(st.just("grow"), st.sampled_from(["a", "b"]), tokens_st),
    st.tuples(st.just("release"), st.sampled_from(["a", "b"])),
    st.tuples(st.just("source"), st.sampled_from(["d1", "d2", "d3"]), tokens_st),
    st.tuples(st.just("remove"), st.sampled_from(["d1", "d2", "d3"])),
)


def pair(branch_length: int = 4, max_query_length: int = 3, tail_tokens: int = 6
         ) -> tuple[DraftStore, TokenTrie]:
    store = DraftStore(branch_length=branch_length, max_query_length=max_query_length, tail_tokens=tail_tokens,
                       background=False)
    trie = TokenTrie(branch_length=branch_length, max_query_length=max_query_length, node_budget=10**9)
    return store, trie


def apply(ops, store: DraftStore, trie: TokenTrie) -> None:
    streams: dict[str, list[int]] = {}
    for op in ops:
        kind = op[0]
        if kind == "insert":
            store.insert(op[1])
            trie.insert(op[1])
        elif kind in ("prompt", "doc", "grow"):
            rid, toks = op[1], op[2]
            if rid not in streams or kind == "prompt" and not streams[rid]:
                kind = "prompt"
            if kind == "prompt":
                if rid in streams:
                    continue  # one prompt per request
                streams[rid] = list(toks)
                store.insert(toks, rid)
                trie.insert(toks, rid)
            elif kind == "doc":
                store.insert(toks, rid)
                trie.insert(toks, rid)
            else:
                store.extend(streams[rid], toks, rid)
                trie.extend(streams[rid], toks, rid)
                streams[rid] += toks
        elif kind == "release":
            streams.pop(op[1], None)
            store.release(op[1])
            trie.release(op[1])
        elif kind == "source":
            store.insert_source(op[1], op[2])
            trie.insert_source(op[1], op[2])
        else:
            store.remove_source(op[1])
            trie.remove_source(op[1])


def assert_same(store: DraftStore, trie: TokenTrie, contexts, sizes=(2, 12)) -> None:
    for ctx in contexts:
        for rid in (None, "a", "b"):
            for k in sizes:
                assert store.draft(ctx, k, rid) == trie.draft(ctx, k, rid), (ctx, rid, k)
                assert store.draft(ctx, k, rid).global_counts == trie.draft(ctx, k, rid).global_counts
        for n in range(1, len(ctx) + 1):
            assert store.count(ctx[-n:]) == trie.count(ctx[-n:])
            assert store.longest_global_suffix(ctx, n) == trie.longest_global_suffix(ctx, n), (ctx, n)


contexts_st = st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=5), min_size=1, max_size=6)


@contextlib.contextmanager
def hot_children(threshold: int):
    """Segments built inside list every node with at least ``threshold`` children in their hot-node tables (1:
    every node of depth 1..HOT_DEPTH, so drafts read them best-first; the default never triggers on 5 tokens)."""
    before = kernels.HOT_CHILDREN
    kernels.HOT_CHILDREN = threshold
    try:
        yield
    finally:
        kernels.HOT_CHILDREN = before


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op_st, max_size=25), contexts_st, st.integers(1, 5), st.integers(1, 4), st.sampled_from([1, 2, 24]))
def test_drafts_equal_the_oracle_trie(ops, contexts, branch_length, max_query_length, hot):
    store, trie = pair(branch_length, max_query_length)
    with hot_children(hot):
        apply(ops, store, trie)
    assert_same(store, trie, contexts)
    assert store.sources() == trie.sources()
    for sid in store.sources():
        for ctx in contexts:
            assert store.source_count(ctx[-2:], sid) == trie.source_count(ctx[-2:], sid)


@settings(max_examples=40, deadline=None)
@given(st.lists(op_st, max_size=25), contexts_st)
def test_a_saved_store_drafts_the_same(tmp_path_factory, ops, contexts):
    store, trie = pair()
    apply([op for op in ops if op[0] in ("insert", "source", "remove")], store, trie)
    path = tmp_path_factory.mktemp("store") / "store.bin"
    store.save(path)
    for loaded in (DraftStore.load(path, background=False), DraftStore.from_bytes(store.to_bytes())):
        assert loaded.origin == store.origin
        assert loaded.sources() == store.sources()
        for ctx in contexts:
            assert loaded.draft(ctx, 12) == trie.draft(ctx, 12)


@settings(max_examples=40, deadline=None)
@given(st.lists(op_st, max_size=25), contexts_st)
def test_deltas_reach_other_stores_and_tries(ops, contexts):
    store, trie = pair()
    apply(ops, store, trie)
    other, other_trie = pair()
    delta = TrieDelta.from_dict(store.export_delta().to_dict())
    assert other.merge(delta) == len(delta)
    assert other.merge(delta) == 0  # idempotent
    other_trie.merge(delta)
    for ctx in contexts:
        assert other.draft(ctx, 12) == trie.draft(ctx, 12) == other_trie.draft(ctx, 12)
    back, _ = pair()
    back.merge(trie.export_delta())  # a trie's delta replays in a store
    for ctx in contexts:
        assert back.draft(ctx, 12) == trie.draft(ctx, 12)


def test_literal_draft_and_counts():
    store = DraftStore(branch_length=3, max_query_length=2, background=False)
    store.insert([1, 2, 3])
    store.insert([1, 2, 4])
    store.insert([7, 1, 2, 3], "r")
    d = store.draft([9, 1], 8)
    assert (d.tokens, d.parents, d.scores, d.match_length) == ([2, 3, 4], [-1, 0, 0], [2.0, 1.0, 1.0], 1)
    d = store.draft([9, 1], 8, "r")
    assert (d.tokens, d.parents, d.scores, d.global_counts) == ([2, 3, 4], [-1, 0, 0], [3.0, 2.0, 1.0],
                                                                [2.0, 1.0, 1.0])
    assert store.count([1, 2]) == 2 and store.count([1, 2], "r") == 1 and store.count([5]) == 0
    assert store.longest_global_suffix([9, 1, 2], 3) == 2
    store.release("r")
    assert store.draft([9, 1], 8, "r").scores == [2.0, 1.0, 1.0]


def test_suffix_array_sorts_windows_within_sequences():
    toks = np.array([3, 1, 2, -1, 1, 2, 0, -1, 1, -1], np.int32)
    sa = kernels.build_suffix_array(toks, 3)
    suffixes = [tuple(toks[p:p + 3].tolist()) for p in sa]
    cut = [s[: s.index(-1)] if -1 in s else s for s in suffixes]
    assert cut == sorted(cut) and sorted(sa.tolist()) == [0, 1, 2, 4, 5, 6, 8]


@settings(max_examples=200, deadline=None)
@given(st.lists(tokens_st, min_size=1, max_size=6), st.lists(st.booleans(), min_size=6, max_size=6),
       st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8), st.integers(1, 8), st.integers(0, 8))
def test_longest_live_suffix_is_found_top_first_then_by_bisection(seqs, dead_flags, query, at_least, span):
    """``_longest_in`` (top first, then bisection) gives the longest live suffix a brute-force scan finds."""
    toks = np.array([t for s in seqs for t in [*s, kernels.SEP]], np.int32)
    sa = kernels.build_suffix_array(toks, 8)
    starts = np.cumsum([0] + [len(s) + 1 for s in seqs[:-1]])
    dead_seq = [dead_flags[i] for i in range(len(seqs))]
    mask = np.zeros(len(toks), np.bool_)
    for i, s in enumerate(seqs):
        mask[starts[i]:starts[i] + len(s)] = dead_seq[i]
    dead = kernels.dead_prefix(sa, mask)
    q_arr = np.array(query, np.int64)
    n = len(query)
    at_least = min(at_least, n)
    at_most = min(at_least + span, n)

    def live(q: int) -> bool:
        want = query[n - q:]
        return any(not dead_seq[i] and any(s[p:p + q] == want for p in range(len(s))) for i, s in enumerate(seqs))

    expected = max([q for q in range(at_least, at_most + 1) if live(q)], default=at_least - 1)
    q, lo, hi = kernels._longest_in(toks, sa, dead, q_arr, n, at_least, at_most)
    assert q == expected
    if q >= at_least:
        assert (lo, hi) == kernels.sa_range(toks, sa, q_arr, n - q, q)


def test_eviction_drops_the_oldest_answers_whole():
    store = DraftStore(branch_length=4, max_query_length=2, store_bytes=1 << 16, tail_tokens=64, background=False)
    per_answer = 100
    for i in range(200):  # 20k tokens at 13 bytes: over the 64 KiB budget
        store.insert([1000 + i] + [i % 7] * (per_answer - 1))
    assert store.num_tokens() * 13 <= 1 << 16
    assert store.count([1000]) == 0 and store.count([1199]) == 1  # the oldest went, the newest stayed
    assert store.num_tokens() % per_answer == 0  # whole answers only


def test_removed_documents_never_draft_again_and_compaction_drops_them():
    store = DraftStore(branch_length=4, max_query_length=2, tail_tokens=4, background=False)
    store.insert_source("doc:a", [5, 6, 7, 8])
    for i in range(5):
        store.insert([1, 2, 3, i])
    store.flush()
    assert store.draft([5], 4).tokens == [6, 7, 8]
    assert store.remove_source("doc:a") == 4
    assert store.draft([5], 4).tokens == [] and store.sources() == []
    assert store.count([5, 6]) == 0
    store.insert_source("doc:b", [9, 9])
    store.flush()
    assert store.num_tokens() == 22


def test_bad_input_and_bad_files_are_refused_clearly(tmp_path):
    store = DraftStore(background=False)
    with pytest.raises(ValueError, match="token ids must be in"):
        store.insert([1, -2])
    with pytest.raises(ValueError, match="non-empty str"):
        store.insert_source("", [1])
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"not a store at all")
    with pytest.raises(StoreFileError, match="magic"):
        DraftStore.load(bad)
    store.insert([40, 41, 42])
    good = tmp_path / "good.bin"
    store.save(good)
    with pytest.raises(StoreFileError, match="token id 42"):
        DraftStore.load(good, vocab_size=10)
    good.write_bytes(good.read_bytes()[:-8])
    with pytest.raises(StoreFileError):
        DraftStore.load(good)


def test_store_stats_command(tmp_path, capsys):
    from lookahead import cli

    store = DraftStore(background=False)
    store.insert([1, 2, 3, 4])
    store.insert_source("doc:a", [5, 6])
    store.save(tmp_path / "s.bin")
    assert cli.main(["store", "stats", str(tmp_path / "s.bin")]) == 0
    out = capsys.readouterr().out
    assert '"tokens": 6' in out and '"entries": 2' in out and '"sources": 1' in out
    (tmp_path / "bad.bin").write_bytes(b"x" * 40)
    assert cli.main(["store", "stats", str(tmp_path / "bad.bin")]) == 2
    assert "not a valid lookahead-store file" in capsys.readouterr().err


def test_every_document_of_a_large_corpus_still_drafts():
    """200k tokens of documents with ids: none is pruned or forgotten (the trie kept ~10k tokens), and the store
    stays compact."""
    rng = np.random.default_rng(1)
    store = DraftStore(background=False)
    docs = {f"doc:{i}": rng.integers(0, 49_152, 500) for i in range(400)}
    for sid, toks in docs.items():
        store.insert_source(sid, toks)
    store.flush()
    assert store.num_tokens() == 200_000 and store.nbytes / store.num_tokens() < 12
    for sid, toks in list(docs.items())[::7]:
        draft = store.draft(toks[100:106].tolist(), 48)
        path = [draft.tokens[i] for i in range(len(draft.tokens)) if draft.parents[i] == i - 1]
        assert path == toks[106:106 + len(path)].tolist() and len(path) == 7, sid  # a whole window: 13 - 6
    assert len(store.sources()) == 400


def test_recall_after_ten_thousand_answers():
    """With the default settings, the first 100 of 10,000 distinct answers are drafted again from their opening
    tokens (the trie remembered about the last 30)."""
    from lookahead.config import LookaheadConfig
    from lookahead.drafter import new_trie

    rng = np.random.default_rng(2)
    answers = [rng.integers(0, 49_152, 100) for _ in range(10_000)]
    store = new_trie(LookaheadConfig())
    for answer in answers:
        store.insert(answer)
    store.flush()
    for answer in answers[:100]:
        draft = store.draft(answer[:6].tolist(), 48)
        path = [draft.tokens[i] for i in range(len(draft.tokens)) if draft.parents[i] == i - 1]
        assert path == answer[6:6 + len(path)].tolist() and len(path) >= 19  # a whole window deep
    store.close()


def test_a_request_with_large_documents_drafts_from_them_while_and_after_they_are_indexed():
    rng = np.random.default_rng(3)
    docs = [rng.integers(0, 49_152, 20_000) for _ in range(3)]  # 60k tokens: indexed in a thread
    store, trie = pair(branch_length=8, max_query_length=4)
    for s in (store, trie):
        s.insert([1, 2, 3], "r")
        for doc in docs:
            s.insert(doc, "r")
    ctx = docs[1][500:504].tolist()
    assert store.draft(ctx, 12, "r") == trie.draft(ctx, 12, "r")  # scanned, or indexed already
    deadline = time.monotonic() + 30
    while not store.documents_indexed("r") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.documents_indexed("r")
    assert store.draft(ctx, 12, "r") == trie.draft(ctx, 12, "r")  # from the index
    assert store.draft(ctx, 12, "r").tokens[:4] == docs[1][504:508].tolist()


def test_hot_node_tables_list_every_child_best_first():
    """A segment's hot-node table holds, for every node of depth 1..HOT_DEPTH with enough children, exactly the
    children the suffix array has (token, range), ordered by count then token."""
    rng = np.random.default_rng(3)
    tokens = np.concatenate([np.append(np.asarray(t, np.int32), -1) for t in
                             (rng.zipf(1.6, 40).clip(max=30) for _ in range(60))]).astype(np.int32)
    seg = Segment.build(tokens, np.zeros(1, np.int64), np.zeros(1, np.int64), 5)
    assert seg.hot_idx is not None and seg.hot_kids is not None
    with hot_children(2):
        seg = Segment.build(tokens, np.zeros(1, np.int64), np.zeros(1, np.int64), 5)
    keys, starts = seg.hot_idx
    assert len(keys) > 10
    for r in range(len(keys) - 1):
        lo, m = int(keys[r]) // 16, int(keys[r]) % 16
        prefix = tuple(tokens[seg.sa[lo]: seg.sa[lo] + m])
        # brute force: every suffix with that prefix, grouped by its next token
        expected: dict[int, int] = {}
        for p in seg.sa:
            if tuple(tokens[p: p + m]) == prefix and tokens[p + m] != kernels.SEP:
                expected[int(tokens[p + m])] = expected.get(int(tokens[p + m]), 0) + 1
        cols = range(int(starts[r]), int(starts[r + 1]))
        assert {int(seg.hot_kids[0, c]): int(seg.hot_kids[2, c] - seg.hot_kids[1, c]) for c in cols} == expected
        ranked = [int(seg.hot_kids[3, c]) for c in cols]
        counts = [(-(int(seg.hot_kids[2, c] - seg.hot_kids[1, c])), int(seg.hot_kids[0, c])) for c in ranked]
        assert counts == sorted(counts) and sorted(ranked) == list(cols)


@pytest.mark.parametrize("hot", [2, 6])
def test_hot_nodes_draft_best_first_exactly_like_the_oracle(hot):
    """Many children per node (a Zipf vocabulary of 60 tokens), drafts of 1 to 24 nodes, deleted documents: the
    best-first reading of hot-node lists stops early and still gives the oracle's drafts."""
    rng = np.random.default_rng(hot)
    store = DraftStore(branch_length=5, max_query_length=3, tail_tokens=400, background=False)
    trie = TokenTrie(branch_length=5, max_query_length=3, node_budget=10**9)
    with hot_children(hot):
        for i in range(120):
            toks = rng.zipf(1.4, int(rng.integers(5, 60))).clip(max=60).tolist()
            if i % 10 == 3:
                store.insert_source(f"d{i}", toks)
                trie.insert_source(f"d{i}", toks)
            else:
                store.insert(toks)
                trie.insert(toks)
        for i in (3, 23, 53):
            store.remove_source(f"d{i}")
            trie.remove_source(f"d{i}")
        store.flush()
    contexts = [rng.zipf(1.4, int(rng.integers(1, 4))).clip(max=60).tolist() for _ in range(80)]
    assert_same(store, trie, contexts, sizes=(1, 3, 8, 24))


def _ahead_by_separate_calls(source, context, k, request_id, depth_limit, limit, branch_length, max_query, at_most):
    """What the drafter computes for a source without a compiled ``draft_ahead`` (the oracle trie)."""
    from lookahead.config import LookaheadConfig
    from lookahead.drafter import Drafter

    config = LookaheadConfig(decoding_length=k, branch_length=branch_length, max_query_length=max_query)
    drafter = Drafter(source, None, config, request_id=request_id)
    drafter.request_id = request_id  # None: global counts only
    first = source.draft(context[-max_query:], k, request_id=request_id, branch_length=depth_limit)
    return drafter.extended(first, context, limit), source.longest_global_suffix(context, at_most)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op_st, max_size=25), st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=9),
       st.integers(1, 4), st.integers(1, 3), st.integers(1, 12), st.integers(0, 6), st.sampled_from([None, "a"]))
def test_draft_ahead_is_the_drafters_separate_calls_in_one(ops, context, branch_length, max_query, limit, at_most,
                                                          request_id):
    """The compiled one-call step (draft, the best path drafted on past the window, the follow length) equals the
    drafter's separate calls over the oracle trie, extensions included (repeated text makes them happen)."""
    store, trie = pair(branch_length, max_query)
    apply(ops + [("insert", context * 3)], store, trie)
    width = max(max_query, branch_length + 1)
    ctx = context[-width:]
    for k in (3, 12):
        depth = max(1, min(branch_length, limit))
        got = store.draft_ahead(ctx, k, request_id, depth, min(k, limit), branch_length, max_query, at_most)
        want = _ahead_by_separate_calls(trie, ctx, k, request_id, depth, min(k, limit), branch_length, max_query,
                                        at_most)
        assert got == want, (ctx, k)
        assert got[0].global_counts == want[0].global_counts

"""Source-tagged counts: documents inserted under an id and removed again (TokenTrie.insert_source / remove_source)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_trie import check_invariants, walk

from lookahead.trie import TokenTrie

# ---------------------------------------------------------------------------------------------------- helpers


def dump(trie: TokenTrie) -> dict[tuple[int, ...], tuple[float, dict[str, float], dict[str, int]]]:
    """Every node's effective global count, per-source parts and local counts, by n-gram (reads internals)."""
    out = {}
    for key, node, _ in walk(trie):
        factor = trie.decay ** (trie._sweep_state.epoch - node.epoch)
        parts = {sid: part * factor for sid, part in (node.sources or {}).items()}
        out[key] = (trie._effective(node), parts, dict(node.local or {}))
    return out


def check_sources(trie: TokenTrie) -> None:
    """Per-source bookkeeping matches the nodes: each listed source holds parts in exactly ``nodes`` nodes, its
    nodes are prefix-closed and start with its recorded first tokens, parts never exceed the count, and no node holds
    parts of an unlisted source."""
    held: dict[str, list[tuple[int, ...]]] = {}
    for key, node, parent in walk(trie):
        for sid, part in (node.sources or {}).items():
            assert 0 < part <= node.count * (1 + 1e-9), (key, sid)
            assert parent is trie._root or sid in (parent.sources or {}), (key, sid)
            held.setdefault(sid, []).append(key)
    assert sorted(held) == trie.sources()
    for sid, keys in held.items():
        info = trie._sources[sid]
        assert info.nodes == len(keys), sid
        assert {k[0] for k in keys} <= info.starts, sid


# ---------------------------------------------------------------------------------------------------- examples


def test_removing_one_of_two_documents_keeps_the_shared_ngram_of_the_other():
    t = TokenTrie(branch_length=2)
    t.insert_source("a", [1, 2, 3, 4])
    t.insert_source("b", [9, 2, 3, 8])
    assert t.sources() == ["a", "b"]
    assert t.count([2, 3]) == 2 and t.source_count([2, 3], "a") == 1 and t.source_count([2, 3], "b") == 1
    before = t.num_nodes()
    removed = t.remove_source("a")
    # a's unique n-grams: 1, 1 2, 1 2 3, 2 3 4, 3 4, 4 (2, 2 3, 3 stay for b)
    assert removed == 6 and t.num_nodes() == before - 6
    assert t.sources() == ["b"]
    assert t.count([2, 3]) == 1 and t.source_count([2, 3], "a") == 0 and t.source_count([2, 3], "b") == 1
    for gone in ([1], [1, 2], [1, 2, 3], [2, 3, 4], [3, 4], [4]):
        assert t.count(gone) == 0, gone
    assert t.count([9, 2, 3]) == 1 and t.count([3, 8]) == 1
    assert t.draft([2, 3], 5).tokens == [8]
    check_invariants(t)
    check_sources(t)


def test_past_outputs_and_live_requests_keep_their_counts():
    t = TokenTrie(branch_length=2)
    t.insert([5, 6, 7])  # a past output
    t.insert([6, 7, 1], request_id="r")  # a live request
    t.insert_source("doc", [5, 6, 7, 6, 7, 1])
    assert t.count([6, 7]) == 3
    t.remove_source("doc")
    assert t.count([5, 6, 7]) == 1 and t.count([6, 7]) == 1 and t.count([7]) == 1
    assert t.count([7, 6]) == 0 and t.count([6, 7, 6]) == 0
    assert t.count([6, 7, 1]) == 0 and t.count([6, 7, 1], request_id="r") == 1  # kept for the live request
    check_invariants(t)
    t.release("r")
    assert t.count([6, 7, 1]) == 0 and t._find((6, 7, 1)) is None
    check_invariants(t)


def test_unknown_or_removed_source_is_a_no_op():
    t = TokenTrie(branch_length=2)
    t.insert([1, 2, 3])
    assert t.remove_source("nope") == 0
    t.insert_source("d", [4, 5])
    assert t.remove_source("d") == 3
    assert t.remove_source("d") == 0
    assert t.sources() == [] and t.num_nodes() == 6


def test_inserting_a_source_again_replaces_it_unless_appended():
    t = TokenTrie(branch_length=2)
    t.insert_source("d", [1, 2, 3])
    t.insert_source("d", [7, 8])  # a replaced document
    assert t.count([1, 2]) == 0 and t.count([7, 8]) == 1 and t.num_nodes() == 3
    t.insert_source("d", [1, 2, 3, 4], 0, 2)  # a long document in slices
    t.insert_source("d", [1, 2, 3, 4], 2, append=True)
    u = TokenTrie(branch_length=2)
    u.insert_source("d", [1, 2, 3, 4])
    assert dump(t) == dump(u)
    t.remove_source("d")
    assert t.num_nodes() == 0 and t.sources() == []


def test_empty_source_is_not_listed():
    t = TokenTrie(branch_length=2)
    t.insert_source("d", [1, 2, 3], 3)
    assert t.sources() == [] and t.num_nodes() == 0


def test_removal_after_decay_clamps_and_drops_emptied_nodes():
    t = TokenTrie(branch_length=2, node_budget=100, decay=0.3)
    t.insert([1, 2, 3])
    t.insert([1, 2, 3])
    t.insert_source("d", [1, 2, 3, 4])
    t.insert_source("e", [2, 3, 9])
    t._sweep_state.epoch += 2  # two decay rounds (what the sweep's passes do), nodes caught up lazily
    assert t.count([1, 2]) == pytest.approx(3 * 0.09)
    t.remove_source("d")
    assert t.count([1, 2]) == pytest.approx(2 * 0.09) and t.count([2, 3]) == pytest.approx(3 * 0.09)
    assert t.count([3, 4]) == 0 and t._find((3, 4)) is None and t._find((4,)) is None
    t.remove_source("e")
    assert t.count([3, 9]) == 0 and t._find((9,)) is None
    assert t.count([1, 2, 3]) == pytest.approx(2 * 0.09)
    check_invariants(t)
    check_sources(t)


def test_removal_with_rounding_leaves_no_residue():
    t = TokenTrie(branch_length=3, node_budget=100, decay=0.7)
    for _ in range(3):
        t.insert_source("a", [1, 2, 3, 4], append=True)
    t.insert_source("b", [1, 2, 3, 4])
    t._sweep_state.epoch += 7
    t.remove_source("b")
    t.remove_source("a")
    assert t.num_nodes() == 0


def test_source_ids_are_checked():
    t = TokenTrie()
    for bad in ("", None, 3):
        with pytest.raises(ValueError, match="source_id must be a non-empty str"):
            t.insert_source(bad, [1, 2])  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="source_id must be a non-empty str"):
            t.remove_source(bad)  # type: ignore[arg-type]


def test_sources_survive_save_and_load(tmp_path: Path):
    t = TokenTrie(branch_length=2, node_budget=1000, decay=0.5)
    t.insert([1, 2, 3, 1, 2])
    t.insert_source("a", [1, 2, 3, 4])
    t.insert_source("b", [2, 3, 9])
    t._sweep_state.epoch += 1
    t.save(tmp_path / "t.json")
    u = TokenTrie.load(tmp_path / "t.json")
    assert u.sources() == ["a", "b"]
    for key, (count, parts, _) in dump(t).items():
        assert u.count(key) == pytest.approx(count)
        for sid, part in parts.items():
            assert u.source_count(key, sid) == pytest.approx(part)
    check_sources(u)
    assert u.remove_source("a") == t.remove_source("a") == 3  # [2, 3, 4], [3, 4], [4]: the rest is shared
    assert dump(u).keys() == dump(t).keys()
    check_invariants(u)
    check_sources(u)


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        ({"a": []}, "non-empty list"),
        ({"a": [[7, 0.5]]}, "bad \\[node, part\\] pair"),
        ({"a": [[0, 3.0]]}, "bad part"),
        ({"a": [[0, 0.5], [0, 0.5]]}, "names node 0 twice"),
        ({"a": [[1, 0.5]]}, "but not its parent"),
        ([], "'sources' must be an object"),
    ],
)
def test_load_rejects_bad_sources(tmp_path: Path, sources, message):
    path = tmp_path / "t.json"
    TokenTrie(branch_length=2).save(path)
    doc = json.loads(path.read_text())
    doc["nodes"] = [[-1, 1, 2.0], [0, 2, 1.0]]
    doc["sources"] = sources
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=message):
        TokenTrie.load(path)


def test_pruning_drops_source_nodes_and_keeps_the_bookkeeping():
    rng = random.Random(4)
    t = TokenTrie(branch_length=3, max_query_length=2, node_budget=150, decay=0.5)
    for k in range(40):
        t.insert_source(f"d{k}", [rng.randrange(50) for _ in range(20)])
        t.insert([rng.randrange(50) for _ in range(10)])
        check_sources(t)
    listed = t.sources()
    assert 0 < len(listed) < 40  # pruning removed every node of some sources
    for k in range(40):
        t.remove_source(f"d{k}")
        check_sources(t)
    check_invariants(t)
    assert t.sources() == []
    assert all(not node.sources for _, node, _ in walk(t))


def test_removal_is_journaled_even_for_an_unknown_id():
    t = TokenTrie(branch_length=2, origin="w")
    t.insert_source("d", [1, 2, 3])
    t.remove_source("d")
    t.remove_source("never")
    ops = [(e.op, e.source) for e in t.export_delta().entries]
    assert ops == [("source", "d"), ("remove", "d"), ("remove", "never")]


# ---------------------------------------------------------------------------------------------------- properties

seq_st = st.lists(st.integers(0, 5), min_size=0, max_size=14)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    docs=st.lists(seq_st, min_size=1, max_size=6),
    outputs=st.lists(seq_st, max_size=4),
    live=seq_st,
    removed=st.sets(st.integers(0, 5)),
    branch=st.integers(1, 4),
    replace_first=st.booleans(),
)
def test_property_removed_sources_leave_the_counts_of_a_trie_that_never_saw_them(docs, outputs, live, removed,
                                                                                 branch, replace_first):
    t = TokenTrie(branch_length=branch, node_budget=100_000)
    ref = TokenTrie(branch_length=branch, node_budget=100_000)
    if replace_first:
        t.insert_source("s0", [0, 1, 2, 3, 4, 5])  # replaced below: leaves nothing
    for i, doc in enumerate(docs):
        t.insert_source(f"s{i}", doc)
        if i not in removed:
            ref.insert_source(f"s{i}", doc)
        if i < len(outputs):
            t.insert(outputs[i])
            ref.insert(outputs[i])
    t.insert(live, request_id="r")
    ref.insert(live, request_id="r")
    for i in sorted(removed):
        t.remove_source(f"s{i}")
    assert dump(t) == dump(ref)
    assert t.sources() == ref.sources()
    check_invariants(t)
    check_sources(t)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(st.tuples(st.sampled_from(["doc", "out", "del", "live", "release"]), st.integers(0, 4), seq_st),
                 max_size=40),
    budget=st.integers(5, 40),
)
def test_property_pruning_keeps_source_bookkeeping_consistent(ops, budget):
    t = TokenTrie(branch_length=3, max_query_length=2, node_budget=budget, decay=0.5)
    for op, k, seq in ops:
        if op == "doc":
            t.insert_source(f"s{k}", seq, append=k % 2 == 1)
        elif op == "out":
            t.insert(seq)
        elif op == "del":
            t.remove_source(f"s{k}")
        elif op == "live":
            t.insert(seq, request_id=f"r{k}")
        else:
            t.release(f"r{k}")
        check_sources(t)
    check_invariants(t)

"""Journal, deltas and merge: TokenTrie.export_delta / merge / trim_journal, TrieDelta and JournalEntry."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_trie import check_invariants
from test_trie_sources import check_sources, dump

from lookahead.trie import JournalEntry, TokenTrie, TrieDelta

BIG = 1_000_000  # a node budget nothing reaches: no decay, no pruning

# ---------------------------------------------------------------------------------------------------- helpers


def play(trie: TokenTrie, ops: list[tuple]) -> None:
    """Apply ``("out", tokens, cut)`` (an output: insert up to cut, then extend), ``("doc", id, tokens)`` and
    ``("del", id)`` to ``trie``."""
    for op in ops:
        if op[0] == "out":
            tokens, cut = op[1], min(op[2], len(op[1]))
            trie.insert(tokens[:cut])
            trie.extend(tokens[:cut], tokens[cut:])
        elif op[0] == "doc":
            trie.insert_source(op[1], op[2])
        else:
            trie.remove_source(op[1])


def new(origin: str, **kw) -> TokenTrie:
    return TokenTrie(branch_length=kw.pop("branch_length", 3), node_budget=kw.pop("node_budget", BIG),
                     origin=origin, **kw)


# ---------------------------------------------------------------------------------------------------- examples


def test_export_and_merge_carry_global_counts_only():
    a, b = new("a"), new("b")
    a.insert([1, 2, 3, 4])
    a.insert([5, 6], request_id="r")  # local: not journaled
    a.extend([1, 2, 3, 4], [5], request_id="r")
    a.extend([1, 2, 3, 4], [7, 8])
    assert a.version == 2 and a.applied() == {"a": 2}
    delta = a.export_delta()
    assert (delta.origin, delta.branch_length, delta.since, delta.version, len(delta)) == ("a", 3, 0, 2, 2)
    assert [(e.origin, e.seq, e.op) for e in delta.entries] == [("a", 1, "insert"), ("a", 2, "insert")]
    assert b.merge(delta) == 2
    ref = new("ref")
    ref.insert([1, 2, 3, 4, 7, 8])
    assert dump(b) == dump(ref)
    assert b.count([5, 6]) == 0
    assert b.version == 2 and b.applied() == {"a": 2, "b": 0}


def test_merge_is_idempotent_and_ignores_echoes():
    a, hub = new("a"), new("hub")
    a.insert([1, 2, 3])
    assert hub.merge(a.export_delta()) == 1
    assert hub.merge(a.export_delta()) == 0  # the same delta again
    assert a.merge(hub.export_delta()) == 0  # a's own entry, echoed by the hub
    assert a.count([1, 2]) == hub.count([1, 2]) == 1
    a.insert([1, 2, 9])
    assert hub.merge(a.export_delta()) == 1  # overlapping: entry 1 again, entry 2 new
    assert hub.count([1, 2]) == 2 and hub.version == 2


def test_hub_spreads_every_workers_entries():
    hub = new("hub")
    workers = [new(f"w{i}") for i in range(3)]
    pulled = [0, 0, 0]
    for round_ in range(3):
        for i, w in enumerate(workers):
            w.insert([i, round_, i + round_, 7])
            hub.merge(w.export_delta(w.version - 1))
        for i, w in enumerate(workers):
            delta = hub.export_delta(pulled[i])
            w.merge(TrieDelta.from_dict(json.loads(json.dumps(delta.to_dict()))))
            pulled[i] = delta.version
        hub.trim_journal(min(pulled))
    ref = new("ref")
    for round_ in range(3):
        for i in range(3):
            ref.insert([i, round_, i + round_, 7])
    for w in workers:
        w.merge(hub.export_delta(min(pulled)))  # whatever they missed in the last round
        assert dump(w) == dump(ref)
    assert dump(hub) == dump(ref)


def test_a_deletion_travels_with_the_delta():
    server, worker = new("server"), new("worker")
    server.insert_source("doc", [1, 2, 3, 4])
    worker.merge(server.export_delta())
    assert worker.sources() == ["doc"] and worker.count([2, 3]) == 1
    since = server.version
    server.remove_source("doc")
    assert worker.merge(server.export_delta(since)) == 1
    assert worker.sources() == [] and worker.num_nodes() == 0


def test_delta_round_trips_through_json():
    a = new("a")
    a.insert([1, 2, 3])
    a.insert_source("d", [4, 5, 6], 1)
    a.insert_source("d", [4, 5, 6, 7], 3, append=True)
    a.remove_source("d")
    a.extend([1, 2, 3], [8])
    delta = a.export_delta()
    data = json.loads(json.dumps(delta.to_dict()))
    assert data["format"] == "lookahead-trie-delta"
    assert data["entries"][1] == {"origin": "a", "seq": 2, "op": "source", "tokens": [5, 6], "start": 0, "stop": 2,
                                  "skip": 0, "source": "d"}
    assert TrieDelta.from_dict(data) == delta


def test_trim_and_export_positions():
    a = new("a")
    for k in range(5):
        a.insert([k, k + 1])
    assert len(a.export_delta(3)) == 2 and len(a.export_delta(5)) == 0
    a.trim_journal(3)
    a.trim_journal(1)  # already gone: nothing to do
    assert a.version == 5 and [e.seq for e in a.export_delta(3).entries] == [4, 5]
    with pytest.raises(ValueError, match="entries before position 3 are gone"):
        a.export_delta(2)
    with pytest.raises(ValueError, match=r"since \(6\) is past this trie's version \(5\)"):
        a.export_delta(6)
    with pytest.raises(ValueError, match=r"upto \(6\) is past"):
        a.trim_journal(6)
    with pytest.raises(ValueError, match="since must be an int >= 0"):
        a.export_delta(-1)


def test_journal_limit_drops_the_oldest_entries():
    a = new("a", journal_limit=2 * (16 + 4))  # two entries of four tokens
    for k in range(4):
        a.insert([k, k, k, k])
    assert a.version == 4 and [e.seq for e in a.export_delta(2).entries] == [3, 4]
    with pytest.raises(ValueError, match="journal_limit=40"):
        a.export_delta(1)
    off = new("off", journal_limit=0)
    off.insert([1, 2])
    assert off.version == 1 and len(off.export_delta(1)) == 0 and off.count([1, 2]) == 1
    with pytest.raises(ValueError, match="journal_limit must be an int >= 0"):
        new("x", journal_limit=-1)


def test_merge_checks_its_input():
    a = new("a")
    a.insert([1, 2, 3])
    with pytest.raises(ValueError, match=r"branch_length 3\), this trie's 3"):
        new("b", branch_length=2).merge(a.export_delta())
    with pytest.raises(TypeError, match="merge takes a TrieDelta"):
        new("b").merge(a.export_delta().to_dict())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="origin must be a non-empty str"):
        new("")


def _delta_dict() -> dict:
    a = new("a")
    a.insert([1, 2, 3])
    return a.export_delta().to_dict()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(format="x"), "format is 'x'"),
        (lambda d: d.update(entries={}), "'entries' must be a list"),
        (lambda d: d.update(version=-1), "version"),
        (lambda d: d.update(origin=""), "origin must be a non-empty str"),
        (lambda d: d["entries"][0].update(seq=0), "entry 0: journal entry: seq must be an int >= 1"),
        (lambda d: d["entries"][0].update(op="upsert"), "op must be one of insert, source, append, remove"),
        (lambda d: d["entries"][0].update(tokens=[1, "2"]), "tokens must be a list of ints"),
        (lambda d: d["entries"][0].update(stop=9), r"stop \(9\) and skip \(0\) must be <= len\(tokens\) \(3\)"),
        (lambda d: d["entries"][0].update(start=2, stop=1), "stop"),
        (lambda d: d["entries"][0].update(source="d"), "source is None or the JSON list of the source ids"),
        (lambda d: d["entries"][0].update(op="source"), "source must be a non-empty str"),
        (lambda d: d["entries"][0].update(op="source", source="d", skip=1), "skip must be 0"),
        (lambda d: d["entries"][0].update(op="remove", source="d"), "a 'remove' has no tokens"),
        (lambda d: d["entries"][0].pop("skip"), "keys must be"),
        (lambda d: d["entries"].append(3), "expected a dict"),
    ],
)
def test_delta_from_dict_rejects_bad_data(mutate, message):
    data = _delta_dict()
    mutate(data)
    with pytest.raises(ValueError, match=message):
        TrieDelta.from_dict(data)


def test_merge_over_budget_prunes_like_inserts():
    rng = random.Random(2)
    src = new("src")
    for _ in range(60):
        src.insert([rng.randrange(40) for _ in range(20)])
    small = new("small", node_budget=200)
    assert small.merge(src.export_delta()) == 60
    assert small.num_nodes() <= 2 * 200
    same = new("same", node_budget=200)
    rng = random.Random(2)
    for _ in range(60):
        same.insert([rng.randrange(40) for _ in range(20)])
    assert dump(small) == dump(same)  # replaying is inserting
    check_invariants(small)


def test_save_and_load_keep_origin_applied_seqs_and_position(tmp_path: Path):
    w, hub = new("w"), new("hub")
    w.insert([1, 2, 3])
    w.insert_source("d", [4, 5])
    hub.merge(w.export_delta())
    hub.save(tmp_path / "hub.json")
    hub2 = TokenTrie.load(tmp_path / "hub.json")
    assert hub2.origin == "hub" and hub2.applied() == {"hub": 0, "w": 2} and hub2.version == 2
    with pytest.raises(ValueError, match="entries before position 2 are gone"):
        hub2.export_delta(0)  # the journal is not saved
    assert hub2.merge(w.export_delta()) == 0  # a restarted hub does not apply what it holds
    assert hub2.count([1, 2]) == 1 and hub2.sources() == ["d"]
    w.save(tmp_path / "w.json")
    w2 = TokenTrie.load(tmp_path / "w.json")
    w2.insert([7, 8])
    assert [(e.origin, e.seq) for e in w2.export_delta(2).entries] == [("w", 3)]  # continues its own numbering
    assert hub2.merge(w2.export_delta(2)) == 1 and hub2.count([7, 8]) == 1


def test_a_trie_restored_from_an_old_save_takes_its_later_entries_back(tmp_path: Path):
    w, hub = new("w"), new("hub")
    w.insert([1, 2])
    w.save(tmp_path / "w.json")
    w.insert([3, 4])  # reaches the hub, then w crashes
    hub.merge(w.export_delta())
    w2 = TokenTrie.load(tmp_path / "w.json")
    assert w2.merge(hub.export_delta()) == 1 and w2.count([3, 4]) == 1
    w2.insert([5, 6])
    assert [(e.origin, e.seq) for e in w2.export_delta(2).entries] == [("w", 3)]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [("origin", "", "'origin' must be a non-empty string"), ("applied", {"a": -1}, "'applied' must map"),
     ("journal_version", "3", "'journal_version' must be an int")],
)
def test_load_rejects_bad_sharing_state(tmp_path: Path, key, value, message):
    path = tmp_path / "t.json"
    new("a").save(path)
    doc = json.loads(path.read_text())
    doc[key] = value
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=message):
        TokenTrie.load(path)


def test_journal_entries_check_their_fields():
    with pytest.raises(ValueError, match="seq must be an int >= 1"):
        JournalEntry("a", True, "insert")  # type: ignore[arg-type]
    assert JournalEntry("a", 1, "remove", source="d").to_dict()["tokens"] == []


# ---------------------------------------------------------------------------------------------------- properties

tokens_st = st.lists(st.integers(0, 4), max_size=10)


def stream_st(name: str):
    """A random stream of outputs (inserted, some in two pieces) and of documents with ids of trie ``name``."""
    doc_id = st.integers(0, 2).map(lambda k: f"{name}{k}")
    return st.lists(
        st.one_of(
            st.tuples(st.just("out"), tokens_st, st.integers(0, 10)),
            st.tuples(st.just("doc"), doc_id, tokens_st),
            st.tuples(st.just("del"), doc_id),
        ),
        max_size=8,
    )


def trie_of(name: str, *streams: list[tuple], branch: int = 3) -> TokenTrie:
    t = new(name, branch_length=branch)
    for ops in streams:
        play(t, ops)
    return t


PROPERTY = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(a_ops=stream_st("a"), b_ops=stream_st("b"), branch=st.integers(1, 4))
def test_property_two_tries_exchanging_deltas_count_like_one_that_saw_both(a_ops, b_ops, branch):
    a, b = trie_of("a", a_ops, branch=branch), trie_of("b", b_ops, branch=branch)
    ref = trie_of("ref", a_ops, b_ops, branch=branch)
    a.merge(b.export_delta())
    b.merge(a.export_delta())
    assert dump(a) == dump(b) == dump(ref)
    assert a.sources() == b.sources() == ref.sources()
    check_sources(a)
    check_invariants(b)
    # idempotent, and echoes are ignored
    assert a.merge(b.export_delta()) == 0 and b.merge(a.export_delta()) == 0
    assert dump(a) == dump(ref)


@PROPERTY
@given(a_ops=stream_st("a"), b_ops=stream_st("b"), c_ops=stream_st("c"))
def test_property_merging_commutes_and_associates(a_ops, b_ops, c_ops):
    a, b, c = trie_of("a", a_ops), trie_of("b", b_ops), trie_of("c", c_ops)
    da, db, dc = a.export_delta(), b.export_delta(), c.export_delta()
    ref = trie_of("ref", a_ops, b_ops, c_ops)
    x = new("x")
    for d in (da, db, dc):
        x.merge(d)
    y = new("y")
    for d in (dc, da, db):
        y.merge(d)
    b.merge(dc)  # (b + c) first, then a
    z = new("z")
    z.merge(b.export_delta())
    z.merge(da)
    z.merge(dc)  # overlaps what came through b
    for t in (x, y, z):
        assert dump(t) == dump(ref)
        assert t.sources() == ref.sources()


def test_concurrent_merges_and_inserts_count_like_one_thread():
    rng = random.Random(6)
    sources = [new(f"s{k}") for k in range(3)]
    for s in sources:
        for _ in range(30):
            s.insert([rng.randrange(20) for _ in range(12)])
    deltas = [s.export_delta() for s in sources]
    own = [[rng.randrange(20) for _ in range(12)] for _ in range(30)]
    hub = new("hub")

    def merge_all(order: list[int]) -> None:
        for k in order:
            hub.merge(deltas[k])

    threads = [threading.Thread(target=merge_all, args=(order,)) for order in ([0, 1, 2], [2, 1, 0], [1, 0, 2])]
    threads.append(threading.Thread(target=lambda: [hub.insert(seq) for seq in own]))
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    ref = new("ref")
    for d in deltas:
        ref.merge(d)
    for seq in own:
        ref.insert(seq)
    assert dump(hub) == dump(ref)
    assert hub.version == 90 + 30 and hub.applied() == {"hub": 30, "s0": 30, "s1": 30, "s2": 30}


journal_op_st = st.one_of(
    st.tuples(st.just("doc"), st.sampled_from(["d1", "d2", "d3"]), st.integers(0, 6)),
    st.tuples(st.just("answer"), st.lists(st.sampled_from(["d1", "d2", "d3"]), max_size=2), st.integers(0, 6)),
    st.tuples(st.just("scrub"), st.sampled_from(["d1", "d2", "d3"]), st.just(0)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(journal_op_st, max_size=40), st.integers(0, 120))
def test_journal_scrub_visits_only_the_entries_holding_a_source(ops, limit):
    """The store journal's indexed scrub leaves exactly what a scan of every kept entry would (tokens and cost)."""
    from lookahead.store.journal import Journal, _holders
    from lookahead.trie import derived_text

    journal = Journal("me", limit)
    for kind, what, n in ops:
        if kind == "doc":
            journal.own("source", list(range(n)), what)
        elif kind == "answer":
            journal.own("insert", list(range(n)), derived_text(what))
        else:
            expected = [(e[0], e[1], e[4].tolist()) for e in journal.entries]
            expected = [(o, q, [] if what in _holders(e[2], e[3], e[4]) else t)
                        for (o, q, t), e in zip(expected, journal.entries)]
            journal.scrub(what)
            assert [(e[0], e[1], e[4].tolist()) for e in journal.entries] == expected
            assert not journal.holding.get(what)
    assert journal.cost == sum(len(e[4]) + 16 for e in journal.entries)

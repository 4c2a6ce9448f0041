"""Checked files and deltas (issue 22, item 4): every store file and delta says which tokenizer and config made it,
a reader of another refuses it naming both, token ids are checked against the vocabulary, the hub refuses what a
worker cannot have sent (naming the cause), and one trie path has one writer."""

from __future__ import annotations

import copy
import json
import logging
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import VOCAB_SIZE, make_tokenizer
from fastapi.testclient import TestClient
from lookahead_ray.hub import HubRefusedError, TrieHubState
from lookahead_ray.sync import TrieSync
from lookahead_server.app import ServeSettings, create_app
from lookahead_server.persistence import TrieFileError, TrieStore
from lookahead_server.tenants import tenant_trie_path
from serve_utils import new_generator

from lookahead.config import LookaheadConfig
from lookahead.store import DraftStore, Fingerprint, StoreFileError, StoreMismatchError, tokenizer_fingerprint
from lookahead.trie import JournalEntry, TrieDelta, check_delta

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIG = {"branch_length": 4, "max_query_length": 3}
FP = tokenizer_fingerprint(make_tokenizer(), VOCAB_SIZE)
ENGINE = {"branch_length": LookaheadConfig().branch_length, "max_query_length": LookaheadConfig().max_query_length}


def other_fingerprint() -> Fingerprint:
    """The fingerprint of a tokenizer that differs from the tests' by one added token (same vocabulary size)."""
    tok = copy.deepcopy(make_tokenizer())
    tok.add_tokens(["<extra>"])
    return tokenizer_fingerprint(tok, VOCAB_SIZE)


def saved(path: Path, tokens: list[int], fingerprint: Fingerprint | None = FP, **config: Any) -> Path:
    store = DraftStore(**{**CONFIG, **config}, background=False)
    store.insert(tokens)
    if fingerprint is not None:
        store.bind(fingerprint)
    store.save(path)
    return path


def _header(path: Path) -> tuple[bytes, dict[str, Any], int]:
    data = path.read_bytes()
    size = int(np.frombuffer(data[8:16], "<u8")[0])
    return data, json.loads(data[16:16 + size]), size


def poke_token(path: Path, value: int) -> None:
    """Overwrite the first token of the file's first segment, leaving its header (and its max_token) as it was."""
    data, header, size = _header(path)
    offset, dtype, _ = header["arrays"][header["segments"][0]["tokens"]]
    at = 16 + size + offset
    path.write_bytes(data[:at] + np.array([value], dtype).tobytes() + data[at + np.dtype(dtype).itemsize:])


def strip_fingerprint(path: Path) -> None:
    """Make the file look like one written before fingerprints: its header without the key."""
    data, header, size = _header(path)
    del header["fingerprint"]
    raw = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(data[:16] + raw.ljust(size) + data[16 + size:])


# ---------------------------------------------------------------------------------------------------- store files


def test_a_file_of_another_tokenizer_is_refused_naming_both(tmp_path):
    path = saved(tmp_path / "s.bin", [1, 2, 3, 4, 5])
    assert DraftStore.load(path, expect=FP).fingerprint == FP
    other = other_fingerprint()
    assert other.tokenizer != FP.tokenizer
    with pytest.raises(StoreMismatchError) as refused:
        DraftStore.load(path, expect=other)
    assert FP.tokenizer in str(refused.value) and other.tokenizer in str(refused.value)
    with pytest.raises(StoreMismatchError, match=f"{VOCAB_SIZE} token ids.*{VOCAB_SIZE + 8} token ids"):
        DraftStore.load(path, expect=Fingerprint(FP.tokenizer, VOCAB_SIZE + 8))


def test_a_file_of_another_config_is_refused_naming_both(tmp_path):
    path = saved(tmp_path / "s.bin", [1, 2, 3, 4, 5])
    DraftStore.load(path, config=CONFIG)
    with pytest.raises(StoreMismatchError, match="branch_length=4, this engine uses branch_length=12"):
        DraftStore.load(path, config={**CONFIG, "branch_length": 12})
    with pytest.raises(StoreMismatchError, match="max_query_length=3, this engine uses max_query_length=6"):
        DraftStore.load(path, config={**CONFIG, "max_query_length": 6})


@pytest.mark.parametrize("token", [-5, VOCAB_SIZE, 10**9])
def test_token_ids_outside_the_vocabulary_are_refused_whatever_the_header_says(tmp_path, token):
    path = saved(tmp_path / "s.bin", [1, 2, 3, 4, 5])
    poke_token(path, token)  # the header still says max_token 5
    with pytest.raises(StoreFileError, match=f"token id {token}, the vocabulary has {VOCAB_SIZE}"):
        DraftStore.load(path, expect=FP)
    with pytest.raises(StoreFileError, match=f"token id {token}"):
        DraftStore.load(path, vocab_size=VOCAB_SIZE)


def test_a_negative_token_id_is_refused_even_without_a_vocabulary(tmp_path):
    path = saved(tmp_path / "s.bin", [1, 2, 3, 4, 5], fingerprint=None)
    poke_token(path, -5)
    with pytest.raises(StoreFileError, match="token id -5"):
        DraftStore.load(path)


def test_an_old_file_without_a_fingerprint_loads_as_unknown_with_a_warning(tmp_path, caplog):
    path = saved(tmp_path / "s.bin", [1, 2, 3, 4, 5])
    strip_fingerprint(path)
    assert "fingerprint" not in _header(path)[1]
    assert DraftStore.load(path).fingerprint is None  # no reader's fingerprint: stays unknown
    with caplog.at_level(logging.WARNING, logger="lookahead.store.store"):
        store = DraftStore.load(path, expect=FP)
    assert "has no tokenizer fingerprint" in caplog.text and store.count([1, 2, 3]) == 1.0
    assert store.fingerprint == FP  # saved with it from now on
    store.save(tmp_path / "again.bin")
    with pytest.raises(StoreMismatchError):
        DraftStore.load(tmp_path / "again.bin", expect=other_fingerprint())
    poke_token(path, VOCAB_SIZE + 1)  # an old file is still checked against the vocabulary
    with pytest.raises(StoreFileError, match=f"token id {VOCAB_SIZE + 1}"):
        DraftStore.load(path, expect=FP)


def test_bind_refuses_another_tokenizer_and_ids_past_the_vocabulary():
    store = DraftStore(**CONFIG, background=False)
    store.insert([1, 2, 3, VOCAB_SIZE + 3])
    with pytest.raises(StoreMismatchError, match=f"token id {VOCAB_SIZE + 3}"):
        store.bind(FP)
    small = DraftStore(**CONFIG, background=False)
    small.bind(FP)
    with pytest.raises(StoreMismatchError, match="cannot be used with"):
        small.bind(other_fingerprint())


# ---------------------------------------------------------------------------------------------------- deltas


def test_a_delta_carries_the_fingerprint_and_another_tokenizers_is_refused():
    a, b = DraftStore(**CONFIG, background=False), DraftStore(**CONFIG, background=False)
    a.bind(FP)
    b.bind(other_fingerprint())
    a.insert([1, 2, 3, 4, 5])
    delta = a.export_delta()
    assert (delta.tokenizer, delta.vocab_size) == (FP.tokenizer, FP.vocab_size)
    assert TrieDelta.from_dict(delta.to_dict()) == delta
    old = {k: v for k, v in delta.to_dict().items() if k not in ("tokenizer", "vocab_size")}
    assert TrieDelta.from_dict(old).tokenizer is None  # a delta of older code: unknown, still merged
    with pytest.raises(ValueError, match=f"tokenizer {FP.tokenizer}.*tokenizer {other_fingerprint().tokenizer}"):
        b.merge(delta)
    assert b.count([1, 2, 3]) == 0.0


@pytest.mark.parametrize("token", [-5, VOCAB_SIZE, 10**9])
def test_a_delta_with_ids_outside_the_vocabulary_is_refused_whole(token):
    store = DraftStore(**CONFIG, background=False)
    store.bind(FP)
    good = JournalEntry("w", 1, "insert", (1, 2, 3, 4, 5), 0, 5)
    bad = JournalEntry("w", 2, "insert", (1, token, 3), 0, 3)
    with pytest.raises(ValueError, match=f"entry 1 .* holds token id {token}; token ids must be in 0..{VOCAB_SIZE - 1}"
                       ):
        store.merge(TrieDelta("w", 4, 0, 2, (good, bad)))
    assert store.count([1, 2, 3]) == 0.0  # nothing of a refused delta was applied


def test_impossible_seqs_are_refused():
    with pytest.raises(ValueError, match="seq must be <="):
        JournalEntry("w", 2**62, "insert", (1, 2, 3), 0, 3)
    with pytest.raises(ValueError, match="version must be <="):
        TrieDelta("w", 4, 0, 2**62)
    entry = JournalEntry("w", 7, "insert", (1, 2, 3), 0, 3)
    with pytest.raises(ValueError, match="seq 7.* impossible.*version 3"):
        check_delta(TrieDelta("w", 4, 0, 3, (entry,)), 4, "store")
    twice = (JournalEntry("w", 2, "insert", (1, 2), 0, 2), JournalEntry("w", 2, "insert", (3, 4), 0, 2))
    with pytest.raises(ValueError, match="seqs of one origin must grow"):
        check_delta(TrieDelta("w", 4, 0, 3, twice), 4, "store")


# ---------------------------------------------------------------------------------------------------- the server


def test_a_second_server_on_one_trie_path_is_refused(tmp_path):
    path = tmp_path / "trie.bin"
    with TestClient(create_app(new_generator(), ServeSettings(trie_path=str(path), trie_save_interval=0))):
        second = create_app(new_generator(), ServeSettings(trie_path=str(path), trie_save_interval=0))
        with pytest.raises(TrieFileError, match="is in use by pid .*two servers or hubs on one trie file"):
            with TestClient(second):
                pass
        with pytest.raises(TrieFileError, match="in use"):
            TrieStore(path).check()
    with TestClient(create_app(new_generator(), ServeSettings(trie_path=str(path), trie_save_interval=0))):
        pass  # released at shutdown


def test_the_cli_refuses_a_trie_path_in_use_before_loading(monkeypatch, capsys, tmp_path):
    from lookahead import cli

    path = tmp_path / "trie.bin"
    holder = TrieStore(path)
    holder.load()
    monkeypatch.setattr(cli, "build_generator", lambda args: pytest.fail("the model must not load"))
    try:
        assert cli.main(["serve", "--trie", str(path)]) == 2
        assert "is in use by pid" in capsys.readouterr().err
    finally:
        holder.close()


def test_a_trie_file_with_ids_past_the_vocabulary_is_refused_at_start_not_a_500(tmp_path, caplog):
    """Without the check the file loads, the next request that matches it drafts the id, and the model's embedding
    fails the whole batch with an IndexError (a 500)."""
    prompt = "the cat sat on the mat"
    gen = new_generator()
    known = gen.encode(prompt) + gen.generate(prompt, max_new_tokens=1).token_ids  # what the first draft matches
    path = saved(tmp_path / "trie.bin", known + [VOCAB_SIZE + 40] * 4, fingerprint=None, **ENGINE)
    with caplog.at_level(logging.ERROR, logger="lookahead_server"):
        with TestClient(create_app(gen, ServeSettings(trie_path=str(path), trie_save_interval=0))) as c:
            reply = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4})
            assert reply.status_code == 200, reply.text
    assert f"token id {VOCAB_SIZE + 40}, the vocabulary has {VOCAB_SIZE}" in caplog.text
    assert list(tmp_path.glob("trie.bin.corrupt-*"))  # moved aside, nothing lost


@pytest.mark.parametrize("what", ["tokenizer", "branch_length"])
def test_a_trie_file_of_another_tokenizer_or_config_stops_the_server_naming_both(tmp_path, what):
    if what == "tokenizer":
        path = saved(tmp_path / "trie.bin", [1, 2, 3, 4], other_fingerprint(), **ENGINE)
        expected = [other_fingerprint().tokenizer, FP.tokenizer]
    else:
        path = saved(tmp_path / "trie.bin", [1, 2, 3, 4], FP, **{**ENGINE, "branch_length": 7})
        expected = ["branch_length=7", f"branch_length={ENGINE['branch_length']}"]
    before = path.read_bytes()
    app = create_app(new_generator(), ServeSettings(trie_path=str(path), trie_save_interval=0))
    with pytest.raises(TrieFileError) as refused:
        with TestClient(app):
            pass
    assert all(text in str(refused.value) for text in expected), refused.value
    assert path.read_bytes() == before and not list(tmp_path.glob("*.corrupt-*"))  # left where it was
    TrieStore(path).check()  # the lock was released


def test_a_tenants_file_of_another_tokenizer_is_refused_with_a_clear_error(tmp_path):
    path = tmp_path / "trie.bin"
    saved(tenant_trie_path(path, "a"), [1, 2, 3, 4], other_fingerprint(), **ENGINE)
    settings = ServeSettings(trie_path=str(path), trie_save_interval=0, tenant_header="X-Tenant")
    with TestClient(create_app(new_generator(), settings)) as c:
        body = {"prompt": "abc", "max_tokens": 2}
        refused = c.post("/v1/completions", json=body, headers={"X-Tenant": "a"})
        assert refused.status_code == 500 and refused.json()["error"]["code"] == "trie_file_refused"
        message = refused.json()["error"]["message"]
        assert "tenant 'a'" in message and other_fingerprint().tokenizer in message and FP.tokenizer in message
        assert c.post("/v1/completions", json=body, headers={"X-Tenant": "b"}).status_code == 200


def test_the_servers_file_says_which_tokenizer_wrote_it(tmp_path):
    path = tmp_path / "trie.bin"
    with TestClient(create_app(new_generator(), ServeSettings(trie_path=str(path), trie_save_interval=0))) as c:
        assert c.post("/v1/completions", json={"prompt": "abc", "max_tokens": 4}).status_code == 200
    assert _header(path)[1]["fingerprint"] == FP.to_dict()


# ---------------------------------------------------------------------------------------------------- the hub


class Hub:
    """A HubClient over a TrieHubState in this process (no Ray)."""

    def __init__(self, state: TrieHubState) -> None:
        self.state = state

    def sync(self, delta: dict[str, Any] | None, since: int, worker: dict[str, Any]) -> dict[str, Any]:
        return self.state.sync(delta, since, worker)

    def snapshot(self) -> dict[str, Any]:
        return self.state.snapshot()


def owner(tokenizer: Any = None, **config: Any) -> types.SimpleNamespace:
    """What TrieSync needs of a generator (a tokenizer and a model's vocabulary size: its trie gets bound)."""
    model = types.SimpleNamespace(config=types.SimpleNamespace(vocab_size=VOCAB_SIZE))
    return types.SimpleNamespace(trie=DraftStore(**{**CONFIG, **config}), tokenizer=tokenizer or make_tokenizer(),
                                 model=model)


def worker_of(origin: str, **extra: Any) -> dict[str, Any]:
    return {"origin": origin, "pid": 1, "host": "h", **extra}


def delta_of(origin: str, entries: list[tuple[int, list[int]]], version: int, since: int = 0) -> dict[str, Any]:
    return {"format": "lookahead-trie-delta", "origin": origin, "branch_length": 4, "since": since,
            "version": version, "entries": [{"origin": origin, "seq": seq, "op": "insert", "tokens": toks, "start": 0,
                                             "stop": len(toks), "skip": 0, "source": None} for seq, toks in entries]}


@pytest.mark.parametrize("token", [10**9, -5])
def test_the_hub_refuses_token_ids_outside_the_vocabulary(token):
    hub = TrieHubState(CONFIG, fingerprint=FP)
    with pytest.raises(HubRefusedError, match=f"refused worker w: .*token id {token}"):
        hub.sync(delta_of("w", [(1, [1, 2, token, 4])], 1), 0, worker_of("w"))
    assert len(hub.trie) == 0
    learned = TrieHubState(CONFIG)  # no fingerprint of its own: takes the first worker's
    learned.sync(None, 0, worker_of("v", fingerprint=FP.to_dict(), config=CONFIG))
    assert learned.trie.fingerprint == FP
    with pytest.raises(HubRefusedError, match=f"token id {token}"):
        learned.sync(delta_of("w", [(1, [1, 2, token, 4])], 1), 0, worker_of("w"))


def test_the_hub_refuses_impossible_seqs_and_keeps_the_workers_real_entries():
    hub = TrieHubState(CONFIG, fingerprint=FP)
    with pytest.raises(HubRefusedError, match="seq must be <="):
        hub.sync(delta_of("w", [(2**62, [1, 2, 3])], 2**62), 0, worker_of("w"))
    with pytest.raises(HubRefusedError, match=r"seq 9\) is impossible"):
        hub.sync(delta_of("w", [(9, [1, 2, 3])], 3), 0, worker_of("w"))
    hub.sync(delta_of("w", [(1, [1, 2, 3, 4]), (2, [5, 6, 7])], 2), 0, worker_of("w"))  # real entries still merge
    assert hub.trie.count([1, 2, 3]) == 1.0 and hub.trie.applied()["w"] == 2
    with pytest.raises(HubRefusedError, match="seq 1000 is impossible: .*at most seq 5"):  # a jump past its journal
        hub.sync(delta_of("w", [(1000, [8, 9])], 5, since=2), 2, worker_of("w"))
    hub.sync(delta_of("w", [(3, [8, 9, 10])], 5, since=2), 2, worker_of("w"))
    assert hub.trie.count([8, 9, 10]) == 1.0 and hub.trie.applied()["w"] == 3
    with pytest.raises(HubRefusedError, match="pushes only its own entries"):
        forged = delta_of("w", [(4, [1, 2])], 6, since=5)
        forged["entries"][0]["origin"] = "hub"
        hub.sync(forged, 5, worker_of("w"))


def test_a_worker_of_another_branch_length_is_refused_and_logged_as_such(caplog):
    hub = TrieHubState(CONFIG)
    other = owner(branch_length=5)
    with caplog.at_level(logging.WARNING, logger="lookahead_ray"):
        sync = TrieSync(other, Hub(hub), interval=60).start(background=False)
        assert not sync.sync_now()
    assert "refused this worker" in caplog.text and "branch_length=5" in caplog.text
    assert "branch_length=4" in caplog.text and "unreachable" not in caplog.text
    assert sync.stats.refused is not None and sync.stats.hub_reachable is True
    with pytest.raises(HubRefusedError, match="the worker's trie has branch_length=5, the hub's branch_length=4"):
        hub.sync(None, 0, worker_of(other.trie.origin, config={**CONFIG, "branch_length": 5}))


def test_a_worker_of_another_tokenizer_is_refused():
    hub = TrieHubState(CONFIG, fingerprint=FP)
    tok = copy.deepcopy(make_tokenizer())
    tok.add_tokens(["<extra>"])
    stranger = owner(tok)
    sync = TrieSync(stranger, Hub(hub), interval=60).start(background=False)
    stranger.trie.insert([1, 2, 3, 4])
    assert not sync.sync_now()
    assert "tokenizer" in sync.stats.refused and FP.tokenizer in sync.stats.refused
    assert hub.trie.count([1, 2, 3]) == 0.0
    friend = owner()
    sync = TrieSync(friend, Hub(hub), interval=60).start(background=False)
    friend.trie.insert([1, 2, 3, 4])
    assert sync.sync_now() and hub.trie.count([1, 2, 3]) == 1.0
    assert friend.trie.fingerprint == FP


def test_two_hubs_on_one_path_are_refused(tmp_path):
    path = tmp_path / "hub.bin"
    first = TrieHubState(CONFIG, path, save_interval=0)
    with pytest.raises(TrieFileError, match="in use"):
        TrieHubState(CONFIG, path, save_interval=0)
    first.close()
    TrieHubState(CONFIG, path, save_interval=0).close()

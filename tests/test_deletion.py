"""Deletion that forgets: after a document is removed no draft proposes a window that came from it, nor from an
answer learned with it in its prompt; the file on disk no longer holds it when the DELETE answers; the removal
reaches every replica through the hub, survives a hub restart, and reaches a replica too far behind for a delta."""

from __future__ import annotations

import types

import numpy as np
import pytest
from fastapi.testclient import TestClient
from lookahead_ray.hub import TrieHubState
from lookahead_ray.sync import TrieSync
from lookahead_server.app import ServeSettings, create_app
from serve_utils import new_generator
from test_ray_hub import CONFIG, InProcessHub

from lookahead.store import DraftStore

pytestmark = pytest.mark.usefixtures("single_thread")

DOC = [40, 41, 42, 43, 44, 45, 46, 47, 48]
ANSWER = [60, 61, 62, 43, 44, 45, 63, 64, 65, 66]  # quotes the document (43 44 45)
OTHER = [80, 81, 82, 83, 84, 85]


def windows(tokens: list[int], n: int = 3) -> list[list[int]]:
    return [tokens[i:i + n] for i in range(len(tokens) - n + 1)]


def holds(store: DraftStore, tokens: list[int]) -> bool:
    """Whether any 3-token window of ``tokens`` would still draft from ``store``."""
    return any(store.count(w) > 0 for w in windows(tokens))


def journal_tokens(store: DraftStore) -> set[int]:
    return {t for e in store.export_delta(0).entries for t in e.tokens}


def learned(store: DraftStore) -> DraftStore:
    store.insert_source("doc:x", DOC)
    store.insert(ANSWER, derived_from=["doc:x"])
    store.insert(OTHER)
    return store


@pytest.mark.parametrize("background", [False, True])
def test_removing_a_document_forgets_its_text_and_the_answers_derived_from_it(tmp_path, background):
    store = learned(DraftStore(**CONFIG, background=background))
    store.flush()
    assert holds(store, DOC) and holds(store, ANSWER) and store.answers_derived_from("doc:x") == 1
    assert store.remove_source("doc:x") == len(DOC)
    assert not holds(store, DOC) and not holds(store, ANSWER) and holds(store, OTHER)
    assert store.draft([60, 61], 8).tokens == []  # the answer's opening drafts nothing any more
    assert not (journal_tokens(store) & set(DOC + ANSWER))  # no delta hands the text on
    store.save(tmp_path / "s.bin")
    raw = np.fromfile(tmp_path / "s.bin", dtype=np.uint8)
    assert bytes(np.asarray(ANSWER[:6], np.int32).tobytes()) not in raw.tobytes()  # not in the file either
    again = DraftStore.load(tmp_path / "s.bin")
    assert not holds(again, DOC) and not holds(again, ANSWER) and holds(again, OTHER)
    assert again.removed_since(0) == ["doc:x"]  # the tombstone is saved


def test_a_replaced_document_takes_its_derived_answers_with_it():
    store = learned(DraftStore(**CONFIG, background=False))
    store.insert_source("doc:x", [90, 91, 92, 93])
    assert not holds(store, ANSWER) and not holds(store, DOC) and holds(store, [90, 91, 92, 93])


def test_derived_answers_survive_a_file_and_a_delta():
    first = learned(DraftStore(**CONFIG, background=False))
    copy = DraftStore(**CONFIG, background=False)
    copy.merge(first.export_delta(0))  # the tags travel with the answer's journal entry
    loaded = DraftStore.from_bytes(first.to_bytes())  # and with the file
    for store in (copy, loaded):
        assert store.answers_derived_from("doc:x") == 1
        store.remove_source("doc:x")
        assert not holds(store, ANSWER) and holds(store, OTHER)


def test_delete_through_the_server_forgets_answers_and_rewrites_the_file_before_answering(tmp_path):
    path = tmp_path / "trie.bin"
    gen = new_generator()
    settings = ServeSettings(trie_path=str(path), trie_save_interval=0)
    doc = "Tries keep shared prefixes once; drafts are verified in one pass by the model."
    with TestClient(create_app(gen, settings)) as c:
        assert c.post("/v1/documents", json={"documents": [doc], "ids": ["x"]}).status_code == 200
        body = {"prompt": "Tell me about tries.", "max_tokens": 24, "documents": [doc], "document_ids": ["x"]}
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        answer = list(new_generator().generate(body["prompt"], max_new_tokens=24).token_ids)  # what it learned
        assert new_generator().tokenizer.decode(answer, skip_special_tokens=True) == r.json()["choices"][0]["text"]
        assert holds(gen.trie, answer) and gen.trie.answers_derived_from("doc:x") == 1
        r = c.delete("/v1/documents/x")
        assert r.status_code == 200 and r.json()["durable"] is True
        assert not holds(gen.trie, answer) and not holds(gen.trie, gen.encode(doc))
        on_disk = DraftStore.load(path)  # as a kill -9 right now would leave it
        assert not holds(on_disk, answer) and not holds(on_disk, gen.encode(doc)) and on_disk.sources() == []
        # an id only ever named by requests (never posted) still deletes the answers learned with it
        c.post("/v1/completions", json={**body, "document_ids": ["only-named"]})
        assert c.delete("/v1/documents/only-named").status_code == 200
        assert not holds(gen.trie, answer)
        assert c.delete("/v1/documents/only-named").status_code == 404


def worker() -> types.SimpleNamespace:
    return types.SimpleNamespace(trie=DraftStore(**CONFIG))


def test_a_removal_reaches_every_replica_survives_a_hub_restart_and_a_replica_left_behind(tmp_path):
    path = tmp_path / "hub.bin"
    state = TrieHubState({**CONFIG, "journal_limit": 200}, path, save_interval=0)
    one, two, late = worker(), worker(), worker()
    syncs = [TrieSync(w, InProcessHub(state), interval=60).start() for w in (one, two, late)]
    learned(one.trie)
    for sync in syncs + syncs:
        assert sync.sync_now()
    assert holds(two.trie, ANSWER) and holds(late.trie, ANSWER) and holds(late.trie, DOC)
    # late stops syncing; the hub's journal moves on past what it keeps, the removal among it
    for i in range(40):
        one.trie.insert([100 + i, 101 + i, 102 + i, 103 + i, 104 + i, 105 + i])
    assert syncs[0].sync_now()
    one.trie.remove_source("doc:x")
    assert syncs[0].sync_now()  # the hub saved the removal before it answered
    assert syncs[1].sync_now() and not holds(two.trie, DOC) and not holds(two.trie, ANSWER)
    assert syncs[2].sync_now() and late.trie.version > 0
    assert syncs[2].stats.missed >= 1  # too far behind for a delta: the tombstone did it
    assert not holds(late.trie, DOC) and not holds(late.trie, ANSWER) and holds(late.trie, OTHER)
    assert state.store is not None
    state.store.close()  # the hub dies without saving again (kill -9): its file is what it saved last
    restarted = TrieHubState(CONFIG, path, save_interval=0)
    assert not holds(restarted.trie, DOC) and not holds(restarted.trie, ANSWER) and holds(restarted.trie, OTHER)
    fresh = worker()
    TrieSync(fresh, InProcessHub(restarted), interval=60).start()  # a new replica starts from the hub's copy
    assert not holds(fresh.trie, DOC) and not holds(fresh.trie, ANSWER) and holds(fresh.trie, OTHER)
    restarted.close()


def test_an_answer_learned_while_its_document_was_deleted_elsewhere_does_not_come_back():
    state = TrieHubState(CONFIG)
    r, q = worker(), worker()
    sync_r, sync_q = (TrieSync(w, InProcessHub(state), interval=60).start() for w in (r, q))
    q.trie.insert_source("doc:x", DOC)
    assert sync_q.sync_now() and sync_r.sync_now()
    r.trie.insert(ANSWER, derived_from=["doc:x"])  # r answers with x in its prompt ...
    q.trie.remove_source("doc:x")  # ... while x is deleted on q, whose push reaches the hub first
    assert sync_q.sync_now()
    assert sync_r.sync_now() and sync_q.sync_now()
    for store in (state.trie, r.trie, q.trie):
        assert not holds(store, ANSWER) and not holds(store, DOC)
    r.trie.insert(ANSWER, derived_from=["doc:x"])  # after r knew of the removal: x was sent again, the answer stays
    assert sync_r.sync_now() and sync_q.sync_now()
    assert holds(q.trie, ANSWER) and holds(state.trie, ANSWER)

"""Deleting documents from a shared trie: `/v1/documents` with ids and `DELETE /v1/documents/{id}` in `lookahead
serve`, and `FAISSVectorStore(llm=...)`, whose adds and deletes reach the trie it feeds. After a deletion the trie
holds no n-gram that only the deleted document contributed, and what the others contributed is left as it was."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_lookahead import FAISSVectorStore, LookaheadLLM
from lookahead_server.app import ServeSettings, create_app
from serve_utils import new_generator

from lookahead.engine import LookaheadGenerator
from lookahead.store import DraftStore
from lookahead.trie import TokenTrie

pytestmark = pytest.mark.usefixtures("single_thread")

X = "Lighthouses guide ships at night. The lamp turns once every ten seconds over the bay."
Y = "Harbours shelter ships at night. The lamp turns once every ten seconds over the bay."
Z = "Canals carry barges through the town, lock after lock, all summer long."


def tokens(gen: LookaheadGenerator, text: str) -> list[int]:
    return gen.tokenizer(text, add_special_tokens=False)["input_ids"]


def ngrams(ids: list[int], longest: int) -> set[tuple[int, ...]]:
    """Every n-gram a trie of windows of ``longest`` tokens holds after inserting ``ids``."""
    return {tuple(ids[i:i + n]) for i in range(len(ids)) for n in range(1, longest + 1) if i + n <= len(ids)}


def only_trie(gen: LookaheadGenerator, **sources: str) -> TokenTrie:
    """A fresh trie holding just these documents (source id -> text)."""
    trie = gen.empty_trie()
    for source, text in sources.items():
        trie.insert_source(source, tokens(gen, text))
    return trie


def assert_holds_only(trie: TokenTrie, gen: LookaheadGenerator, deleted: str, **kept: str) -> None:
    """``trie`` equals a trie of ``kept`` alone: the n-grams only ``deleted`` had are gone, the others keep their
    counts."""
    window = trie.branch_length + 1
    expected = only_trie(gen, **kept)
    kept_grams = set().union(*(ngrams(tokens(gen, text), window) for text in kept.values()))
    gone = ngrams(tokens(gen, deleted), window) - kept_grams
    assert gone and kept_grams & ngrams(tokens(gen, deleted), window)  # the texts share some n-grams, not all
    assert all(trie.count(g) == 0 for g in gone)
    assert all(trie.count(g) == expected.count(g) > 0 for g in kept_grams)
    assert len(trie) == len(expected)


# ---------------------------------------------------------------------------------------------------- the server


@pytest.fixture()
def client():
    with TestClient(create_app(new_generator(), ServeSettings())) as c:
        yield c


def generator(c: TestClient) -> LookaheadGenerator:
    return c.app.state.service.generator  # type: ignore[attr-defined,no-any-return]


def listed(c: TestClient, **headers: str) -> list[str]:
    r = c.get("/v1/documents", headers=headers)
    assert r.status_code == 200, r.text
    return [d["id"] for d in r.json()["data"]]


def test_delete_removes_what_only_that_document_taught(client):
    gen = generator(client)
    r = client.post("/v1/documents", json={"documents": [X, Y], "ids": ["x", "y"]})
    assert r.status_code == 200, r.text
    assert r.json()["ids"] == ["x", "y"] and r.json()["tokens"] == len(tokens(gen, X)) + len(tokens(gen, Y))
    assert listed(client) == ["x", "y"]
    r = client.delete("/v1/documents/x")
    assert r.status_code == 200, r.text
    assert r.json() == {"id": "x", "object": "document.deleted", "deleted": True, "removed": r.json()["removed"],
                        "trie_nodes": len(gen.trie), "durable": True}
    assert r.json()["removed"] > 0
    assert listed(client) == ["y"]
    assert_holds_only(gen.trie, gen, X, **{"doc:y": Y})
    again = client.delete("/v1/documents/x")
    assert again.status_code == 404 and again.json()["error"]["code"] == "document_not_found"


def test_an_id_sent_again_replaces_its_document(client):
    gen = generator(client)
    assert client.post("/v1/documents", json={"documents": [X], "ids": ["d1"]}).status_code == 200
    assert client.post("/v1/documents", json={"documents": [Y], "ids": ["d1"]}).status_code == 200
    assert listed(client) == ["d1"]
    assert_holds_only(gen.trie, gen, X, **{"doc:d1": Y})
    assert client.delete("/v1/documents/d1").status_code == 200
    assert len(gen.trie) == 0


def test_documents_without_ids_stay_and_cannot_be_deleted(client):
    gen = generator(client)
    assert client.post("/v1/documents", json=[Z]).status_code == 200
    assert client.post("/v1/documents", json={"documents": [X], "ids": ["x"]}).status_code == 200
    assert listed(client) == ["x"]
    assert client.delete("/v1/documents/x").status_code == 200
    assert gen.trie.count(tokens(gen, Z)[:5]) == 1  # the plain document is untouched
    assert gen.trie.sources() == []


@pytest.mark.parametrize(("body", "fragment"), [
    ({"documents": [X, Y], "ids": ["a"]}, "got 1 ids for 2 documents"),
    ({"documents": [X, Y], "ids": ["a", "a"]}, "ids must be unique"),
    ({"documents": [X], "ids": ["a b"]}, "ids[0]: document id 'a b' is not allowed"),
    ({"documents": [X], "ids": [""]}, "is not allowed"),
    ({"documents": [X], "ids": "a"}, "expected a list of unique document ids"),
])
def test_bad_ids_are_a_clear_400(client, body, fragment):
    r = client.post("/v1/documents", json=body)
    assert r.status_code == 400
    assert fragment in r.json()["error"]["message"]
    assert listed(client) == []


def test_delete_checks_the_id(client):
    r = client.delete("/v1/documents/a%20b")
    assert r.status_code == 400 and "is not allowed" in r.json()["error"]["message"]
    r = client.delete("/v1/documents/never-sent")
    assert r.status_code == 404 and "GET /v1/documents" in r.json()["error"]["message"]


def test_deletion_is_per_tenant():
    gen = new_generator()
    with TestClient(create_app(gen, ServeSettings(tenant_header="X-Tenant"))) as c:
        for tenant, text in (("a", X), ("b", Y)):
            r = c.post("/v1/documents", json={"documents": [text], "ids": ["shared-id"]}, headers={"X-Tenant": tenant})
            assert r.status_code == 200, r.text
        assert c.delete("/v1/documents/shared-id", headers={"X-Tenant": "b"}).status_code == 200
        tenants = c.app.state.service.tenants  # type: ignore[attr-defined]
        assert listed(c, **{"X-Tenant": "a"}) == ["shared-id"] and listed(c, **{"X-Tenant": "b"}) == []
        assert len(tenants.get("b")) == 0
        assert len(tenants.get("a")) == len(only_trie(gen, **{"doc:shared-id": X}))
        assert c.delete("/v1/documents/shared-id").status_code == 404  # the default trie never had it


def test_document_ids_survive_a_restart(tmp_path):
    path = tmp_path / "trie.json.gz"
    settings = ServeSettings(trie_path=str(path), trie_save_interval=0)
    with TestClient(create_app(new_generator(), settings)) as c:
        assert c.post("/v1/documents", json={"documents": [X, Y], "ids": ["x", "y"]}).status_code == 200
    gen = new_generator()
    with TestClient(create_app(gen, settings)) as c:
        assert listed(c) == ["x", "y"]
        assert c.delete("/v1/documents/x").status_code == 200
        assert_holds_only(gen.trie, gen, X, **{"doc:y": Y})
    assert DraftStore.load(path).sources() == ["doc:y"]  # the deletion was saved


# ---------------------------------------------------------------------------------------------------- the vector store


def store_for(llm: Any, **kwargs: Any) -> FAISSVectorStore:
    return FAISSVectorStore(DeterministicFakeEmbedding(size=8), llm=llm, **kwargs)


def test_store_delete_reaches_the_trie_it_feeds():
    gen = new_generator()
    store = store_for(gen)
    assert store.add_texts([X, Y], ids=["x", "y"]) == ["x", "y"]
    assert gen.trie.sources() == ["doc:x", "doc:y"]
    store.delete(["x", "missing"])
    assert gen.trie.sources() == ["doc:y"]
    assert_holds_only(gen.trie, gen, X, **{"doc:y": Y})
    assert [d.page_content for d in store.similarity_search("ships", k=5)] == [Y]


def test_store_upsert_replaces_and_delete_all_empties():
    gen = new_generator()
    store = store_for(gen)
    store.add_texts([X, Z], ids=["a", "z"])
    store.add_texts([Y], ids=["a"])  # upsert: a is Y now
    assert_holds_only(gen.trie, gen, X, **{"doc:a": Y, "doc:z": Z})
    generated = store.add_texts([X])  # no id given: the store makes one, and the trie gets it too
    assert gen.trie.sources() == sorted(["doc:a", "doc:z", f"doc:{generated[0]}"])
    store.delete()
    assert len(gen.trie) == 0 and gen.trie.sources() == [] and len(store) == 0


def test_store_feeds_the_trie_of_a_langchain_model_and_reloads(tmp_path):
    gen = new_generator()
    llm = LookaheadLLM(generator=gen)
    store = FAISSVectorStore.from_texts([X, Y], DeterministicFakeEmbedding(size=8), ids=["x", "y"], llm=llm)
    assert gen.trie.sources() == ["doc:x", "doc:y"]
    store.save_local(tmp_path / "idx")
    nodes = len(gen.trie)
    loaded = FAISSVectorStore.load_local(tmp_path / "idx", DeterministicFakeEmbedding(size=8), llm=llm)
    assert len(gen.trie) == nodes and gen.trie.count(tokens(gen, X)[:4]) == 1  # loading again counts once
    loaded.delete(["x"])
    assert_holds_only(gen.trie, gen, X, **{"doc:y": Y})
    plain = FAISSVectorStore.load_local(tmp_path / "idx", DeterministicFakeEmbedding(size=8))
    plain.delete(["y"])  # a store without llm= feeds no trie
    assert gen.trie.sources() == ["doc:y"]


def test_store_refuses_a_wrong_llm():
    with pytest.raises(TypeError, match="llm must be a LookaheadLLM, ChatLookahead or LookaheadGenerator"):
        store_for("model name")

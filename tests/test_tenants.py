"""Tenants of `lookahead serve`: each tenant drafts from a trie of its own (past answers and documents), chosen by a
header or by the API key; tenant tries persist next to the global one."""

from __future__ import annotations

import functools
from typing import Any

import pytest
from conftest import FLAT_CURVE, make_model
from fastapi.testclient import TestClient
from lookahead_server.app import ServeSettings, create_app
from lookahead_server.tenants import Access, read_tenant_keys, tenant_trie_path
from serve_utils import chat_tokenizer

from lookahead.config import LookaheadConfig
from lookahead.engine import LookaheadGenerator
from lookahead.store import DraftStore

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPT = "Tell me about tries and drafts."
N = 48
HEADER = "X-Tenant"


def fixed_generator() -> LookaheadGenerator:
    """Drafts of a fixed size (not adaptive): equal tries give equal draft statistics, request after request."""
    return LookaheadGenerator(make_model("llama"), chat_tokenizer(), LookaheadConfig(adaptive=False),
                              cost_curve=FLAT_CURVE)


def ask(c: TestClient, tenant: str | None = None, **headers: str) -> dict[str, Any]:
    if tenant is not None:
        headers[HEADER] = tenant
    r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": N}, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def drafting(answer: dict[str, Any]) -> tuple[int, int, int]:
    info = answer["lookahead"]
    return info["steps"], info["draft_tokens"], info["accepted_draft_tokens"]


@functools.cache
def plain_rounds() -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Drafting of the first request and of the same request again on a server without tenants: a trie without,
    then with, that answer among its past answers."""
    with TestClient(create_app(fixed_generator(), ServeSettings())) as c:
        cold, warm = drafting(ask(c)), drafting(ask(c))
    assert warm[2] > cold[2] and warm[0] < cold[0]  # the past answer is drafted: more accepted, fewer steps
    return cold, warm


COLD, WARM = 0, 1


def answer_ids() -> list[int]:
    """The answer's token ids, from a generator of its own."""
    return fixed_generator().generate(PROMPT, max_new_tokens=N).token_ids


def service(c: TestClient) -> Any:
    return c.app.state.service  # type: ignore[attr-defined]


def test_tenant_b_gets_no_drafts_from_tenant_a_answers():
    gen = fixed_generator()
    with TestClient(create_app(gen, ServeSettings(tenant_header=HEADER))) as c:
        first = ask(c, "a")
        again = ask(c, "a")
        other = ask(c, "b")
        tenants = service(c).tenants
        a, b = tenants.get("a"), tenants.get("b")
    assert first["choices"][0]["text"] == again["choices"][0]["text"] == other["choices"][0]["text"]
    assert drafting(first) == plain_rounds()[COLD]
    assert drafting(again) == plain_rounds()[WARM]  # a's second request drafts a's first answer
    assert drafting(other) == plain_rounds()[COLD]  # b drafts exactly as a did before a had any past answer
    window = answer_ids()[:8]
    assert a.count(window) >= 2  # a learned its answer twice
    assert b.count(window) == 1  # b only its own answer
    assert gen.trie.count(window) == 0  # requests with a tenant never teach the default trie


def test_requests_without_a_tenant_use_the_default_trie():
    gen = fixed_generator()
    with TestClient(create_app(gen, ServeSettings(tenant_header=HEADER))) as c:
        first = ask(c)
        assert drafting(ask(c, "a")) == drafting(first)
        assert drafting(ask(c)) == plain_rounds()[WARM]
        assert drafting(ask(c, " ")) == plain_rounds()[WARM]  # a blank header is no tenant
        assert service(c).tenants.tenants() == ["a"]


def test_documents_of_one_tenant_never_draft_for_another():
    gen = fixed_generator()
    text = "The quick brown fox jumps over the lazy dog, again and again."
    ids = gen.tokenizer(text, add_special_tokens=False)["input_ids"]
    with TestClient(create_app(gen, ServeSettings(tenant_header=HEADER))) as c:
        r = c.post("/v1/documents", json=[text], headers={HEADER: "a"})
        assert r.status_code == 200, r.text
        tenants = service(c).tenants
        assert r.json()["trie_nodes"] == len(tenants.get("a")) > 0
        assert tenants.get("a").count(ids[:4]) == 1
        assert tenants.get("b").count(ids[:4]) == 0 and gen.trie.count(ids[:4]) == 0
        listed = c.get("/v1/documents", headers={HEADER: "b"}).json()
        assert listed == {"object": "list", "data": []}


@pytest.mark.parametrize("value", ["../etc", "a b", ".hidden", "x" * 65, "semi;colon"])
def test_a_bad_tenant_name_is_a_clear_400(value):
    with TestClient(create_app(fixed_generator(), ServeSettings(tenant_header=HEADER))) as c:
        r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}, headers={HEADER: value})
        assert r.status_code == 400
        error = r.json()["error"]
        assert "is not allowed" in error["message"] and "letters, digits" in error["message"]
        assert error["param"] == HEADER.lower()


def test_more_tenants_than_allowed_are_refused():
    with TestClient(create_app(fixed_generator(), ServeSettings(tenant_header=HEADER, max_tenants=2))) as c:
        ask(c, "a")
        ask(c, "b")
        r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}, headers={HEADER: "c"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "too_many_tenants"
        assert "at most 2 tenants" in r.json()["error"]["message"]
        ask(c, "a")  # known tenants go on


def test_tenant_from_the_api_key(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# key tenant\nkey-a  alpha\n\nkey-b beta  # the second tenant\n", encoding="utf-8")
    assert read_tenant_keys(keys) == {"key-a": "alpha", "key-b": "beta"}
    gen = fixed_generator()
    settings = ServeSettings(api_key="admin", tenant_keys=read_tenant_keys(keys))
    with TestClient(create_app(gen, settings)) as c:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "key-a"}):
            r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        first = ask(c, Authorization="Bearer key-a")
        assert drafting(ask(c, Authorization="Bearer key-b")) == drafting(first)  # beta: nothing from alpha
        assert drafting(ask(c, Authorization="Bearer key-a")) == plain_rounds()[WARM]
        assert drafting(ask(c, Authorization="Bearer admin")) == drafting(first)  # the server's key: default trie
        assert service(c).tenants.tenants() == ["alpha", "beta"]
        assert c.get("/v1/models", headers={"Authorization": "Bearer key-b"}).status_code == 200
        assert c.get("/").status_code == 200  # the page holds no data: no key needed


def test_server_key_with_a_tenant_header():
    gen = fixed_generator()
    with TestClient(create_app(gen, ServeSettings(api_key="k", tenant_header=HEADER))) as c:
        r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}, headers={HEADER: "a"})
        assert r.status_code == 401  # the header alone does not let anyone in
        ask(c, "a", Authorization="Bearer k")
        assert service(c).tenants.tenants() == ["a"]


def test_tenant_tries_are_saved_next_to_the_global_one_and_loaded_back(tmp_path):
    path = tmp_path / "state" / "trie.json.gz"
    assert tenant_trie_path(path, "a") == tmp_path / "state" / "trie.tenant-a.json.gz"
    assert tenant_trie_path(tmp_path / "trie", "a") == tmp_path / "trie.tenant-a"
    gen = fixed_generator()
    settings = ServeSettings(trie_path=str(path), trie_save_interval=0, tenant_header=HEADER)
    with TestClient(create_app(gen, settings)) as c:
        first = ask(c, "a")
        nodes = len(service(c).tenants.get("a"))
    assert len(DraftStore.load(tenant_trie_path(path, "a"))) == nodes
    assert len(DraftStore.load(path)) == 0  # the default trie learned nothing
    gen2 = fixed_generator()
    with TestClient(create_app(gen2, settings)) as c:
        assert drafting(ask(c, "a")) == plain_rounds()[WARM]  # a's past answer came back from its file
        assert drafting(ask(c, "b")) == drafting(first)
    assert len(DraftStore.load(tenant_trie_path(path, "b"))) > 0


def test_periodic_saves_write_only_the_tries_that_changed(tmp_path):
    path = tmp_path / "trie.json"
    gen = fixed_generator()
    settings = ServeSettings(trie_path=str(path), trie_save_interval=0, tenant_header=HEADER)
    with TestClient(create_app(gen, settings)) as c:
        svc = service(c)
        assert not svc.save()  # nothing changed yet
        ask(c, "a")
        assert svc.save()
        assert tenant_trie_path(path, "a").exists() and not path.exists()
        ask(c)
        stamp = tenant_trie_path(path, "a").stat().st_mtime_ns
        assert svc.save() and path.exists()
        assert tenant_trie_path(path, "a").stat().st_mtime_ns == stamp  # a did not change: not rewritten
        assert not svc.save()


def test_tenant_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        ServeSettings(tenant_header=HEADER, tenant_keys={"k": "a"})
    with pytest.raises(ValueError, match="header name"):
        ServeSettings(tenant_header="X Tenant")
    with pytest.raises(ValueError, match="tenant name"):
        ServeSettings(tenant_keys={"k": "no/slashes"})
    with pytest.raises(ValueError, match="max_tenants"):
        ServeSettings(max_tenants=0)
    bad = tmp_path / "keys.txt"
    for text, fragment in (("onlyone\n", "expected 'KEY TENANT'"), ("k a\nk b\n", "listed twice"),
                           ("# nothing\n", "no 'KEY TENANT' lines"), ("k ../a\n", "line 1: tenant name")):
        bad.write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match=fragment):
            read_tenant_keys(bad)
    assert Access().tenant({HEADER.lower(): "a"}) is None  # no tenant options: no tenants

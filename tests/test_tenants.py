"""Tenants of `lookahead serve`: each tenant drafts from a trie of its own (past answers and documents), chosen by a
header or by the API key; tenant tries persist next to the global one."""

from __future__ import annotations

import functools
import threading
import time
from typing import Any

import pytest
from conftest import FLAT_CURVE, make_model
from fastapi.testclient import TestClient
from lookahead_server.app import ServeSettings, create_app
from lookahead_server.tenants import Access, read_tenant_keys, tenant_trie_path
from serve_utils import chat_tokenizer

from lookahead.budget import CostCurve
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


# ---------------------------------------------------------------------------------------------------- slots, locks,
# budgets and what each caller sees


def doc_ids_of(c: TestClient, tenant: str) -> list[str]:
    r = c.get("/v1/documents", headers={HEADER: tenant})
    assert r.status_code == 200, r.text
    return [d["id"] for d in r.json()["data"]]


def test_idle_tenants_are_unloaded_to_their_files_and_come_back(tmp_path):
    path = tmp_path / "trie.bin"
    settings = ServeSettings(trie_path=str(path), trie_save_interval=0, tenant_header=HEADER, max_tenants=2)
    with TestClient(create_app(fixed_generator(), settings)) as c:
        for name in ("a", "b", "c", "d"):
            r = c.post("/v1/documents", json={"documents": [f"notes of {name}: tries and drafts"], "ids": [f"{name}1"]},
                       headers={HEADER: name})
            assert r.status_code == 200, r.text
            ask(c, name)
            assert len(service(c).tenants.tenants()) <= 2
        assert service(c).tenants.tenants() == ["c", "d"]  # the least recently used went to their files
        assert tenant_trie_path(path, "a").exists() and tenant_trie_path(path, "b").exists()
        assert doc_ids_of(c, "a") == ["a1"]  # read from its file, without taking a slot
        assert service(c).tenants.tenants() == ["c", "d"]
        assert drafting(ask(c, "a")) == plain_rounds()[WARM]  # loaded back: its past answer drafts again
        assert doc_ids_of(c, "a") == ["a1"] and "a" in service(c).tenants.tenants()


def test_read_only_requests_take_no_tenant_slot():
    with TestClient(create_app(fixed_generator(), ServeSettings(tenant_header=HEADER, max_tenants=1))) as c:
        for name in ("r1", "r2", "r3"):
            assert doc_ids_of(c, name) == []
        assert service(c).tenants.tenants() == []
        ask(c, "w")  # the one slot is still free for a tenant that generates
        assert service(c).tenants.tenants() == ["w"]


def test_a_slow_tenant_load_never_delays_another_tenant():
    gate = threading.Event()
    entered = threading.Event()

    def on_new(name: str, trie: DraftStore) -> DraftStore:
        if name == "slow":
            entered.set()
            gate.wait(30)  # a hub snapshot that takes its time
        return trie

    app = create_app(fixed_generator(), ServeSettings(tenant_header=HEADER), on_new_tenant=on_new)
    with TestClient(app) as c:
        slow = threading.Thread(target=lambda: ask(c, "slow"))
        slow.start()
        try:
            assert entered.wait(30)
            t0 = time.perf_counter()
            ask(c, "fast")  # another tenant's first request, while slow's load is stuck
            assert time.perf_counter() - t0 < 20 and not gate.is_set()
        finally:
            gate.set()
            slow.join(60)
        assert service(c).tenants.tenants() == ["fast", "slow"]


def adaptive_generator() -> LookaheadGenerator:
    """Adaptive drafts over a cost curve where size matters: draft sizes follow what the budget has learned."""
    curve = CostCurve((1, 2, 4, 8, 16, 32, 64), (1.0, 1.05, 1.2, 1.6, 2.4, 4.0, 7.5))
    return LookaheadGenerator(make_model("llama"), chat_tokenizer(), LookaheadConfig(), cost_curve=curve)


def test_each_tenant_has_a_draft_budget_of_its_own():
    other = {"prompt": "Once upon a time the drafts", "max_tokens": N}
    with TestClient(create_app(adaptive_generator(), ServeSettings(tenant_header=HEADER))) as c:
        alone = ask(c, "b")["lookahead"]["draft_tokens"]
    with TestClient(create_app(adaptive_generator(), ServeSettings(tenant_header=HEADER))) as c:
        for _ in range(3):  # tenant a's traffic teaches a's budget
            assert c.post("/v1/completions", json=other, headers={HEADER: "a"}).status_code == 200
        tenants = service(c).tenants
        assert tenants.budget("a").acceptance.total_trials > 0
        assert tenants.budget("b").acceptance.total_trials == 0
        assert tenants.budget("a") is not service(c).generator.budget
        assert ask(c, "b")["lookahead"]["draft_tokens"] == alone  # b drafts as if a had never come


def test_a_tenant_key_sees_its_own_metrics_and_health_hides_internals(tmp_path):
    settings = ServeSettings(api_key="admin", tenant_keys={"key-a": "alpha", "key-b": "beta"})
    with TestClient(create_app(fixed_generator(), settings)) as c:
        ask(c, Authorization="Bearer key-a")
        alpha = c.get("/metrics", headers={"Authorization": "Bearer key-a"}).text
        beta = c.get("/metrics", headers={"Authorization": "Bearer key-b"}).text
        admin = c.get("/metrics", headers={"Authorization": "Bearer admin"}).text
        assert 'lookahead_tenant_completions_total{finish_reason="length",tenant="alpha"} 1.0' in alpha
        assert "alpha" not in beta and "lookahead_http_requests" not in alpha + beta
        assert "lookahead_http_requests" in admin
        assert c.get("/health").json() == {"status": "ok"}
        assert c.get("/health", headers={"Authorization": "Bearer key-a"}).json() == {"status": "ok"}
        assert "queued" in c.get("/health", headers={"Authorization": "Bearer admin"}).json()
    with TestClient(create_app(fixed_generator(), ServeSettings(tenant_header=HEADER))) as c:
        assert c.get("/health").json() == {"status": "ok"}  # tenants, no key: nobody sees the internals
    with TestClient(create_app(fixed_generator(), ServeSettings())) as c:
        assert "trie_nodes" in c.get("/health").json()  # a server open to all: as before


def test_without_a_file_a_keeper_lets_idle_tenants_go():
    kept: dict[str, DraftStore] = {}

    def keep(name: str, trie: DraftStore) -> bool:  # what a Ray replica does: push to the hub, stop syncing
        kept[name] = trie
        return True

    app = create_app(fixed_generator(), ServeSettings(tenant_header=HEADER, max_tenants=1), on_unload_tenant=keep)
    with TestClient(app) as c:
        ask(c, "a")
        ask(c, "b")  # a is idle: handed to the keeper instead of a 403 for b
        assert list(kept) == ["a"] and service(c).tenants.tenants() == ["b"]


def test_a_tenant_with_a_request_in_flight_is_never_unloaded(tmp_path):
    settings = ServeSettings(trie_path=str(tmp_path / "trie.bin"), trie_save_interval=0, tenant_header=HEADER,
                             max_tenants=1)
    with TestClient(create_app(fixed_generator(), settings)) as c:
        tenants = service(c).tenants
        held = tenants.hold("a")  # what a request does from its submission to its release
        r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}, headers={HEADER: "b"})
        assert r.status_code == 403 and "request in flight" in r.json()["error"]["message"]
        assert tenants.peek("a") is held
        tenants.release("a")
        ask(c, "b")  # idle now: a is saved and unloaded to make room
        assert tenants.tenants() == ["b"]

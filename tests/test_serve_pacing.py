"""`lookahead serve --stream-chunk`: paced streams say what the engine said, one piece per N tokens, with nothing in
them that tells what was drafted; tenants get paced streams by default."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from lookahead_server.app import ServeSettings, create_app
from serve_utils import new_generator, sse_events, stream_text

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPT = "Tell me about tries and drafts."
N = 24


@pytest.fixture(scope="module")
def reference():
    return new_generator()


def _stream(client: TestClient, headers: dict[str, str] | None = None) -> list[Any]:
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": N, "stream": True}, headers=headers)
    assert r.status_code == 200, r.text
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    return [e for e in events[:-1] if e["choices"]]


def _content(events: list[Any]) -> list[Any]:
    return [e for e in events if "lookahead" in e and "tokens" in e["lookahead"]]


@pytest.mark.parametrize("chunking, size", [("token", 1), ("fixed:3", 3)])
def test_paced_stream_equals_the_answer_in_even_pieces(reference, chunking, size):
    ref = reference.generate(PROMPT, max_new_tokens=N)
    with TestClient(create_app(new_generator(), ServeSettings(stream_chunk=chunking))) as client:
        for _ in range(2):  # the second time the answer is in the store and drafts: still even pieces
            events = _stream(client)
            assert stream_text(events, chat=False) == ref.text
            pieces = _content(events)
            assert [p["lookahead"]["tokens"] for p in pieces[:-1]] == [size] * (len(pieces) - 1)
            assert all(p["lookahead"]["accepted"] == 0 and p["lookahead"]["accepted_runs"] == [] for p in pieces)
            assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        assert events[-1]["lookahead"]["accepted_draft_tokens"] > 0  # the second answer did draft


def test_run_chunking_shows_accepted_runs(reference):
    with TestClient(create_app(new_generator(), ServeSettings(stream_chunk="run"))) as client:
        _stream(client)
        events = _stream(client)  # drafted from the learned answer: runs of more than one token
    assert max(p["lookahead"]["tokens"] for p in _content(events)) > 1


def test_tenants_are_paced_by_default_and_may_choose_runs():
    assert str(ServeSettings().chunking()) == "run"
    assert str(ServeSettings(tenant_header="X-Tenant").chunking()) == "token"
    assert str(ServeSettings(tenant_keys={"k1": "a"}).chunking()) == "token"
    assert str(ServeSettings(tenant_header="X-Tenant", stream_chunk="run").chunking()) == "run"
    with TestClient(create_app(new_generator(), ServeSettings(tenant_header="X-Tenant"))) as client:
        for _ in range(2):
            pieces = _content(_stream(client, {"X-Tenant": "acme"}))
            assert [p["lookahead"]["tokens"] for p in pieces[:-1]] == [1] * (len(pieces) - 1)


@pytest.mark.parametrize("bad", ["runs", "fixed:0", "fixed:", "tokens", "fixed:-1"])
def test_a_bad_stream_chunk_is_refused_naming_the_forms(bad):
    with pytest.raises(ValueError, match="'run'.*'token'.*'fixed:N'"):
        ServeSettings(stream_chunk=bad)

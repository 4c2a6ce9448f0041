"""`lookahead serve`: the OpenAI-compatible server on a tiny model (TestClient, and a live uvicorn server for the
official `openai` client and client disconnects)."""

from __future__ import annotations

import gzip
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from lookahead_server.app import ServeSettings, create_app
from lookahead_server.persistence import TrieFileError, TrieStore
from prometheus_client.parser import text_string_to_metric_families
from serve_utils import LiveServer, new_generator, slow_factory, sse_events, stream_text, wait_until

from lookahead.store import DraftStore

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPT = "Tell me about tries and drafts."
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a trie?"}]
DOCS = ["A trie stores token sequences; shared prefixes are kept once.", "Drafts are verified in one pass."]
N = 24


@pytest.fixture(scope="module")
def reference():
    """A separate generator: what a single request decoded alone gives."""
    return new_generator()


@pytest.fixture(scope="module")
def client():
    app = create_app(new_generator(), ServeSettings(model_name="tiny"))
    with TestClient(app) as c:
        yield c


def service(client: TestClient) -> Any:
    return client.app.state.service  # type: ignore[attr-defined]


def completion(client: TestClient, **body: Any) -> httpx.Response:
    return client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": N, **body})


def chat(client: TestClient, **body: Any) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": N, **body})


# ---------------------------------------------------------------------------------------------------- answers


def test_completion_equals_engine(client, reference):
    ref = reference.generate(PROMPT, max_new_tokens=N)
    r = completion(client, model="tiny")
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "text_completion" and data["model"] == "tiny" and data["id"].startswith("cmpl-")
    choice = data["choices"][0]
    assert choice["text"] == ref.text
    assert choice["finish_reason"] == {"eos": "stop", "stop": "stop", "length": "length"}[ref.finish_reason]
    prompt_tokens = len(reference.encode(PROMPT))
    assert data["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": len(ref.token_ids),
                             "total_tokens": prompt_tokens + len(ref.token_ids),
                             "completion_tokens_details": {"accepted_prediction_tokens": 0,
                                                           "rejected_prediction_tokens": 0}}
    assert data["lookahead"]["steps"] >= 1


def test_chat_equals_engine(client, reference):
    ref = reference.generate(MESSAGES, max_new_tokens=N)
    r = chat(client)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
    assert data["choices"][0]["message"] == {"role": "assistant", "content": ref.text}
    assert data["usage"]["prompt_tokens"] == len(reference.encode(MESSAGES))
    assert data["usage"]["completion_tokens"] == len(ref.token_ids)


def test_content_parts_and_developer_role(client, reference):
    messages = [{"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
                {"role": "user", "content": "What is a trie?"}]
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": N})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == reference.generate(MESSAGES, max_new_tokens=N).text


def test_documents_field_keeps_the_answer(client, reference):
    ref = reference.generate(PROMPT, max_new_tokens=N)
    r = completion(client, documents=DOCS + [ref.text])  # the answer itself drafts: still the same text
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == ref.text


@pytest.mark.parametrize("chat_mode", [False, True])
def test_stream_equals_whole(client, reference, chat_mode):
    ref = reference.generate(MESSAGES if chat_mode else PROMPT, max_new_tokens=N)
    post = chat if chat_mode else completion
    r = post(client, stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert stream_text(chunks, chat_mode) == ref.text
    assert all(e["object"] == ("chat.completion.chunk" if chat_mode else "text_completion") for e in events[:-1])
    assert len({e["id"] for e in events[:-1]}) == 1
    finish = [c["choices"][0]["finish_reason"] for c in chunks]
    assert finish[-1] in ("stop", "length") and all(f is None for f in finish[:-1])
    if chat_mode:
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(ref.token_ids)


def test_stream_without_usage(client, reference):
    events = sse_events(completion(client, stream=True).text)
    assert events[-1] == "[DONE]" and all(e["choices"] for e in events[:-1])
    assert stream_text(events[:-1], False) == reference.generate(PROMPT, max_new_tokens=N).text


def test_stop_string(client, reference):
    full = reference.generate(PROMPT, max_new_tokens=N).text
    stop = full[8:10]
    expected = full[: full.find(stop)]
    for stops in (stop, [stop, "never-there"]):
        r = completion(client, stop=stops)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["text"] == expected and choice["finish_reason"] == "stop"
        assert stream_text(sse_events(completion(client, stop=stops, stream=True).text)[:-1], False) == expected


def test_temperature_zero_is_greedy_and_sampling_is_seeded(client, reference):
    greedy = reference.generate(PROMPT, max_new_tokens=N).text
    assert completion(client, temperature=0, top_p=0.5, seed=3).json()["choices"][0]["text"] == greedy
    sampled = reference.generate(PROMPT, max_new_tokens=N, do_sample=True, temperature=0.9, top_p=0.95, top_k=0,
                                 seed=7).text
    texts = [completion(client, temperature=0.9, top_p=0.95, seed=7).json()["choices"][0]["text"] for _ in range(2)]
    assert texts == [sampled, sampled]


def test_default_max_tokens(reference):
    app = create_app(new_generator(), ServeSettings(default_max_tokens=5))
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"prompt": PROMPT})
    assert r.status_code == 200
    assert r.json()["usage"]["completion_tokens"] == len(reference.generate(PROMPT, max_new_tokens=5).token_ids)


def test_models_health_and_model_names(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny"
    r = completion(client, model="gpt-4")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found" and "'tiny'" in r.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------------- bad input

BAD_REQUESTS = [
    ("/v1/completions", b'{"prompt": "x",', "not valid JSON"),
    ("/v1/completions", b'{"prompt": "\xff\xfe abc"}', "not valid UTF-8"),
    ("/v1/completions", b"", "body is empty"),
    ("/v1/completions", b"[1, 2]", "must be a JSON object"),
    ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', "NaN is not valid JSON"),
    ("/v1/completions", {"max_tokens": 5}, "missing required field 'prompt'"),
    ("/v1/completions", {"prompt": ""}, "prompt is empty"),
    ("/v1/completions", {"prompt": "   "}, "prompt is empty"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "exactly one string"),
    ("/v1/completions", {"prompt": 5}, "invalid 'prompt'"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, "invalid 'max_tokens'"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2.5}, "expected a positive integer"),
    ("/v1/completions", {"prompt": "x", "max_tokens": True}, "invalid 'max_tokens'"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens must be a positive integer"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -3}, "max_tokens must be a positive integer"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**12}, "max_tokens must be at most 512"),
    ("/v1/completions", {"prompt": "x" * 400, "max_tokens": 200}, "maximum context length is 512"),
    ("/v1/completions", {"prompt": "x" * 600}, "maximum context length is 512"),
    ("/v1/completions", {"prompt": "x", "bogus": 1}, "unknown field 'bogus'"),
    ("/v1/completions", {"prompt": "x", "n": 2}, "n must be 1"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, "best_of must be 1"),
    ("/v1/completions", {"prompt": "x", "echo": True}, "echo is not supported"),
    ("/v1/completions", {"prompt": "x", "logprobs": 2}, "logprobs is not supported"),
    ("/v1/completions", {"prompt": "x", "temperature": 3}, "temperature must be in [0, 2]"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "invalid 'temperature'"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p must be in (0, 1]"),
    ("/v1/completions", {"prompt": "x", "seed": -1}, "seed must be"),
    ("/v1/completions", {"prompt": "x", "stop": 5}, "invalid 'stop'"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, "stop strings must not be empty"),
    ("/v1/completions", {"prompt": "x", "stop": ["s"] * 17}, "at most 16"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 0.5}, "only 0 is allowed"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 1.0}}, "logit_bias is not supported"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, "invalid 'stream'"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "only allowed with stream"),
    ("/v1/completions", {"prompt": "x", "stream": True, "stream_options": {"x": 1}},
     "unknown field 'stream_options.x'"),
    ("/v1/completions", {"prompt": "x", "documents": "one doc"}, "invalid 'documents'"),
    ("/v1/completions", {"prompt": "x", "documents": ["ok", 5]}, "invalid 'documents.1'"),
    ("/v1/chat/completions", {"messages": []}, "at least 1 item"),
    ("/v1/chat/completions", {"messages": "hi"}, "invalid 'messages'"),
    ("/v1/chat/completions", {}, "missing required field 'messages'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": ""}]}, "every message is empty"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "invalid 'messages.0.role'"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "missing required field 'messages.0.content'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "extra": 1}]},
     "unknown field 'messages.0.extra'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "invalid 'messages.0.content"),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 4, "max_completion_tokens": 5}, "disagree"),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_completion_tokens": 0}, "positive integer"),
    ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": True}, "logprobs is not supported"),
    ("/v1/chat/completions", {"messages": MESSAGES, "prompt": "x"}, "unknown field 'prompt'"),
    ("/v1/documents", {"documents": []}, "at least 1 item"),
    ("/v1/documents", {"documents": ["ok", ""]}, "documents[1] is empty"),
    ("/v1/documents", {"docs": ["x"]}, "unknown field 'docs'"),
    ("/v1/documents", [1, 2], "invalid 'documents.0'"),
    ("/v1/documents", b'{"documents": ["fine", "bad \\ud800 text"]}', "not valid Unicode at documents[1]"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "documents": ["d"], '
                             b'"document_ids": ["\\udc00"]}', "not valid Unicode at document_ids[0]"),
    ("/v1/completions", b'{"prompt": "x\\ud83d"}', "lone surrogate \\ud83d"),
]


@pytest.mark.parametrize(("path", "body", "fragment"), BAD_REQUESTS,
                         ids=[f"{i}-{frag[:30]}" for i, (_, _, frag) in enumerate(BAD_REQUESTS)])
def test_bad_request_is_a_clear_400(client, path, body, fragment):
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert fragment in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_errors_carry_param_and_allowed_fields(client):
    error = completion(client, bogus=1).json()["error"]
    assert error["param"] == "bogus" and "prompt" in error["message"] and "max_tokens" in error["message"]
    error = completion(client, max_tokens=400, prompt="x" * 400).json()["error"]
    assert error["param"] == "max_tokens" and error["code"] == "context_length_exceeded"
    error = completion(client, max_tokens="many").json()["error"]
    assert error["param"] == "max_tokens" and "expected a positive integer" in error["message"]


def test_server_keeps_serving_after_bad_input(client, reference):
    for path, body, _ in BAD_REQUESTS[:6]:
        client.post(path, content=body if isinstance(body, bytes) else json.dumps(body).encode())
    assert completion(client).json()["choices"][0]["text"] == reference.generate(PROMPT, max_new_tokens=N).text
    assert client.get("/health").json()["active"] == 0


def test_unknown_route_and_method(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and "/v1/completions" in r.json()["error"]["message"]
    r = client.get("/v1/completions")
    assert r.status_code == 405 and "GET" in r.json()["error"]["message"]


def test_body_too_large():
    app = create_app(new_generator(), ServeSettings(max_body_bytes=1000))
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"prompt": "x" * 2000})
        assert r.status_code == 413 and "larger than 1000 bytes" in r.json()["error"]["message"]
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_settings_are_checked():
    for bad in ({"max_batch_size": 0}, {"max_queue": -1}, {"api_key": " "}, {"trie_save_interval": -1}):
        with pytest.raises(ValueError):
            ServeSettings(**bad)


# ---------------------------------------------------------------------------------------------------- API key


def test_api_key():
    app = create_app(new_generator(), ServeSettings(api_key="sekret"))
    with TestClient(app) as c:
        body = {"prompt": PROMPT, "max_tokens": 4}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"},
                        {"Authorization": "Basic sekret"}):
            r = c.post("/v1/completions", json=body, headers=headers)
            assert r.status_code == 401, headers
            assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
        assert c.get("/v1/models").status_code == 401
        assert c.get("/metrics").status_code == 401
        assert c.post("/v1/documents", json=["x y z"]).status_code == 401
        assert c.get("/health").status_code == 200
        ok = {"Authorization": "Bearer sekret"}
        assert c.post("/v1/completions", json=body, headers=ok).status_code == 200
        assert c.get("/v1/models", headers=ok).status_code == 200


# ------------------------------------------------------------------------------------------------ documents, metrics


def test_documents_feed_the_global_trie(client):
    trie = service(client).generator.trie
    before = len(trie)
    text = "The quick brown fox jumps over the lazy dog, again and again."
    r = client.post("/v1/documents", json={"documents": [text]})
    assert r.status_code == 200, r.text
    data = r.json()
    ids = service(client).generator.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert data["documents"] == 1 and data["tokens"] == len(ids) and data["trie_nodes"] == len(trie) > before
    assert trie.count(ids[:3]) >= 1  # global count
    assert client.post("/v1/documents", json=[text, text]).json()["documents"] == 2  # a bare list works too


def test_metrics(client):
    completion(client)
    text = client.get("/metrics").text
    samples = {s.name + json.dumps(s.labels, sort_keys=True): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}

    def value(name: str, **labels: str) -> float:
        return samples[name + json.dumps(labels, sort_keys=True)]

    assert value("lookahead_http_requests_total", endpoint="/v1/completions", status="200") >= 1
    assert value("lookahead_completion_tokens_total") >= N
    assert value("lookahead_trie_nodes") == len(service(client).generator.trie) > 0
    assert value("lookahead_queue_depth") == 0 and value("lookahead_active_batch") == 0
    assert value("lookahead_tokens_per_step") >= 1.0
    assert value("lookahead_tokens_per_second") > 0
    assert value("lookahead_scheduler_requests_total", outcome="finished") >= 1
    assert value("lookahead_request_tokens_per_step_count") >= 1
    assert value("lookahead_max_batch_size") == 8 and value("lookahead_max_queue") == 64


# ---------------------------------------------------------------------------------------------------- concurrency


def test_queue_full_is_429_and_the_queued_requests_finish(reference):
    gate = threading.Event()
    app = create_app(new_generator(), ServeSettings(max_batch_size=1, max_queue=1), slow_factory(gate))
    ref = reference.generate(PROMPT, max_new_tokens=8).text
    with TestClient(app) as c:
        sched = c.app.state.service.scheduler
        results: list[httpx.Response] = []

        def post() -> None:
            results.append(c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8}))

        threads = [threading.Thread(target=post) for _ in range(2)]
        try:
            threads[0].start()
            wait_until(lambda: sched.active == 1, what="the first request in the batch")
            threads[1].start()
            wait_until(lambda: sched.queued == 1, what="the second request in the queue")
            r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8})
            assert r.status_code == 429
            error = r.json()["error"]
            assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
            assert "queue is full" in error["message"] and r.headers["retry-after"] == "1"
        finally:
            gate.set()
            for t in threads:
                t.join(60)
        assert [x.status_code for x in results] == [200, 200]
        assert [x.json()["choices"][0]["text"] for x in results] == [ref, ref]
        assert c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8}).status_code == 200
        metrics = c.get("/metrics").text
        assert 'lookahead_http_requests_total{endpoint="/v1/completions",status="429"} 1.0' in metrics


def test_concurrent_requests_are_exact(client, reference):
    prompts = [f"{PROMPT} ({i})" for i in range(6)]
    refs = {p: reference.generate(p, max_new_tokens=N).text for p in prompts}
    got: dict[str, str] = {}

    def post(p: str) -> None:
        got[p] = client.post("/v1/completions", json={"prompt": p, "max_tokens": N}).json()["choices"][0]["text"]

    threads = [threading.Thread(target=post, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == refs


def _cancelled(sched: Any) -> int:
    return sched.stats.requests_cancelled


def test_disconnect_frees_the_slot():
    app = create_app(new_generator(), ServeSettings(max_batch_size=2, disconnect_poll=0.05),
                     slow_factory(delay=0.02))
    with LiveServer(app) as server:
        sched = app.state.service.scheduler
        body = {"prompt": PROMPT, "max_tokens": 400}
        with httpx.Client(base_url=server.url, timeout=30) as http:
            with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        break  # one chunk, then hang up
            wait_until(lambda: _cancelled(sched) == 1 and sched.active == 0, 15, "the stream's slot to be freed")
            assert not app.state.service.handles
            r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4})
            assert r.status_code == 200


# ---------------------------------------------------------------------------------------------------- the openai client


def test_openai_client_against_a_live_server(reference):
    openai = pytest.importorskip("openai")
    app = create_app(new_generator(), ServeSettings(model_name="tiny", api_key="k"))
    ref_text = reference.generate(PROMPT, max_new_tokens=N).text
    ref_chat = reference.generate(MESSAGES, max_new_tokens=N).text
    with LiveServer(app) as server:
        api = openai.OpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0, timeout=60)
        assert [m.id for m in api.models.list()] == ["tiny"]
        out = api.completions.create(model="tiny", prompt=PROMPT, max_tokens=N)
        assert out.choices[0].text == ref_text and out.usage.completion_tokens > 0
        parts = [c.choices[0].text for c in api.completions.create(model="tiny", prompt=PROMPT, max_tokens=N,
                                                                    stream=True) if c.choices]
        assert "".join(parts) == ref_text
        out = api.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=N)
        assert out.choices[0].message.content == ref_chat and out.choices[0].message.role == "assistant"
        stream = api.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=N, stream=True,
                                             stream_options={"include_usage": True})
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref_chat
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
        out = api.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=N,
                                          extra_body={"documents": DOCS})
        assert out.choices[0].message.content == ref_chat
        with pytest.raises(openai.BadRequestError, match="max_tokens must be a positive integer"):
            api.completions.create(model="tiny", prompt=PROMPT, max_tokens=0)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).models.list()


# ---------------------------------------------------------------------------------------------------- trie persistence


def _learn(c: TestClient) -> None:
    assert c.post("/v1/documents", json=["alpha beta gamma delta epsilon"]).status_code == 200
    assert c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8}).status_code == 200


def test_trie_saved_at_shutdown_and_loaded_at_start(tmp_path):
    path = tmp_path / "state" / "store.bin"
    gen = new_generator()
    with TestClient(create_app(gen, ServeSettings(trie_path=str(path), trie_save_interval=0))) as c:
        _learn(c)
        nodes = len(gen.trie)
        assert not path.exists()  # interval 0: only at shutdown
    assert path.exists() and path.read_bytes()[:8] == b"LKSTORE\x01"  # raw arrays, mapped when loaded
    assert len(DraftStore.load(path)) == nodes
    gen2 = new_generator()
    with TestClient(create_app(gen2, ServeSettings(trie_path=str(path)))) as c:
        assert c.get("/health").json()["trie_nodes"] == nodes
        learned = gen2.tokenizer("alpha beta gamma delta epsilon", add_special_tokens=False)["input_ids"]
        assert gen2.trie.count(learned[:3]) >= 1


def test_trie_saved_periodically_only_when_changed(tmp_path):
    path = tmp_path / "trie.json"
    gen = new_generator()
    with TestClient(create_app(gen, ServeSettings(trie_path=str(path), trie_save_interval=0.1))) as c:
        time.sleep(0.3)
        assert not path.exists()  # nothing learned yet: nothing written
        _learn(c)
        wait_until(path.exists, 10, "the periodic save")
        wait_until(lambda: len(DraftStore.load(path)) == len(gen.trie), 10, "the saved trie to catch up")
        time.sleep(0.3)  # a save that raced the last change has happened by now
        mtime = path.stat().st_mtime_ns
        time.sleep(0.4)
        assert path.stat().st_mtime_ns == mtime  # unchanged trie: not rewritten


@pytest.mark.parametrize("content", [b"not json at all", b'{"format": "something-else", "version": 1}',
                                     gzip.compress(b'{"format": "lookahead-trie", "version": 99}'), b"\x00\xff"])
def test_corrupt_trie_is_moved_aside_and_service_starts_empty(tmp_path, caplog, content):
    path = tmp_path / "trie.json"
    path.write_bytes(content)
    gen = new_generator()
    with caplog.at_level("ERROR", logger="lookahead_server"):
        with TestClient(create_app(gen, ServeSettings(trie_path=str(path), trie_save_interval=0))) as c:
            assert c.get("/health").json()["trie_nodes"] == 0
            moved = list(tmp_path.glob("trie.json.corrupt-*"))
            assert len(moved) == 1 and moved[0].read_bytes() == content  # nothing lost
            assert not path.exists()
            _learn(c)
    assert "refused trie file" in caplog.text and str(moved[0]) in caplog.text
    assert len(DraftStore.load(path)) == len(gen.trie) > 0  # a fresh, valid file
    assert moved[0].read_bytes() == content


def test_trie_path_that_cannot_work(tmp_path):
    with pytest.raises(TrieFileError, match="is a folder"):
        TrieStore(tmp_path).check()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(TrieFileError, match="not a folder"):
        TrieStore(blocker / "trie.json").check()


def test_trie_save_failure_is_logged_not_fatal(tmp_path, caplog, monkeypatch):
    path = tmp_path / "trie.json"
    gen = new_generator()
    with caplog.at_level("ERROR", logger="lookahead_server"):
        with TestClient(create_app(gen, ServeSettings(trie_path=str(path), trie_save_interval=0))) as c:
            _learn(c)

            def fail(self: DraftStore, p: Any) -> None:
                raise OSError("disk full")

            monkeypatch.setattr(DraftStore, "save", fail)
        assert "could not save the trie" in caplog.text and "disk full" in caplog.text
    assert not path.exists()


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_help_and_missing_extra(monkeypatch, capsys):
    from lookahead_server import cli as serve_cli

    from lookahead import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--max-batch-size" in out and "--trie" in out and "--api-key" in out
    monkeypatch.setattr(serve_cli, "missing_dependencies", lambda: ["fastapi", "uvicorn"])
    monkeypatch.setattr(cli, "build_generator", lambda args: pytest.fail("the model must not load"))
    assert cli.main(["serve"]) == 2
    assert "pip install 'lookahead-rag[serve]'" in capsys.readouterr().err


def test_cli_refuses_a_folder_as_trie_before_loading(monkeypatch, capsys, tmp_path):
    from lookahead import cli

    monkeypatch.setattr(cli, "build_generator", lambda args: pytest.fail("the model must not load"))
    assert cli.main(["serve", "--trie", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_cli_wires_settings_into_uvicorn(monkeypatch, tmp_path):
    import uvicorn

    from lookahead import cli

    gen = new_generator()
    seen: dict[str, Any] = {}
    monkeypatch.setattr(cli, "build_generator", lambda args: (gen.model, gen.tokenizer, gen))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    monkeypatch.setenv("LOOKAHEAD_API_KEY", "from-env")
    trie = tmp_path / "t.json"
    assert cli.main(["serve", "--port", "8123", "--max-batch-size", "3", "--max-queue", "5", "--trie", str(trie),
                     "--served-model-name", "mine"]) == 0
    settings = seen["app"].state.service.settings
    assert seen["port"] == 8123 and seen["host"] == "127.0.0.1"
    assert (settings.max_batch_size, settings.max_queue, settings.api_key) == (3, 5, "from-env")
    assert settings.trie_path == str(trie) and settings.model_name == "mine"
    with TestClient(seen["app"]) as c:
        assert c.get("/v1/models", headers={"Authorization": "Bearer from-env"}).json()["data"][0]["id"] == "mine"
    assert Path(trie).exists()


def test_cli_wires_tenant_options(monkeypatch, tmp_path, capsys):
    import uvicorn

    from lookahead import cli

    gen = new_generator()
    seen: dict[str, Any] = {}
    monkeypatch.setattr(cli, "build_generator", lambda args: (gen.model, gen.tokenizer, gen))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    assert cli.main(["serve", "--tenant-header", "x-tenant"]) == 0
    assert seen["app"].state.service.settings.tenant_header == "x-tenant"
    keys = tmp_path / "keys.txt"
    keys.write_text("# key tenant\nk1 alpha\nk2 beta\n", encoding="utf-8")
    assert cli.main(["serve", "--tenant-keys", str(keys)]) == 0
    assert seen["app"].state.service.settings.tenant_keys == {"k1": "alpha", "k2": "beta"}
    assert cli.main(["serve", "--tenant-keys", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one or the other
        cli.main(["serve", "--tenant-header", "x-tenant", "--tenant-keys", str(keys)])


def test_page_is_served_with_security_headers(client):
    """The page runs only its own inline script and style (their hashes in the policy), talks only to this
    server, and cannot be framed."""
    import base64
    import hashlib
    import re

    r = client.get("/")
    assert r.status_code == 200
    policy = r.headers["content-security-policy"]
    for tag in ("script", "style"):
        (block,) = re.findall(rf"<{tag}>(.*?)</{tag}>", r.text, flags=re.S)
        digest = base64.b64encode(hashlib.sha256(block.encode()).digest()).decode()
        assert f"{tag}-src 'sha256-{digest}'" in policy
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy and "connect-src 'self'" in policy
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"
    assert " style=" not in r.text  # an inline style attribute would be blocked by the policy

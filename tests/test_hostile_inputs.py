"""A hostile client against `lookahead serve`: every kind of bad input gets a clear 4xx (never a 5xx), listed kind by
kind, and hypothesis throws arbitrary JSON at the request schema of every endpoint."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lookahead_server.app import ServeSettings, create_app
from serve_utils import new_generator

pytestmark = pytest.mark.usefixtures("single_thread")

KEY = "sekret"
AUTH = {"Authorization": f"Bearer {KEY}"}
GOOD = {"prompt": "the cat", "max_tokens": 2}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def client():
    settings = ServeSettings(model_name="tiny", api_key=KEY, default_max_tokens=2, max_tokens_limit=8,
                             max_body_bytes=64 * 1024, max_request_tokens=2048)
    with TestClient(create_app(new_generator(), settings)) as c:
        yield c


def _body(**changes: Any) -> dict[str, Any]:
    return {**GOOD, **changes}


#: (kind, method, path, json body or raw bytes, extra headers, allowed status codes)
CASES: list[tuple[str, str, str, Any, dict[str, str], tuple[int, ...]]] = [
    ("no API key", "POST", "/v1/completions", GOOD, {"Authorization": ""}, (401,)),
    ("wrong API key", "POST", "/v1/completions", GOOD, {"Authorization": "Bearer nope"}, (401,)),
    ("key without Bearer", "POST", "/v1/completions", GOOD, {"Authorization": KEY}, (401,)),
    ("body not JSON", "POST", "/v1/completions", b"{not json", {}, (400,)),
    ("body a JSON list", "POST", "/v1/completions", b"[1, 2]", {}, (400,)),
    ("empty body", "POST", "/v1/completions", b"", {}, (400,)),
    ("body not UTF-8", "POST", "/v1/completions", b'{"prompt": "\xff\xfe"}', {}, (400,)),
    ("lone surrogate in prompt", "POST", "/v1/completions", b'{"prompt": "a\\ud800b", "max_tokens": 2}', {}, (400,)),
    ("body over the size limit", "POST", "/v1/completions", _body(prompt="x" * 70_000), {}, (413,)),
    ("prompt missing", "POST", "/v1/completions", {"max_tokens": 2}, {}, (400,)),
    ("prompt empty", "POST", "/v1/completions", _body(prompt=""), {}, (400,)),
    ("prompt a number", "POST", "/v1/completions", _body(prompt=5), {}, (400,)),
    ("prompt token ids out of the vocabulary", "POST", "/v1/completions", _body(prompt=[10**9]), {}, (400,)),
    ("prompt negative token id", "POST", "/v1/completions", _body(prompt=[-3, 4]), {}, (400,)),
    ("max_tokens 0", "POST", "/v1/completions", _body(max_tokens=0), {}, (400,)),
    ("max_tokens negative", "POST", "/v1/completions", _body(max_tokens=-1), {}, (400,)),
    ("max_tokens a string", "POST", "/v1/completions", _body(max_tokens="2"), {}, (400,)),
    ("max_tokens past the limit", "POST", "/v1/completions", _body(max_tokens=10**9), {}, (400,)),
    ("max_tokens a float", "POST", "/v1/completions", _body(max_tokens=2.5), {}, (400,)),
    ("temperature negative", "POST", "/v1/completions", _body(temperature=-1), {}, (400,)),
    ("temperature a string", "POST", "/v1/completions", _body(temperature="hot"), {}, (400,)),
    ("temperature NaN", "POST", "/v1/completions", b'{"prompt": "a", "temperature": NaN}', {}, (400,)),
    ("top_p above 1", "POST", "/v1/completions", _body(temperature=1, top_p=1.5), {}, (400,)),
    ("top_p 0", "POST", "/v1/completions", _body(temperature=1, top_p=0), {}, (400,)),
    ("seed a string", "POST", "/v1/completions", _body(seed="x"), {}, (400,)),
    ("stop a number", "POST", "/v1/completions", _body(stop=123), {}, (400,)),
    ("stop with a non-string", "POST", "/v1/completions", _body(stop=["a", 1]), {}, (400,)),
    ("unknown field", "POST", "/v1/completions", _body(frobnicate=True), {}, (400,)),
    ("n above 1", "POST", "/v1/completions", _body(n=2), {}, (400,)),
    ("logprobs asked", "POST", "/v1/completions", _body(logprobs=5), {}, (400,)),
    ("stream not a bool", "POST", "/v1/completions", _body(stream="yes"), {}, (400,)),
    ("stream_options not an object", "POST", "/v1/completions", _body(stream=True, stream_options=3), {}, (400,)),
    ("unknown model", "POST", "/v1/completions", _body(model="gpt-9"), {}, (404,)),
    ("documents not a list", "POST", "/v1/completions", _body(documents="text"), {}, (400,)),
    ("documents with a number", "POST", "/v1/completions", _body(documents=["a", 3]), {}, (400,)),
    ("document_ids without documents", "POST", "/v1/completions", _body(document_ids=["a"]), {}, (400,)),
    ("document_ids of the wrong length", "POST", "/v1/completions", _body(documents=["a", "b"], document_ids=["a"]),
     {}, (400,)),
    ("documents past max_request_tokens", "POST", "/v1/completions", _body(documents=["word " * 3000]), {},
     (413,)),
    ("prediction a number", "POST", "/v1/completions", _body(prediction=7), {}, (400,)),
    ("messages missing", "POST", "/v1/chat/completions", {"max_tokens": 2}, {}, (400,)),
    ("messages empty", "POST", "/v1/chat/completions", {**CHAT, "messages": []}, {}, (400,)),
    ("messages not a list", "POST", "/v1/chat/completions", {**CHAT, "messages": "hi"}, {}, (400,)),
    ("message without role", "POST", "/v1/chat/completions", {**CHAT, "messages": [{"content": "hi"}]}, {}, (400,)),
    ("unknown role", "POST", "/v1/chat/completions", {**CHAT, "messages": [{"role": "god", "content": "x"}]}, {},
     (400,)),
    ("content a number", "POST", "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": 3}]}, {},
     (400,)),
    ("content part of an unknown type", "POST", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, {},
     (400,)),
    ("documents body not a list", "POST", "/v1/documents", {"documents": "text"}, {}, (400,)),
    ("documents body empty", "POST", "/v1/documents", {"documents": []}, {}, (400,)),
    ("document ids of the wrong length", "POST", "/v1/documents", {"documents": ["a", "b"], "ids": ["x"]}, {},
     (400,)),
    ("document id with a slash", "POST", "/v1/documents", {"documents": ["a"], "ids": ["a/b"]}, {}, (400,)),
    ("lone surrogate in a document", "POST", "/v1/documents", b'{"documents": ["a\\udc00"]}', {}, (400,)),
    ("delete an id that is not allowed", "DELETE", "/v1/documents/a%20b", None, {}, (400,)),
    ("delete an unknown id", "DELETE", "/v1/documents/never-sent", None, {}, (404,)),
    ("unknown endpoint", "GET", "/v2/whatever", None, {}, (404,)),
    ("wrong method", "GET", "/v1/completions", None, {}, (405,)),
]


def _send(client: TestClient, method: str, path: str, body: Any, headers: dict[str, str]) -> Any:
    sent = {**AUTH, **headers}
    if not sent.get("Authorization"):
        sent.pop("Authorization", None)
    if isinstance(body, bytes):
        return client.request(method, path, content=body, headers={**sent, "Content-Type": "application/json"})
    if body is None:
        return client.request(method, path, headers=sent)
    return client.request(method, path, json=body, headers=sent)


def test_at_least_40_kinds_of_bad_input_each_get_a_clear_4xx(client):
    assert len({kind for kind, *_ in CASES}) >= 40
    for kind, method, path, body, headers, allowed in CASES:
        r = _send(client, method, path, body, headers)
        assert r.status_code in allowed, f"{kind}: {r.status_code} {r.text[:300]}"
        error = r.json()["error"]
        assert error["message"] and "Traceback" not in error["message"], kind
    assert client.post("/v1/completions", json=GOOD, headers=AUTH).status_code == 200  # and the server still works


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
                    | st.text(max_size=12), lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
FIELDS = ["prompt", "messages", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "documents",
          "document_ids", "prediction", "model", "n", "stream_options", "max_completion_tokens", "ids"]
BODIES = st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6) | JSON
ENDPOINTS = st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/documents"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(path=ENDPOINTS, body=BODIES)
def test_arbitrary_json_never_gets_a_5xx(client, path, body):
    r = client.post(path, content=json.dumps(body), headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code < 500, f"{path} {body!r}: {r.status_code} {r.text[:300]}"

"""`lookahead serve` with OpenAI's Predicted Outputs (``prediction``, ``usage.completion_tokens_details``) and
provenance (the ``lookahead`` object's ``provenance``, each streamed chunk's accepted run ``source``), on a tiny
model; the official `openai` client reads the usage details."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from lookahead_server.app import ServeSettings, create_app
from serve_utils import LiveServer, chat_tokenizer, new_generator, sse_events

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPT = "Tell me about tries and drafts."
MESSAGES = [{"role": "user", "content": "What is a trie?"}]
N = 32


@pytest.fixture(scope="module")
def reference():
    return new_generator()


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(new_generator(), ServeSettings(model_name="tiny"))) as c:
        yield c


def completion(client: TestClient, **body: Any) -> httpx.Response:
    return client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": N, **body})


def details(data: dict[str, Any]) -> dict[str, int]:
    return data["usage"]["completion_tokens_details"]


def test_a_right_prediction_is_accepted_and_reported(client, reference):
    ref = reference.generate(PROMPT, max_new_tokens=N)
    r = completion(client, prediction={"type": "content", "content": ref.text})
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["choices"][0]["text"] == ref.text
    accepted = details(data)["accepted_prediction_tokens"]
    assert accepted == data["lookahead"]["accepted_prediction_tokens"] <= data["lookahead"]["accepted_draft_tokens"]
    assert accepted >= N // 2  # the text encodes to the model's tokens but where a random model spells it otherwise


def test_a_wrong_prediction_changes_nothing_but_the_counts(client, reference):
    ref = reference.generate(MESSAGES, max_new_tokens=N)
    wrong = "".join(chr((ord(c) - 32 + 7) % 95 + 32) for c in ref.text)  # every character another
    answers = []
    for prediction in (wrong, [{"type": "text", "text": ref.text[:12]}, {"type": "text", "text": wrong[12:]}]):
        r = client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": N,
                                                      "prediction": {"type": "content", "content": prediction}})
        assert r.status_code == 200, r.text
        data = r.json()
        assert data["choices"][0]["message"]["content"] == ref.text
        answers.append(details(data))
    assert answers[0]["accepted_prediction_tokens"] == 0  # never agrees
    assert answers[1]["accepted_prediction_tokens"] > 0 and answers[1]["rejected_prediction_tokens"] > 0


def test_the_prediction_streams_the_same_text(client, reference):
    ref = reference.generate(PROMPT, max_new_tokens=N)
    r = completion(client, stream=True, stream_options={"include_usage": True},
                   prediction={"type": "content", "content": ref.text})
    events = sse_events(r.text)
    assert "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"]) == ref.text
    assert events[-2]["usage"]["completion_tokens_details"]["accepted_prediction_tokens"] > 0


@pytest.mark.parametrize("prediction,message", [
    ({"type": "text", "content": "x"}, "prediction"),
    ({"type": "content"}, "prediction"),
    ("just text", "prediction"),
    ({"type": "content", "content": "x", "extra": 1}, "extra"),
])
def test_a_bad_prediction_is_a_clear_400(client, prediction, message):
    r = completion(client, prediction=prediction)
    assert r.status_code == 400
    assert message in r.json()["error"]["message"]


def test_provenance_names_the_document_the_answer_copies(reference):
    """The answer's middle is sent as a document: once the output reaches it, it drafts from it, and the response
    says so (the first time: no past answer holds it yet)."""
    ref = reference.generate(PROMPT, max_new_tokens=N)
    ids = ref.token_ids
    tok = chat_tokenizer()
    start, end = next((a, b) for a in range(2, 16) for b in range(a + 14, a + 5, -1)
                      if tok(tok.decode(ids[a:b]), add_special_tokens=False)["input_ids"] == ids[a:b])
    piece = tok.decode(ids[start:end])  # encodes back to the output's own tokens
    docs = ["Nothing in here is in the answer at all.", piece]
    with TestClient(create_app(new_generator(), ServeSettings())) as c:
        data = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": N, "documents": docs,
                                               "document_ids": ["other", "middle"]}).json()
    with TestClient(create_app(new_generator(), ServeSettings())) as c:  # no past answer holds the piece
        events = sse_events(c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": N, "documents": docs,
                                                            "stream": True}).text)
    assert data["choices"][0]["text"] == ref.text
    other, middle = data["lookahead"]["provenance"]
    assert other == {"index": 0, "source": "other", "tokens": 0, "spans": []}
    assert middle["index"] == 1 and middle["source"] == "middle" and middle["tokens"] >= (end - start) // 2
    assert all(start <= a < b <= end for a, b in middle["spans"])
    runs = [run for e in events[:-1] if e["choices"] for run in e.get("lookahead", {}).get("accepted_runs", [])]
    assert "doc:1" in {run["source"] for run in runs}  # unnamed documents are known by their index
    final = next(e for e in events[:-1] if e["choices"] and e["choices"][0]["finish_reason"])
    assert final["lookahead"]["provenance"][1]["source"] == "doc:1"


def test_document_ids_need_one_per_document(client):
    r = completion(client, documents=["a", "b"], document_ids=["x"])
    assert r.status_code == 400 and "got 1 document_ids for 2 documents" in r.json()["error"]["message"]


def test_the_openai_client_reads_the_prediction_usage(reference):
    openai = pytest.importorskip("openai")
    ref = reference.generate(MESSAGES, max_new_tokens=N)
    with LiveServer(create_app(new_generator(), ServeSettings(model_name="tiny"))) as server:
        api = openai.OpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0, timeout=60)
        out = api.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=N,
                                          prediction={"type": "content", "content": ref.text})
        assert out.choices[0].message.content == ref.text
        usage = out.usage.completion_tokens_details
        assert usage.accepted_prediction_tokens >= N // 2
        text = api.completions.create(model="tiny", prompt=PROMPT, max_tokens=N,
                                      extra_body={"prediction": {"type": "content", "content": "no such answer"}})
        details = text.usage.completion_tokens_details  # a prediction unlike the answer: none of it is accepted
        assert details.accepted_prediction_tokens == 0 and details.rejected_prediction_tokens is not None

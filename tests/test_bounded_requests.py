"""Bounded requests (issue 22, item 1): a request's documents count against ``max_request_tokens`` (the library's
:class:`RequestTooLargeError`, the server's 413), what a request keeps for drafting is capped at the store's
``local_tokens`` (the last ones), documents are staged before a request joins, and huge documents leave the output
exactly greedy decoding's."""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import EOS_ID, hf_greedy, make_model, make_tokenizer, random_prompt
from fastapi.testclient import TestClient
from lookahead_server.app import ServeSettings, create_app
from serve_utils import new_generator

from lookahead.config import LookaheadConfig
from lookahead.engine import LookaheadGenerator
from lookahead.inputs import RequestOptions, RequestTooLargeError
from lookahead.store import DraftStore, StagedDocuments

pytestmark = pytest.mark.usefixtures("single_thread")


def words(n: int, seed: int = 0) -> str:
    """About ``n`` tokens of text for the tiny tokenizer (letters and spaces, one token or two each)."""
    rng = np.random.default_rng(seed)
    return " ".join("".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 5)) for _ in range(n // 4))


def wait_indexed(store: DraftStore, request_id: str) -> None:
    deadline = time.monotonic() + 20
    while not store.documents_indexed(request_id):
        assert time.monotonic() < deadline, "the request's documents were never indexed"
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------------------- the store


def test_request_local_documents_keep_the_last_local_tokens():
    store = DraftStore(branch_length=4, background=False, local_tokens=1000)
    rng = np.random.default_rng(0)
    docs = [rng.integers(10, 5000, 700).tolist() for _ in range(4)]
    store.insert([1, 2, 3], request_id="r")
    for doc in docs:
        store.insert(doc, request_id="r")
    assert store.local_tokens_held("r") == {"stream": 3, "documents": 1000}
    assert store.count(docs[-1][:5], request_id="r") == 1  # the newest document is kept whole
    assert store.count(docs[-2][-3:], request_id="r") == 1  # the one before by its last 300 tokens
    assert store.count(docs[-2][:5], request_id="r") == 0
    assert store.count(docs[0][:5], request_id="r") == 0  # the oldest are gone
    store.insert_documents([rng.integers(10, 5000, 5000).tolist()], "r")  # one larger than the cap alone
    assert store.local_tokens_held("r")["documents"] == 1000
    store.release("r")
    assert store.local_tokens_held("r") == {"stream": 0, "documents": 0}


def test_request_stream_keeps_the_last_local_tokens():
    store = DraftStore(branch_length=4, background=False, local_tokens=1000)
    prompt = list(range(10, 1510))
    store.insert(prompt, request_id="r")
    assert store.local_tokens_held("r")["stream"] == 1000  # the prompt's last 1000
    output = list(range(2000, 4000))
    before = prompt
    for i in range(0, len(output), 7):  # counted a few tokens at a time, as decoding does
        store.extend(before[-4:], output[i:i + 7], request_id="r")
        before = output[:i + 7]
        assert store.local_tokens_held("r")["stream"] <= 1250
    assert store.count(output[-5:], request_id="r") == 1  # the newest windows draft
    draft = store.draft(output[-18:-16], 8, request_id="r")  # a window holds 5 tokens: 3 after a match of 2
    assert draft.tokens[:3] == output[-16:-13]
    assert store.count(prompt[:5], request_id="r") == 0


@pytest.mark.parametrize("size", [600, 40_000])  # scanned, and with a suffix array (past 32768 tokens)
def test_staged_documents_draft_as_inserted_ones(size):
    rng = np.random.default_rng(1)
    docs = [rng.integers(10, 60, size // 3).tolist() for _ in range(3)]
    staged_store = DraftStore(branch_length=6, background=False)
    plain_store = DraftStore(branch_length=6, background=False)
    staged = staged_store.stage_documents(docs)
    assert isinstance(staged, StagedDocuments) and list(staged) == docs  # still the plain documents to any reader
    assert (staged.index is not None) == (size > 32_768)
    for store, given in ((staged_store, staged), (plain_store, docs)):
        store.insert([5, 6, 7], request_id="r")
        store.insert_documents(given, "r")
        if size > 32_768:
            wait_indexed(store, "r")
    for at in range(0, size // 3 - 10, max(1, size // 40)):
        context = docs[1][at:at + 3]
        assert staged_store.draft(context, 24, request_id="r") == plain_store.draft(context, 24, request_id="r")


def test_staged_documents_are_not_shared_between_requests():
    store = DraftStore(branch_length=4, background=False)
    staged = store.stage_documents([[11, 12, 13, 14]])
    for request in ("a", "b"):
        store.insert([1, 2], request_id=request)
        store.insert_documents(staged, request)
    store.insert_documents([[21, 22, 23]], "a")  # a later document of one request only
    assert store.count([21, 22], request_id="a") == 1
    assert store.count([21, 22], request_id="b") == 0
    assert store.count([11, 12], request_id="b") == 1
    other = DraftStore(branch_length=6, background=False)  # another shape: built again, not swapped in
    other.insert([1, 2], request_id="c")
    other.insert_documents(staged, "c")
    assert other.count([11, 12, 13], request_id="c") == 1


def test_replacing_a_source_forgets_its_old_text():
    store = DraftStore(branch_length=4, background=False)
    store.insert_source("doc:a", list(range(100, 200)))
    store.insert_source("doc:b", list(range(300, 400)))
    store.flush()  # both in a sealed segment
    store.insert_source("doc:a", list(range(500, 600)))
    assert store.count([100, 101, 102]) == 0
    assert store.count([500, 501, 502]) == 1
    assert store.count([300, 301, 302]) == 1
    assert store.draft([150, 151], 8).tokens == []


# ---------------------------------------------------------------------------------------------------- the library


def test_max_request_tokens_is_checked():
    with pytest.raises(ValueError, match="max_request_tokens must be a positive integer"):
        RequestOptions(max_request_tokens=0)


def test_prepare_refuses_documents_past_the_limit():
    generator = new_generator()
    docs = [words(300, seed) for seed in range(4)]
    sizes = [len(generator.inputs.encode_document(d)) for d in docs]
    limit = len(generator.encode("Hello there")) + sizes[0] + sizes[1]  # the third document does not fit
    with pytest.raises(RequestTooLargeError) as caught:
        generator.prepare("Hello there", documents=docs, max_request_tokens=limit)
    error = caught.value
    assert error.limit == limit and error.partial
    assert error.counted["documents"] == sizes[0] + sizes[1] + sizes[2]  # the count stops at the first one past it
    assert f"max_request_tokens={limit}" in str(error) and "prompt" in str(error)
    request = generator.prepare("Hello there", documents=docs, max_request_tokens=sum(sizes) + 100)
    assert [len(d) for d in request.document_ids] == sizes
    with pytest.raises(RequestTooLargeError, match="prediction"):
        generator.prepare("Hello there", prediction=words(400), max_request_tokens=50)


def test_a_huge_document_is_refused_from_a_prefix():
    generator = new_generator()
    calls: list[int] = []
    encode = generator.inputs.encode_document

    def counting(text: str) -> list[int]:
        calls.append(len(text))
        return encode(text)

    generator.inputs.encode_document = counting  # type: ignore[method-assign]
    huge = words(400_000)
    with pytest.raises(RequestTooLargeError, match="at least"):
        generator.prepare("Hello there", documents=[huge], max_request_tokens=1000)
    assert calls and max(calls) < 20_000 < len(huge)  # never tokenized whole


def test_prepare_stages_documents_capped_at_local_tokens():
    model = make_model("llama")
    store = DraftStore(branch_length=6, local_tokens=512)
    generator = LookaheadGenerator(model, make_tokenizer(), LookaheadConfig(branch_length=6), trie=store)
    request = generator.prepare(random_prompt(0), documents=[words(2000)])
    assert isinstance(request.document_ids, StagedDocuments)
    assert request.document_ids.kept_tokens == 512 < len(request.document_ids[0])


@pytest.mark.parametrize("answer_at", ["end", "start"])  # kept for drafting, and cut away by the cap
def test_huge_documents_stay_exact(answer_at):
    model = make_model("llama", 3)
    tok = make_tokenizer()
    prompt = random_prompt(7)
    ref = hf_greedy(model, prompt, 40)
    store = DraftStore(branch_length=8, local_tokens=2048)
    generator = LookaheadGenerator(model, tok, LookaheadConfig(branch_length=8), trie=store)
    filler = words(30_000, 5)
    answer = tok.decode(ref)
    docs = [filler, answer] if answer_at == "end" else [answer, filler]
    result = generator.generate(prompt, max_new_tokens=40, documents=docs, eos_token_id=EOS_ID)
    assert result.token_ids == ref
    if answer_at == "end":
        assert sum(result.stats.accepted_lengths) > 0  # the answer drafted from the kept documents
    assert store.live_requests() == []


# ---------------------------------------------------------------------------------------------------- the server


def test_server_settings_check_the_limit():
    assert ServeSettings().max_request_tokens == 32768
    with pytest.raises(ValueError, match="max_request_tokens must be an integer >= 1"):
        ServeSettings(max_request_tokens=0)


def test_server_answers_413_past_max_request_tokens():
    generator = new_generator()
    app = create_app(generator, ServeSettings(model_name="tiny", max_request_tokens=600))
    docs = [words(300, seed) for seed in range(4)]
    body = {"messages": [{"role": "user", "content": "What is a trie?"}], "max_tokens": 8}
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", json={**body, "documents": docs})
        assert r.status_code == 413, r.text
        error = r.json()["error"]
        assert error["code"] == "request_too_large"
        assert "max_request_tokens=600" in error["message"] and "--max-request-tokens" in error["message"]
        assert "documents" in error["message"]
        r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 8, "documents": [words(40_000)]})
        assert r.status_code == 413 and "at least" in r.json()["error"]["message"]
        r = client.post("/v1/chat/completions", json={**body, "documents": docs[:1]})
        assert r.status_code == 200, r.text
    assert generator.trie.live_requests() == []

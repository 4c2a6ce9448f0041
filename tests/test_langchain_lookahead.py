"""Our own tests of the LangChain integration, on a tiny random Llama (fast) and, for the retrieval parts, the offline
MiniLM embeddings: text equal to the engine's, stop strings, streaming callbacks, async, batch, documents routed into
the request-local trie, the FAISS store's extras, and clear errors for bad input."""

from __future__ import annotations

import asyncio
import copy
import json
from typing import Any

import numpy as np
import pytest
from conftest import FLAT_CURVE
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_core.prompts import PromptTemplate
from langchain_core.runnables import RunnableLambda, RunnablePassthrough
from langchain_lookahead import ChatLookahead, FAISSVectorStore, LookaheadLLM, LookaheadRetriever, MiniLMEmbeddings
from langchain_lookahead._engine import DocumentRouter, loaded_engines
from pydantic import ValidationError

from lookahead.config import LookaheadConfig
from lookahead.engine import LookaheadGenerator
from lookahead.models import ModelLoadError
from lookahead.outputs import Request

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant> {% endif %}")
PROMPT = "the cat sat on the mat and the cat ate the rat; "


@pytest.fixture(scope="module")
def gen(tiny_model, tok, single_thread) -> LookaheadGenerator:
    return LookaheadGenerator(tiny_model("llama"), tok, LookaheadConfig(), cost_curve=FLAT_CURVE)


@pytest.fixture(scope="module")
def chat_gen(tiny_model, tok, single_thread) -> LookaheadGenerator:
    tokenizer = copy.deepcopy(tok)
    tokenizer.chat_template = TEMPLATE
    return LookaheadGenerator(tiny_model("llama"), tokenizer, LookaheadConfig(), cost_curve=FLAT_CURVE)


@pytest.fixture
def llm(gen) -> LookaheadLLM:
    return LookaheadLLM(generator=gen, chat_template=False, max_new_tokens=40)


@pytest.fixture
def chat(chat_gen) -> ChatLookahead:
    return ChatLookahead(generator=chat_gen, max_tokens=40)


class Recorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.chunks: list[Any] = []

    def on_llm_new_token(self, token: str, *, chunk: Any = None, **kwargs: Any) -> None:
        self.tokens.append(token)
        self.chunks.append(chunk)


def spy_inserts(monkeypatch: pytest.MonkeyPatch, generator: LookaheadGenerator) -> list[tuple[list[int], Any]]:
    calls: list[tuple[list[int], Any]] = []
    original = generator.trie.insert

    def insert(tokens, request_id=None):
        calls.append((list(tokens), request_id))
        return original(tokens, request_id=request_id)

    def insert_documents(documents, request_id):  # a request's documents, all at once
        calls.extend((list(doc), request_id) for doc in documents)
        return original_documents(documents, request_id)

    original_documents = generator.trie.insert_documents
    monkeypatch.setattr(generator.trie, "insert", insert)
    monkeypatch.setattr(generator.trie, "insert_documents", insert_documents)
    return calls


def spy_requests(monkeypatch: pytest.MonkeyPatch, generator: LookaheadGenerator) -> list[Request]:
    """Every request the generator prepares."""
    requests: list[Request] = []
    original = generator.prepare

    def prepare(*args, **kwargs):
        requests.append(original(*args, **kwargs))
        return requests[-1]

    monkeypatch.setattr(generator, "prepare", prepare)
    return requests


def doc_ids(generator: LookaheadGenerator, text: str) -> list[int]:
    return generator.tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------------- construction


def test_constructors_load_nothing():
    before = loaded_engines()
    llm = LookaheadLLM(model="./no/such/model", max_tokens=8, decoding_length=8, branch_length=4)
    chat = ChatLookahead(model="./no/such/model", temperature=0, stop=["x"])
    assert not llm.loaded and not chat.loaded and loaded_engines() == before
    assert llm.max_new_tokens == 8 and llm.lookahead_settings().decoding_length == 8
    params = llm._identifying_params
    assert params["model_name"] == "./no/such/model" and params["branch_length"] == 4


def test_bad_settings_are_refused():
    with pytest.raises(ValidationError, match="temperature"):
        ChatLookahead(temperature=-0.5)
    with pytest.raises(ValidationError, match="top_p"):
        LookaheadLLM(temperature=0.7, top_p=1.5)
    with pytest.raises(ValidationError, match="seed"):
        LookaheadLLM(seed=-1)
    with pytest.raises(ValidationError, match="dtype"):
        LookaheadLLM(dtype="int8")
    with pytest.raises(ValidationError, match="decoding_length"):
        LookaheadLLM(decoding_length=-1)
    with pytest.raises(ValidationError):
        LookaheadLLM(max_tokens=0)
    with pytest.raises(TypeError, match="LookaheadGenerator"):
        LookaheadLLM(generator=object())


def test_sampling_through_langchain_equals_seeded_hf_sampling(gen, chat_gen):
    """temperature > 0 samples losslessly: with a seed, the lookahead path gives the tokens of HF's seeded sampling."""
    settings = dict(chat_template=False, max_new_tokens=30, temperature=0.9, top_k=20, seed=11)
    sampled = LookaheadLLM(generator=gen, **settings)
    plain = LookaheadLLM(generator=gen, use_lookahead=False, **settings)
    greedy = LookaheadLLM(generator=gen, chat_template=False, max_new_tokens=30)
    texts = {seed: sampled.invoke(PROMPT * 2, seed=seed) for seed in (11, 12, 13)}
    assert texts[11] == plain.invoke(PROMPT * 2) == sampled.invoke(PROMPT * 2)  # the field's seed, reproducible
    assert texts[12] == plain.invoke(PROMPT * 2, seed=12)  # a per-call seed
    assert len(set(texts.values()) | {greedy.invoke(PROMPT * 2)}) > 1  # sampling does change the text
    assert sampled.invoke(PROMPT * 2, temperature=0) == greedy.invoke(PROMPT * 2)  # temperature 0 is greedy
    chat = ChatLookahead(generator=chat_gen, max_tokens=30, temperature=0.9, seed=5)
    streamed = "".join(c.content for c in chat.stream("the cat"))
    assert streamed == chat.invoke("the cat").content


def test_sampling_settings_are_checked_per_call(llm):
    with pytest.raises(ValueError, match="top_p"):
        llm.invoke(PROMPT, temperature=0.5, top_p=0)
    with pytest.raises(ValueError, match="n > 1"):
        llm.invoke(PROMPT, n=2, temperature=0.5)


def test_unknown_model_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not found"):
        LookaheadLLM(model="./no/such/model").invoke("hi")
    with pytest.raises(ModelLoadError, match="not found"):
        ChatLookahead(model="no-such-org/no-such-model").invoke("hi")


# ---------------------------------------------------------------------------------------------------- LLM


def test_invoke_equals_engine(llm, gen):
    expected = gen.generate(PROMPT, max_new_tokens=40).text
    assert llm.invoke(PROMPT) == expected
    assert llm.invoke(PROMPT, max_new_tokens=7) == gen.generate(PROMPT, max_new_tokens=7).text


def test_stop_sequences_cut_exactly(llm):
    full = llm.invoke(PROMPT)
    assert len(full) > 12
    stop = full[8:11]
    cut = full[: full.find(stop)]
    assert llm.invoke(PROMPT, stop=[stop]) == cut
    assert "".join(llm.stream(PROMPT, stop=[stop])) == cut
    assert LookaheadLLM(generator=llm.generator, chat_template=False, max_new_tokens=40, stop=[stop]).invoke(
        PROMPT) == cut
    assert llm.invoke(PROMPT, stop=["\x07never"]) == full


def test_stream_callbacks_concatenate_to_invoke(llm):
    expected = llm.invoke(PROMPT)
    recorder = Recorder()
    streamed = list(llm.stream(PROMPT, config={"callbacks": [recorder]}))
    assert "".join(streamed) == expected
    assert "".join(recorder.tokens) == expected
    infos = [c.generation_info for c in recorder.chunks]
    assert all(isinstance(i["accepted"], int) and i["accepted"] >= 0 for i in infos)
    assert sum(len(i["token_ids"]) for i in infos) == infos[-1]["stats"]["new_tokens"]
    # one callback per accepted run: one per forward pass (the prefill's token included)
    assert len(infos) == infos[-1]["stats"]["steps"]
    assert sum(i["accepted"] for i in infos) == sum(infos[-1]["stats"]["accepted_lengths"])
    recorder = Recorder()
    assert llm.invoke(PROMPT, config={"callbacks": [recorder]}) == expected
    assert "".join(recorder.tokens) == expected and len(recorder.tokens) > 1


def test_stream_chunk_token_paces_streams_one_token_a_chunk(gen, chat_gen):
    llm = LookaheadLLM(generator=gen, chat_template=False, max_new_tokens=40, stream_chunk="token")
    expected = llm.invoke(PROMPT)
    for _ in range(2):  # the second time the answer drafts from the store: still one token a chunk
        recorder = Recorder()
        assert "".join(llm.stream(PROMPT, config={"callbacks": [recorder]})) == expected
        infos = [c.generation_info for c in recorder.chunks]
        assert [len(i["token_ids"]) for i in infos] == [1] * len(infos)
        assert all(i["accepted"] == 0 for i in infos)
    assert sum(infos[-1]["stats"]["accepted_lengths"]) > 0
    chat = ChatLookahead(generator=chat_gen, max_tokens=30, stream_chunk="fixed:3")
    reply = chat.invoke([HumanMessage("the cat sat")]).content
    pieces = list(chat.stream([HumanMessage("the cat sat")]))
    assert "".join(p.content for p in pieces) == reply
    sizes = [p.usage_metadata["output_tokens"] for p in pieces]
    assert sizes[:-1] == [3] * (len(sizes) - 1) and 0 <= sizes[-1] <= 3
    with pytest.raises(ValidationError, match="'run'.*'token'.*'fixed:N'"):
        LookaheadLLM(generator=gen, stream_chunk="tokens")


def test_async_and_batch(llm):
    prompts = [PROMPT, "a quick brown fox jumps over the lazy dog. a quick "]
    expected = [llm.invoke(p) for p in prompts]
    assert llm.batch(prompts) == expected

    async def run() -> tuple[str, str, list[str]]:
        text = await llm.ainvoke(prompts[0])
        chunks = [c async for c in llm.astream(prompts[1])]
        both = await llm.abatch(prompts)
        return text, "".join(chunks), both

    text, streamed, both = asyncio.run(run())
    assert text == expected[0] and streamed == expected[1] and both == expected


def test_plain_baseline_matches(gen):
    fast = LookaheadLLM(generator=gen, chat_template=False, max_new_tokens=30)
    plain = LookaheadLLM(generator=gen, chat_template=False, max_new_tokens=30, use_lookahead=False)
    full = fast.invoke(PROMPT)
    assert plain.invoke(PROMPT) == full
    stop = full[5:8]
    assert plain.invoke(PROMPT, stop=[stop]) == fast.invoke(PROMPT, stop=[stop])


def test_bad_call_arguments(llm):
    with pytest.raises(TypeError, match="documents"):
        llm.invoke(PROMPT, documents="one string")
    with pytest.raises(TypeError, match=r"documents\[1\]"):
        llm.invoke(PROMPT, documents=["ok", 3])
    with pytest.raises(TypeError, match="unexpected keyword"):
        llm.invoke(PROMPT, temperature_typo=1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        llm.invoke(PROMPT, max_new_tokens=0)
    with pytest.raises(ValueError, match="empty"):
        llm.invoke("   ")


# ---------------------------------------------------------------------------------------------------- chat


def test_chat_equals_engine_with_usage(chat, chat_gen):
    messages = [SystemMessage("be brief"), HumanMessage(PROMPT)]
    dicts = [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPT}]
    expected = chat_gen.generate(dicts, max_new_tokens=40)
    reply = chat.invoke(messages)
    assert reply.content == expected.text
    assert reply.usage_metadata["input_tokens"] == len(chat_gen.encode(dicts))
    assert reply.usage_metadata["output_tokens"] == expected.stats.new_tokens
    assert reply.response_metadata["model_name"] == chat.model_name
    full = None
    for chunk in chat.stream(messages):
        full = chunk if full is None else full + chunk
    assert full.content == expected.text
    assert full.usage_metadata == reply.usage_metadata
    assert full.chunk_position == "last"


def test_chat_async_batch_and_stop(chat):
    expected = chat.invoke(PROMPT).content
    assert [m.content for m in chat.batch([PROMPT, PROMPT])] == [expected, expected]
    assert asyncio.run(chat.ainvoke(PROMPT)).content == expected
    stop = expected[6:9]
    assert chat.invoke(PROMPT, stop=[stop]).content == expected[: expected.find(stop)]


def test_chat_rejects_non_text_content(chat):
    with pytest.raises(ValueError, match="image"):
        chat.invoke([HumanMessage(content=[{"type": "image", "url": "http://x/y.png"}])])
    with pytest.raises(ValueError, match="no messages"):
        chat.invoke([])


# ---------------------------------------------------------------------------------------------------- documents -> trie


def test_documents_seed_the_request_local_trie(llm, gen, monkeypatch):
    calls = spy_inserts(monkeypatch, gen)
    doc = "zebra quokka narwhal"
    llm.invoke(PROMPT, documents=[doc, Document(page_content="second document")])
    inserted = {tuple(tokens): rid for tokens, rid in calls}
    assert inserted.get(tuple(doc_ids(gen, doc))) is not None  # with the request's id: request-local counts
    assert inserted.get(tuple(doc_ids(gen, "second document"))) is not None


def _store(texts: list[str]) -> FAISSVectorStore:
    return FAISSVectorStore.from_texts(texts, DeterministicFakeEmbedding(size=16))


def test_retriever_feeds_llm_in_a_plain_chain(llm, gen, monkeypatch):
    texts = ["the quokka smiles at the zebra", "the narwhal sings to the walrus"]
    retriever = LookaheadRetriever(vectorstore=_store(texts), llm=llm, k=2)
    prompt = PromptTemplate.from_template("notes: {docs}\nthe cat sat on the mat and")
    chain = retriever | prompt | llm
    calls = spy_inserts(monkeypatch, gen)
    requests = spy_requests(monkeypatch, gen)
    text = chain.invoke("quokka")
    assert isinstance(text, str)
    local = {tuple(tokens) for tokens, rid in calls if rid is not None}
    (request,) = requests
    for t in texts:
        assert t in request.documents  # routed to the request
        assert tuple(doc_ids(gen, t)) not in local  # but counted once: as part of the prompt that quotes it
    assert tuple(request.prompt_ids) in local


def test_retriever_feeds_llm_through_a_parallel_branch(llm, gen, monkeypatch):
    texts = ["the quokka smiles at the zebra", "the narwhal sings to the walrus"]
    retriever = LookaheadRetriever(vectorstore=_store(texts), llm=llm, k=1)
    prompt = PromptTemplate.from_template("notes: {context}\nquestion: {question}\n")

    def join(docs: list[Document]) -> str:
        return "\n".join(d.page_content for d in docs)

    chain = {"context": retriever | RunnableLambda(join), "question": RunnablePassthrough()} | prompt | llm
    requests = spy_requests(monkeypatch, gen)
    chain.invoke("narwhal")
    retrieved = retriever.invoke("narwhal")[0].page_content
    (request,) = requests
    assert retrieved in request.documents and request.document_ids == ()  # quoted by the prompt: counted there


def test_retriever_without_llm_and_wrapping(llm):
    store = _store(["a", "b", "c"])
    plain = LookaheadRetriever(vectorstore=store, k=2)
    assert len(plain.invoke("a")) == 2 and len(plain.invoke("a", k=3)) == 3
    wrapped = LookaheadRetriever(retriever=store.as_retriever(search_kwargs={"k": 3}), llm=llm, k=1)
    assert len(wrapped.invoke("a")) == 1 and len(llm.router) >= 1
    with pytest.raises(ValidationError, match="exactly one"):
        LookaheadRetriever(k=2)
    with pytest.raises(ValueError, match="k must be"):
        plain.invoke("a", k=0)


def test_router_matches_by_run_then_by_content():
    router = DocumentRouter(max_entries=2)
    router.file("run-1", ["alpha doc", "beta doc"])
    assert router.take("run-1", "") == ["alpha doc", "beta doc"]
    assert router.take("run-2", "prompt mentioning beta doc here") == ["alpha doc", "beta doc"]
    assert router.take("run-2", "unrelated") == []
    router.file("run-3", ["gamma"])
    router.file("run-4", ["delta"])
    assert router.take("run-1", "") == [] and len(router) == 2  # bounded: the oldest entry went


# ---------------------------------------------------------------------------------------------------- FAISS, MiniLM


def test_faiss_save_load_roundtrip_without_pickle(tmp_path):
    store = FAISSVectorStore.from_texts(["alpha", "beta", "gamma"], DeterministicFakeEmbedding(size=8),
                                        metadatas=[{"n": 1}, {"n": 2}, {"n": 3}], ids=["a", "b", "c"])
    store.add_texts(["beta v2"], [{"n": 22}], ids=["b"])  # upsert
    store.delete(["c", "missing"])
    store.save_local(tmp_path / "idx")
    files = sorted(p.name for p in (tmp_path / "idx").iterdir())
    assert files == ["docstore.json", "index.faiss"]
    json.loads((tmp_path / "idx" / "docstore.json").read_text())  # plain JSON
    loaded = FAISSVectorStore.load_local(tmp_path / "idx", DeterministicFakeEmbedding(size=8))
    assert loaded.get_by_ids(["b", "a", "c"]) == [Document(id="b", page_content="beta v2", metadata={"n": 22}),
                                                  Document(id="a", page_content="alpha", metadata={"n": 1})]
    assert loaded.similarity_search_with_score("alpha", k=1)[0][0].id == "a"
    assert loaded.similarity_search("alpha", k=2, filter={"n": 22})[0].id == "b"
    assert [d.id for d in loaded.max_marginal_relevance_search("alpha", k=2, fetch_k=2)][0] == "a"
    scores = loaded.similarity_search_with_relevance_scores("alpha", k=2)
    assert all(0.0 <= s <= 1.0 for _, s in scores)


def test_faiss_errors(tmp_path):
    store = FAISSVectorStore(DeterministicFakeEmbedding(size=8))
    with pytest.raises(ValueError, match="metric"):
        FAISSVectorStore(DeterministicFakeEmbedding(size=8), metric="hamming")
    store.add_texts(["x"], [{"when": object()}])
    with pytest.raises(ValueError, match="JSON"):
        store.save_local(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="docstore.json"):
        FAISSVectorStore.load_local(tmp_path / "nothing", DeterministicFakeEmbedding(size=8))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "docstore.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="format"):
        FAISSVectorStore.load_local(tmp_path / "junk", DeterministicFakeEmbedding(size=8))
    with pytest.raises(ValueError, match="ids"):
        store.add_texts(["a", "b"], ids=["1"])


def test_faiss_lazy_import_hint(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_faiss(name, *args, **kwargs):
        if name == "faiss":
            raise ImportError("No module named 'faiss'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        FAISSVectorStore(DeterministicFakeEmbedding(size=8))


def test_minilm_embeddings_offline():
    emb = MiniLMEmbeddings(batch_size=2)
    docs = ["Remove common leading whitespace from every line.", "Serialize an object to a JSON string.",
            "Push an item onto the heap."]
    vectors = np.array(emb.embed_documents(docs))
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    query = np.array(emb.embed_query("How do I dedent text?"))
    assert int(np.argmax(vectors @ query)) == 0
    assert np.allclose(np.array(emb.embed_documents(docs[:1]))[0], vectors[0], atol=1e-5)  # batching is invisible
    with pytest.raises(TypeError):
        emb.embed_documents("not a list")

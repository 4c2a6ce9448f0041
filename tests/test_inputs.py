"""Tests for lookahead.inputs: documents already quoted in the prompt do not seed the request-local trie twice (string
prompts, chat messages, token ids, and LangChain's RAG chain end to end)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from langchain_core.documents import Document
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_lookahead import ChatLookahead, FAISSVectorStore
from langchain_lookahead.rag import format_documents, rag_chain
from transformers import PreTrainedTokenizerFast

from lookahead.config import LookaheadConfig
from lookahead.engine import LookaheadGenerator
from lookahead.inputs import InputEncoder, RequestOptions, in_prompt, prompt_texts
from lookahead.prompts import rag_messages

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant> {% endif %}")
QUOKKA = "the quokka smiles at the zebra"
NARWHAL = "the narwhal sings to the walrus"


@pytest.fixture(scope="module")
def chat_tok(tok: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    tokenizer = copy.deepcopy(tok)
    tokenizer.chat_template = TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def encoder(chat_tok: PreTrainedTokenizerFast) -> InputEncoder:
    return InputEncoder(chat_tok, vocab_size=len(chat_tok))


def ids(encoder: InputEncoder, text: str) -> tuple[int, ...]:
    return tuple(encoder.encode_document(text))


# ---------------------------------------------------------------------------------------------------- options


def test_request_options_are_normalised_and_checked_once():
    options = RequestOptions(max_new_tokens=5, stop=["x"], documents=["a", "b"], eos_token_id=[3, 1])
    assert options.stop == ("x",) and options.documents == ("a", "b") and options.eos_token_id == (3, 1)
    assert options.names == (None, None)
    with pytest.raises(ValueError, match="max_new_tokens"):
        RequestOptions(max_new_tokens=0)
    with pytest.raises(TypeError, match="stop must be a list of strings"):
        RequestOptions(stop="x")
    with pytest.raises(ValueError, match="give one per document"):
        RequestOptions(documents=["a"], document_names=["n", "m"])
    with pytest.raises(TypeError, match="trie must be"):
        RequestOptions(trie=object())


def test_request_options_of_keywords_replace_fields_and_sampling_fields():
    base = RequestOptions(max_new_tokens=7, stop=("x",))
    options = RequestOptions.of(base, max_new_tokens=9, temperature=0.5, do_sample=True)
    assert (options.max_new_tokens, options.stop) == (9, ("x",))
    assert options.sampling.do_sample and options.sampling.temperature == 0.5
    assert RequestOptions.of(base) is base and base.max_new_tokens == 7  # frozen: the base is untouched
    with pytest.raises(TypeError, match="unexpected request option.*max_tokens"):
        RequestOptions.of(max_tokens=3)


def test_prepare_takes_options_or_keywords_alike(encoder: InputEncoder):
    options = RequestOptions(max_new_tokens=4, stop=("z",), documents=(NARWHAL,))
    by_options = encoder.prepare("a prompt", options)
    by_keywords = encoder.prepare("a prompt", max_new_tokens=4, stop=["z"], documents=[NARWHAL])
    assert by_options.options is options and by_keywords.options == options
    assert (by_options.max_new_tokens, by_options.stop, by_options.document_ids) == (
        by_keywords.max_new_tokens, by_keywords.stop, by_keywords.document_ids)


def test_special_ids_keep_the_configured_eos_order_and_pad_with_the_first(encoder: InputEncoder):
    special = encoder.special_ids([7, 2])
    assert special.eos == (7, 2) and special.pad == 7 and encoder.eos_ids([7, 2]) == {2, 7}
    assert encoder.special_ids(5, pad_token_id=0).generate_kwargs() == {"eos_token_id": [5], "pad_token_id": 0}


# ---------------------------------------------------------------------------------------------------- helpers


def test_prompt_texts_by_prompt_kind():
    assert prompt_texts("a prompt") == ["a prompt"]
    assert prompt_texts([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]) == ["s", "u"]
    assert prompt_texts([1, 2, 3]) == [] and prompt_texts(torch.tensor([1, 2])) == []


@pytest.mark.parametrize(
    ("document", "texts", "expected"),
    [
        (QUOKKA, [f"notes: {QUOKKA}. question?"], True),
        (f"\n  {QUOKKA} \n", [f"notes: {QUOKKA}. question?"], True),  # surrounding whitespace does not count
        (QUOKKA, ["system", f"[1] {QUOKKA}"], True),  # in any one of the texts
        (QUOKKA, ["the quokka smiles", "at the zebra"], False),  # split over two texts: not verbatim
        (QUOKKA, ["the quokka  smiles at the zebra"], False),  # inner whitespace differs
        (QUOKKA, [], False),
        ("   ", ["anything"], False),  # nothing to find: the document is kept as before
    ],
)
def test_in_prompt(document: str, texts: list[str], expected: bool):
    assert in_prompt(document, texts) is expected


# ---------------------------------------------------------------------------------------------------- prepare


def test_string_prompt_quoting_a_document_drops_its_ids_only(encoder: InputEncoder):
    prompt = f"Documents:\n\n[1] {QUOKKA}\n\nQuestion: who smiles?"
    request = encoder.prepare(prompt, documents=[QUOKKA + "\n", NARWHAL])
    assert request.documents == (QUOKKA + "\n", NARWHAL)  # callers still see every document
    assert request.document_ids == (ids(encoder, NARWHAL),)


def test_chat_prompt_quoting_documents_drops_their_ids(encoder: InputEncoder):
    messages = rag_messages("who smiles?", [QUOKKA, NARWHAL])
    assert QUOKKA in messages[-1]["content"]
    request = encoder.prepare(messages, documents=[NARWHAL, QUOKKA, "a document nobody quoted"])
    assert request.documents == (NARWHAL, QUOKKA, "a document nobody quoted")
    assert request.document_ids == (ids(encoder, "a document nobody quoted"),)


def test_token_id_prompt_is_matched_through_its_decoded_text(encoder: InputEncoder):
    prompt_ids = encoder.encode(f"notes: {QUOKKA}\nquestion: ")
    for prompt in (prompt_ids, torch.tensor(prompt_ids)):
        request = encoder.prepare(prompt, documents=[QUOKKA, NARWHAL])
        assert request.prompt_ids == prompt_ids
        assert request.document_ids == (ids(encoder, NARWHAL),)


def test_documents_not_in_the_prompt_are_all_kept_in_order(encoder: InputEncoder):
    docs = [NARWHAL, QUOKKA, NARWHAL]  # a repeat is not this rule's business: kept
    request = encoder.prepare("what sings?", documents=docs)
    assert request.document_ids == tuple(ids(encoder, d) for d in docs)
    assert encoder.prepare("what sings?").document_ids == ()


# ---------------------------------------------------------------------------------------------------- the RAG chain


@pytest.fixture(scope="module")
def chat_gen(tiny_model, chat_tok, single_thread) -> LookaheadGenerator:
    return LookaheadGenerator(tiny_model("llama"), chat_tok, LookaheadConfig())


def test_rag_chain_inserts_each_retrieved_document_once(chat_gen: LookaheadGenerator,
                                                       monkeypatch: pytest.MonkeyPatch):
    """rag_chain quotes each retrieved chunk in the prompt and routes it as documents= too: it seeds the trie once,
    through the prompt."""
    texts = [QUOKKA, NARWHAL, "the wombat digs under the fence"]
    store = FAISSVectorStore.from_texts(texts, DeterministicFakeEmbedding(size=16))
    chain = rag_chain(store, ChatLookahead(generator=chat_gen, max_tokens=8), k=2)
    requests: list[Any] = []
    real_prepare = chat_gen.inputs.prepare
    monkeypatch.setattr(chat_gen.inputs, "prepare", lambda *a, **kw: requests.append(real_prepare(*a, **kw))
                        or requests[-1])
    counts: dict[str, float] = {}
    trie = chat_gen.trie
    real_release = trie.release

    def release(request_id: str) -> None:  # what the request's local trie held, just before it goes
        for doc in retrieved:
            middle = ids_of(doc)[2:8]  # inside the document: the prompt's windows cover it as the document's do
            counts[doc] = trie.count(middle, request_id)
        real_release(request_id)

    ids_of = chat_gen.inputs.encode_document
    monkeypatch.setattr(trie, "release", release)
    question = "who smiles at the zebra?"
    retrieved = [d.page_content for d in store.similarity_search(question, k=2)]
    out = chain.invoke(question)
    assert [d.page_content for d in out["docs"]] == retrieved
    (request,) = requests
    assert list(request.documents) == retrieved  # routed to the call as documents=
    assert request.document_ids == ()  # ... and left out of the trie's seeds: the prompt quotes them
    assert chat_gen.tokenizer.decode(request.prompt_ids).count(format_documents(
        [Document(page_content=t) for t in retrieved])) == 1
    # each document's n-grams counted once (by the prompt's windows), not twice
    assert counts == {doc: occurrences(request.prompt_ids, ids_of(doc)[2:8]) for doc in retrieved}
    assert set(counts.values()) == {1}


def occurrences(seq: list[int], sub: list[int]) -> int:
    return sum(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


# ---------------------------------------------------------------------------------------------------- RAG sources


def test_answer_sources_map_the_calls_document_indices_onto_the_retrieved_chunks():
    from langchain_lookahead.rag import answer_sources

    docs = [Document(page_content=QUOKKA, id="q", metadata={"source": "q.txt"}),
            Document(page_content=NARWHAL, id="n", metadata={"source": "n.txt"}),
            Document(page_content=QUOKKA, id="q2", metadata={"source": "q-copy.txt"})]  # routed once: index 0
    provenance = [{"index": 1, "source": "doc:1", "tokens": 5, "spans": [[1, 4], [7, 9]]},
                  {"index": 0, "source": "doc:0", "tokens": 2, "spans": [[10, 12]]}]
    sources = answer_sources(docs, provenance)
    assert sources == [
        {"index": 1, "id": "q", "source": "q.txt", "copied_tokens": 2, "spans": [[10, 12]]},
        {"index": 2, "id": "n", "source": "n.txt", "copied_tokens": 5, "spans": [[1, 4], [7, 9]]},
        {"index": 3, "id": "q2", "source": "q-copy.txt", "copied_tokens": 2, "spans": [[10, 12]]},
    ]
    assert [s["copied_tokens"] for s in answer_sources(docs, [])] == [0, 0, 0]  # nothing copied
    assert [s["copied_tokens"] for s in answer_sources(docs, None)] == [None] * 3  # a model without provenance


class _ProvenanceChat:
    """A chat model whose reply copies from the second document it was given (as its response metadata says)."""

    @staticmethod
    def build() -> Any:
        from langchain_core.language_models import BaseChatModel
        from langchain_core.messages import AIMessage, AIMessageChunk
        from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

        metadata = {"provenance": [{"index": 1, "source": "doc:1", "tokens": 3, "spans": [[1, 4]]}]}

        class Fake(BaseChatModel):
            @property
            def _llm_type(self) -> str:
                return "fake-provenance"

            def _generate(self, messages, stop=None, run_manager=None, **kwargs):  # type: ignore[no-untyped-def]
                message = AIMessage(content="the narwhal sings", response_metadata=metadata)
                return ChatResult(generations=[ChatGeneration(message=message)])

            def _stream(self, messages, stop=None, run_manager=None, **kwargs):  # type: ignore[no-untyped-def]
                pieces = ["the", " narwhal", " sings"]
                for i, piece in enumerate(pieces):
                    last = i == len(pieces) - 1
                    yield ChatGenerationChunk(message=AIMessageChunk(
                        content=piece, response_metadata=metadata if last else {}))

        return Fake()


def test_rag_chain_streams_text_then_the_sources_the_answer_copied_from():
    texts = [QUOKKA, NARWHAL, "the wombat digs under the fence"]
    store = FAISSVectorStore.from_texts(texts, DeterministicFakeEmbedding(size=16), ids=["q", "n", "w"])
    chain = rag_chain(store, _ProvenanceChat.build(), k=2)
    question = "who sings?"
    retrieved = store.similarity_search(question, k=2)
    parts = list(chain.stream(question))
    answers = [p["answer"] for p in parts if "answer" in p]
    assert all(isinstance(a, str) for a in answers)
    assert [a for a in answers if a] == ["the", " narwhal", " sings"]  # streamed as text, piece by piece
    assert "".join(answers) == "the narwhal sings"
    assert "sources" in parts[-1] and not any("sources" in p for p in parts[:-1])  # once the answer is complete
    sources = parts[-1]["sources"]
    assert [s["id"] for s in sources] == [d.id for d in retrieved]
    assert [s["copied_tokens"] for s in sources] == [0, 3]
    out = chain.invoke(question)
    assert out["answer"] == "the narwhal sings" and out["sources"] == sources
    assert [d.page_content for d in out["docs"]] == [d.page_content for d in retrieved]

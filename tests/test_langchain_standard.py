"""LangChain's standard test suites (langchain-tests) on the integration classes, fully offline.

- ChatModelUnitTests / ChatModelIntegrationTests: ChatLookahead on the embedded default model (SmolLM2-135M-Instruct,
  float32 CPU, a few tokens per reply). The per-call model override uses the default model's converted local folder,
  a second, differently named copy of the same weights.
- VectorStoreIntegrationTests: FAISSVectorStore (cosine and L2) with the suite's deterministic fake embeddings.
- RetrieversIntegrationTests: LookaheadRetriever over a FAISS store of MiniLM embeddings, feeding a ChatLookahead.

The suites skip the features a local text-only model does not have (tool calling, structured output, images, audio,
PDF, VCR cassettes); every such skip carries the suite's own reason.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import pytest
from langchain_lookahead import ChatLookahead, FAISSVectorStore, LookaheadRetriever, MiniLMEmbeddings
from langchain_tests.integration_tests import (
    ChatModelIntegrationTests,
    RetrieversIntegrationTests,
    VectorStoreIntegrationTests,
)
from langchain_tests.unit_tests import ChatModelUnitTests

from lookahead.models import default_model_dir

CHAT_PARAMS = {"model": "default", "device": "cpu"}
#: replies of a few tokens keep the suite fast on a CPU (the suites only check that text comes back)
SHORT_REPLIES = {"max_tokens": 20}


class TestChatLookaheadUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatLookahead]:
        return ChatLookahead

    @property
    def chat_model_params(self) -> dict:
        return CHAT_PARAMS

    @property
    def init_from_env_params(self) -> tuple[dict, dict, dict]:
        return {"LOOKAHEAD_MODEL": "/models/my-llama"}, {}, {"model_name": "/models/my-llama"}


@pytest.mark.slow
class TestChatLookaheadIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatLookahead]:
        return ChatLookahead

    @property
    def chat_model_params(self) -> dict:
        return CHAT_PARAMS

    @property
    def standard_chat_model_params(self) -> dict:
        return SHORT_REPLIES

    @property
    def model_override_value(self) -> str:
        return str(default_model_dir())  # same weights under another name (a local folder)


class TestFAISSVectorStoreCosine(VectorStoreIntegrationTests):
    @pytest.fixture()
    def vectorstore(self) -> Iterator[FAISSVectorStore]:
        yield FAISSVectorStore(self.get_embeddings())


class TestFAISSVectorStoreL2(VectorStoreIntegrationTests):
    @pytest.fixture()
    def vectorstore(self) -> Iterator[FAISSVectorStore]:
        yield FAISSVectorStore(self.get_embeddings(), metric="l2")


RETRIEVAL_TEXTS = [
    "textwrap.dedent removes any common leading whitespace from every line of a text.",
    "json.dumps serializes a Python object to a JSON formatted string.",
    "heapq.heappush pushes an item onto a heap, keeping the heap invariant.",
    "functools.lru_cache memoizes a function with a least-recently-used cache.",
    "pathlib.Path.read_text opens a file in text mode, reads it and closes it.",
]


@functools.cache
def _minilm_store() -> FAISSVectorStore:
    return FAISSVectorStore.from_texts(RETRIEVAL_TEXTS, MiniLMEmbeddings(),
                                       metadatas=[{"source": f"doc{i}"} for i in range(len(RETRIEVAL_TEXTS))])


class TestLookaheadRetriever(RetrieversIntegrationTests):
    @property
    def retriever_constructor(self) -> type[LookaheadRetriever]:
        return LookaheadRetriever

    @property
    def retriever_constructor_params(self) -> dict:
        return {"vectorstore": _minilm_store(), "llm": ChatLookahead(**CHAT_PARAMS, **SHORT_REPLIES),
                "k": 2}

    @property
    def retriever_query_example(self) -> str:
        return "How do I remove indentation from a block of text?"

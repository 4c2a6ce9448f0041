"""``LookaheadRetriever``: retrieval that also feeds the request-local trie of the LLM it serves."""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from langchain_core.vectorstores import VectorStore
from pydantic import ConfigDict, Field, model_validator

from ._base import LookaheadParams


class LookaheadRetriever(BaseRetriever):
    """Retrieve from a vector store (or wrap any retriever) and hand each retrieved document to ``llm``.

    With ``llm`` set (a :class:`LookaheadLLM` or :class:`ChatLookahead`), every retrieved document's tokens seed the
    request-local trie of that model's call in the same chain run, so a plain LCEL chain
    ``retriever | prompt | llm`` (or ``{"context": retriever | format_docs, "question": ...} | prompt | llm``) drafts
    from the retrieved text without extra wiring. Output is unchanged either way: documents only shape drafts.

    Args:
        vectorstore: where to search (``k`` results, ``search_type`` "similarity" or "mmr", ``search_kwargs``).
        retriever: any retriever to wrap instead (its results are cut to ``k``).
        llm: the lookahead model the results feed (optional).
        k: number of documents (``invoke(query, k=...)`` overrides it per call).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    vectorstore: VectorStore | None = None
    retriever: BaseRetriever | None = None
    llm: LookaheadParams | None = None
    k: int = Field(default=4, ge=1)
    search_type: str = "similarity"
    search_kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_source(self) -> LookaheadRetriever:
        if (self.vectorstore is None) == (self.retriever is None):
            raise ValueError("pass exactly one of vectorstore= or retriever=")
        if self.search_type not in ("similarity", "mmr"):
            raise ValueError(f"search_type must be 'similarity' or 'mmr', got {self.search_type!r}")
        return self

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun,
                                **kwargs: Any) -> list[Document]:
        k = kwargs.pop("k", self.k)
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if self.vectorstore is not None:
            search = {**self.search_kwargs, **kwargs}
            if self.search_type == "mmr":
                docs = self.vectorstore.max_marginal_relevance_search(query, k=k, **search)
            else:
                docs = self.vectorstore.similarity_search(query, k=k, **search)
        else:
            assert self.retriever is not None
            docs = self.retriever.invoke(query, config={"callbacks": run_manager.get_child()}, **kwargs)[:k]
        if self.llm is not None and docs:
            self.llm.route_documents(run_manager.parent_run_id, docs)
        return docs

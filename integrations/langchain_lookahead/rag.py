"""A RAG QA chain over a folder of text files: load, split, index (MiniLM + FAISS), retrieve, answer with sources.

```python
from langchain_lookahead import ChatLookahead
from langchain_lookahead.rag import build_index, load_folder, rag_chain

store = build_index(load_folder("examples/docs"))
chain = rag_chain(store, ChatLookahead(max_tokens=128))
for part in chain.stream("What does textwrap.dedent do?"):
    print(part.get("answer", ""), end="")
```
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.messages import BaseMessage
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable, RunnableGenerator, RunnableParallel, RunnablePassthrough
from langchain_core.runnables.utils import AddableDict

from lookahead.prompts import RAG_SYSTEM

from ._base import LookaheadParams
from .embeddings import MiniLMEmbeddings
from .retrievers import LookaheadRetriever
from .vectorstores import FAISSVectorStore

#: the prompt lookahead's own RAG demo and benchmark use (lookahead.prompts.rag_messages), as a LangChain template
RAG_PROMPT = ChatPromptTemplate([("system", RAG_SYSTEM),
                                 ("human", "Documents:\n\n{context}\n\nQuestion: {question}")])
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")


def load_folder(folder: str | os.PathLike[str], suffixes: Sequence[str] = TEXT_SUFFIXES) -> list[Document]:
    """Every text file under ``folder`` (recursively, by suffix) as a Document with ``metadata["source"]``."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    docs = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not a UTF-8 text file ({exc.reason})") from exc
        if text.strip():
            docs.append(Document(page_content=text, metadata={"source": path.relative_to(root).as_posix()}))
    if not docs:
        raise ValueError(f"{root}: no non-empty text files ({', '.join(suffixes)})")
    return docs


def split_documents(docs: Sequence[Document], chunk_size: int = 800, chunk_overlap: int = 80) -> list[Document]:
    """Split documents into overlapping chunks (characters), at paragraph, line and sentence boundaries first."""
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    splitter = RecursiveCharacterTextSplitter(chunk_size=chunk_size, chunk_overlap=chunk_overlap,
                                              separators=["\n\n", "\n", ". ", " ", ""])
    return splitter.split_documents(list(docs))


def build_index(docs: Sequence[Document], embedding: Embeddings | None = None, chunk_size: int = 800,
                chunk_overlap: int = 80) -> FAISSVectorStore:
    """Chunk ``docs`` and index the chunks in a FAISS store (default embedding: offline MiniLM)."""
    chunks = split_documents(docs, chunk_size, chunk_overlap)
    for i, chunk in enumerate(chunks):
        chunk.id = f"{chunk.metadata.get('source', 'doc')}#{i}"
    store = FAISSVectorStore(embedding or MiniLMEmbeddings())
    store.add_documents(chunks)
    return store


def format_documents(docs: Sequence[Document]) -> str:
    """Numbered documents, as :func:`lookahead.prompts.format_documents` numbers them."""
    return "\n\n".join(f"[{i}] {d.page_content.strip()}" for i, d in enumerate(docs, start=1))


def answer_sources(docs: Sequence[Document], provenance: Sequence[Mapping[str, Any]] | None
                   ) -> list[dict[str, Any]]:
    """What an answer copied from each retrieved chunk, in prompt order: ``index`` (its number in the prompt,
    from 1), ``id``, ``source`` (``metadata["source"]``), ``copied_tokens`` (answer tokens accepted from drafts
    copied from it) and ``spans`` (answer token offsets ``[start, end)``).

    ``provenance`` is the model response's ``response_metadata["provenance"]``: its indices count the distinct chunk
    texts in retrieval order, as the retriever routed them to the call. None (a model that reports no provenance,
    such as a plain LLM): ``copied_tokens`` and ``spans`` are None.
    """
    texts = list(dict.fromkeys(d.page_content for d in docs))  # the call's documents: duplicates routed once
    by_text: dict[str, Mapping[str, Any]] = {}
    for use in provenance or ():
        index = use.get("index")
        if isinstance(index, int) and 0 <= index < len(texts):
            by_text[texts[index]] = use
    sources = []
    for number, doc in enumerate(docs, start=1):
        use = by_text.get(doc.page_content)
        copied = None if provenance is None else (use or {}).get("tokens", 0)
        spans = None if provenance is None else [list(span) for span in (use or {}).get("spans", [])]
        sources.append({"index": number, "id": doc.id, "source": doc.metadata.get("source"),
                        "copied_tokens": copied, "spans": spans})
    return sources


def _answer_text(answer: Any) -> str:
    """An answer chunk as text (a chat model's message chunk, or an LLM's string)."""
    if isinstance(answer, BaseMessage):
        return str(answer.text)
    return str(answer)


def _with_sources(parts: Iterator[Mapping[str, Any]]) -> Iterator[AddableDict]:
    """Pass the chain's parts on with the answer as text, then the ``sources`` (see :func:`answer_sources`) once the
    answer is complete: the response metadata of the answer's last message chunk carries the provenance."""
    docs: Sequence[Document] = []
    provenance: list[Any] | None = None
    for part in parts:
        out = AddableDict()
        for key, value in part.items():
            if key == "answer":
                metadata = getattr(value, "response_metadata", None) or {}
                if "provenance" in metadata:
                    provenance = list(metadata["provenance"])
                value = _answer_text(value)
            elif key == "docs":
                docs = value
            out[key] = value
        yield out
    yield AddableDict(sources=answer_sources(docs, provenance))


def rag_chain(store: FAISSVectorStore, llm: Any, k: int = 3) -> Runnable:
    """``question -> {"question", "docs", "answer", "sources"}``: retrieve ``k`` chunks, answer from them, and say
    what the answer copied from each chunk (``sources``, see :func:`answer_sources`).

    When ``llm`` is a lookahead model, the retriever also seeds its request-local trie with the retrieved chunks.
    Streaming the chain yields the question and docs first, then the answer in pieces (text), then the sources.
    """
    feeds = llm if isinstance(llm, LookaheadParams) else None
    retriever = LookaheadRetriever(vectorstore=store, llm=feeds, k=k)
    answer = ({"context": lambda x: format_documents(x["docs"]), "question": lambda x: x["question"]}
              | RAG_PROMPT | llm)
    return (RunnableParallel(question=RunnablePassthrough(), docs=retriever)
            | RunnablePassthrough.assign(answer=answer) | RunnableGenerator(_with_sources))

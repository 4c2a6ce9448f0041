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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable, RunnableParallel, RunnablePassthrough

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


def rag_chain(store: FAISSVectorStore, llm: Any, k: int = 3) -> Runnable:
    """``question -> {"question", "docs", "answer"}``: retrieve ``k`` chunks, answer from them.

    When ``llm`` is a lookahead model, the retriever also seeds its request-local trie with the retrieved chunks.
    Streaming the chain yields the docs first, then the answer in pieces.
    """
    feeds = llm if isinstance(llm, LookaheadParams) else None
    retriever = LookaheadRetriever(vectorstore=store, llm=feeds, k=k)
    answer = ({"context": lambda x: format_documents(x["docs"]), "question": lambda x: x["question"]}
              | RAG_PROMPT | llm | StrOutputParser())
    return RunnableParallel(question=RunnablePassthrough(), docs=retriever) | RunnablePassthrough.assign(
        answer=answer)

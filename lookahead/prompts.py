"""Prompt construction shared by the benchmark, the demo and the CLI: the same for every method."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

RAG_SYSTEM = (
    "You are a helpful assistant. Answer the question using only the documents. "
    "Quote the documents where they answer the question."
)
SUMMARY_SYSTEM = "You are a helpful assistant that writes faithful, concise summaries."
TASKS = ("rag_qa", "summarize", "open")


def format_documents(documents: Sequence[str]) -> str:
    """Number the documents so the model can cite them."""
    return "\n\n".join(f"[{i}] {doc.strip()}" for i, doc in enumerate(documents, start=1))


def rag_messages(question: str, documents: Sequence[str]) -> list[dict[str, str]]:
    """Chat messages for a question answered from retrieved documents."""
    user = f"Documents:\n\n{format_documents(documents)}\n\nQuestion: {question.strip()}"
    return [{"role": "system", "content": RAG_SYSTEM}, {"role": "user", "content": user}]


def summary_messages(document: str) -> list[dict[str, str]]:
    """Chat messages asking for a summary of one document."""
    user = f"Summarize the following document in a few sentences.\n\n{document.strip()}"
    return [{"role": "system", "content": SUMMARY_SYSTEM}, {"role": "user", "content": user}]


def case_messages(case: Mapping[str, Any]) -> list[dict[str, str]]:
    """Messages for one benchmark case (as checked by ``lookahead.bench.cases.validate_case``); a case that carries
    its chat ``messages`` (a Spec-Bench turn, :func:`lookahead.bench.runner.turn_case`) is asked them as they are;
    the cases and what they measure: docs/benchmarks.md."""
    if case.get("messages"):
        return [dict(m) for m in case["messages"]]
    task = case.get("task")
    if task == "rag_qa":
        return rag_messages(case["question"], case["documents"])
    if task == "summarize":
        return summary_messages("\n\n".join(case["documents"]))
    if task == "open":
        return [{"role": "user", "content": case["question"].strip()}]
    raise ValueError(f"case {case.get('id')!r}: unknown task {task!r}; allowed: {', '.join(TASKS)}")

"""Provenance in the benchmark: per document of a case, the share of an answer's tokens copied from it (accepted
drafts attributed by :func:`lookahead.provenance.provenance`), and whether the document the question is about is
the answer's top source."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from ..provenance import DocumentUse, provenance

#: the documented name a rag_qa question asks about (make_cases.py writes it in backticks)
QUESTION_NAME = re.compile(r"`([\w.]+)`")


def question_document(case: Mapping[str, Any]) -> int | None:
    """Index of the document the case's question is about: the one whose heading starts with the name the question
    writes in backticks (``name(`` or ``class name(``, as make_cases.py builds rag_qa and long_rag). None when the
    question names nothing or not exactly one document starts so."""
    match = QUESTION_NAME.search(case.get("question") or "")
    if not match:
        return None
    name = match.group(1)
    hits = [i for i, doc in enumerate(case.get("documents", [])) if doc.startswith((f"{name}(", f"class {name}("))]
    return hits[0] if len(hits) == 1 else None


def top_document(uses: Sequence[DocumentUse]) -> int | None:
    """The document the answer copied the most tokens from; None when none was copied from or two tie."""
    ranked = sorted(uses, key=lambda use: use.tokens, reverse=True)
    if not ranked or ranked[0].tokens == 0 or (len(ranked) > 1 and ranked[1].tokens == ranked[0].tokens):
        return None
    return ranked[0].index


def document_shares(uses: Sequence[DocumentUse], new_tokens: int) -> list[dict[str, Any]]:
    """Per document: its index, the accepted draft tokens copied from it, their share of the answer's tokens and the
    spans (output token offsets ``[start, end)``)."""
    return [{"index": use.index, "tokens": use.tokens, "share": use.tokens / new_tokens if new_tokens else 0.0,
             "spans": [list(span) for span in use.spans]} for use in uses]


def case_provenance(documents: Sequence[Sequence[int]], case: Mapping[str, Any], output: Sequence[int],
                    accepted_lengths: Sequence[int]) -> dict[str, Any]:
    """The provenance fields of one answer to ``case`` over its documents' token ids: ``provenance`` (per document,
    see :func:`document_shares`), ``question_document``, ``top_document`` and ``top_is_question_document`` (None
    when the question's document is unknown)."""
    uses = provenance(documents, output, accepted_lengths)
    asked, top = question_document(case), top_document(uses)
    return {"provenance": document_shares(uses, len(output)), "question_document": asked, "top_document": top,
            "top_is_question_document": None if asked is None else top == asked}

"""The summarization prompts: one text (:func:`lookahead.prompts.summary_messages`) and combining partial summaries."""

from __future__ import annotations

from collections.abc import Sequence

from ..prompts import SUMMARY_SYSTEM, summary_messages

__all__ = ["combine_messages", "summary_messages"]


def combine_messages(partials: Sequence[str]) -> list[dict[str, str]]:
    """Chat messages asking to merge partial summaries of one document into one summary."""
    parts = "\n\n".join(f"Part {i}: {p.strip()}" for i, p in enumerate(partials, start=1))
    user = ("The following are summaries of consecutive parts of one document. Combine them into one summary of "
            f"the whole document in a few sentences.\n\n{parts}")
    return [{"role": "system", "content": SUMMARY_SYSTEM}, {"role": "user", "content": user}]

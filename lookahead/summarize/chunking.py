"""Splitting a long text into chunks of at most a given number of tokens, at paragraph and sentence boundaries."""

from __future__ import annotations

import re
from collections.abc import Callable

_PARAGRAPHS = re.compile(r"\n\s*\n")
_SENTENCES = re.compile(r"(?<=[.!?])\s+")


def _units(text: str, count_tokens: Callable[[str], int], chunk_tokens: int,
           encode: Callable[[str], list[int]] | None, decode: Callable[[list[int]], str] | None
           ) -> list[tuple[str, int, str]]:
    """The pieces chunks are built from: (text, tokens, joiner before it). Paragraphs that fit, else their
    sentences, else (with ``encode``/``decode``) a sentence cut every ``chunk_tokens`` tokens."""
    units: list[tuple[str, int, str]] = []
    for paragraph in (p.strip() for p in _PARAGRAPHS.split(text)):
        if not paragraph:
            continue
        n = count_tokens(paragraph)
        if n <= chunk_tokens:
            units.append((paragraph, n, "\n\n"))
            continue
        joiner = "\n\n"
        for sentence in (s for s in _SENTENCES.split(paragraph) if s):
            m = count_tokens(sentence)
            if m <= chunk_tokens or encode is None or decode is None:
                units.append((sentence, m, joiner))
            else:
                ids = encode(sentence)
                for start in range(0, len(ids), chunk_tokens):
                    piece = decode(ids[start:start + chunk_tokens])
                    units.append((piece, count_tokens(piece), joiner))
            joiner = " "
    return units


def split_text(text: str, count_tokens: Callable[[str], int], chunk_tokens: int,
               encode: Callable[[str], list[int]] | None = None, decode: Callable[[list[int]], str] | None = None
               ) -> list[str]:
    """Split ``text`` into chunks of at most ``chunk_tokens`` tokens at paragraph, then sentence boundaries; a single
    sentence longer than that is cut by tokens (needs ``encode``/``decode``)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    chunks: list[str] = []
    current, used = "", 0
    for unit, n, joiner in _units(text, count_tokens, chunk_tokens, encode, decode):
        if current and used + n > chunk_tokens:
            chunks.append(current)
            current, used = "", 0
        current = f"{current}{joiner}{unit}" if current else unit
        used += n
    if current:
        chunks.append(current)
    return chunks

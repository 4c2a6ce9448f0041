"""Documents in a tenant's trie: inserted under ``doc:<id>`` so that they can be removed again.

A document sent with an id is counted in the trie as the source ``doc:<id>`` (global counts that the trie remembers
per source); deleting the id removes exactly what it contributed, so no window that only it taught is left behind,
and with it every answer learned from a request that named the id in its ``document_ids`` (the answer may quote it).
Sending an id again replaces that document. A document sent without an id is plain global text: it cannot be
deleted on its own.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from lookahead.store import DraftStore

#: the trie source of a document id
SOURCE_PREFIX = "doc:"
#: what a document id may be (it travels in a URL path)
DOCUMENT_ID = re.compile(r"[A-Za-z0-9._:@~-]{1,128}")
ID_RULE = "1 to 128 letters, digits, '.', '_', ':', '@', '~' or '-'"


def check_document_id(doc_id: str) -> str:
    """``doc_id`` if it may name a document, else a ValueError saying what is allowed."""
    if not isinstance(doc_id, str) or not DOCUMENT_ID.fullmatch(doc_id):
        raise ValueError(f"document id {doc_id!r} is not allowed; use {ID_RULE}")
    return doc_id


def source_of(doc_id: str) -> str:
    """The trie source a document id is counted under."""
    return SOURCE_PREFIX + doc_id


def document_ids(trie: DraftStore) -> list[str]:
    """Ids of the documents held in ``trie`` (sorted)."""
    return sorted(s[len(SOURCE_PREFIX):] for s in trie.sources() if s.startswith(SOURCE_PREFIX))


def insert_documents(trie: DraftStore, tokenizer: Any, texts: Sequence[str], ids: Sequence[str] | None = None) -> int:
    """Insert ``texts`` into ``trie`` (under their ``ids`` when given, replacing documents with the same id);
    returns the number of tokens inserted."""
    if ids is not None and len(ids) != len(texts):
        raise ValueError(f"got {len(ids)} ids for {len(texts)} documents: give one id per document")
    tokens = 0
    for n, text in enumerate(texts):
        token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids is None:
            trie.insert(token_ids)
        else:
            trie.insert_source(source_of(ids[n]), token_ids)  # a known id is replaced
        tokens += len(token_ids)
    return tokens


def delete_document(trie: DraftStore, doc_id: str) -> int | None:
    """Remove document ``doc_id`` from ``trie`` with every answer learned from a request that named it in its
    ``document_ids``: what ``remove_source`` reports, or None when the trie held neither. The removal is made (and
    journaled) either way, so it reaches every trie a delta of this one is merged into."""
    source = source_of(doc_id)
    known = source in trie.sources() or trie.answers_derived_from(source) > 0
    removed = trie.remove_source(source)
    return removed if known else None

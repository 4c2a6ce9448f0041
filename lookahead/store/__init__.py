"""The draft store: compact, memory-mapped token sequences that draft like the trie (see :mod:`.store`)."""

from .store import DEFAULT_STORE_BYTES, DraftStore, StoreFileError

__all__ = ["DEFAULT_STORE_BYTES", "DraftStore", "StoreFileError"]

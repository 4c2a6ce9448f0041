"""The draft store: compact, memory-mapped token sequences that draft like the trie (see :mod:`.store`)."""

from .identity import Fingerprint, tokenizer_fingerprint
from .store import DEFAULT_STORE_BYTES, DraftStore, StoreFileError, StoreMismatchError

__all__ = ["DEFAULT_STORE_BYTES", "DraftStore", "Fingerprint", "StoreFileError", "StoreMismatchError",
           "tokenizer_fingerprint"]

"""The draft store: compact, memory-mapped token sequences that draft like the trie (see :mod:`.store`)."""

from .identity import Fingerprint, tokenizer_fingerprint
from .store import (
                    DEFAULT_LOCAL_TOKENS,
                    DEFAULT_STORE_BYTES,
                    DraftStore,
                    StagedDocuments,
                    StoreFileError,
                    StoreMismatchError,
)

__all__ = ["DEFAULT_LOCAL_TOKENS", "DEFAULT_STORE_BYTES", "DraftStore", "Fingerprint", "StagedDocuments",
           "StoreFileError", "StoreMismatchError", "tokenizer_fingerprint"]

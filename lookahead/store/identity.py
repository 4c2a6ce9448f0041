"""What a store's token ids mean: the fingerprint of the tokenizer that made them and the size of the vocabulary.

A draft store holds bare token ids; read with another tokenizer they are other text, and an id at or past the
model's vocabulary fails a forward pass. Every store file and every delta carries a :class:`Fingerprint`, and a
reader of another one refuses them (``lookahead.store.StoreMismatchError``) with a message naming both.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

__all__ = ["Fingerprint", "tokenizer_fingerprint"]


@dataclass(frozen=True)
class Fingerprint:
    """``tokenizer``: ``"sha256:<16 hex>"`` of the tokenizer's vocabulary, merges and added tokens (None: unknown,
    e.g. a file written before fingerprints); ``vocab_size``: token ids are ``0 .. vocab_size - 1`` (the model's
    embedding rows)."""

    tokenizer: str | None
    vocab_size: int

    def __post_init__(self) -> None:
        if self.tokenizer is not None and (not isinstance(self.tokenizer, str) or not self.tokenizer):
            raise ValueError(f"Fingerprint: tokenizer must be a non-empty str or None, got {self.tokenizer!r}")
        if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int) or self.vocab_size < 1:
            raise ValueError(f"Fingerprint: vocab_size must be an int >= 1, got {self.vocab_size!r}")

    def describe(self) -> str:
        return f"tokenizer {self.tokenizer or 'unknown'} with {self.vocab_size} token ids"

    def to_dict(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer, "vocab_size": self.vocab_size}

    @classmethod
    def from_dict(cls, data: object) -> Fingerprint | None:
        """Inverse of :meth:`to_dict`; None for None (no fingerprint). Raises ValueError for anything else."""
        if data is None:
            return None
        if not isinstance(data, dict) or set(data) != {"tokenizer", "vocab_size"}:
            raise ValueError(f"a fingerprint must be a dict with keys tokenizer and vocab_size, got {data!r}")
        return cls(data["tokenizer"], data["vocab_size"])

    def conflict(self, other: Fingerprint | None) -> str | None:
        """Why ids of ``other`` cannot be read as ids of this fingerprint (None: they can, or ``other`` is unknown).
        An unknown tokenizer on either side is not a conflict; a different vocabulary size always is."""
        if other is None:
            return None
        if self.tokenizer and other.tokenizer and self.tokenizer != other.tokenizer:
            return f"tokenizer {other.tokenizer}, not {self.tokenizer}"
        if self.vocab_size != other.vocab_size:
            return f"{other.vocab_size} token ids, not {self.vocab_size}"
        return None


def _tokenizer_content(tokenizer: Any) -> Any:
    """What decides the ids a tokenizer gives: a fast tokenizer's model (vocabulary, merges) and added tokens, else
    its vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        data = json.loads(backend.to_str())
        return {"model": data.get("model"), "added_tokens": data.get("added_tokens")}
    return sorted(tokenizer.get_vocab().items())


def tokenizer_fingerprint(tokenizer: Any, vocab_size: int | None = None) -> Fingerprint:
    """The fingerprint of a Hugging Face tokenizer: a hash of its vocabulary and merges (``tokenizer.json``'s model
    and added tokens for a fast tokenizer); ``vocab_size``: the model's (``config.vocab_size``, which may exceed the
    tokenizer's own ``len``; default ``len(tokenizer)``)."""
    raw = json.dumps(_tokenizer_content(tokenizer), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(raw.encode("utf-8")).hexdigest()[:16]
    return Fingerprint(f"sha256:{digest}", int(vocab_size if vocab_size is not None else len(tokenizer)))

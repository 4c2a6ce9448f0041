"""``FAISSVectorStore``: an in-process FAISS vector store on langchain-core (no langchain-community).

Upsert by id, tolerant delete, ``get_by_ids``, similarity search with scores (optionally filtered by metadata), MMR,
``from_texts``, and ``save_local``/``load_local`` that store the index with FAISS's own format and the documents as
JSON: loading never unpickles, so it cannot run code from the folder.

With ``llm=`` (a :class:`LookaheadLLM` / :class:`ChatLookahead` or a ``LookaheadGenerator``) the store feeds that
model's shared trie: every added document is inserted under the source ``doc:<id>`` (global counts, so it drafts for
every request of that model), an upsert replaces it, and ``delete`` removes exactly what it contributed.

On GPU (``use_gpu=True``, needs the CUDA build of FAISS and a visible GPU, checked when the store is built) the CPU
index stays the source of truth and one GPU holds a replica: adds go to both, a delete drops the replica (rebuilt
from the CPU index on the next search), and searches for more than :data:`GPU_MAX_K` neighbours (which FAISS's GPU
indexes cannot serve) run on the CPU index.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import VectorStore
from langchain_core.vectorstores.utils import maximal_marginal_relevance

from lookahead.files import atomic_path, atomic_write_text

if TYPE_CHECKING:  # pragma: no cover
    from lookahead.engine import LookaheadGenerator

FAISS_INSTALL = ("pip install faiss-cpu  (or the extra: pip install 'lookahead-rag[langchain]'; for CUDA instead: "
                 "pip install 'lookahead-rag[langchain-gpu]', never both faiss packages)")
FAISS_GPU_INSTALL = ("pip uninstall -y faiss-cpu && pip install 'lookahead-rag[faiss-gpu]'  (with the LangChain "
                     "integration: pip install 'lookahead-rag[langchain-gpu]')")
#: the largest k a FAISS GPU index can search; larger searches run on the CPU index
GPU_MAX_K = 2048
METRICS = ("cosine", "ip", "l2")
INDEX_FILE = "index.faiss"
DOCSTORE_FILE = "docstore.json"
STORE_FORMAT = 1
#: the trie source of a document fed to a model's trie: ``doc:<id>``
TRIE_SOURCE_PREFIX = "doc:"

Filter = dict[str, Any] | Callable[[dict[str, Any]], bool]


def import_faiss() -> Any:
    """Import FAISS, or fail with the command that installs it."""
    try:
        import faiss
    except ImportError as exc:
        raise ImportError(f"FAISS is not installed. Install it with: {FAISS_INSTALL}") from exc
    return faiss


def check_gpu(faiss: Any, device: int) -> None:
    """Raise a ``ValueError`` unless ``faiss`` is a GPU build that sees GPU number ``device``."""
    missing = [name for name in ("StandardGpuResources", "index_cpu_to_gpu", "get_num_gpus")
               if not hasattr(faiss, name)]
    if missing:
        raise ValueError(f"use_gpu=True needs FAISS built with GPU support, but the installed faiss "
                         f"({getattr(faiss, '__version__', '?')}, probably faiss-cpu) lacks {', '.join(missing)}. "
                         f"Install the CUDA build instead of faiss-cpu: {FAISS_GPU_INSTALL}; or pass use_gpu=False")
    count = int(faiss.get_num_gpus())
    if count <= 0:
        raise ValueError("use_gpu=True, but FAISS sees no GPU (faiss.get_num_gpus() == 0): check the NVIDIA driver "
                         "and CUDA_VISIBLE_DEVICES, or pass use_gpu=False")
    if device >= count:
        raise ValueError(f"gpu_device={device}, but FAISS sees only {count} GPU(s) (devices 0..{count - 1})")


def _matches(metadata: dict[str, Any], filter: Filter | None) -> bool:
    if filter is None:
        return True
    if callable(filter):
        return bool(filter(metadata))
    return all(metadata.get(key) == value for key, value in filter.items())


class FAISSVectorStore(VectorStore):
    """A FAISS flat index with string ids and an in-memory document store.

    Args:
        embedding: the :class:`~langchain_core.embeddings.Embeddings` used for texts and queries.
        metric: ``"cosine"`` (vectors are L2-normalised; score = cosine similarity, higher is closer), ``"ip"``
            (raw inner product, higher is closer) or ``"l2"`` (squared Euclidean distance, lower is closer).
        use_gpu: search on a GPU replica of the index (needs the CUDA build of FAISS, ``faiss-gpu``, and a visible
            GPU: otherwise a ``ValueError`` here); the CPU index stays the source of truth.
        gpu_device: the GPU that holds the replica (FAISS's device number).
        llm: a lookahead model (``LookaheadLLM``, ``ChatLookahead``) or ``LookaheadGenerator`` whose shared trie
            the documents feed under ``doc:<id>`` (removed again by ``delete``); None feeds no trie.
    """

    def __init__(self, embedding: Embeddings, *, metric: str = "cosine", use_gpu: bool = False,
                 gpu_device: int = 0, llm: Any = None) -> None:
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
        if not isinstance(embedding, Embeddings):
            raise TypeError(f"embedding must be a langchain_core Embeddings, got {type(embedding).__name__}")
        if not isinstance(gpu_device, int) or isinstance(gpu_device, bool) or gpu_device < 0:
            raise ValueError(f"gpu_device must be a non-negative integer, got {gpu_device!r}")
        self._faiss = import_faiss()
        if use_gpu:
            check_gpu(self._faiss, gpu_device)
        if llm is not None and not (callable(getattr(llm, "engine", None))
                                    or hasattr(llm, "trie") and hasattr(llm, "tokenizer")):
            raise TypeError(f"llm must be a LookaheadLLM, ChatLookahead or LookaheadGenerator, got "
                            f"{type(llm).__name__}")
        self._embedding = embedding
        self.llm = llm
        self.metric = metric
        self.use_gpu = bool(use_gpu)
        self.gpu_device = gpu_device
        self._index: Any = None  # faiss.IndexIDMap2 over a flat index, created with the first vectors
        self._gpu_res: Any = None  # one StandardGpuResources for the store's life, created with the first replica
        self._gpu_index: Any = None  # the GPU replica of _index; None: (re)built from _index by the next search
        self._dim: int | None = None
        self._docs: dict[str, Document] = {}
        self._int_ids: dict[str, int] = {}
        self._str_ids: dict[int, str] = {}
        self._next_id = 0
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ basics

    @property
    def embeddings(self) -> Embeddings:
        return self._embedding

    def __len__(self) -> int:
        return len(self._docs)

    def _new_index(self, dim: int) -> Any:
        flat = self._faiss.IndexFlatL2(dim) if self.metric == "l2" else self._faiss.IndexFlatIP(dim)
        return self._faiss.IndexIDMap2(flat)

    def _vectors(self, embeddings: Sequence[Sequence[float]]) -> np.ndarray:
        vectors = np.asarray(embeddings, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] == 0:
            raise ValueError(f"embeddings must be a non-empty [n, d] array, got shape {vectors.shape}")
        if self._dim is not None and vectors.shape[1] != self._dim:
            raise ValueError(f"embedding size {vectors.shape[1]} does not match the index ({self._dim})")
        vectors = np.ascontiguousarray(vectors)
        if self.metric == "cosine":
            self._faiss.normalize_L2(vectors)
        return vectors

    def _generator(self) -> LookaheadGenerator | None:
        """The generator whose trie the documents feed (loads the ``llm``'s model on first use)."""
        if self.llm is None:
            return None
        engine = getattr(self.llm, "engine", None)
        return engine().generator if callable(engine) else self.llm

    def _feed(self, docs: Sequence[Document]) -> None:
        """Insert documents into the fed trie, each under ``doc:<id>`` (replacing what that id had)."""
        generator = self._generator()
        if generator is None:
            return
        for doc in docs:
            tokens = generator.tokenizer(doc.page_content, add_special_tokens=False)["input_ids"]
            generator.trie.insert_source(TRIE_SOURCE_PREFIX + str(doc.id), tokens)

    def _unfeed(self, ids: Iterable[str]) -> None:
        """Remove what documents ``ids`` contributed to the fed trie."""
        generator = self._generator()
        if generator is None:
            return
        for doc_id in ids:
            generator.trie.remove_source(TRIE_SOURCE_PREFIX + doc_id)

    def _remove(self, ids: Iterable[str]) -> None:
        ints = [self._int_ids.pop(i) for i in ids if i in self._int_ids]
        for i in ints:
            self._docs.pop(self._str_ids.pop(i), None)
        if ints and self._index is not None:
            self._index.remove_ids(np.asarray(ints, dtype=np.int64))
            self._gpu_index = None  # GPU flat indexes cannot remove: the next search rebuilds the replica

    def _gpu_replica(self) -> Any:
        """The GPU replica of the CPU index, cloned once from it when missing (after creation, a load or a delete)."""
        if self._gpu_index is None:
            if self._gpu_res is None:
                self._gpu_res = self._faiss.StandardGpuResources()
            self._gpu_index = self._faiss.index_cpu_to_gpu(self._gpu_res, self.gpu_device, self._index)
        return self._gpu_index

    # ------------------------------------------------------------------ writes

    def add_texts(self, texts: Iterable[str], metadatas: list[dict] | None = None, *,
                  ids: list[str | None] | None = None, **kwargs: Any) -> list[str]:
        """Embed and add texts; an id that is already present is replaced (upsert). Returns the ids."""
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be strings")
        if metadatas is not None and len(metadatas) != len(texts):
            raise ValueError(f"got {len(metadatas)} metadatas for {len(texts)} texts")
        if ids is not None and len(ids) != len(texts):
            raise ValueError(f"got {len(ids)} ids for {len(texts)} texts")
        if not texts:
            return []
        given = list(ids) if ids is not None else [None] * len(texts)
        out = [str(i) if i is not None else uuid.uuid4().hex for i in given]
        metas = [dict(m or {}) for m in (metadatas or [{}] * len(texts))]
        vectors = self._vectors(self._embedding.embed_documents(texts))
        if vectors.shape[0] != len(texts):
            raise ValueError(f"the embedding returned {vectors.shape[0]} vectors for {len(texts)} texts")
        last = {doc_id: n for n, doc_id in enumerate(out)}  # a repeated id within one call: the last one wins
        keep = sorted(last.values())
        with self._lock:
            if self._index is None:
                self._dim = int(vectors.shape[1])
                self._index = self._new_index(self._dim)
            self._remove(out)
            ints = []
            for n in keep:
                int_id = self._next_id
                self._next_id += 1
                self._int_ids[out[n]] = int_id
                self._str_ids[int_id] = out[n]
                self._docs[out[n]] = Document(page_content=texts[n], metadata=metas[n], id=out[n])
                ints.append(int_id)
            new_ids = np.asarray(ints, dtype=np.int64)
            self._index.add_with_ids(vectors[keep], new_ids)
            if self._gpu_index is not None:  # incremental: the replica gets the same vectors, never a re-clone
                try:
                    self._gpu_index.add_with_ids(vectors[keep], new_ids)
                except BaseException:
                    self._gpu_index = None  # possibly half-added: rebuilt from the CPU index by the next search
                    raise
            self._feed([self._docs[out[n]] for n in keep])  # an upsert replaces the id's windows
        return out

    def delete(self, ids: list[str] | None = None, **kwargs: Any) -> bool:
        """Delete by id (missing ids are ignored); ``ids=None`` deletes everything. What the deleted documents
        contributed to the fed trie (``llm=``) is removed from it."""
        with self._lock:
            if ids is None:
                self._unfeed(list(self._docs))
                self._docs.clear()
                self._int_ids.clear()
                self._str_ids.clear()
                if self._index is not None:
                    self._index.reset()
                self._gpu_index = None
                return True
            if isinstance(ids, str):
                raise TypeError("ids must be a list of strings")
            present = [str(i) for i in ids if str(i) in self._docs]
            self._remove(present)
            self._unfeed(present)
        return True

    # ------------------------------------------------------------------ reads

    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        """Documents with these ids, in the given order; missing ids are skipped."""
        with self._lock:
            return [self._copy(self._docs[i]) for i in ids if i in self._docs]

    @staticmethod
    def _copy(doc: Document) -> Document:
        return Document(page_content=doc.page_content, metadata=json.loads(json.dumps(doc.metadata, default=str))
                        if doc.metadata else {}, id=doc.id)

    def _search_index(self, vector: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        index = self._gpu_replica() if self.use_gpu and n <= GPU_MAX_K else self._index
        scores, ints = index.search(vector, n)
        return scores[0], ints[0]

    def similarity_search_with_score_by_vector(self, embedding: Sequence[float], k: int = 4,
                                               filter: Filter | None = None, fetch_k: int = 20, **kwargs: Any
                                               ) -> list[tuple[Document, float]]:
        """The ``k`` closest documents to a vector with their scores (see ``metric``), optionally filtered by
        metadata (a dict of required values or a predicate)."""
        if not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be a non-negative integer, got {k!r}")
        with self._lock:
            total = len(self._docs)
            if k == 0 or total == 0:
                return []
            vector = self._vectors([embedding])
            n = min(total, k if filter is None else max(fetch_k, 4 * k))
            while True:
                scores, ints = self._search_index(vector, n)
                results = []
                for score, int_id in zip(scores.tolist(), ints.tolist()):
                    doc_id = self._str_ids.get(int_id)
                    if doc_id is None:
                        continue
                    doc = self._docs[doc_id]
                    if _matches(doc.metadata, filter):
                        results.append((self._copy(doc), float(score)))
                if len(results) >= k or n >= total:
                    return results[:k]
                n = min(total, n * 4)

    def similarity_search_with_score(self, query: str, k: int = 4, filter: Filter | None = None,
                                     fetch_k: int = 20, **kwargs: Any) -> list[tuple[Document, float]]:
        """The ``k`` closest documents to a query with their scores."""
        if not isinstance(query, str):
            raise TypeError(f"query must be a string, got {type(query).__name__}")
        if not self._docs:
            return []
        return self.similarity_search_with_score_by_vector(self._embedding.embed_query(query), k, filter=filter,
                                                           fetch_k=fetch_k)

    def similarity_search_by_vector(self, embedding: list[float], k: int = 4, **kwargs: Any) -> list[Document]:
        return [doc for doc, _ in self.similarity_search_with_score_by_vector(embedding, k, **kwargs)]

    def similarity_search(self, query: str, k: int = 4, **kwargs: Any) -> list[Document]:
        return [doc for doc, _ in self.similarity_search_with_score(query, k, **kwargs)]

    def _select_relevance_score_fn(self) -> Callable[[float], float]:
        if self.metric == "l2":
            return lambda distance: 1.0 / (1.0 + max(distance, 0.0))
        return lambda similarity: min(1.0, max(0.0, (1.0 + similarity) / 2.0))

    def max_marginal_relevance_search_by_vector(self, embedding: list[float], k: int = 4, fetch_k: int = 20,
                                                lambda_mult: float = 0.5, filter: Filter | None = None,
                                                **kwargs: Any) -> list[Document]:
        """Diverse results: ``fetch_k`` candidates re-ranked by maximal marginal relevance."""
        with self._lock:
            candidates = self.similarity_search_with_score_by_vector(embedding, max(k, fetch_k), filter=filter,
                                                                     fetch_k=fetch_k)
            if not candidates:
                return []
            vectors = np.stack([self._index.reconstruct(self._int_ids[doc.id]) for doc, _ in candidates])
        query = self._vectors([embedding])[0]
        chosen = maximal_marginal_relevance(query, vectors, lambda_mult=lambda_mult, k=k)
        return [candidates[i][0] for i in chosen]

    def max_marginal_relevance_search(self, query: str, k: int = 4, fetch_k: int = 20, lambda_mult: float = 0.5,
                                      **kwargs: Any) -> list[Document]:
        if not self._docs:
            return []
        return self.max_marginal_relevance_search_by_vector(self._embedding.embed_query(query), k, fetch_k,
                                                            lambda_mult, **kwargs)

    # ------------------------------------------------------------------ construction, persistence

    @classmethod
    def from_texts(cls, texts: list[str], embedding: Embeddings, metadatas: list[dict] | None = None, *,
                   ids: list[str] | None = None, **kwargs: Any) -> FAISSVectorStore:
        """A new store holding ``texts`` (``kwargs``: ``metric``, ``use_gpu``, ``gpu_device``)."""
        store = cls(embedding, **kwargs)
        store.add_texts(texts, metadatas, ids=ids)
        return store

    def save_local(self, folder: str | os.PathLike[str]) -> None:
        """Write ``index.faiss`` (FAISS format) and ``docstore.json`` into ``folder``, each atomically.

        Metadata must be JSON-serialisable: the store never pickles, so loading cannot execute code.
        """
        path = Path(folder)
        path.mkdir(parents=True, exist_ok=True)
        with self._lock:
            entries = []
            for doc_id, doc in self._docs.items():
                try:
                    json.dumps(doc.metadata)
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"metadata of document {doc_id!r} is not JSON-serialisable ({exc}); "
                                     "save_local stores JSON only (no pickle)") from exc
                entries.append({"id": doc_id, "int_id": self._int_ids[doc_id], "page_content": doc.page_content,
                                "metadata": doc.metadata})
            data = {"format": STORE_FORMAT, "metric": self.metric, "dim": self._dim, "next_id": self._next_id,
                    "entries": entries}
            index = self._index if self._index is not None else None
            if index is not None:
                with atomic_path(path / INDEX_FILE, mode=0o600) as tmp:  # owner-only: documents may be private
                    self._faiss.write_index(index, str(tmp))
            else:
                (path / INDEX_FILE).unlink(missing_ok=True)
            atomic_write_text(path / DOCSTORE_FILE, json.dumps(data, ensure_ascii=False), mode=0o600, fsync=False)

    @classmethod
    def load_local(cls, folder: str | os.PathLike[str], embeddings: Embeddings, *, use_gpu: bool = False,
                   gpu_device: int = 0, llm: Any = None, **kwargs: Any) -> FAISSVectorStore:
        """Load a store written by :meth:`save_local` (JSON + FAISS index; nothing is unpickled). With ``llm`` its
        documents feed that model's trie (each replacing what its id held there, so loading twice counts once)."""
        path = Path(folder)
        try:
            data = json.loads((path / DOCSTORE_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} holds no saved FAISSVectorStore ({DOCSTORE_FILE} is missing)") from None
        except ValueError as exc:
            raise ValueError(f"{path / DOCSTORE_FILE} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != STORE_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{path / DOCSTORE_FILE}: not a FAISSVectorStore docstore of format {STORE_FORMAT} "
                             f"(found {found!r})")
        store = cls(embeddings, metric=data["metric"], use_gpu=use_gpu, gpu_device=gpu_device, llm=llm)
        entries = data["entries"]
        if entries:
            index = store._faiss.read_index(str(path / INDEX_FILE))
            stored = set(store._faiss.vector_to_array(index.id_map).tolist())
            if index.ntotal != len(entries) or stored != {e["int_id"] for e in entries}:
                raise ValueError(f"{path}: {INDEX_FILE} and {DOCSTORE_FILE} do not match (an interrupted save?)")
            store._index, store._dim = index, int(data["dim"])
        for e in entries:
            store._docs[e["id"]] = Document(page_content=e["page_content"], metadata=e["metadata"], id=e["id"])
            store._int_ids[e["id"]] = int(e["int_id"])
            store._str_ids[int(e["int_id"])] = e["id"]
        store._next_id = int(data["next_id"])
        store._feed(list(store._docs.values()))
        return store

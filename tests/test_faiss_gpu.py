"""FAISSVectorStore on GPU, tested on CPU: a fake GPU build of FAISS stands in for faiss-gpu.

The fake is the installed faiss (CPU) plus ``StandardGpuResources``, ``get_num_gpus`` and ``index_cpu_to_gpu``,
whose "GPU index" is a CPU clone that behaves as FAISS's GPU flat index does where it matters here: it refuses
k > 2048 and cannot remove ids. It counts resource objects, clones, adds and searches.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

pytest.importorskip("langchain_core")
real_faiss = pytest.importorskip("faiss")

from langchain_core.embeddings import DeterministicFakeEmbedding  # noqa: E402
from langchain_lookahead import FAISSVectorStore  # noqa: E402
from langchain_lookahead.vectorstores import GPU_MAX_K  # noqa: E402

GPU_NAMES = ("StandardGpuResources", "index_cpu_to_gpu", "get_num_gpus", "index_cpu_to_all_gpus",
             "index_cpu_to_gpus_list", "index_cpu_to_gpu_multiple")


class FakeGpuIndex:
    """A CPU clone with the limits of a GPU flat index."""

    def __init__(self, fake: types.ModuleType, res: object, device: int, cpu_index: object) -> None:
        self.fake, self.res, self.device = fake, res, device
        self.inner = real_faiss.clone_index(cpu_index)
        self.added = 0

    @property
    def ntotal(self) -> int:
        return self.inner.ntotal

    def search(self, x: np.ndarray, k: int):
        if k > GPU_MAX_K:
            raise RuntimeError(f"GPU index only supports k <= {GPU_MAX_K} (requested {k})")
        self.fake.gpu_searches.append(k)
        return self.inner.search(x, k)

    def add_with_ids(self, x: np.ndarray, ids: np.ndarray) -> None:
        self.added += len(x)
        self.inner.add_with_ids(x, ids)

    def remove_ids(self, ids: np.ndarray) -> int:
        raise RuntimeError("remove_ids not implemented for this type of index")


def fake_faiss(gpus: int = 1, *, gpu_build: bool = True) -> types.ModuleType:
    fake = types.ModuleType("faiss")
    fake.__dict__.update({k: v for k, v in vars(real_faiss).items() if k not in GPU_NAMES and k != "__name__"})
    fake.resources, fake.clones, fake.gpu_searches = [], [], []
    if not gpu_build:
        return fake

    class StandardGpuResources:
        def __init__(self) -> None:
            fake.resources.append(self)

    def index_cpu_to_gpu(res, device, index, options=None):
        assert isinstance(res, StandardGpuResources) and 0 <= device < gpus
        gpu_index = FakeGpuIndex(fake, res, device, index)
        fake.clones.append(gpu_index)
        return gpu_index

    def index_cpu_to_all_gpus(*args, **kwargs):
        raise AssertionError("the store must use one GPU resource object and one device, not every GPU")

    fake.StandardGpuResources = StandardGpuResources
    fake.index_cpu_to_gpu = index_cpu_to_gpu
    fake.index_cpu_to_all_gpus = index_cpu_to_all_gpus
    fake.get_num_gpus = lambda: gpus
    return fake


@pytest.fixture
def gpu_faiss(monkeypatch):
    fake = fake_faiss(gpus=2)
    monkeypatch.setitem(sys.modules, "faiss", fake)  # the store imports faiss lazily: it gets the fake
    return fake


def emb() -> DeterministicFakeEmbedding:
    return DeterministicFakeEmbedding(size=8)


def texts(n: int, start: int = 0) -> list[str]:
    return [f"document number {i}" for i in range(start, start + n)]


def ranked(pairs) -> list[tuple[str, float]]:
    return [(doc.id, round(score, 4)) for doc, score in pairs]


# ------------------------------------------------------------------------------------------- the check at construction


@pytest.mark.parametrize("build", [lambda **kw: FAISSVectorStore(emb(), **kw),
                                   lambda **kw: FAISSVectorStore.from_texts(["a"], emb(), **kw)])
def test_use_gpu_without_gpu_faiss_fails_at_construction(monkeypatch, build):
    monkeypatch.setitem(sys.modules, "faiss", fake_faiss(gpu_build=False))  # what faiss-cpu offers
    with pytest.raises(ValueError, match=r"GPU support.*StandardGpuResources.*lookahead-rag\[faiss-gpu\]"):
        build(use_gpu=True)
    assert build(use_gpu=False) is not None


def test_use_gpu_on_the_installed_faiss_cpu_fails_at_construction():
    if hasattr(real_faiss, "StandardGpuResources") and real_faiss.get_num_gpus() > 0:
        pytest.skip("a GPU build of FAISS with a GPU is installed")
    with pytest.raises(ValueError, match="use_gpu=True"):
        FAISSVectorStore(emb(), use_gpu=True)


def test_use_gpu_without_a_visible_gpu_or_device(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "faiss", fake_faiss(gpus=0))
    with pytest.raises(ValueError, match="sees no GPU"):
        FAISSVectorStore(emb(), use_gpu=True)
    monkeypatch.setitem(sys.modules, "faiss", fake_faiss(gpus=1))
    with pytest.raises(ValueError, match="gpu_device=1.*only 1 GPU"):
        FAISSVectorStore(emb(), use_gpu=True, gpu_device=1)
    for bad in (-1, 1.0, True, "0"):
        with pytest.raises(ValueError, match="gpu_device"):
            FAISSVectorStore(emb(), gpu_device=bad)
    FAISSVectorStore.from_texts(["a"], emb()).save_local(tmp_path / "idx")
    with pytest.raises(ValueError, match="gpu_device=3"):
        FAISSVectorStore.load_local(tmp_path / "idx", emb(), use_gpu=True, gpu_device=3)


# ------------------------------------------------------------------------------------------- one replica, incremental


def test_one_resource_object_one_device_and_incremental_adds(gpu_faiss):
    gpu = FAISSVectorStore.from_texts(texts(20), emb(), ids=texts(20), use_gpu=True, gpu_device=1)
    assert gpu_faiss.resources == [] and gpu_faiss.clones == []  # nothing on the GPU before the first search
    gpu.similarity_search("document number 3", k=4)
    assert len(gpu_faiss.resources) == 1 and len(gpu_faiss.clones) == 1
    replica = gpu_faiss.clones[0]
    assert replica.device == 1 and replica.res is gpu_faiss.resources[0]
    for start in (20, 30, 40):
        gpu.add_texts(texts(10, start), ids=texts(10, start))
        gpu.similarity_search("document number 3", k=4)
    assert len(gpu_faiss.clones) == 1 and len(gpu_faiss.resources) == 1  # never re-cloned on a write
    assert replica.added == 30 and replica.ntotal == len(gpu) == 50
    assert gpu_faiss.gpu_searches == [4, 4, 4, 4]


def test_delete_rebuilds_the_replica_with_the_same_resources(gpu_faiss):
    gpu = FAISSVectorStore.from_texts(texts(10), emb(), ids=texts(10), use_gpu=True)
    gpu.similarity_search("x", k=2)
    gpu.delete(["document number 1", "not there"])
    gpu.add_texts(["document number 2 again"], ids=["document number 2"])  # an upsert removes, then adds
    gpu.add_texts(texts(5, 10), ids=texts(5, 10))
    hits = gpu.similarity_search("document number 2 again", k=20)
    assert len(gpu_faiss.clones) == 2 and len(gpu_faiss.resources) == 1
    assert gpu_faiss.clones[1].res is gpu_faiss.clones[0].res and gpu_faiss.clones[1].ntotal == 14
    assert {d.id for d in hits} == set(texts(15)) - {"document number 1"}
    gpu.delete()
    assert gpu.similarity_search("x", k=3) == []
    gpu.add_texts(["fresh"], ids=["f"])
    assert [d.id for d in gpu.similarity_search("fresh", k=3)] == ["f"]
    assert len(gpu_faiss.resources) == 1


def test_a_failed_replica_add_drops_the_replica(gpu_faiss):
    gpu = FAISSVectorStore.from_texts(texts(5), emb(), ids=texts(5), use_gpu=True)
    gpu.similarity_search("x", k=2)

    def broken(x, ids):
        raise RuntimeError("out of GPU memory")

    gpu_faiss.clones[0].add_with_ids = broken
    with pytest.raises(RuntimeError, match="GPU memory"):
        gpu.add_texts(["six"], ids=["6"])
    assert [d.id for d in gpu.similarity_search("six", k=1)] == ["6"]  # rebuilt from the CPU index
    assert len(gpu_faiss.clones) == 2


# ------------------------------------------------------------------------------------------- k > 2048, equal results


def test_large_k_runs_on_the_cpu_index_and_results_equal_the_cpu_store(gpu_faiss):
    n = GPU_MAX_K + 300
    metas = [{"even": i % 2 == 0} for i in range(n)]
    cpu = FAISSVectorStore.from_texts(texts(n), emb(), metas, ids=texts(n))
    gpu = FAISSVectorStore.from_texts(texts(n), emb(), metas, ids=texts(n), use_gpu=True)
    query = "document number 7"

    gpu_faiss.gpu_searches.clear()
    assert ranked(gpu.similarity_search_with_score(query, k=GPU_MAX_K + 100)) == \
        ranked(cpu.similarity_search_with_score(query, k=GPU_MAX_K + 100))
    assert gpu_faiss.gpu_searches == []  # served by the CPU index
    assert ranked(gpu.similarity_search_with_score(query, k=GPU_MAX_K)) == \
        ranked(cpu.similarity_search_with_score(query, k=GPU_MAX_K))
    assert gpu_faiss.gpu_searches == [GPU_MAX_K]  # up to the limit: on the GPU replica

    # a filtered search widens its candidate list past 2048: the wider searches go to the CPU index
    gpu_faiss.gpu_searches.clear()
    rare = {"even": True}
    assert ranked(gpu.similarity_search_with_score(query, k=1000, filter=rare, fetch_k=600)) == \
        ranked(cpu.similarity_search_with_score(query, k=1000, filter=rare, fetch_k=600))
    assert all(k <= GPU_MAX_K for k in gpu_faiss.gpu_searches)
    assert ranked(gpu.similarity_search_with_score(query, k=5, filter=lambda m: not m["even"])) == \
        ranked(cpu.similarity_search_with_score(query, k=5, filter=lambda m: not m["even"]))

    # MMR asks for fetch_k candidates
    mmr = dict(k=10, fetch_k=GPU_MAX_K + 50, lambda_mult=0.3)
    assert [d.id for d in gpu.max_marginal_relevance_search(query, **mmr)] == \
        [d.id for d in cpu.max_marginal_relevance_search(query, **mmr)]
    assert len(gpu_faiss.clones) == 1 and len(gpu_faiss.resources) == 1


@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
def test_gpu_store_equals_cpu_store_through_writes(gpu_faiss, metric, tmp_path):
    cpu = FAISSVectorStore(emb(), metric=metric)
    gpu = FAISSVectorStore(emb(), metric=metric, use_gpu=True)
    steps = [("add", texts(30)), ("add", texts(10, 25)), ("delete", texts(5, 3)), ("add", texts(7, 60))]
    for op, batch in steps:
        for store in (cpu, gpu):
            if op == "add":
                store.add_texts(batch, [{"i": i} for i in range(len(batch))], ids=batch)
            else:
                store.delete(batch)
        for query in ("document number 4", "document number 61"):
            assert ranked(gpu.similarity_search_with_score(query, k=8)) == \
                ranked(cpu.similarity_search_with_score(query, k=8))
    gpu.save_local(tmp_path / "idx")
    loaded = FAISSVectorStore.load_local(tmp_path / "idx", emb(), use_gpu=True, gpu_device=1)
    assert ranked(loaded.similarity_search_with_score("document number 9", k=8)) == \
        ranked(cpu.similarity_search_with_score("document number 9", k=8))
    assert gpu_faiss.clones[-1].device == 1 and gpu_faiss.clones[-1].res is not gpu_faiss.clones[0].res

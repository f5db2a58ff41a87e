"""The GPU search back ends against FAISS's CPU search.

The torch exact scan is the same code on CPU and CUDA, so it is checked against FAISS here on the CPU;
the CUDA tests run where a GPU is present (the device checks) and are skipped elsewhere.
"""

import faiss
import numpy as np
import pytest
import torch

from mmretrieve.index import Index
from mmretrieve.index.flatscan import BlasFlatScanner
from mmretrieve.index.gpu import TorchFlatSearcher, make_gpu_searcher
from mmretrieve.index.vectors import resolve_search_device
from mmretrieve.store import IndexWriter, Item

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _idmap(xb, ids, metric=faiss.METRIC_INNER_PRODUCT):
    inner = faiss.IndexFlat(xb.shape[1], metric)
    idx = faiss.IndexIDMap2(inner)
    idx.add_with_ids(xb, ids)
    return idx


def _faiss_search(findex, q, k, exclude=()):
    if not len(exclude):
        return findex.search(q, k)
    arr = np.asarray(exclude, dtype=np.int64)
    params = faiss.SearchParameters(sel=faiss.IDSelectorNot(faiss.IDSelectorBatch(arr)))
    return findex.search(q, k, params=params)


@pytest.mark.parametrize("scanner", ["torch", "blas"])
@pytest.mark.parametrize("metric", [faiss.METRIC_INNER_PRODUCT, faiss.METRIC_L2])
def test_scans_match_faiss_with_sparse_ids_and_exclusions(metric, scanner):
    rng = np.random.default_rng(0)
    xb, q = _unit(rng, 500, 24), _unit(rng, 7, 24)
    ids = rng.choice(10_000, size=500, replace=False).astype(np.int64)  # ids unrelated to rows, unsorted
    findex = _idmap(xb, ids, metric)
    exclude = [int(ids[3]), int(ids[77]), 999_999]  # includes an id that is not in the index
    for ex in ((), exclude):
        D0, I0 = _faiss_search(findex, q, 10, ex)
        s = TorchFlatSearcher(findex, "cpu") if scanner == "torch" else BlasFlatScanner(findex)
        D1, I1 = s.search(q, 10, exclude=list(ex))
        np.testing.assert_array_equal(I1, I0)
        np.testing.assert_allclose(D1, D0, rtol=1e-5, atol=1e-5)
    assert not set(exclude) & set(I1.ravel().tolist())


@pytest.mark.parametrize("make", [lambda f: TorchFlatSearcher(f, "cpu"), BlasFlatScanner])
def test_scans_pad_like_faiss_when_k_exceeds_what_is_left(make):
    rng = np.random.default_rng(1)
    xb = _unit(rng, 5, 8)
    findex = _idmap(xb, np.arange(10, 15, dtype=np.int64))
    D, I = make(findex).search(xb[:2], 8, exclude=[10, 11])
    assert (I[:, :3] >= 12).all() and (I[:, 3:] == -1).all()
    assert I[0, 0] != 10 and I[1, 0] != 11  # each query's own vector was excluded
    empty = faiss.IndexIDMap2(faiss.IndexFlatIP(8))
    D, I = make(empty).search(xb[:1], 3)
    assert (I == -1).all()


def test_torch_scan_chunks_query_batches():
    rng = np.random.default_rng(2)
    xb, q = _unit(rng, 300, 16), _unit(rng, 50, 16)
    findex = _idmap(xb, np.arange(300, dtype=np.int64))
    s = TorchFlatSearcher(findex, "cpu", max_scores_bytes=300 * 4 * 7)  # 7 queries per chunk
    np.testing.assert_array_equal(s.search(q, 5)[1], findex.search(q, 5)[1])


def test_gpu_searcher_refuses_what_it_cannot_search():
    hnsw = faiss.IndexIDMap2(faiss.IndexHNSWFlat(8, 16, faiss.METRIC_INNER_PRODUCT))
    with pytest.raises(TypeError, match="needs a Flat index"):
        make_gpu_searcher(hnsw, "cpu")
    with pytest.raises(ValueError, match="unknown search device 'tpu'"):
        resolve_search_device("tpu", hnsw)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_search_device("cuda", hnsw)
        assert resolve_search_device("auto", hnsw) == "cpu"


def _write_index(path, xb):
    w = IndexWriter(path, encoder_info={"name": "test-random", "dim": xb.shape[1], "modalities": ["image"]}, create=True)
    w.add([Item(id=-1, key=str(i), uri=f"vec://{i}") for i in range(len(xb))], xb)
    w.commit()


def test_search_device_environment_default(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    _write_index(tmp_path / "idx", _unit(rng, 20, 8))
    monkeypatch.setenv("MMRETRIEVE_SEARCH_DEVICE", "cpu")
    assert Index.open(tmp_path / "idx", verify=False).search_device == "cpu"
    monkeypatch.setenv("MMRETRIEVE_SEARCH_DEVICE", "nonsense")
    with pytest.raises(ValueError, match="unknown search device"):
        Index.open(tmp_path / "idx", verify=False)


@cuda
def test_index_search_on_cuda_matches_cpu(tmp_path):
    rng = np.random.default_rng(4)
    xb, q = _unit(rng, 2000, 64), _unit(rng, 16, 64)
    _write_index(tmp_path / "idx", xb)
    cpu = Index.open(tmp_path / "idx", verify=False, search_device="cpu")
    gpu = Index.open(tmp_path / "idx", verify=False, search_device="cuda")
    assert Index.open(tmp_path / "idx", verify=False).search_device == "cuda"  # auto
    for ex in (None, [0, 5, 1999]):
        D0, I0 = cpu.search_vectors(q, 20, exclude=ex)
        D1, I1 = gpu.search_vectors(q, 20, exclude=ex)
        np.testing.assert_array_equal(I1, I0)
        np.testing.assert_allclose(D1, D0, atol=1e-5)
    assert gpu.gpu_searcher().device.type == "cuda"

"""Queries say what they mean: ``image=`` is always a file, stored items are asked for by ``item=``;
vectors, ``k`` and reranker options are validated with errors that name what is wrong."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from mmretrieve import BadVectorsError, InputError, UsageError, build_index, open_index
from mmretrieve.cli import main
from mmretrieve.rerank import Pipeline


@pytest.fixture()
def index(photo_dir, tiny_clip):
    build_index("q", photo_dir, encoder=tiny_clip)
    idx = open_index("q", encoder=tiny_clip)
    assert len(idx) > 6
    return idx


def test_an_image_named_like_an_id_is_the_file_not_the_item(index, tmp_path, monkeypatch):
    items = {it.id: it for it in index.meta.iter_items()}
    monkeypatch.chdir(tmp_path)
    shutil.copyfile(items[5].uri, tmp_path / "3")  # a file named "3" holding item 5's picture
    top = index.search(image="3", k=1)[0]
    assert top.id == 5 and top.score == pytest.approx(1.0, abs=1e-5)  # not item 3's stored vector
    composed = index.search(image="3", text="a photo", k=len(index))
    assert 3 in composed.ids and 5 in composed.ids  # nothing excluded: the file "3" is not in the index
    by_item = index.search(item=3, k=1, exclude_reference=False)[0]  # more like this, the item itself kept
    assert by_item.id == 3 and by_item.score == pytest.approx(1.0, abs=1e-5)
    assert index.search(item=f"key:{items[3].key}", k=1, exclude_reference=False)[0].id == 3
    assert 3 not in index.search(item=3, k=len(index)).ids  # by default more like this leaves the item out
    assert 3 not in index.search(item=3, text="a photo", k=len(index)).ids  # the composed reference is left out
    os.remove(tmp_path / "3")
    with pytest.raises(InputError, match=r"query image 3: no such file .*give item='3' \(--item 3\)"):
        index.search(image="3", k=1)


def test_an_indexed_file_changed_since_is_encoded_again(index, samples):
    items = sorted(index.meta.iter_items(), key=lambda it: it.id)
    a, b = items[1], items[2]
    assert index.search(image=a.uri, k=1)[0].id == a.id
    shutil.copyfile(b.uri, a.uri)  # replaced in place: same path, other picture
    os.utime(a.uri, ns=(0, 0))
    res = index.search(image=a.uri, text="x", k=len(index))
    top = index.search(image=a.uri, k=1)[0]
    assert top.id == b.id and top.score == pytest.approx(1.0, abs=1e-5)  # the file's picture, not the stale vector
    assert a.id in res.ids  # and it is no longer "the reference" to leave out


def test_cli_item_and_image(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["search", str(index.path), "--item", "3", "-k", "1", "--json", "--keep-reference"]) == 0
    assert '"id": 3' in capsys.readouterr().out
    assert main(["search", str(index.path), "--item", "3", "-k", "1", "--json"]) == 0
    assert '"id": 3,' not in capsys.readouterr().out  # more like this leaves the item itself out
    assert main(["search", str(index.path), "--image", "3", "-k", "1"]) == 1
    assert "a query image is always a file); to query the indexed item '3', give item='3' (--item 3)" in capsys.readouterr().err
    assert main(["search", str(index.path), "--image", "x.jpg", "--item", "3"]) == 2


def test_query_vectors_are_validated(index):
    d = index.dim
    v = index.vectors([0])[0]
    assert index.search(vector=v, k=1)[0].id == 0 and index.search(vector=v[None], k=1)[0].id == 0
    nan = v.copy()
    nan[3] = np.nan
    cases = [
        (nan, r"query vector: 1 NaN or infinite value\(s\), the first at position 3"),
        (np.full(d, np.inf, np.float32), rf"query vector: {d} NaN or infinite value\(s\), the first at position 0"),
        (np.stack([v, v]), rf"Index.search\(vector=...\) takes one vector of shape \({d},\) or \(1, {d}\), got shape \(2, {d}\)"),
        (v[:-1], f"query vector: expected dim {d}, got {d - 1}"),
        (np.zeros(d, np.float32), "query vector: all zeros"),
        (["a"] * d, "query vector: not numeric"),
    ]
    for bad, msg in cases:
        with pytest.raises(BadVectorsError, match=msg):
            index.search(vector=bad, k=3)


@pytest.mark.parametrize("k", [0, -5, 2.5, True, "3", None])
def test_k_is_a_positive_integer_everywhere(index, k):
    v = index.vectors([0])[0]
    for call, where in [(lambda: index.search(text="a photo", k=k), "Index.search"),
                        (lambda: index.search(vector=v, k=k), "Index.search"),
                        (lambda: index.search(text="a photo", k=k, pipeline=Pipeline([])), "Index.search")]:
        with pytest.raises(UsageError, match=f"{where}: k must be a positive integer, got {k!r}"):
            call()
    assert len(index.search(text="a photo", k=np.int64(2))) == 2


RERANKER_ERRORS = {
    "emd:k=0": "emd: k must be a positive integer, got 0",
    "emd:k=-5": "emd: k must be a positive integer, got -5",
    "emd:k=2.5": "reranker 'emd': option k must be an integer, got 2.5",
    "emd:k=abc": "reranker 'emd': option k must be an integer, got 'abc'",
    "emd:grid=-1": "emd: grid must be a positive integer (patches per side), got -1",
    "emd:grid=abc": "reranker 'emd': option grid must be an integer, got 'abc'",
    "emd:alpha=2": "emd: alpha must be in [0, 1]",
    "emd:reg=0": "emd: reg must be > 0, got 0.0",
    "emd:tol=-1": "emd: tol must be >= 0",
    "emd:threads=-2": "emd: threads must be >= 1",
    "emd:cache_size=-1": "emd: cache_size must be >= 0",
    "emd:device=bogus": "emd: option device: unknown device 'bogus'",
    "emd:solver=fast": "emd: solver must be one of auto, exact, sinkhorn, pot-sinkhorn, got 'fast'",
    "frames:m=0": "frames: m must be >= 1, got 0",
    "frames:k=true": "reranker 'frames': option k must be an integer, got True",
    "mllm:model=x,batch_size=0": "mllm: batch_size must be >= 1, got 0",
    "mllm:model=x,max_pixels=-5": "mllm: max_pixels must be >= 1",
    "mllm:model=x,dtype=fp8": "mllm: dtype must be one of auto, fp32",
    "mllm:model=x,answer_fallback=last": "mllm: answer_fallback must be 'first' or unset, got 'last'",
    "mllm:model=x,collage=3": "reranker 'mllm': option collage must be true/false, got 3",
}


@pytest.mark.parametrize("spec", sorted(RERANKER_ERRORS))
def test_reranker_option_errors_name_the_reranker_and_option(spec):
    with pytest.raises(UsageError) as e:
        Pipeline.from_specs(spec)
    assert RERANKER_ERRORS[spec] in str(e.value)

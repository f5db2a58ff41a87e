"""Composed-query fusion, checked against rankings computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from mmretrieve import Query, list_fusions, open_index
from mmretrieve.query import fuse_sum, fuse_weighted, intersection_scores, minmax
from mmretrieve.registry import UnknownNameError
from mmretrieve.store import IndexWriter, Item


def test_fusions_registered():
    assert set(list_fusions()) == {"sum", "weighted", "text", "image", "intersection", "hybrid"}


def test_vector_fusions_by_hand():
    img = np.array([3.0, 0.0, 0.0], np.float32)
    txt = np.array([0.0, 0.0, 2.0], np.float32)
    s = 1 / np.sqrt(2)
    np.testing.assert_allclose(fuse_sum(img, txt), [s, 0, s], atol=1e-6)
    w = fuse_weighted(img, txt, weight=0.75)  # (0.25, 0, 0.75) normalised
    np.testing.assert_allclose(w, np.array([0.25, 0, 0.75]) / np.linalg.norm([0.25, 0, 0.75]), atol=1e-6)
    np.testing.assert_allclose(fuse_weighted(img, txt, weight=0.5), fuse_sum(img, txt), atol=1e-6)
    with pytest.raises(ValueError, match="weight must be in"):
        fuse_weighted(img, txt, weight=2)


def test_intersection_scores_by_hand():
    s_img = np.array([0.9, 0.8, 0.2, 0.5])
    s_txt = np.array([0.1, 0.6, 0.9, 0.5])
    # min-max over the 4 candidates: img -> [1, 6/7, 0, 3/7]; txt -> [0, 5/8, 1, 1/2]
    np.testing.assert_allclose(minmax(s_img), [1, 6 / 7, 0, 3 / 7])
    np.testing.assert_allclose(intersection_scores(s_img, s_txt, "min"), [0, 5 / 8, 0, 3 / 7])
    np.testing.assert_allclose(intersection_scores(s_img, s_txt, "product"), [0, 6 / 7 * 5 / 8, 0, 3 / 7 * 1 / 2])
    with pytest.raises(ValueError, match="mode must be"):
        intersection_scores(s_img, s_txt, "max")


class _StubEncoder:
    """Returns fixed query vectors so the index-level fusion can be checked exactly."""

    def __init__(self, img, txt):
        self.img, self.txt = img, txt

    def encode_images(self, images):
        return self.img[None]

    def encode_texts(self, texts):
        return self.txt[None]


def test_index_level_fusions_rank_as_computed_by_hand(tmp_path):
    # 4-d toy space: items are combinations of an "image concept" (dims 0,1) and a "text concept" (2,3)
    X = np.array(
        [
            [1.0, 0.0, 0.0, 0.0],  # 0: the reference look only
            [0.0, 0.1, 1.0, 0.0],  # 1: the modification only (no exact ties with 0)
            [0.7, 0.0, 0.7, 0.0],  # 2: both -> the composed target
            [0.0, 1.0, 0.0, 1.0],  # 3: neither
            [0.95, 0.0, 0.3, 0.0],  # 4: mostly the reference
        ],
        np.float32,
    )
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    info = {"name": "toy", "dim": 4, "modalities": ["image", "text"]}
    with IndexWriter(tmp_path / "t", encoder_info=info, create=True) as w:
        w.add([Item(id=-1, key=f"i{j}", uri=f"toy://{j}") for j in range(len(X))], X)
    idx = open_index(tmp_path / "t")
    img, txt = np.array([1, 0, 0, 0], np.float32), np.array([0, 0, 1, 0], np.float32)
    idx._encoder = _StubEncoder(img, txt)

    def ranking(fusion, **opt):
        return idx.search(Query(text="t", image="ref.jpg", fusion=fusion, options=opt), k=5)

    s_img, s_txt = X @ img, X @ txt
    by_hand = {
        "sum": X @ fuse_sum(img, txt),
        "image": s_img,
        "text": s_txt,
        "intersection": intersection_scores(s_img, s_txt, "min"),
    }
    for fusion, expected in by_hand.items():
        res = ranking(fusion)
        got = {h.key: h.score for h in res}
        assert sorted(got) == [f"i{j}" for j in range(5)], fusion
        for key, score in got.items():
            assert score == pytest.approx(expected[int(key[1:])], abs=1e-5), (fusion, key)
        assert all(a >= b - 1e-6 for a, b in zip(res.scores, res.scores[1:])), fusion

    def ranking(fusion):  # noqa: F811 - keys only, from here on
        return idx.search(Query(text="t", image="ref.jpg", fusion=fusion), k=5).keys

    assert ranking("intersection")[0] == "i2"  # the item with both concepts wins the soft AND
    assert ranking("image")[0] == "i0"
    with pytest.raises(UnknownNameError, match="unknown fusion 'union'"):
        ranking("union")


def test_query_validation():
    with pytest.raises(ValueError, match="a query needs"):
        Query()
    with pytest.raises(ValueError, match="empty query text"):
        Query(text="  ")
    assert Query(text="a").kind == "text"
    assert Query(image="x.jpg").kind == "image"
    assert Query(image="x.jpg", text="red").kind == "composed"


def test_composed_query_excludes_reference_on_real_photos(photo_dir, embedded):
    from mmretrieve import build_index

    build_index("p", photo_dir, encoder=embedded)
    idx = open_index("p")
    ref = next(photo_dir.rglob("motorcycle_left.png"))
    keys_img = idx.search(image=ref, k=3).keys
    assert keys_img[0] == str(ref.resolve())  # image search returns the image itself first
    res = idx.search(image=ref, text="a horse", fusion="sum", k=5)
    assert str(ref.resolve()) not in res.keys  # composed: the reference is left out
    names = [k.rsplit("/", 1)[-1] for k in res.keys]
    assert "motorcycle_right.png" in names[:3] and "horse.png" in names[:3]
    inter = [k.rsplit("/", 1)[-1] for k in idx.search(image=ref, text="a horse", fusion="intersection", k=5).keys]
    assert inter[0] == "horse.png"
    kept = idx.search(image=ref, text="a horse", k=30, exclude_reference=False).keys
    assert str(ref.resolve()) in kept

"""The ``locore`` reranker (LOCORE): sequence layout, aggregation, fusion, sliding windows, checkpoint
loading and errors, and end to end on a small index through the API, the CLI and ``eval``, with a tiny
random checkpoint in the published layout (``mmretrieve.testing.write_tiny_locore``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmretrieve import build_index, open_index
from mmretrieve.errors import RerankError, UsageError
from mmretrieve.rerank import create_reranker
from mmretrieve.rerank.locore import (
    LocoreReranker,
    aggregate,
    fuse_scores,
    load_locore,
    monotone_scores,
    sequence_layout,
    sliding_rerank,
    window_starts,
)
from mmretrieve.testing import write_tiny_locore

EMBEDDED_PATCH_DIM = 1280  # the embedded encoder's native patch dim (its stored patches)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_locore(tmp_path_factory.mktemp("locore"), descriptor_dim=EMBEDDED_PATCH_DIM, seed=0)


class _Query:
    def __init__(self, image="q.png"):
        self.image, self.image_id, self.text = image, None, None


class _FakePatches:
    """Stands in for the index's patch store: fixed random patches per id."""

    def __init__(self, dim: int, n_patches: int = 49, seed: int = 0) -> None:
        self.dim, self.n, self.rng = dim, n_patches, np.random.default_rng(seed)
        self.store: dict[int, np.ndarray] = {}

    def _get(self, i: int) -> np.ndarray:
        if i not in self.store:
            self.store[i] = self.rng.normal(size=(self.n, self.dim)).astype(np.float32)
        return self.store[i]

    def query_patches(self, view, query):
        return self._get(-1)

    def candidate_patches(self, view, ids):
        return np.stack([self._get(int(i)) for i in ids])


# ---- layout, aggregation, fusion, windows (no model) ---------------------------------------------------
def test_sequence_layout_matches_a_hand_built_one():
    lay = sequence_layout(np.array([True, True]), np.array([[True, False], [True, True]]))
    # query block, then candidate 1, then candidate 2: [G D D S] each
    assert "".join(lay["kind"]) == "GDDS" * 3
    assert lay["image"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert lay["attention"].tolist() == [1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1]  # candidate 1's 2nd descriptor padded
    # global attention: the whole query block and every SEP
    assert lay["global_attention"].tolist() == [1, 1, 1, 1, 0, 0, 0, 1, 0, 0, 0, 1]


def test_aggregates_as_the_reference_defines_them():
    x = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 4.0]])  # (candidates, global + descriptors)
    assert aggregate(x, "max-prod").tolist() == [6.0, -2.0]
    assert aggregate(x, "max-sum").tolist() == [6.0, 3.5]
    assert aggregate(x, "max-start").tolist() == [1.0, 0.5]  # the global token
    assert aggregate(x, "max-end").tolist() == [3.0, 4.0]  # the last descriptor
    with pytest.raises(UsageError, match="aggregate must be one of"):
        aggregate(x, "mean")


def test_fusion_formula():
    got = fuse_scores([0.8], [2.0], alpha=0.5, t=0.1)
    assert got[0] == pytest.approx(0.5 * 0.8 + 0.5 / (1 + np.exp(-0.2)))
    assert fuse_scores([0.3], [-7.0], alpha=1.0, t=0.1)[0] == pytest.approx(0.3)


def test_window_starts_follow_the_reference_ranges():
    assert window_starts(400, 100, 50, "end-to-start") == [300, 250, 200, 150, 100, 50, 0]
    assert window_starts(400, 100, 50, "start-to-end") == [0, 50, 100, 150, 200, 250, 300]
    assert window_starts(400, 100, 50, "start-to-end-to-start") == [0, 50, 100, 150, 200, 250, 300, 250, 200, 150,
                                                                    100, 50, 0]
    assert window_starts(80, 100, 50, "end-to-start") == [0]
    assert window_starts(130, 100, 50, "end-to-start") == [30, 0]  # clipped, always ends at the top
    # every candidate is in some window, whatever the lengths (review: start-to-end left the tail unscored)
    for n, w, st in [(9, 4, 3), (10, 4, 4), (210, 100, 100), (120, 100, 50), (401, 100, 50)]:
        for sched in ("start-to-end", "end-to-start", "start-to-end-to-start", "end-to-start-to-end"):
            starts = window_starts(n, w, st, sched)
            assert {i for s in starts for i in range(s, min(n, s + w))} == set(range(n)), (n, w, st, sched)


def test_sliding_windows_merge_as_specified():
    # 12 candidates, true quality = their id; the shortlist order is the reverse (the best last)
    true = np.arange(12, dtype=float)
    calls = []

    def score(pos):
        calls.append(list(pos))
        return true[pos]

    order, last, seen = sliding_rerank(12, 4, 2, "end-to-start", score)
    assert calls[0] == [8, 9, 10, 11] and len(calls) == 5  # starts 8, 6, 4, 2, 0
    assert order[0] == 11  # end-to-start carries the best item from the tail to the top
    assert seen[11] == 5 and seen[0] == 1
    s = monotone_scores(order, last)
    assert np.argsort(-s, kind="stable").tolist() == order  # the returned scores reproduce the merged order


# ---- the model ----------------------------------------------------------------------------------------
def test_checkpoint_layout_and_errors(ckpt, tmp_path):
    from safetensors.torch import load_file

    keys = set(load_file(str(ckpt / "model.safetensors")))
    assert {"language_model.longformer.sep_embedding", "language_model.longformer.pad_embedding",
            "language_model.classifier.weight", "scale_encoder.weight", "local_to_lm.weight"} <= keys
    assert not any("word_embeddings" in k for k in keys)
    net = load_locore(str(ckpt), torch.device("cpu"), torch.float32)
    assert net.local_dim == EMBEDDED_PATCH_DIM and net.hidden == 32
    # without config.json the config is read off the weights
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "locore_base.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes())
    assert load_locore(str(tmp_path / "w"), torch.device("cpu"), torch.float32).hidden == 32
    with pytest.raises(RerankError, match="not found"):
        load_locore(str(tmp_path / "nope"), torch.device("cpu"), torch.float32)
    with pytest.raises(RerankError, match="vislang/locore_dinov2_base"):  # offline, not cached: at once
        create_reranker("locore", model="vislang/locore_dinov2_base").net()
    with pytest.raises(UsageError, match="aggregate"):
        create_reranker("locore", model=str(ckpt), aggregate="avg")


def test_wrong_descriptor_dim_names_both_dims(ckpt):
    r = LocoreReranker(model=str(ckpt), k=5)
    r._patch_source = _FakePatches(dim=64)
    with pytest.raises(RerankError, match=r"64-dim but .* expects 1280-dim"):
        r.score(None, _Query(), np.arange(5), np.zeros(5))


def test_scores_fuse_the_local_logits_and_windows_cover_long_shortlists(ckpt):
    prev = np.linspace(0.9, 0.1, 10)
    r = LocoreReranker(model=str(ckpt), k=10, alpha=0.3, t=0.2, num_descriptors=8)
    r._patch_source = _FakePatches(EMBEDDED_PATCH_DIM)
    out = r.score(None, _Query(), np.arange(10), prev)
    local = np.array([out.extra[i]["locore_local"] for i in range(10)])
    np.testing.assert_allclose(out.scores, 0.3 * prev + 0.7 / (1 + np.exp(-0.2 * local)), rtol=1e-12)
    assert len(set(np.round(local, 6))) > 1
    # a window of 4, stride 2: several passes, every candidate scored, the scores sort to a permutation
    w = LocoreReranker(model=str(ckpt), k=10, window=4, stride=2, num_descriptors=8)
    w._patch_source = r._patch_source
    out2 = w.score(None, _Query(), np.arange(10), prev)
    assert all(out2.extra[i]["locore_windows"] >= 1 for i in range(10))
    assert sorted(np.argsort(-out2.scores).tolist()) == list(range(10))
    with pytest.raises(RerankError, match="positions"):  # 200 candidates x 48 descriptors do not fit
        LocoreReranker(model=str(ckpt), k=200, window=200).score(None, _Query(), np.arange(200), np.zeros(200))


# ---- end to end -----------------------------------------------------------------------------------------
def test_end_to_end_on_an_index_with_patches(photo_dir, embedded, sample_by_id, ckpt):
    build_index("lp", photo_dir, encoder=embedded, patches=True)
    idx = open_index("lp")
    q = sample_by_id["chelsea"].path
    coarse = idx.search(image=q, k=12)
    spec = f"locore:model={ckpt},k=8"
    a = idx.search(image=q, k=12, pipeline=spec)
    b = idx.search(image=q, k=12, pipeline=spec)
    assert a.stages == ["coarse", "locore"] and a.keys == b.keys  # deterministic
    assert sorted(a.keys[:8]) == sorted(coarse.keys[:8]) and a.keys[8:] == coarse.keys[8:]  # tail kept
    assert [h.stage_scores["locore"] for h in a[:8]] == [h.stage_scores["locore"] for h in b[:8]]
    assert all("locore" not in h.stage_scores for h in a[8:])


def test_cli_search_and_eval_with_locore(photo_dir, samples, sample_by_id, ckpt, tmp_path, capsys, embedded):
    from cir_fixtures import make_fashioniq

    from mmretrieve.cli import main

    home = str(tmp_path / "home")
    assert main(["index", "build", "p", str(photo_dir), "--patches", "--index-dir", home, "-q"]) == 0
    capsys.readouterr()
    q = str(sample_by_id["coffee"].path)
    assert main(["search", "p", "--image", q, "--rerank", f"locore:model={ckpt},k=6,aggregate=max-sum", "-k", "8",
                 "--json", "--index-dir", home]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stages"] == ["coarse", "locore"] and len(out["hits"]) == 8
    assert out["query"]["pipeline"][0]["aggregate"] == "max-sum"
    make_fashioniq(tmp_path / "fiq", samples)
    args = ["eval", "fashioniq", "--root", str(tmp_path / "fiq"), "--categories", "dress", "--cache", str(tmp_path / "c"),
            "--out", str(tmp_path / "o"), "--json", "--rerank", f"locore:model={ckpt},k=5,num_descriptors=16"]
    assert main(args) == 0
    nested = json.loads(capsys.readouterr().out)
    assert set(nested) == {"coarse", "locore"}


def test_bench_locore_smoke(capsys):
    from mmretrieve.cli import main

    assert main(["bench", "locore", "--json", "--size", "tiny", "-K", "4", "--descriptors", "8", "--queries", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rows"][0]["tokens"] == 5 * 10 and out["rows"][0]["ms_per_query"] > 0

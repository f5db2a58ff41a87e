"""The search path runs one way: ``Index.search`` encodes the query, plans and runs the coarse search,
hands the ranking to the rerank stages and hydrates. A reranker gets only its inputs (a read-only view,
the encoded query, the shortlist and its scores); a coarse strategy only plans (it never sees an index);
scores fall with rank after stages of any scale, in Python, on the command line and over HTTP."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest

from mmretrieve import Query, open_index
from mmretrieve.cli import main
from mmretrieve.index import ReadView
from mmretrieve.index.search import coarse, encode_query
from mmretrieve.query import FUSIONS, CoarsePlan, CoarseStrategy, EncodedQuery, coarse_strategy
from mmretrieve.rerank import Pipeline
from mmretrieve.rerank.base import RERANKERS, Reranker, RerankOutput
from mmretrieve.rerank.pipeline import below
from mmretrieve.store import IndexWriter, Item

D = 8


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class _Vec:  # a text encoder answering one fixed vector (no model)
    def __init__(self, v):
        self.v = v

    def encode_texts(self, texts):
        return self.v[None]


@pytest.fixture()
def toy(tmp_path):
    rng = np.random.default_rng(0)
    X = _unit(rng.standard_normal((30, D))).astype(np.float32)
    with IndexWriter(tmp_path / "t", encoder_info={"name": "toy", "dim": D, "modalities": ["text"]}, create=True) as w:
        w.add([Item(id=-1, key=f"i{j}", uri=f"toy://{j}") for j in range(30)], X)
    idx = open_index(tmp_path / "t")
    idx._encoder = _Vec(_unit(rng.standard_normal(D)).astype(np.float32))
    yield idx, X
    idx.close()


class _Probe(Reranker):
    """Records what it was given and answers far below the coarse scale (so the tail must move)."""

    name = "probe"
    seen: list = []

    def __init__(self, *, k: int = 5, alpha: float | None = 1.0, norm: str = "none") -> None:
        super().__init__(k=k, alpha=alpha, norm=norm)

    def score(self, view, query, ids, scores):
        type(self).seen.append((view, query, np.array(ids), np.array(scores)))
        return RerankOutput(-10.0 - np.arange(len(ids), dtype=np.float64))


RERANKERS.register("probe", override=True)(_Probe)


def test_a_reranker_gets_only_its_inputs(toy):
    idx, _ = toy
    _Probe.seen.clear()
    coarse_only = idx.search(text="x", k=12)
    res = idx.search(text="x", k=12, pipeline=Pipeline([_Probe(k=5)]))
    (view, query, ids, scores), = _Probe.seen
    assert isinstance(view, ReadView)
    public = {n for n in dir(view) if not n.startswith("_")}
    assert public == {"path", "manifest", "encoder", "items", "vectors", "patches", "patch_projection",
                      "frames_matrix", "frame_similarities"}
    for member in ("coarse", "hydrate", "search", "search_vectors", "query_vector"):
        assert not hasattr(view, member)
    assert isinstance(query, EncodedQuery) and query.text == "x" and set(query.sides) == {"text"}
    np.testing.assert_array_equal(query.vector, query.sides["text"])
    assert ids.tolist() == coarse_only.ids[:5]  # the coarse shortlist, with its coarse scores
    np.testing.assert_allclose(scores, [h.score for h in coarse_only.hits[:5]], atol=1e-6)
    assert res.stages == ["coarse", "probe"]
    assert not hasattr(Query(text="x"), "cache")  # vectors travel as a value, never as a memo on the query


def test_coarse_strategies_plan_without_an_index(toy):
    idx, X = toy
    vecs = {"image": X[3], "text": _unit(X[4] + X[5])}
    assert not hasattr(CoarseStrategy, "search")
    for name in FUSIONS.names():
        strategy = coarse_strategy(name)
        params = list(inspect.signature(strategy.plan).parameters)
        assert params == ["vecs", "k", "k1", *(["text"] if getattr(strategy, "uses_text", False) else [])], (name, params)
        plan = strategy.plan(vecs, 6)  # no index anywhere near it
        assert isinstance(plan, CoarsePlan) and plan.queries.shape[1] == D
        assert plan.single == (name not in ("intersection", "hybrid"))
        ids, scores = coarse(idx, plan)
        assert len(ids) == 6 and np.all(np.diff(scores) <= 1e-7)
        q = Query(text="x", item=3, fusion=name)
        res = idx.search(q, k=6, exclude_reference=False)
        want = coarse(idx, encode_query(idx, q).plan(6))[0].tolist()
        assert res.ids == want, name


def test_intersection_plan_merges_the_union_by_stored_vectors(toy):
    idx, X = toy
    img, txt = X[0], X[1]
    plan = coarse_strategy("intersection", {"k1": 10}).plan({"image": img, "text": txt}, 5)
    assert plan.k == 10 and len(plan.queries) == 2 and plan.merge is not None
    ids, scores = coarse(idx, plan)
    top_i = np.argsort(-(X @ img), kind="stable")[:10]
    top_t = np.argsort(-(X @ txt), kind="stable")[:10]
    union = np.unique(np.concatenate([top_i, top_t]))
    a, b = X[union] @ img, X[union] @ txt
    mm = lambda x: (x - x.min()) / (x.max() - x.min())  # noqa: E731
    s = np.minimum(mm(a), mm(b))
    assert ids.tolist() == union[np.argsort(-s, kind="stable")[:5]].tolist()


def test_scores_fall_with_rank_across_a_stage_of_another_scale(toy):
    idx, _ = toy
    res = idx.search(text="x", k=20, pipeline=Pipeline([_Probe(k=5)]))
    s = [h.score for h in res]
    assert all(a > b for a, b in zip(s, s[1:])), s
    assert [h.score for h in res.hits[:5]] == [-10.0, -11.0, -12.0, -13.0, -14.0]
    coarse_scores = [h.stage_scores["coarse"] for h in res.hits[5:]]  # the tail: its gaps kept, below the head
    np.testing.assert_allclose(np.diff(s[5:]), np.diff(coarse_scores), atol=1e-9)
    assert s[5] < -14.0


def test_below_keeps_a_tail_that_is_already_below():
    tail = np.array([0.3, 0.2])
    assert below(tail, np.array([0.9, 0.5])).tolist() == [0.3, 0.2]
    moved = below(tail, np.array([0.9, 0.1]))
    assert moved[0] < 0.1 and moved[0] - moved[1] == pytest.approx(0.1)
    assert below(np.zeros(0), np.array([1.0])).size == 0


def test_scores_fall_with_rank_on_the_command_line(toy, capsys, monkeypatch):
    idx, _ = toy
    import mmretrieve.index.index as index_mod

    real_open = index_mod.Index.open

    def with_toy_encoder(*a, **kw):
        opened = real_open(*a, **kw)
        opened._encoder = idx._encoder
        return opened

    monkeypatch.setattr(index_mod.Index, "open", with_toy_encoder)
    assert main(["search", str(idx.path), "--text", "x", "-k", "15", "--rerank", "probe:k=4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    hits = out["hits"] if isinstance(out, dict) else out
    scores = [h["score"] for h in hits]
    assert len(scores) == 15 and all(a > b for a, b in zip(scores, scores[1:])), scores


def test_a_pipeline_name_means_the_same_in_python_and_on_the_command_line():
    from mmretrieve.rerank.pipeline import as_pipeline

    # "emd" is the preset (configs/pipelines/emd.yaml), as `--pipeline emd` and the API's pipeline take it
    assert as_pipeline("emd").config() == Pipeline.from_config("emd").config()
    assert as_pipeline("setr").coarse_fusion == Pipeline.from_config("setr").coarse_fusion == "intersection"
    # anything that is not a preset is reranker specs, as `--rerank` takes them
    assert as_pipeline("frames").config() == Pipeline.from_specs(["frames"]).config()
    assert as_pipeline("emd:k=5|frames").config() == Pipeline.from_specs(["emd:k=5", "frames"]).config()

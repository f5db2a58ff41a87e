"""Benchmarks: official layouts, metrics against hand-computed values and a plain reference
implementation, reports, submission files, re-scoring without a model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cir_fixtures import CIRCO_QUERIES, CIRR_QUERIES, FIQ, make_circo, make_cirr, make_fashioniq

from mmretrieve.eval import DatasetError, evaluate, load_dataset
from mmretrieve.eval import metrics as M
from mmretrieve.eval.report import write_report
from mmretrieve.eval.submission import SubmissionError, score_files


# ---- metrics by hand ---------------------------------------------------------------------------------
class Q:
    def __init__(self, qid, reference, target, subset=(), gts=(), group=None, aspects=()):
        self.qid, self.reference, self.target = qid, reference, target
        self.subset, self.gts, self.group, self.aspects = list(subset), list(gts) or [target], group, list(aspects)


def test_cirr_metrics_by_hand():
    qs = [
        Q("a", "ref", "t1", subset=["ref", "t1", "m1", "m2", "m3", "m4"]),
        Q("b", "ref2", "t2", subset=["ref2", "t2", "m1", "m2", "m3", "m4"]),
        Q("c", "same", "same", subset=["same", "m1", "m2", "m3", "m4", "m5"]),  # target == reference
    ]
    rankings = {
        # reference first: removed, so t1 is at rank 1
        "a": ["ref", "t1", "m1", "x1"] + [f"y{i}" for i in range(60)],
        # t2 at position 7 overall (after removing ref2 at 3): m1, m2 are ahead of it in the subset
        "b": ["x1", "m1", "ref2", "x2", "m2", "x3", "x4", "t2"] + [f"y{i}" for i in range(60)],
        "c": ["same", "m1"] + [f"y{i}" for i in range(60)],
    }
    m = M.cirr_metrics(rankings, qs)
    # a: hit@1; b: target at rank 7 -> hit@10, @50; c: never (its target is deleted as the reference)
    assert m["recall@1"] == pytest.approx(100 / 3)
    assert m["recall@5"] == pytest.approx(100 / 3)
    assert m["recall@10"] == pytest.approx(200 / 3) and m["recall@50"] == pytest.approx(200 / 3)
    # subset: a -> t1 first; b -> [m1, m2, t2, ...] -> @3 only; c -> miss
    assert m["recall_subset@1"] == pytest.approx(100 / 3)
    assert m["recall_subset@2"] == pytest.approx(100 / 3)
    assert m["recall_subset@3"] == pytest.approx(200 / 3)


def test_circo_ap_by_hand_with_several_gts_and_fewer_than_k():
    gts = ["g1", "g2", "g3"]
    ranking = ["g1", "x", "g2", "x2", "x3", "x4", "x5", "x6", "x7", "g3"] + [f"y{i}" for i in range(40)]
    ap = M.circo_average_precisions(ranking, gts)
    # precisions at hits: 1/1, 2/3, 3/10
    assert ap[5] == pytest.approx((1 + 2 / 3) / 3)
    assert ap[10] == pytest.approx((1 + 2 / 3 + 3 / 10) / 3)  # |gt| = 3 < 10: divide by 3
    assert ap[25] == ap[50] == pytest.approx(ap[10])
    one = M.circo_average_precisions(["x"] * 0 + ["a", "g"] + [f"y{i}" for i in range(48)], ["g"])
    assert one[5] == pytest.approx(0.5)
    m = M.circo_metrics({"0": ranking}, [Q("0", "r", "g1", gts=gts, aspects=["cardinality"])])
    assert m["map@5"] == pytest.approx(100 * (1 + 2 / 3) / 3)
    assert m["recall@5"] == 100 and m["aspect/cardinality/map@10"] == pytest.approx(m["map@10"])


def test_fashioniq_metrics_by_hand():
    qs = [Q("dress/0", "r", "t", group="dress"), Q("dress/1", "r", "u", group="dress"), Q("shirt/0", "r", "v", group="shirt")]
    rankings = {"dress/0": ["r", "t"] + ["x"] * 60, "dress/1": ["x"] * 20 + ["u"], "shirt/0": ["x"] * 60}
    m = M.fashioniq_metrics(rankings, qs)
    # the reference is NOT removed: t is at rank 2
    assert m["dress/recall@10"] == 50 and m["dress/recall@50"] == 100
    assert m["shirt/recall@10"] == 0 and m["average/recall@50"] == 50


# ---- loaders -------------------------------------------------------------------------------------------
def test_loaders_read_the_official_layouts(tmp_path, samples):
    make_cirr(tmp_path / "cirr", samples)
    ds = load_dataset("cirr", tmp_path / "cirr", "val")
    assert len(ds.queries) == len(CIRR_QUERIES) and len(ds.galleries[None]) == len(samples)
    assert all(len(q.subset) == 6 and q.reference in q.subset for q in ds.queries)
    test = load_dataset("cirr", tmp_path / "cirr", "test")
    assert not test.has_targets and test.split == "test"
    make_fashioniq(tmp_path / "fiq", samples)
    fiq = load_dataset("fashioniq", tmp_path / "fiq", "val", categories="dress,toptee")
    assert {q.group for q in fiq.queries} == {"dress", "toptee"}
    q0 = fiq.queries[0]
    assert q0.texts == ["is a cup of coffee and has a saucer and a spoon", "has a saucer and a spoon and is a cup of coffee"]
    assert any(p.endswith(".png") for p in fiq.galleries["toptee"].values())
    make_circo(tmp_path / "circo", samples)
    circo = load_dataset("circo", tmp_path / "circo", "val")
    assert [len(q.gts) for q in circo.queries] == [len(x[3]) for x in CIRCO_QUERIES]
    shared = load_dataset("circo", tmp_path / "circo", "val", text_style="shared")
    assert shared.queries[0].texts == ["find a picture that also a red motorcycle, but is seen from another side"]


def test_missing_images_are_reported_and_allow_missing_drops_queries(tmp_path, samples):
    names = make_cirr(tmp_path / "cirr", samples)
    (tmp_path / "cirr" / "dev" / f"{names['coffee']}.png").unlink()
    with pytest.raises(DatasetError, match="1 image file\\(s\\) are missing.*--allow-missing"):
        load_dataset("cirr", tmp_path / "cirr", "val")
    ds = load_dataset("cirr", tmp_path / "cirr", "val", allow_missing=True)
    # two queries use coffee (as target and as reference)
    assert ds.dropped_queries == 2 and len(ds.queries) == len(CIRR_QUERIES) - 2
    with pytest.raises(DatasetError, match="missing file"):
        load_dataset("circo", tmp_path / "nothing", "val")


# ---- the runner against a plain reference implementation ------------------------------------------------
def _reference_rankings(enc, gallery: dict[str, str], queries, fusion="sum"):
    ids = sorted(gallery)
    E = enc.encode_images([gallery[i] for i in ids])
    out = {}
    for q in queries:
        t = enc.encode_texts(q.texts)
        t = t.mean(0)
        t /= np.linalg.norm(t)
        img = E[ids.index(q.reference)]
        v = img / np.linalg.norm(img) + t
        v /= np.linalg.norm(v)
        order = np.argsort(-(E @ v), kind="stable")
        out[q.qid] = [ids[j] for j in order]
    return out


def test_cirr_runner_matches_reference_implementation(tmp_path, samples, embedded):
    make_cirr(tmp_path / "cirr", samples)
    ds = load_dataset("cirr", tmp_path / "cirr", "val")
    res = evaluate(ds, encoder=embedded, cache=tmp_path / "cache")
    ref = _reference_rankings(embedded, ds.galleries[None], ds.queries)
    expected = M.cirr_metrics(ref, ds.queries)
    assert res.metrics["coarse"] == pytest.approx(expected)
    assert res.metrics["coarse"]["recall@50"] < 100  # the target == reference query can never be found
    # the per-query ranks follow the protocol (reference removed)
    for d, q in zip(res.per_query, ds.queries):
        r = [x for x in ref[q.qid] if x != q.reference]
        assert d["ranks"]["coarse"] == (r.index(q.target) + 1 if q.target in r else None)
    # a pipeline designed for another coarse fusion (SETR: intersection) brings it when none is chosen
    from mmretrieve.rerank.pipeline import Pipeline

    inter = evaluate(ds, encoder=embedded, cache=tmp_path / "cache", fusion="intersection")
    via_pipe = evaluate(ds, encoder=embedded, cache=tmp_path / "cache", pipeline=Pipeline([], coarse_fusion="intersection"))
    assert via_pipe.config["fusion"] == "intersection" and via_pipe.rankings["coarse"] == inter.rankings["coarse"]


def test_an_evaluator_is_built_once_and_called_per_run(tmp_path, samples, embedded, monkeypatch):
    """sentence-transformers' evaluator shape: the protocol is made once, from data that never builds it."""
    from mmretrieve.eval import CIREvaluator, protocol
    from mmretrieve.eval.datasets import BENCHMARKS, CIRDataset

    make_cirr(tmp_path / "cirr", samples)
    ds = load_dataset("cirr", tmp_path / "cirr", "val")
    assert not any(hasattr(CIRDataset, a) for a in ("benchmark", "metrics", "target_rank", "needs_full_ranking"))
    made = []
    real_create = BENCHMARKS.create
    monkeypatch.setattr(BENCHMARKS, "create", lambda name, **kw: made.append(name) or real_create(name, **kw))
    evaluator = CIREvaluator(ds, cache=tmp_path / "cache")
    a = evaluator(embedded)
    b = evaluator(embedded, fusion="intersection")
    assert made == ["cirr"]  # one protocol for both runs
    assert a.metrics == evaluate(ds, encoder=embedded, cache=tmp_path / "cache").metrics
    assert b.metrics == evaluate(ds, encoder=embedded, cache=tmp_path / "cache", fusion="intersection").metrics
    assert a.metrics["coarse"] == pytest.approx(protocol(ds).metrics(a.rankings["coarse"], ds.queries))


def test_fashioniq_and_circo_runners_match_reference(tmp_path, samples, embedded):
    make_fashioniq(tmp_path / "fiq", samples)
    fiq = load_dataset("fashioniq", tmp_path / "fiq", "val", categories=["dress", "toptee"])
    res = evaluate(fiq, encoder=embedded, cache=tmp_path / "cache")
    ref = {}
    for cat in ("dress", "toptee"):
        ref.update(_reference_rankings(embedded, fiq.galleries[cat], [q for q in fiq.queries if q.group == cat]))
    assert res.metrics["coarse"] == pytest.approx(M.fashioniq_metrics(ref, fiq.queries))
    assert set(res.metrics["coarse"]) == {f"{c}/recall@{k}" for c in ("dress", "toptee", "average") for k in (10, 50)}
    make_circo(tmp_path / "circo", samples)
    circo = load_dataset("circo", tmp_path / "circo", "val")
    res = evaluate(circo, encoder=embedded, cache=tmp_path / "cache")
    ref = _reference_rankings(embedded, circo.galleries[None], circo.queries)
    assert res.metrics["coarse"] == pytest.approx(M.circo_metrics(ref, circo.queries))


def test_report_and_rescoring_reproduce_the_metrics(tmp_path, samples, embedded, capsys):
    from mmretrieve.cli import main

    make_cirr(tmp_path / "cirr", samples)
    ds = load_dataset("cirr", tmp_path / "cirr", "val")
    res = evaluate(ds, encoder=embedded, pipeline="emd:k=10,solver=exact", cache=tmp_path / "cache")
    assert res.stages == ["coarse", "emd"]
    for q in ds.queries:  # left out of the coarse search itself, so no reranker spends a slot on it
        assert q.reference not in res.rankings["coarse"][q.qid] and q.reference not in res.rankings["emd"][q.qid]
    out = write_report(res, ds, tmp_path / "report")
    for f in ("report.json", "report.md", "config.json", "recall_at_k.png", "gallery.html"):
        assert (out / f).is_file(), f
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["metrics"]) == {"coarse", "emd"} and "@1" in rep["changes"]
    assert "| emd |" in (out / "report.md").read_text()
    for stage in ("coarse", "emd"):
        files = out / "rankings" / stage
        sub = json.loads((files / "recall.json").read_text())
        assert sub["version"] == "rc2" and sub["metric"] == "recall"
        assert score_files(ds, files / "recall.json") == pytest.approx(res.metrics[stage])
        assert main(["eval", "score", "cirr", "--root", str(tmp_path / "cirr"), "--rankings", str(files / "recall.json"), "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == pytest.approx(res.metrics[stage])


def test_circo_and_fiq_rescoring(tmp_path, samples, embedded):
    make_circo(tmp_path / "circo", samples)
    circo = load_dataset("circo", tmp_path / "circo", "val")
    res = evaluate(circo, encoder=embedded, cache=tmp_path / "cache")
    out = write_report(res, circo, tmp_path / "r1")
    sub = json.loads((out / "rankings" / "coarse" / "circo.json").read_text())
    assert all(isinstance(x, int) for x in sub["0"]) and len(sub["0"]) == min(50, len(samples))
    assert score_files(circo, out / "rankings" / "coarse" / "circo.json") == pytest.approx(res.metrics["coarse"])
    make_fashioniq(tmp_path / "fiq", samples)
    fiq = load_dataset("fashioniq", tmp_path / "fiq", "val", categories=["dress", "toptee"])
    res = evaluate(fiq, encoder=embedded, cache=tmp_path / "cache")
    out = write_report(res, fiq, tmp_path / "r2")
    assert score_files(fiq, out / "rankings" / "coarse" / "fashioniq.json") == pytest.approx(res.metrics["coarse"])


def test_submission_validation(tmp_path, samples):
    names = make_cirr(tmp_path / "cirr", samples)
    ds = load_dataset("cirr", tmp_path / "cirr", "val")
    good = {q.qid: [n for n in names.values() if n != q.reference] for q in ds.queries}
    f = tmp_path / "run.json"
    f.write_text(json.dumps({"version": "rc2", "metric": "recall", **good}))
    assert score_files(ds, f)["recall@50"] == pytest.approx(100 * 7 / 8)
    dup = dict(good)
    first = ds.queries[0].qid
    dup[first] = [dup[first][0]] + dup[first]
    f.write_text(json.dumps({"version": "rc2", "metric": "recall", **dup}))
    with pytest.raises(SubmissionError, match="appears more than once"):
        score_files(ds, f)
    bad = dict(good)
    bad[first] = ["dev-999-nothing-img0"] + good[first][:-1]
    f.write_text(json.dumps({"version": "rc2", "metric": "recall", **bad}))
    with pytest.raises(SubmissionError, match="unknown image id 'dev-999-nothing-img0'"):
        score_files(ds, f)
    f.write_text(json.dumps({"version": "rc2", "metric": "recall", "424242": good[first], **good}))
    with pytest.raises(SubmissionError, match="unknown query id '424242'"):
        score_files(ds, f)
    part = dict(list(good.items())[1:])
    f.write_text(json.dumps({"version": "rc2", "metric": "recall", **part}))
    with pytest.raises(SubmissionError, match="1 query id\\(s\\) have no ranking"):
        score_files(ds, f)
    f.write_text(json.dumps(good))
    with pytest.raises(SubmissionError, match="\"version\": \"rc2\""):
        score_files(ds, f)
    # a subset file that puts the reference first is scored as the recall file is: without it
    f.write_text(json.dumps({"version": "rc2", "metric": "recall", **good}))
    subset = {q.qid: [m for m in q.subset if m != q.reference][:3] for q in ds.queries}
    sf = tmp_path / "subset.json"
    sf.write_text(json.dumps({"version": "rc2", "metric": "recall_subset", **subset}))
    clean = score_files(ds, f, sf)
    with_ref = {q.qid: [q.reference] + subset[q.qid] for q in ds.queries}
    sf.write_text(json.dumps({"version": "rc2", "metric": "recall_subset", **with_ref}))
    assert score_files(ds, f, sf) == clean


def test_test_split_writes_official_submission_files(tmp_path, samples, embedded, capsys):
    from mmretrieve.cli import main

    make_cirr(tmp_path / "cirr", samples)
    out = tmp_path / "sub"
    assert main(["eval", "cirr", "--root", str(tmp_path / "cirr"), "--split", "test", "--out", str(out),
                 "--cache", str(tmp_path / "cache")]) == 0
    main_file = json.loads((out / "rankings" / "coarse" / "recall.json").read_text())
    subset = json.loads((out / "rankings" / "coarse" / "recall_subset.json").read_text())
    assert main_file["metric"] == "recall" and subset["metric"] == "recall_subset"
    assert len(main_file) == 2 + 4 and all(len(v) == 3 for k, v in subset.items() if k not in ("version", "metric"))
    ds = load_dataset("cirr", tmp_path / "cirr", "test")
    for q in ds.queries:
        assert q.reference not in main_file[q.qid] and set(subset[q.qid]) <= set(q.subset)


def test_cli_eval_json_nested_by_stage(tmp_path, samples, capsys):
    from mmretrieve.cli import main

    make_fashioniq(tmp_path / "fiq", samples)
    args = ["eval", "fashioniq", "--root", str(tmp_path / "fiq"), "--categories", "dress,toptee", "--cache", str(tmp_path / "c"),
            "--out", str(tmp_path / "o"), "--json"]
    assert main(args) == 0
    flat = json.loads(capsys.readouterr().out)
    assert "average/recall@10" in flat and "dress/recall@50" in flat
    assert main(args + ["--rerank", "emd:k=5"]) == 0
    nested = json.loads(capsys.readouterr().out)
    assert set(nested) == {"coarse", "emd"} and nested["coarse"] == pytest.approx(flat)


# ---- captions --------------------------------------------------------------------------------------------
def test_eval_captions_matches_reference(tmp_path, samples, embedded, capsys):
    from mmretrieve.cli import main
    from mmretrieve.eval.captions import evaluate_captions, load_captions

    rows = [{"path": s.path, "caption": s.caption} for s in samples]
    rows.append({"path": samples[0].path, "caption": "a second caption of the first image"})
    f = tmp_path / "caps.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    cs = load_captions(f)
    assert len(cs.images) == len(samples) and len(cs.captions) == len(samples) + 1
    res = evaluate_captions(cs, encoder=embedded, cache=tmp_path / "cache")
    # reference implementation
    I = embedded.encode_images([s.path for s in samples])
    T = embedded.encode_texts([r["caption"] for r in rows])
    owner = np.array(list(range(len(samples))) + [0])
    S = T @ I.T
    t2i = np.array([1 + (S[i] > S[i, owner[i]]).sum() for i in range(len(rows))])
    i2t = []
    for j in range(len(samples)):
        own = np.flatnonzero(owner == j)
        i2t.append(1 + (S[:, j] > S[own, j].max()).sum())
    i2t = np.array(i2t)
    for k in (1, 5, 10):
        assert res["metrics"][f"t2i/recall@{k}"] == pytest.approx(100 * np.mean(t2i <= k), abs=1e-6)
        assert res["metrics"][f"i2t/recall@{k}"] == pytest.approx(100 * np.mean(i2t <= k), abs=1e-6)
    assert res["metrics"]["t2i/recall@10"] > 50  # the embedded encoder does find most of these photos
    assert main(["eval", "captions", str(f), "--json", "--cache", str(tmp_path / "cache")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {f"{d}/recall@{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)}


def test_captions_karpathy_and_coco_formats(tmp_path, samples):
    import shutil

    from mmretrieve.eval.captions import load_captions

    img = tmp_path / "imgs"
    img.mkdir()
    for s in samples[:3]:
        shutil.copy(s.path, img / f"{s.id}.png")
    karpathy = {"images": [{"filename": f"{s.id}.png", "split": "test" if i < 2 else "train", "imgid": i,
                            "sentences": [{"raw": s.caption}, {"raw": "another"}]} for i, s in enumerate(samples[:3])]}
    (tmp_path / "k.json").write_text(json.dumps(karpathy))
    cs = load_captions(tmp_path / "k.json", images=img, split="test")
    assert len(cs.images) == 2 and len(cs.captions) == 4
    coco = {"images": [{"id": 7, "file_name": f"{samples[0].id}.png"}], "annotations": [{"image_id": 7, "caption": "x"}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    assert len(load_captions(tmp_path / "c.json", images=img).captions) == 1
    with pytest.raises(DatasetError, match="needs --images"):
        load_captions(tmp_path / "c.json")


def test_fiq_caption_styles():
    from mmretrieve.eval.benchmarks.fashioniq import fashioniq_texts

    assert fashioniq_texts("is red.", "has sleeves?", "pic2word") == ["has sleeves? and is red."]
    assert fashioniq_texts("is red.", "has sleeves?", "covr") == ["is red. and has sleeves?"]
    assert fashioniq_texts("is red.", "has sleeves?") == ["is red and has sleeves", "has sleeves and is red"]
    with pytest.raises(DatasetError):
        fashioniq_texts("a", "b", "other")
    assert FIQ  # fixture data is importable


# ---- a gallery restricted by a filter ----------------------------------------------------------------------
def test_a_filtered_gallery(tmp_path, samples, embedded, capsys):
    """A filter that keeps everything changes nothing; one that drops a target's image removes it from every
    ranking (the queries that ranked it above their target move up one), and its query is a counted miss."""
    from mmretrieve.cli import main

    make_cirr(tmp_path / "cirr", samples)
    ds = load_dataset("cirr", tmp_path / "cirr", "val")
    cache = tmp_path / "cache"
    base = evaluate(ds, encoder=embedded, cache=cache)
    everything = evaluate(ds, encoder=embedded, cache=cache, where="key is not null")
    assert everything.metrics == base.metrics and everything.rankings == base.rankings
    assert everything.dataset["queries_target_filtered"] == 0 and "where" not in base.config
    # leave out query 0's target, and the image ranked just above another query's target (which moves up one)
    q1, b1 = next((q, b) for q, b in zip(ds.queries[1:], base.per_query[1:])
                  if (b["ranks"]["coarse"] or 0) > 1 and q.target != ds.queries[0].target)
    above_q1 = base.rankings["coarse"][q1.qid][b1["ranks"]["coarse"] - 2]
    gone = {ds.queries[0].target, above_q1}
    where = "key not in (" + ", ".join(f"'{g}'" for g in sorted(gone)) + ")"
    res = evaluate(ds, encoder=embedded, cache=cache, where=where)
    misses = sum(q.target in gone for q in ds.queries)
    assert res.config["where"] == where and res.dataset["queries_target_filtered"] == misses >= 1
    assert res.dataset["queries_evaluated"] == base.dataset["queries_evaluated"]  # kept in the metric, as a miss
    for q, b, d in zip(ds.queries, base.per_query, res.per_query):
        want = [x for x in base.rankings["coarse"][q.qid] if x not in gone]
        assert res.rankings["coarse"][q.qid] == want[: len(res.rankings["coarse"][q.qid])]
        if q.target in gone:
            assert d["ranks"]["coarse"] is None and d["target_filtered"] is True
            continue
        r = b["ranks"]["coarse"]
        above = 0 if r is None else sum(g in base.rankings["coarse"][q.qid][: r - 1] for g in gone)
        assert d["ranks"]["coarse"] == (None if r is None else r - above) and "target_filtered" not in d
    assert res.per_query[ds.queries.index(q1)]["ranks"]["coarse"] < b1["ranks"]["coarse"]
    assert res.metrics["coarse"] == pytest.approx(M.cirr_metrics(res.rankings["coarse"], ds.queries))
    args = ["eval", "cirr", "--root", str(tmp_path / "cirr"), "--cache", str(cache), "--out", str(tmp_path / "o"), "--json"]
    capsys.readouterr()
    assert main([*args, "--where", where]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out) == pytest.approx(res.metrics["coarse"]) and f"{misses} quer(ies)" in out.err
    assert main([*args, "--where", "key = = 'x'"]) != 0

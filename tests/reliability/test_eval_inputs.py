"""Evaluation never scores zero silently: relative roots, unreadable gallery images, stale caches, the
other CIRR layouts, subset files that are not found, and test-split submissions checked without ground truth."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cir_fixtures import CIRR_QUERIES, make_circo, make_cirr

from mmretrieve.cli import main
from mmretrieve.eval import DatasetError, evaluate, load_dataset
from mmretrieve.eval.runner import encoder_key
from mmretrieve.eval.submission import SubmissionError, check_submission, score_files


@pytest.fixture(scope="module")
def cirr_template(tmp_path_factory, samples):
    """One CIRR tree per module (writing its PNGs is the slow part); tests copy it."""
    root = tmp_path_factory.mktemp("cirr-template") / "cirr"
    names = make_cirr(root, samples)
    return root, names


@pytest.fixture()
def cirr(tmp_path, cirr_template):
    root = tmp_path / "cirr"
    shutil.copytree(cirr_template[0], root)
    return root, cirr_template[1]


@pytest.mark.parametrize("bench", ["cirr", "circo"])
def test_a_relative_root_scores_like_an_absolute_one(tmp_path, samples, tiny_clip_dir, cirr_template, monkeypatch, capsys,
                                                     bench):
    if bench == "cirr":
        shutil.copytree(cirr_template[0], tmp_path / "DATA")
    else:
        make_circo(tmp_path / "DATA", samples)
    common = ["--cache", str(tmp_path / "cache"), "--json", "--encoder", f"open_clip:local-dir:{tiny_clip_dir}"]
    assert main(["eval", bench, "--root", str(tmp_path / "DATA"), "--out", str(tmp_path / "abs"), *common]) == 0
    absolute = json.loads(capsys.readouterr().out)
    monkeypatch.chdir(tmp_path)
    assert main(["eval", bench, "--root", "DATA", "--out", "rel", *common]) == 0
    relative = json.loads(capsys.readouterr().out)
    assert relative == absolute and max(relative.values()) > 0
    sub = json.loads((tmp_path / "rel" / "rankings" / "coarse" / ("recall.json" if bench == "cirr" else "circo.json")).read_text())
    assert all(len(v) > 0 for k, v in sub.items() if k not in ("version", "metric"))


def test_an_unreadable_gallery_image_fails_the_run_naming_it(tmp_path, cirr, tiny_clip_dir, capsys):
    root, names = cirr
    (root / "dev" / f"{names['coffee']}.png").write_bytes(b"not a png at all" * 20)
    args = ["eval", "cirr", "--root", str(root), "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "o"),
            "--encoder", f"open_clip:local-dir:{tiny_clip_dir}"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"cirr val: 1 gallery image(s) could not be read ({names['coffee']}: not an image" in err and "--allow-missing" in err
    assert main(args) == 1  # the cached gallery remembers what it could not read
    capsys.readouterr()
    assert main([*args, "--allow-missing", "--fusion", "sum,intersection", "--json"]) == 0  # counted once, not per fusion
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["dataset"]["dropped_queries"] == 2 and report["dataset"]["queries_evaluated"] == len(CIRR_QUERIES) - 2
    ds = load_dataset("cirr", root, "val", allow_missing=True)
    for _ in range(2):  # each evaluation of the split drops the same queries, counted once
        res = evaluate(ds, encoder=f"open_clip:local-dir:{tiny_clip_dir}", cache=tmp_path / "cache")
        assert ds.dropped_queries == 2 and len(res.per_query) == len(CIRR_QUERIES) - 2


def test_every_image_missing_is_an_error_even_with_allow_missing(cirr):
    shutil.rmtree(cirr[0] / "dev")
    for allow in (False, True):
        with pytest.raises(DatasetError, match="none of the .* CIRR val images was found .*expected one of these layouts"):
            load_dataset("cirr", cirr[0], "val", allow_missing=allow)


def test_gallery_images_replaced_in_place_are_encoded_again(tmp_path, cirr, tiny_clip):
    root, names = cirr
    ds = load_dataset("cirr", root, "val")
    cache = tmp_path / "cache"
    before = evaluate(ds, encoder=tiny_clip, cache=cache).rankings["coarse"]
    dev = root / "dev"
    shutil.copyfile(dev / f"{names['gravel']}.png", dev / f"{names['coffee']}.png")  # another picture, same path
    stale = evaluate(ds, encoder=tiny_clip, cache=cache).rankings["coarse"]
    fresh = evaluate(ds, encoder=tiny_clip, cache=tmp_path / "fresh-cache").rankings["coarse"]
    assert stale == fresh and stale != before


def test_the_feature_cache_follows_the_encoder_weights_and_precision(tmp_path, tiny_clip_dir):
    from mmretrieve import create_encoder

    d = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, d)
    enc = create_encoder(f"open_clip:local-dir:{d}", precision="fp32", cache=False)
    k1 = encoder_key(enc)
    weights = d / "open_clip_model.safetensors"
    weights.write_bytes(weights.read_bytes())  # rewritten in place (e.g. another checkpoint copied over it)
    assert encoder_key(enc) != k1 and k1["precision"] == "fp32"


def _split_into(root: Path, ann: Path, img: Path) -> None:
    """Move a CIRR fixture's annotations to ``ann`` and its image folders to ``img``."""
    for sub in ("captions", "image_splits"):
        ann.mkdir(parents=True, exist_ok=True)
        shutil.move(str(root / sub), str(ann / sub))
    for sub in ("dev", "test1"):
        img.mkdir(parents=True, exist_ok=True)
        shutil.move(str(root / sub), str(img / sub))


@pytest.mark.parametrize("layout", ["searle", "img_raw", "cirr_img_raw"])
def test_searle_and_cirr_repository_layouts_are_accepted(cirr, layout):
    root = cirr[0]
    ann, img = {"searle": (root / "cirr", root), "img_raw": (root, root / "img_raw"),
                "cirr_img_raw": (root / "cirr", root / "cirr" / "img_raw")}[layout]
    _split_into(root, ann, img)
    ds = load_dataset("cirr", root, "val")
    assert len(ds.queries) == len(CIRR_QUERIES) and not ds.missing_images
    assert all(Path(p).is_file() and Path(p).is_relative_to(img) for p in ds.galleries[None].values())


def test_an_unknown_cirr_layout_names_the_expected_ones(tmp_path):
    (tmp_path / "x" / "annotations").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"no CIRR annotations for split 'dev'; expected one of these layouts: "
                                           r"ROOT/captions/cap.rc2.dev.json .*img_raw.*SEARLE's: ROOT/cirr/captions"):
        load_dataset("cirr", tmp_path / "x", "dev")


def _perfect_files(ds, out: Path, stem: str) -> Path:
    """Recall and recall_subset files that rank each query's target first, named like CIRR's demo files."""
    rec, sub = {"version": "rc2", "metric": "recall"}, {"version": "rc2", "metric": "recall_subset"}
    ids = sorted(ds.galleries[None])
    for q in ds.queries:
        rest = [i for i in ids if i not in (q.target, q.reference)]
        rec[q.qid] = [q.target] + rest[:49] if q.target != q.reference else rest[:50]
        members = [m for m in q.subset if m != q.reference]
        sub[q.qid] = ([q.target] + [m for m in members if m != q.target])[:3] if q.target != q.reference else members[:3]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}_recall.json").write_text(json.dumps(rec))
    (out / f"{stem}_recall_subset.json").write_text(json.dumps(sub))
    return out / f"{stem}_recall.json"


def test_score_finds_the_subset_file_beside_the_recall_file_or_says_it_did_not(tmp_path, cirr_template, caplog):
    ds = load_dataset("cirr", cirr_template[0], "val", check_images=False)
    recall = _perfect_files(ds, tmp_path / "runs", "val_pred_ranks")
    m = score_files(ds, recall)
    assert m["recall@1"] == pytest.approx(100 * 7 / 8) and m["recall_subset@1"] == pytest.approx(100 * 7 / 8)
    (tmp_path / "runs" / "val_pred_ranks_recall_subset.json").rename(tmp_path / "runs" / "subset_val.json")
    assert "recall_subset@1" in score_files(ds, recall)  # subset_*.json is found too
    (tmp_path / "runs" / "subset_val.json").unlink()
    m = score_files(ds, recall)
    assert "recall_subset@1" not in m and "subset metrics not computed" in caplog.text


def _official_like(n_queries: int, per: int, metric: str | None, make_id, first: int = 12063) -> dict:
    data = {"version": "rc2", "metric": metric} if metric else {}
    for q in range(n_queries):
        data[str(first + q)] = [make_id(q, j) for j in range(per)]
    return data


def test_eval_check_validates_test_submissions_without_ground_truth(tmp_path, samples, capsys):
    out = tmp_path / "sub"
    out.mkdir()
    cirr_id = lambda q, j: f"test1-{(q * 7 + j) % 1000}-{j % 4}-img{j % 2}"  # noqa: E731
    (out / "test1_pred_ranks_recall.json").write_text(json.dumps(_official_like(4148, 50, "recall", cirr_id)))
    (out / "test1_pred_ranks_recall_subset.json").write_text(json.dumps(_official_like(4148, 3, "recall_subset", cirr_id)))
    reports = check_submission("cirr", out / "test1_pred_ranks_recall.json")
    assert [(r["metric"], r["queries"]) for r in reports] == [("recall", 4148), ("recall_subset", 4148)]
    assert main(["eval", "check", "cirr", "--rankings", str(out / "test1_pred_ranks_recall.json")]) == 0
    assert capsys.readouterr().out.count("ok: ") == 2
    circo = _official_like(800, 50, None, lambda q, j: 1000 + q + j, first=0)
    (out / "circo.json").write_text(json.dumps(circo))
    assert check_submission("circo", out / "circo.json")[0]["queries"] == 800

    def refused(name, data, match, dataset="cirr", **kw):
        (out / name).write_text(json.dumps(data))
        with pytest.raises(SubmissionError, match=match):
            check_submission(dataset, out / name, **kw)

    good = _official_like(4148, 50, "recall", cirr_id)
    refused("a.json", {**good, "version": "rc1"}, '"version": "rc2"')
    refused("b.json", {**good, "12063": [x + ".png" for x in good["12063"]]}, r"query 12063: 'test1-.*\.png' is not a CIRR test1 image name")
    refused("c.json", {**good, "12064": good["12064"][:49]}, "query 12064: 49 ids, exactly 50 expected")
    refused("d.json", {**good, "12065": good["12065"][:49] + good["12065"][:1]}, "appears more than once")
    refused("e.json", {**good, "abc": good["12063"]}, "key 'abc' is not a query id")
    refused("f.json", {**good, "12066": ["dev-1-2-img0"] + good["12066"][1:]}, "'dev-1-2-img0' is not a CIRR test1 image name")
    refused("g.json", {k: v for k, v in good.items() if k != "12070"}, "4147 queries; the official test split has 4,148")
    refused("h.json", {**circo, "5": [str(x) for x in circo["5"]]}, r"query 5: '1005' is not an image id \(an integer\)", "circo")
    refused("i.json", [1, 2], "expected a JSON object", "circo")


def test_eval_check_against_the_split_annotations(tmp_path, cirr_template):
    root = cirr_template[0]
    test = load_dataset("cirr", root, "test", check_images=False)
    ids = sorted(test.galleries[None])
    rec = {"version": "rc2", "metric": "recall", **{q.qid: [i for i in ids if i != q.reference] for q in test.queries}}
    sub = {"version": "rc2", "metric": "recall_subset", **{q.qid: q.subset[1:4] for q in test.queries}}
    (tmp_path / "recall.json").write_text(json.dumps(rec))
    (tmp_path / "recall_subset.json").write_text(json.dumps(sub))
    reports = check_submission("cirr", tmp_path / "recall.json", root=root)
    assert [r["checked_against"] for r in reports] == ["the split's annotations"] * 2
    q0 = test.queries[0].qid
    outsider = next(i for i in ids if i not in test.queries[0].subset)
    (tmp_path / "recall_subset.json").write_text(json.dumps({**sub, q0: [outsider] + sub[q0][1:]}))
    with pytest.raises(SubmissionError, match=f"query {q0}: '{outsider}' is not in its image set"):
        check_submission("cirr", tmp_path / "recall.json", root=root)
    del rec[q0]
    (tmp_path / "recall.json").write_text(json.dumps(rec))
    with pytest.raises(SubmissionError, match=f"1 query id\\(s\\) of cirr test have no ranking, e.g. '{q0}'"):
        check_submission("cirr", tmp_path / "recall.json", root=root)

"""Browsing a collection over the API: facets (counts against a Python reference, the filter respected, a bad
filter a 400, cached per version) and the embeddings map (shape, computed once per version, on disk)."""

from __future__ import annotations

import base64
from collections import Counter

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'mmretrieve[serve]')")
pytest.importorskip("httpx", reason="FastAPI's test client needs httpx (the dev extra)")

from mmretrieve.index import embmap  # noqa: E402
from mmretrieve.serve import collection  # noqa: E402
from mmretrieve.store import IndexWriter, Item  # noqa: E402
from mmretrieve.store.filters import evaluate, parse, record_of  # noqa: E402

DIM, N = 16, 300
INFO = {"name": "test-vectors", "dim": DIM, "modalities": ["image"]}
LICENSES = ["cc0", "cc-by", "cc-by-sa", None]


def _meta(i: int) -> dict:
    d = {"year": 2000 + i % 12, "bucket": i, "score": i / 7, "shard": f"s{i % 5}", "flag": bool(i % 2)}
    if LICENSES[i % 4]:
        d["license"] = LICENSES[i % 4]
    if i % 10 == 0:
        d["year"] = str(d["year"])  # a string among numbers: a mixed field
    d["exif"] = {"iso": 100}  # objects are not facets
    return d


def _add(path, start: int, n: int, create: bool) -> None:
    rng = np.random.default_rng(start)
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    x[:, 0] += np.arange(n) % 3 * 4  # three clusters along one axis
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    with IndexWriter(path, encoder_info=INFO, create=create, auto_compact=False) as w:
        w.add([Item(id=-1, key=f"k{i}", uri=f"vec://{i}", caption=f"thing {i}", extra=_meta(i))
               for i in range(start, start + n)], x)


@pytest.fixture()
def served(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from mmretrieve.serve import ServeConfig, Service, create_app

    monkeypatch.setenv("MMRETRIEVE_CACHE", str(tmp_path / "cache"))
    home = tmp_path / "home"
    _add(home / "coll", 0, N, True)
    with IndexWriter(home / "coll", auto_compact=False) as w:
        w.remove(list(range(0, N, 9)))
    svc = Service(ServeConfig(indexes=["coll"], index_dir=str(home), reload_interval_s=0)).start()
    try:
        with TestClient(create_app(svc), base_url="http://127.0.0.1") as c:
            yield c, svc, home / "coll"
    finally:
        svc.close()


def _reference(svc, where: str | None) -> tuple[int, dict[str, Counter]]:
    idx = svc.manager.get("coll").index
    tree = parse(where) if where else None
    items = [it for it in idx.meta.iter_items() if tree is None or evaluate(tree, record_of(it))]
    out: dict[str, Counter] = {}
    for it in items:
        for k, v in (it.extra or {}).items():
            if v is not None and not isinstance(v, (dict, list)):
                out.setdefault(k, Counter())[(type(v).__name__ if not isinstance(v, (int, float)) or isinstance(v, bool)
                                              else "num", v)] += 1
    return len(items), out


def _key(v):
    return (type(v).__name__ if not isinstance(v, (int, float)) or isinstance(v, bool) else "num", v)


@pytest.mark.parametrize("where", [None, "license in ('cc0', 'cc-by') and year >= 2004", "flag = true"])
def test_facets_count_like_the_python_reference(served, where):
    c, svc, _ = served
    r = c.get("/api/v1/indexes/coll/facets", params={"filter": where} if where else {})
    assert r.status_code == 200, r.text
    body = r.json()
    n, ref = _reference(svc, where)
    assert body["matching"] == n and n > 0
    fields = {f["name"]: f for f in body["fields"] if not f.get("builtin")}
    assert "exif" not in fields and set(fields) == set(ref)
    for name, f in fields.items():
        assert f["count"] == sum(ref[name].values()), name
        assert f["distinct"] == len(ref[name]), name
        got = Counter({_key(v["value"]): v["count"] for v in f["values"]})
        if f["truncated"]:  # bucket: one value per item, the top values listed
            assert len(f["values"]) == collection.TOP_VALUES and all(ref[name][k] == m for k, m in got.items())
        else:
            assert got == ref[name], name
    assert fields["year"]["type"] == ("mixed" if len({k for k, _ in ref["year"]}) > 1 else "number")
    assert fields["flag"]["type"] == "bool"
    nums = [v for k, v in ref["score"] if k == "num"]
    assert fields["score"]["min"] == pytest.approx(min(nums)) and fields["score"]["max"] == pytest.approx(max(nums))
    assert sum(fields["score"]["histogram"]["counts"]) == len(nums)
    kind = next(f for f in body["fields"] if f["name"] == "kind")
    assert kind["builtin"] and sum(v["count"] for v in kind["values"]) == n
    if where and "license" in where:
        assert {v["value"] for v in fields["license"]["values"]} == {"cc0", "cc-by"}


def test_facets_bad_filter_is_a_400_and_answers_are_cached_per_version(served, monkeypatch):
    c, svc, path = served
    r = c.get("/api/v1/indexes/coll/facets", params={"filter": "license in ('cc0'"})
    assert r.status_code == 400 and "position" in r.json()["error"]["message"], r.text
    assert c.get("/api/v1/indexes/nope/facets").status_code == 404
    calls = []
    real = collection.compute_facets
    monkeypatch.setattr(collection, "compute_facets", lambda *a: calls.append(a) or real(*a))
    first = c.get("/api/v1/indexes/coll/facets", params={"filter": "year > 2003"}).json()
    again = c.get("/api/v1/indexes/coll/facets", params={"filter": "year  >  2003"}).json()  # same canonical form
    assert first == again and len(calls) == 1
    _add(path, N, 30, False)
    svc.manager.refresh()
    newer = c.get("/api/v1/indexes/coll/facets", params={"filter": "year > 2003"}).json()
    assert len(calls) == 2 and newer["version"] != first["version"] and newer["matching"] > first["matching"]


def _decode(body):
    ids = np.frombuffer(base64.b64decode(body["ids"]), "<i4" if body["ids_dtype"] == "int32" else "<f8")
    xy = np.frombuffer(base64.b64decode(body["xy"]), "<f2").reshape(-1, 2)
    return ids, xy


def test_map_shape_cache_and_recompute_on_a_new_version(served, monkeypatch):
    c, svc, path = served
    calls = []
    real = embmap.project
    monkeypatch.setattr(embmap, "project", lambda *a: calls.append(a) or real(*a))
    r = c.get("/api/v1/indexes/coll/map")
    assert r.status_code == 200, r.text
    body = r.json()
    ids, xy = _decode(body)
    live = sorted(svc.manager.get("coll").index.meta.all_ids())
    assert body["method"] == "pca" and body["count"] == len(live) and ids.tolist() == live
    assert xy.shape == (len(live), 2) and np.isfinite(xy).all() and np.abs(xy).max() <= 1.001
    assert np.ptp(xy[:, 0]) > 0.5  # the clusters spread out on the first axis
    assert len(calls) == 1
    assert c.get("/api/v1/indexes/coll/map").json() == body and len(calls) == 1  # memory
    embmap.clear_cache()
    assert c.get("/api/v1/indexes/coll/map").json() == body and len(calls) == 1  # disk
    assert collection.map_path(svc.manager.get("coll").index, "pca").is_file()
    _add(path, N, 30, False)
    svc.manager.refresh()
    newer = c.get("/api/v1/indexes/coll/map").json()
    assert len(calls) == 2 and newer["count"] == len(live) + 30 and newer["version"] != body["version"]
    assert c.get("/api/v1/indexes/coll/map", params={"method": "magic"}).status_code == 400


def test_map_within_filters_search_facets_and_export_by_the_cached_map(served):
    c, svc, _ = served
    ids, xy = _decode(c.get("/api/v1/indexes/coll/map").json())
    poly = [(-1, -1), (0.2, -1), (0.2, 1), (-0.3, 0), (-1, 1)]  # concave: a notch at (-0.3, 0)
    where = "map within (" + ", ".join(f"{x} {y}" for x, y in poly) + ")"
    inside = set(ids[embmap_points(xy, poly)].tolist())
    assert 0 < len(inside) < len(ids)
    f = c.get("/api/v1/indexes/coll/facets", params={"filter": where}).json()
    assert f["matching"] == len(inside)
    r = c.post("/api/v1/indexes/coll/search", json={"filter": where + " and year >= 2005", "k": 1000})
    assert r.status_code == 200, r.text
    got = {h["id"] for h in r.json()["hits"]}
    idx = svc.manager.get("coll").index
    year = {it.id: it.extra.get("year") for it in idx.meta.iter_items()}
    assert got == {i for i in inside if isinstance(year[i], int) and year[i] >= 2005}
    out = c.get("/api/v1/indexes/coll/export", params={"filter": "not " + where, "format": "jsonl"})
    assert out.status_code == 200 and int(out.headers["x-total-count"]) == len(ids) - len(inside)
    for bad, word in [("map within (0 0, 1 1)", "at least 3"), ("map within (0 0, 1 x, 1 1)", "'x'"),
                      ("map within (" + ", ".join(["0 0"] * 65) + ")", "more than 64")]:
        r = c.get("/api/v1/indexes/coll/facets", params={"filter": bad})
        assert r.status_code == 400 and word in r.json()["error"]["message"], r.text


def embmap_points(xy, poly):
    from mmretrieve.store.filters import points_in_polygon

    return points_in_polygon(xy.astype(np.float64), poly)


def test_map_methods_not_installed_are_a_400_naming_the_package(served, monkeypatch):
    import importlib.util

    c, _, _ = served
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in ("umap", "sklearn") else real(n, *a))
    for method, package in [("umap", "umap-learn"), ("tsne", "scikit-learn")]:
        r = c.get("/api/v1/indexes/coll/map", params={"method": method})
        assert r.status_code == 400 and package in r.json()["error"]["message"], r.text
        r = c.get("/api/v1/indexes/coll/facets", params={"filter": f"map.{method} within (0 0, 1 0, 0 1)"})
        assert r.status_code == 400 and package in r.json()["error"]["message"], r.text


def test_nonlinear_maps_are_sampled_with_a_log_line(served, monkeypatch, caplog):
    _, svc, _ = served
    monkeypatch.setattr(embmap, "MAX_NONLINEAR_POINTS", 50)
    idx = svc.manager.get("coll").index
    with caplog.at_level("INFO", logger="mmretrieve.index.embmap"):
        ids = embmap.live_ids(idx, "tsne")
    assert len(ids) == 50 and "even sample of 50" in caplog.text
    assert len(embmap.live_ids(idx, "pca")) == len(idx.select(None).ids)


def test_a_pca_map_holds_every_item_and_the_page_gets_a_sample(served, monkeypatch):
    """Past MAX_MAP_POINTS the page is sent an even sample, but `map within` selects among every item (the
    axes fitted on a sample of MAX_FIT_POINTS, every item projected)."""
    c, svc, _ = served
    idx = svc.manager.get("coll").index
    everyone = idx.select(None).ids
    embmap.clear_cache()
    full_ids, full_xy = embmap.get_map(idx, "pca")
    monkeypatch.setattr(embmap, "MAX_MAP_POINTS", 7)
    monkeypatch.setattr(embmap, "MAX_FIT_POINTS", 20)
    embmap.clear_cache()
    monkeypatch.setattr(embmap, "map_path", lambda index, method, real=embmap.map_path: real(index, method).with_name("fit20.npz"))
    ids, xy = embmap.get_map(idx, "pca")
    assert ids.tolist() == everyone.tolist() and len(xy) == len(everyone)  # every item is on the map
    r = c.get("/api/v1/indexes/coll/map").json()
    assert r["count"] == 7 and r["total"] == len(everyone)
    whole = "map within (-1.1 -1.1, 1.1 -1.1, 1.1 1.1, -1.1 1.1)"  # the whole square: every item, not the 7 drawn
    assert idx.select(whole).count == len(everyone)
    assert full_ids.tolist() == ids.tolist()  # fitted on 20 rows or on all, the map holds the same items

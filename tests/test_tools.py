"""Collection tools: "more like this" leaves the item out, near-duplicate groups (planted groups recovered
exactly), one hit per group at search time, batch queries equal to one-by-one searches, exports."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmretrieve import open_index
from mmretrieve.store import IndexWriter, Item

DIM, N = 32, 600
INFO = {"name": "test-vectors", "dim": DIM, "modalities": ["image"]}


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def planted():
    """N random vectors (pairwise cosine ~ 0 +- 0.2) and 40 planted groups of 2..4 near-copies (cosine > 0.99)."""
    rng = np.random.default_rng(11)
    x = _unit(rng.standard_normal((N, DIM)))
    groups, free = [], list(rng.permutation(N))
    for g in range(40):
        size = 2 + g % 3
        members = sorted(int(free.pop()) for _ in range(size))
        for m in members[1:]:
            x[m] = _unit(x[members[0]] + 0.03 * rng.standard_normal(DIM))
        groups.append(members)
    return x, sorted(groups)


@pytest.fixture(scope="module")
def index_path(tmp_path_factory, planted):
    x, _ = planted
    path = tmp_path_factory.mktemp("tools") / "planted"
    half = N // 2
    for b in range(2):  # two segments
        with IndexWriter(path, encoder_info=INFO, create=b == 0, auto_compact=False) as w:
            rows = range(b * half, (b + 1) * half)
            w.add([Item(id=-1, key=f"k{i}", uri=f"vec://{i}", caption=f"thing {i}", extra={"n": i, "odd": i % 2})
                   for i in rows], x[b * half:(b + 1) * half])
    return path


@pytest.fixture()
def idx(index_path):
    with open_index(index_path, search_device="cpu") as i:
        yield i


# ---- more like this ----------------------------------------------------------------------------------
def test_more_like_this_leaves_the_item_itself_out(idx, index_path, capsys):
    from mmretrieve.cli import main

    res = idx.search(item="k5", k=5)
    assert len(res.hits) == 5 and "k5" not in res.keys
    assert idx.search(item="k5", k=5, exclude_reference=False).keys[0] == "k5"
    assert idx.search(item=5, k=3).keys == res.keys[:3]
    capsys.readouterr()
    base = ["search", str(index_path), "--item", "k7", "-k", "3", "--json", "--search-device", "cpu"]
    assert main(base) == 0
    assert "k7" not in [h["key"] for h in json.loads(capsys.readouterr().out)["hits"]]
    assert main([*base, "--keep-reference"]) == 0
    assert json.loads(capsys.readouterr().out)["hits"][0]["key"] == "k7"


# ---- near-duplicates ---------------------------------------------------------------------------------
def test_near_duplicates_recover_the_planted_groups_exactly(idx, planted, index_path, capsys):
    from mmretrieve.cli import main

    _, truth = planted
    groups = idx.near_duplicates(0.95, 10)
    assert sorted(g.ids for g in groups) == truth
    assert all(g.representative == min(g.ids) and g.keys == [f"k{i}" for i in g.ids] for g in groups)
    assert all(g.min_score >= 0.95 for g in groups)
    assert idx.near_duplicates(0.95, 10) is groups  # cached per snapshot
    capsys.readouterr()
    assert main(["index", "dupes", str(index_path), "--threshold", "0.95", "--json", "--search-device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert sorted(g["ids"] for g in out["groups"]) == truth
    assert main(["index", "dupes", str(index_path), "--search-device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("40 group(s)")


def test_exclude_dupes_keeps_the_best_ranked_of_each_group(idx, planted, index_path, capsys):
    from mmretrieve.cli import main

    x, truth = planted
    big = next(g for g in truth if len(g) == 4)
    q = x[big[1]]
    plain = idx.search(vector=q, k=8)
    assert set(big) <= set(plain.ids)  # the whole group ranks first
    res = idx.search(vector=q, k=8, exclude_dupes=True)
    assert len(res.hits) == 8 and [h.rank for h in res.hits] == list(range(1, 9))
    assert len(set(big) & set(res.ids)) == 1 and res.ids[0] == plain.ids[0]
    rep = {i: min(g) for g in truth for i in g}
    assert len({rep.get(i, i) for i in res.ids}) == 8
    capsys.readouterr()
    assert main(["search", str(index_path), "--item", f"k{big[0]}", "-k", "6", "--exclude-dupes", "--json",
                 "--search-device", "cpu"]) == 0
    keys = [h["key"] for h in json.loads(capsys.readouterr().out)["hits"]]
    copies = {f"k{i}" for i in big[1:]}
    assert len(keys) == 6 and f"k{big[0]}" not in keys  # itself left out ...
    assert keys[0] in copies and len(copies & set(keys)) == 1  # ... and of its copies only the best-ranked kept


@pytest.fixture(scope="module")
def client(index_path):
    pytest.importorskip("httpx", reason="FastAPI's test client needs httpx (the dev extra)")
    from fastapi.testclient import TestClient

    from mmretrieve.serve.app import create_app
    from mmretrieve.serve.config import ServeConfig
    from mmretrieve.serve.service import Service

    svc = Service(ServeConfig(indexes=["planted"], index_dir=str(index_path.parent), reload_interval_s=0)).start()
    try:
        with TestClient(create_app(svc), base_url="http://127.0.0.1") as c:
            yield c
    finally:
        svc.close()


def test_api_exclude_dupes(client, planted, idx):
    x, truth = planted
    big = next(g for g in truth if len(g) == 4)
    url = "/api/v1/indexes/planted/search"
    r = client.post(url, json={"item": big[0], "k": 5, "exclude_dupes": True})
    assert r.status_code == 200, r.text
    ids = [h["id"] for h in r.json()["hits"]]
    assert ids == idx.search(item=big[0], k=5, exclude_dupes=True).ids and len(set(big) & set(ids)) == 1
    assert r.json()["query"]["exclude_dupes"] is True


# ---- batch queries -------------------------------------------------------------------------------------
def test_batch_queries_equal_one_by_one_searches(idx, planted, index_path, tmp_path, capsys):
    from mmretrieve.cli import main

    x, _ = planted
    queries = [{"item": "k3"}, {"vector": x[10].tolist()}, {"item": 77}, {"item": "k4", "keep_reference": True}]
    got = idx.search_batch(queries, k=5)
    want = [idx.search(item="k3", k=5), idx.search(vector=x[10], k=5), idx.search(item=77, k=5),
            idx.search(item="k4", k=5, exclude_reference=False)]
    assert [r.ids for r in got] == [r.ids for r in want]
    assert all(np.allclose(a.scores, b.scores, atol=1e-5) for a, b in zip(got, want))
    filt = idx.search_batch(queries[:2], k=5, where="odd = 1")
    assert [r.ids for r in filt] == [idx.search(item="k3", k=5, where="odd = 1").ids,
                                     idx.search(vector=x[10], k=5, where="odd = 1").ids]
    f = tmp_path / "q.jsonl"
    f.write_text("".join(json.dumps(q) + "\n" for q in queries))
    capsys.readouterr()
    assert main(["search", str(index_path), "--queries", str(f), "-k", "5", "--search-device", "cpu"]) == 0
    lines = [json.loads(s) for s in capsys.readouterr().out.splitlines()]
    assert [[h["id"] for h in r["hits"]] for r in lines] == [r.ids for r in want]
    f.write_text('{"item": 1, "text": "x"}\n')
    assert main(["search", str(index_path), "--queries", str(f), "--search-device", "cpu"]) != 0


def test_api_batch_equals_one_by_one(client, planted, idx):
    x, _ = planted
    url = "/api/v1/indexes/planted/search/batch"
    body = {"queries": [{"item": 3}, {"item_key": "k9"}, {"vector": x[12].tolist()}], "k": 4, "filter": "odd = 0"}
    r = client.post(url, json=body)
    assert r.status_code == 200, r.text
    got = [[h["id"] for h in res["hits"]] for res in r.json()["results"]]
    assert got == [idx.search(item=3, k=4, where="odd = 0").ids, idx.search(item="k9", k=4, where="odd = 0").ids,
                   idx.search(vector=x[12], k=4, where="odd = 0").ids]
    assert "vec://" not in r.text  # no stored paths
    assert client.post(url, json={"queries": [{"item": 1}] * 1000}).status_code == 400
    assert client.post(url, json={"queries": [{"item": 1}], "k": 10**6}).status_code == 400
    assert client.post(url, json={"queries": [{"item": 1}], "filter": "odd = = 1"}).status_code == 400

"""Browsing by a filter alone (``Index.browse``): the matching items in an order, paged, with no query, in
Python, the API and on the command line; equal to ``select(where)`` in id order."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmretrieve import open_index
from mmretrieve.errors import UsageError
from mmretrieve.store import IndexWriter, Item

DIM, N = 8, 240
INFO = {"name": "test-vectors", "dim": DIM, "modalities": ["image"]}


def _meta(i: int) -> dict:
    d: dict = {"license": ["cc0", "cc-by", "x"][i % 3]}
    if i % 5:
        d["year"] = 2000 + (i * 7) % 23 if i % 17 else str(2000 + i % 23)  # some strings: they come last
    return d


@pytest.fixture(scope="module")
def browse_index(tmp_path_factory):
    path = tmp_path_factory.mktemp("browse") / "b"
    rng = np.random.default_rng(3)
    x = rng.standard_normal((N, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for b in range(2):
        rows = range(b * N // 2, (b + 1) * N // 2)
        with IndexWriter(path, encoder_info=INFO, create=b == 0, auto_compact=False) as w:
            w.add([Item(id=-1, key=f"k{i}", uri=f"vec://{i}", caption=f"thing {i}", extra=_meta(i)) for i in rows],
                  x[list(rows)])
    dead = [int(i) for i in rng.choice(N, 40, replace=False)]
    with IndexWriter(path, auto_compact=False) as w:
        w.remove(dead)
    return path, set(dead)


def _year_order(live: list[int], desc: bool) -> list[int]:
    nums = [i for i in live if isinstance(_meta(i).get("year"), int)]
    rest = sorted(i for i in live if i not in set(nums))
    nums.sort(key=lambda i: (-_meta(i)["year"] if desc else _meta(i)["year"], i))
    return nums + rest


def test_browse_equals_select_in_order_and_pages(browse_index):
    path, dead = browse_index
    idx = open_index(path, search_device="cpu")
    where = "license = 'cc0'"
    want = idx.select(where).ids.tolist()
    assert want == sorted(i for i in range(N) if i % 3 == 0 and i not in dead)
    res = idx.browse(where, k=len(want) + 5)
    assert [h.id for h in res] == want and [h.rank for h in res] == list(range(1, len(want) + 1))
    assert all(h.score == 0 and h.metadata["license"] == "cc0" for h in res)
    assert res.query["kind"] == "browse" and res.query["matching"] == len(want)
    pages = [idx.browse(where, k=7, offset=o) for o in range(0, len(want) + 7, 7)]
    assert [h.id for p in pages for h in p] == want
    assert [h.rank for p in pages for h in p] == list(range(1, len(want) + 1))
    assert [h.id for h in idx.browse(where, k=5, order="id desc")] == want[::-1][:5]
    live = sorted(set(range(N)) - dead)
    assert [h.id for h in idx.browse(k=N)] == live  # no filter: every live item
    assert [h.id for h in idx.browse(k=N, order="year")] == _year_order(live, False)
    assert [h.id for h in idx.browse(k=N, order="`year` DESC")] == _year_order(live, True)
    added = [h.id for h in idx.browse(k=N, order="added desc")]
    assert sorted(added) == live and added[0] >= N // 2  # the second write's items are the newest
    for bad in ("year sideways", "", "and"):
        with pytest.raises(UsageError):
            idx.browse(where, order=bad)
    with pytest.raises(UsageError):
        idx.browse(where, offset=-1)


def test_cli_browses_with_where_alone(browse_index, capsys):
    from mmretrieve.cli import main

    path, dead = browse_index
    want = open_index(path, search_device="cpu").select("license = 'cc-by'").ids.tolist()
    capsys.readouterr()
    args = ["search", str(path), "--where", "license = 'cc-by'", "-k", "6", "--json"]
    assert main(args) == 0
    assert [h["id"] for h in json.loads(capsys.readouterr().out)["hits"]] == want[:6]
    assert main([*args, "--offset", "6"]) == 0
    assert [h["id"] for h in json.loads(capsys.readouterr().out)["hits"]] == want[6:12]
    assert main(["search", str(path), "--where", "license = 'cc-by'", "--order", "year desc", "-k", "3"]) == 0
    assert capsys.readouterr().out.splitlines()[0].split()[:2] == ["rank", "score"]
    assert main(["search", str(path), "--where", "license = 'cc-by'", "--rerank", "emd"]) != 0
    assert "browsing" in capsys.readouterr().err


def test_api_filter_alone_browses(browse_index):
    pytest.importorskip("httpx", reason="FastAPI's test client needs httpx (the dev extra)")
    from fastapi.testclient import TestClient

    from mmretrieve.serve.app import create_app
    from mmretrieve.serve.config import ServeConfig
    from mmretrieve.serve.service import Service

    path, dead = browse_index
    want = open_index(path, search_device="cpu").select("license != 'x'").ids.tolist()
    svc = Service(ServeConfig(indexes=[path.name], index_dir=str(path.parent), reload_interval_s=0)).start()
    try:
        with TestClient(create_app(svc), base_url="http://127.0.0.1") as c:
            url = f"/api/v1/indexes/{path.name}/search"
            got, offset = [], 0
            while offset is not None:
                r = c.post(url, json={"filter": "license != 'x'", "k": 50, "offset": offset})
                assert r.status_code == 200, r.text
                body = r.json()
                assert body["query"]["kind"] == "browse" and all(h["score"] == 0 for h in body["hits"])
                got += [h["id"] for h in body["hits"]]
                offset = body["next_offset"]
            assert got == want
            r = c.post(url, json={"filter": "license != 'x'", "k": 3, "order": "year desc"})
            years = [h["metadata"]["year"] for h in r.json()["hits"]]
            assert years == sorted(years, reverse=True) and r.json()["query"]["order"] == "year desc"
            assert c.post(url, json={"filter": "license != 'x'", "order": "year up"}).status_code == 400
            assert c.post(url, json={"filter": "license != 'x'", "rerank": ["emd"]}).status_code == 400
            assert c.post(url, json={"k": 3}).status_code == 400
    finally:
        svc.close()

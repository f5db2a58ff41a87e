"""Export (CSV, JSONL, webdataset tar, symlinks; Python, CLI and API) and the clip-retrieval compatible
endpoints (/knn-service, /indices-list, /metadata) with the request shapes of its client and front end."""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile

import numpy as np
import pytest

from mmretrieve import open_index
from mmretrieve.store import IndexWriter, Item

DIM = 8
INFO = {"name": "test-vectors", "dim": DIM, "modalities": ["image"]}
TOKEN = "export-test-token-0123456789abcdef"
HOSTILE = ["../x", "a\nb", "=cmd", "a/b/../../etc", "a.b.c", "a_b_c", "", "@SUM(1)"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    files = root / "files"
    files.mkdir()
    rng = np.random.default_rng(3)
    x = rng.standard_normal((20, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    items = []
    for i in range(20):
        key = HOSTILE[i] if i < len(HOSTILE) else f"k{i}"
        ext = "png" if i % 2 else "jpg"
        f = files / f"f{i}.{ext}"
        f.write_bytes(f"bytes of {i}".encode())
        caption = ["=HYPERLINK(\"x\")", "line1\nline2", "-2+3", "plain"][i % 4]
        items.append(Item(id=-1, key=key or f"blank{i}", uri=str(f), caption=caption,
                          extra={"n": i, "odd": i % 2, **({"tag": "=x"} if i % 3 == 0 else {})}))
    shard = root / "s.tar"
    with tarfile.open(shard, "w") as t:
        data = b"member bytes"
        info = tarfile.TarInfo("m0.jpg")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    items[19] = Item(id=-1, key="in-shard", uri=f"{shard}#m0.jpg", caption="shard", extra={"n": 19, "odd": 1})
    path = root / "idx"
    with IndexWriter(path, encoder_info=INFO, create=True) as w:
        w.add(items, x)
    (files / "f10.jpg").unlink()  # a missing file
    return path, x


@pytest.fixture()
def idx(built):
    with open_index(built[0], search_device="cpu") as i:
        yield i


def _csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_csv_and_jsonl_round_trip_and_cells_are_safe(idx, tmp_path):
    from mmretrieve.index.export import item_row

    want = [item_row(it) for it in idx.meta.iter_items()]
    assert idx.export(tmp_path / "a.jsonl").written == 20
    assert _jsonl(tmp_path / "a.jsonl") == json.loads(json.dumps(want))
    idx.export(tmp_path / "a.csv")
    rows = _csv(tmp_path / "a.csv")
    assert [r["id"] for r in rows] == [str(w["id"]) for w in want]
    assert set(rows[0]) >= {"id", "key", "uri", "kind", "caption", "n", "odd", "tag", "added_at"}  # the union of columns
    for r, w in zip(rows, want):
        for col, v in r.items():
            raw = w.get(col)
            if isinstance(raw, str) and raw[:1] in "=+-@":
                assert v == "'" + raw  # a formula is text to a spreadsheet
            elif isinstance(raw, str):
                assert v == raw  # newlines survive inside quotes
            elif raw is None:
                assert v == ""
    assert not any(n.startswith(".") for n in os.listdir(tmp_path))  # no temporary file left


def test_filtered_export_equals_select(idx, tmp_path):
    rep = idx.export(tmp_path / "f.jsonl", where="odd = 1 and n < 15")
    assert [r["id"] for r in _jsonl(tmp_path / "f.jsonl")] == idx.select("odd = 1 and n < 15").ids.tolist()
    assert rep.written == 7
    idx.export(tmp_path / "l.csv", where="odd = 0", limit=3)
    assert [int(r["id"]) for r in _csv(tmp_path / "l.csv")] == idx.select("odd = 0").ids.tolist()[:3]


def test_webdataset_tar_has_safe_members_and_reports_missing_files(idx, tmp_path):
    rep = idx.export(tmp_path / "out.tar")
    assert rep.format == "wds" and rep.written == 19
    assert [k for k, _ in rep.skipped] == [idx.get(10).key]
    with tarfile.open(tmp_path / "out.tar") as t:
        members = t.getmembers()
        names = [m.name for m in members]
        assert all(m.isfile() and m.mode == 0o644 for m in members)
        for n in names:
            assert "/" not in n and "\n" not in n and not n.startswith(".") and n.count(".") == 1, n
        stems = {}
        for n in names:
            stem, ext = n.split(".")
            stems.setdefault(stem, set()).add(ext)
        assert len(stems) == 19 and all(len(e) == 2 and "json" in e for e in stems.values())
        by_key = {}
        for stem, exts in stems.items():
            meta = json.loads(t.extractfile(f"{stem}.json").read())
            (ext,) = exts - {"json"}
            by_key[meta["key"]] = (t.extractfile(f"{stem}.{ext}").read(), ext)
    assert by_key["in-shard"] == (b"member bytes", "jpg")
    assert by_key["../x"] == (b"bytes of 0", "jpg") and by_key["a\nb"] == (b"bytes of 1", "png")


def test_links_are_named_safely_and_collisions_resolved(idx, tmp_path):
    out = tmp_path / "links"
    rep = idx.export(out, format="links")
    names = sorted(os.listdir(out))
    assert rep.written == len(names) == 18  # the missing file and the shard member are reported
    assert {k for k, _ in rep.skipped} == {idx.get(10).key, "in-shard"}
    for n in names:
        assert "/" not in n and "\n" not in n and ".." not in n and not n.startswith(".")
        assert (out / n).is_symlink() and (out / n).resolve().is_file()
    # "a.b.c" and "a_b_c" make the same name: one of them gets its id
    assert sum(n.startswith("a_b_c") for n in names) == 2
    with pytest.raises(Exception, match="not an empty folder"):
        idx.export(out, format="links")


def test_search_results_export_and_cli(idx, built, tmp_path, capsys):
    from mmretrieve.cli import main

    res = idx.search(vector=built[1][4], k=5)
    assert res.export(tmp_path / "r.jsonl") == 5
    got = _jsonl(tmp_path / "r.jsonl")
    assert [(g["id"], g["rank"]) for g in got] == [(h.id, h.rank) for h in res.hits]
    assert [g["score"] for g in got] == pytest.approx(res.scores)
    res.export(tmp_path / "r.csv")
    assert [r["key"] for r in _csv(tmp_path / "r.csv")] == ["'" + k if k[:1] in "=@" else k for k in res.keys]
    assert main(["search", str(built[0]), "--item", "k12", "-k", "3", "--export", str(tmp_path / "s.csv")]) == 0
    assert len(_csv(tmp_path / "s.csv")) == 3
    capsys.readouterr()
    assert main(["index", "export", str(built[0]), str(tmp_path / "c.jsonl"), "--where", "odd = 0", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["written"] == 10
    assert main(["index", "export", str(built[0]), str(tmp_path / "d.tar"), "--limit", "12"]) == 0
    assert "skipped 1" in capsys.readouterr().out


# ---- the API ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(built):
    pytest.importorskip("httpx", reason="FastAPI's test client needs httpx (the dev extra)")
    from fastapi.testclient import TestClient

    from mmretrieve.serve.app import create_app
    from mmretrieve.serve.config import ServeConfig
    from mmretrieve.serve.service import Service

    svc = Service(ServeConfig(indexes=["idx"], index_dir=str(built[0].parent), reload_interval_s=0, token=TOKEN,
                              max_k=50, max_offset=5)).start()
    try:
        with TestClient(create_app(svc), base_url="http://127.0.0.1") as c:
            yield c
    finally:
        svc.close()


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_api_export_streams_rows_without_server_paths(client, idx, built):
    url = "/api/v1/indexes/idx/export"
    assert client.get(url).status_code == 401
    r = client.get(url, params={"format": "jsonl", "filter": "odd = 1"}, headers=AUTH)
    assert r.status_code == 200 and r.headers["x-total-count"] == "10" and r.headers["x-row-limit"] == "55"
    rows = [json.loads(line) for line in r.text.splitlines()]
    assert [x["id"] for x in rows] == idx.select("odd = 1").ids.tolist()
    assert str(built[0].parent) not in r.text and "uri" not in rows[0]
    assert rows[0]["thumbnail"].endswith(f"/items/{rows[0]['id']}/thumbnail")
    r = client.get(url, params={"limit": 4}, headers=AUTH)
    assert r.headers["x-row-limit"] == "4"  # the page says "the first 4 of N" when fewer than X-Total-Count
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert len(rows) == 4 and rows[0]["key"] == "'../x"[1:] and rows[2]["key"] == "'=cmd"
    assert str(built[0].parent) not in r.text
    bad = client.get(url, params={"filter": "odd = = 1"}, headers=AUTH)
    assert bad.status_code == 400 and "position" in bad.json()["error"]["message"]
    assert client.get(url, params={"limit": 56}, headers=AUTH).status_code == 400  # over max_offset + max_k
    assert client.get(url, params={"format": "tar"}, headers=AUTH).status_code == 400


@pytest.fixture()
def photo_client(tmp_path):
    """A served index of real image files: PNG and JPEG files, a JPEG inside a shard, one file deleted and
    one rewritten after indexing (both must be left out of a tar), a hostile key."""
    pytest.importorskip("httpx", reason="FastAPI's test client needs httpx (the dev extra)")
    from fastapi.testclient import TestClient
    from PIL import Image

    from mmretrieve.serve.app import create_app
    from mmretrieve.serve.config import ServeConfig
    from mmretrieve.serve.service import Service

    files, rng, items = tmp_path / "files", np.random.default_rng(5), []
    files.mkdir()
    for i in range(6):
        f = files / f"p{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(rng.integers(0, 255, (40 + i, 30, 3), dtype=np.uint8)).save(f)
        items.append(Item(id=-1, key=["../x", "a\nb", "p2", "gone", "changed", "p5"][i], uri=str(f),
                          size=f.stat().st_size, mtime=f.stat().st_mtime, extra={"n": i}))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(buf, "JPEG")
    with tarfile.open(tmp_path / "s.tar", "w") as t:
        info = tarfile.TarInfo("m0.jpg")
        info.size = len(buf.getvalue())
        t.addfile(info, io.BytesIO(buf.getvalue()))
    items.append(Item(id=-1, key="in-shard", uri=f"{tmp_path / 's.tar'}#m0.jpg", extra={"n": 6}))
    x = rng.standard_normal((len(items), DIM)).astype(np.float32)
    with IndexWriter(tmp_path / "ix" / "photos", encoder_info=INFO, create=True) as w:
        w.add(items, x / np.linalg.norm(x, axis=1, keepdims=True))
    (files / "p3.png").unlink()
    os.utime(files / "p4.jpg", (1, 1))  # not the file indexed any more
    svc = Service(ServeConfig(indexes=["photos"], index_dir=str(tmp_path / "ix"), reload_interval_s=0, token=TOKEN,
                              max_k=50, max_offset=5)).start()
    try:
        with TestClient(create_app(svc), base_url="http://127.0.0.1") as c:
            yield c, files, tmp_path / "s.tar", buf.getvalue()
    finally:
        svc.close()


@pytest.mark.parametrize("in_memory", [True, False])
def test_api_export_streams_a_webdataset_tar_of_the_checked_files(photo_client, monkeypatch, in_memory):
    """format=wds: each readable item's bytes and its row (no server path), plain members; a deleted or
    rewritten file is left out; files past the in-memory size are sent from their descriptor a chunk at a
    time (both ways give the same tar)."""
    import functools

    from mmretrieve.media import readback
    from mmretrieve.serve import export_api

    c, files, shard, member = photo_client
    if not in_memory:
        monkeypatch.setattr(readback, "open_indexed", functools.partial(readback.open_indexed, in_memory_bytes=10))
        monkeypatch.setattr(export_api, "CHUNK", 7)
    url = "/api/v1/indexes/photos/export"
    assert c.get(url, params={"format": "wds"}).status_code == 401
    r = c.get(url, params={"format": "wds"}, headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-tar"
    assert r.headers["content-disposition"].endswith('filename="export.tar"') and len(r.content) % 512 == 0
    with tarfile.open(fileobj=io.BytesIO(r.content)) as t:
        members = t.getmembers()
        got = {m.name: t.extractfile(m).read() for m in members}
    assert all(m.isfile() and m.mode == 0o644 and m.uid == 0 and not m.uname for m in members)
    assert sorted(got) == sorted(["x.jpg", "x.json", "a_b.png", "a_b.json", "p2.jpg", "p2.json", "p5.png", "p5.json",
                                  "in-shard.jpg", "in-shard.json"])  # "gone" and "changed" are left out
    assert got["x.jpg"] == (files / "p0.jpg").read_bytes() and got["p5.png"] == (files / "p5.png").read_bytes()
    assert got["in-shard.jpg"] == member
    row = json.loads(got["a_b.json"])
    assert row["key"] == "a\nb" and row["n"] == 1 and "uri" not in row
    assert str(files) not in r.content.decode("latin-1") and str(shard) not in r.content.decode("latin-1")
    r = c.get(url, params={"format": "wds", "filter": "n >= 5"}, headers=AUTH)
    with tarfile.open(fileobj=io.BytesIO(r.content)) as t:
        assert sorted(t.getnames()) == ["in-shard.jpg", "in-shard.json", "p5.json", "p5.png"]


# ---- clip-retrieval compatible endpoints -------------------------------------------------------------------
def client_body(**query):
    """What clip_retrieval.clip_client.ClipClient.__search_knn_api__ posts (its defaults)."""
    body = {"text": None, "image": None, "image_url": None, "embedding_input": None, "deduplicate": True,
            "use_safety_model": True, "use_violence_detector": True, "indice_name": "idx", "use_mclip": False,
            "aesthetic_score": 9, "aesthetic_weight": 0.5, "modality": "image", "num_images": 40,
            "num_result_ids": 40}
    return {**body, **query}


def front_body(**query):
    """What the front end's ClipService.callClipService posts (clip-front.js defaults)."""
    body = {"text": None, "image": None, "image_url": None, "embedding_input": None, "modality": "image",
            "num_images": 40, "indice_name": "idx", "num_result_ids": 3000, "use_mclip": False, "deduplicate": True,
            "use_safety_model": True, "use_violence_detector": True, "aesthetic_score": "", "aesthetic_weight": "0.5"}
    return {**body, **query}


def test_knn_service_answers_in_clip_back_shape(client, idx, built):
    q = built[1][7].tolist()
    assert client.post("/knn-service", json=client_body(embedding_input=q)).status_code == 401
    r = client.post("/knn-service", json=client_body(embedding_input=q, num_images=3, num_result_ids=6,
                                                    deduplicate=False), headers=AUTH)
    assert r.status_code == 200, r.text
    res = r.json()
    want = idx.search(vector=built[1][7], k=6)
    assert [x["id"] for x in res] == want.ids and [x["similarity"] for x in res] == pytest.approx(want.scores)
    for x in res[:3]:  # what ClipClient documents and the front end reads: id, similarity, url, caption
        assert isinstance(x["id"], int) and isinstance(x["similarity"], float) and isinstance(x["url"], str)
        assert "caption" in x and "image_path" not in x
    assert all(set(x) == {"id", "similarity"} for x in res[3:])
    assert set(r.headers["x-clip-compat-ignored"].split(",")) == {"use_safety_model", "use_violence_detector",
                                                                 "aesthetic_score", "aesthetic_weight"}
    assert str(built[0].parent) not in r.text
    front = client.post("/knn-service", content=json.dumps(front_body(embedding_input=q)), headers=AUTH)
    assert front.status_code == 200 and len(front.json()) == 20  # num_result_ids clamped to the index's 20 items


def test_knn_service_refusals(client, built):
    ssrf = client.post("/knn-service", json=front_body(image_url="http://169.254.169.254/latest"), headers=AUTH)
    assert ssrf.status_code == 400 and "SSRF" in ssrf.json()["error"]["message"]
    text_modality = client.post("/knn-service", json=client_body(embedding_input=[0.1] * DIM, modality="text"),
                                headers=AUTH)
    assert text_modality.status_code == 400
    assert client.post("/knn-service", json=client_body(), headers=AUTH).status_code == 400
    assert client.post("/knn-service", json=client_body(indice_name="nope", embedding_input=[0.1] * DIM),
                       headers=AUTH).status_code == 404
    # a text query needs the index's encoder, which this test index (imported vectors) has not
    assert client.post("/knn-service", json=client_body(text="a cat"), headers=AUTH).status_code == 400


def test_indices_list_and_metadata(client, idx, built):
    assert client.get("/indices-list").status_code == 401
    assert client.get("/indices-list", headers=AUTH).json() == ["idx"]
    r = client.post("/metadata", json={"ids": [3, 999, 0], "indice_name": "idx"}, headers=AUTH)
    assert r.status_code == 200
    got = r.json()
    assert [g["id"] for g in got] == [3, 999, 0] and got[1]["metadata"] == {}
    assert got[0]["metadata"]["caption"] == idx.get(3).caption and got[0]["metadata"]["n"] == 3
    assert got[2]["metadata"]["key"] == "../x" and isinstance(got[2]["metadata"]["url"], str)
    assert str(built[0].parent) not in r.text
    assert client.post("/metadata", json={"ids": list(range(51)), "indice_name": "idx"}, headers=AUTH).status_code == 400
    spec = client.get("/openapi.json").json()["paths"]
    assert {"/knn-service", "/indices-list", "/metadata", "/api/v1/indexes/{name}/export"} <= set(spec)


def test_wds_stream_closed_after_a_header_closes_the_file(tmp_path):
    """A client that disconnects closes the generator wherever it is: right after a member's header too,
    the item's open descriptor is closed (none leaks per dropped download)."""
    from mmretrieve.index.export import tar_member
    from mmretrieve.media.readback import IndexedMedia
    from mmretrieve.serve import export_api

    f = tmp_path / "big.bin"
    f.write_bytes(b"x" * 5000)
    fd = os.open(f, os.O_RDONLY)
    media = IndexedMedia("big.bin", "video/mp4", 5000, fd=fd)
    chunks = export_api._member_chunks(tar_member("a.mp4", 5000, 0), media)
    assert len(next(chunks)) % 512 == 0  # the header
    chunks.close()
    with pytest.raises(OSError):
        os.fstat(fd)

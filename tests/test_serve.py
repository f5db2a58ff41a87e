"""The HTTP service through FastAPI's test client (and a real uvicorn server on loopback where
concurrency matters): every endpoint, every refusal with its status and message, tokens, paging, the
heavy queue, timeouts, batching and a new index version picked up while serving."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'mmretrieve[serve]')")
pytest.importorskip("httpx", reason="FastAPI's test client needs httpx (the dev extra)")

from conftest import png_bomb  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402
from serve_helpers import running_server  # noqa: E402

from mmretrieve.serve import ServeConfig, Service, create_app  # noqa: E402
from mmretrieve.serve.models import EmbedResponse, IndexDetail, ItemModel, SearchResponse  # noqa: E402

S = "/api/v1/indexes/gallery/search"
TOKEN = "a-test-token-of-24-chars"


@pytest.fixture(scope="module")
def home(serve_gallery):
    return serve_gallery


def make_service(home, embedded, **kw) -> Service:
    cfg = dict(indexes=["gallery"], index_dir=str(home), max_upload_bytes=2 << 20, reload_interval_s=0,
               batch_scan_min_bytes=0)  # the search batcher serves even this small index
    cfg.update(kw)
    return Service(ServeConfig(**cfg), encoders={"embedded": embedded}).start()


@pytest.fixture(scope="module")
def service(home, embedded):
    svc = make_service(home, embedded)
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def client(service):
    with TestClient(create_app(service), base_url="http://127.0.0.1") as c:
        yield c


@pytest.fixture(scope="module")
def ids(service):
    idx = service.manager.get("gallery").index
    return {it.key: it.id for it in idx.items(list(range(0, 100))).values()}


def png_of(path: str, size: int | None = None) -> bytes:
    im = Image.open(path).convert("RGB")
    if size:
        im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def err(r, status: int, fragment: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()["error"]
    assert body["status"] == status
    assert fragment.lower() in body["message"].lower(), body


# ---- endpoints ------------------------------------------------------------------------------------------
def test_indexes_and_what_each_offers(client):
    r = client.get("/api/v1/indexes")
    assert r.status_code == 200
    (g,) = r.json()
    assert g["name"] == "gallery" and g["encoder"] == "embedded" and g["dim"] == 1000 and g["patches"] and g["videos"] == 1
    d = IndexDetail.model_validate(client.get("/api/v1/indexes/gallery").json())
    assert d.capabilities.rerankers["emd"] is None and d.capabilities.rerankers["frames"] is None
    assert "--mllm" in d.capabilities.rerankers["mllm"]
    assert d.capabilities.pipelines["emd"] is None and d.capabilities.pipelines["emd-dinov2"]  # loads a hub model: refused
    assert "path" not in d.info and d.info["counts"]["items"] == g["items"]
    assert "sum" in d.capabilities.fusions and "intersection" in d.capabilities.fusions
    err(client.get("/api/v1/indexes/nope"), 404, "serves no index 'nope'")


def test_text_search_finds_the_cat(client):
    r = client.post(S, json={"text": "a photo of a cat", "k": 5})
    assert r.status_code == 200, r.text
    res = SearchResponse.model_validate(r.json())
    assert res.hits[0].key == "chelsea"
    assert res.query["kind"] == "text" and res.stages == ["coarse"] and res.hits[0].stage_ranks == {"coarse": 1}
    assert res.hits[0].thumbnail.endswith(f"/items/{res.hits[0].id}/thumbnail")
    assert {"encode", "coarse", "total"} <= set(res.timings_ms)


def test_image_search_by_upload_base64_and_multipart(client, sample_by_id):
    png = png_of(sample_by_id["chelsea"].path)
    r = client.post(S, json={"image": "data:image/png;base64," + base64.b64encode(png).decode(), "k": 3})
    assert r.status_code == 200, r.text
    assert r.json()["hits"][0]["key"] == "chelsea" and r.json()["hits"][0]["score"] > 0.99
    r = client.post(S, files={"image": ("c.png", png, "image/png")}, data={"k": "3"})
    assert r.status_code == 200, r.text
    assert r.json()["hits"][0]["key"] == "chelsea" and "decode" in r.json()["timings_ms"]
    assert "upload" in r.json()["query"]["image"] and "/" not in r.json()["query"]["image"]


def test_composed_query_by_item_with_reranking_stages(client, ids):
    body = {"item": ids["motorcycle_left"], "text": "a horse", "fusion": "intersection", "rerank": ["emd:k=20"], "k": 8}
    res = SearchResponse.model_validate(client.post(S, json=body).json())
    assert res.query["kind"] == "composed" and res.query["fusion"] == "intersection" and res.stages == ["coarse", "emd"]
    assert res.query["item"] == {"id": ids["motorcycle_left"], "key": "motorcycle_left"}
    assert "motorcycle_left" not in [h.key for h in res.hits]  # the reference is left out
    for h in res.hits:
        assert set(h.stage_ranks) == {"coarse", "emd"} and "emd" in h.stage_scores
    assert [h.stage_ranks["emd"] for h in res.hits] == list(range(1, 9))
    kept = client.post(S, json={**body, "keep_reference": True}).json()
    assert "motorcycle_left" in [h["key"] for h in kept["hits"]]
    multi = client.post(S, data={"item_key": "motorcycle_left", "text": "a horse", "rerank": ["emd:k=20", "frames:k=10"],
                                 "fusion_options": '{"mode": "product"}', "fusion": "intersection"})
    assert multi.status_code == 200, multi.text
    assert multi.json()["stages"] == ["coarse", "emd", "frames"]


def test_scores_fall_with_rank_in_the_json_after_a_stage_of_another_scale(client, ids):
    # z-scored fusion of 3 re-scored items puts the head around 0, below the tail's cosines: the tail moves
    body = {"item": ids["motorcycle_left"], "text": "a horse", "rerank": ["emd:k=3,alpha=0.5,norm=zscore"], "k": 10}
    hits = client.post(S, json=body).json()["hits"]
    scores = [h["score"] for h in hits]
    assert len(scores) == 10 and all(a > b for a, b in zip(scores, scores[1:])), scores
    assert min(scores[:3]) <= 0 < max(h["stage_scores"]["coarse"] for h in hits[3:])  # the shift was needed
    assert all("emd" not in h["stage_scores"] for h in hits[3:])


def test_batched_searches_match_the_index_and_leave_the_reference_out(client, service, ids):
    idx = service.manager.get("gallery").index
    body = {"item": ids["motorcycle_left"], "text": "a horse", "k": 6}
    r = client.post(S, json=body).json()  # sum fusion: one vector, served by the search batcher
    expected = idx.search(image=idx.get("key:motorcycle_left").uri, text="a horse", k=6)
    assert [h["id"] for h in r["hits"]] == expected.ids and ids["motorcycle_left"] not in expected.ids
    kept = client.post(S, json={**body, "keep_reference": True}).json()
    assert kept["hits"][0]["key"] in ("motorcycle_left", "horse") and ids["motorcycle_left"] in [h["id"] for h in kept["hits"]]


def test_more_like_this_and_a_preset_pipeline(client, ids):
    r = client.post(S, json={"item": ids["coffee"], "k": 3, "pipeline": "emd", "keep_reference": True}).json()
    assert r["hits"][0]["key"] == "coffee" and r["stages"] == ["coarse", "emd"]
    r = client.post(S, json={"item_key": "coffee", "k": 3}).json()  # more like this: the item itself left out
    assert len(r["hits"]) == 3 and "coffee" not in [h["key"] for h in r["hits"]]
    r = client.post(S, json={"item": ids["coffee"], "k": 3}).json()
    assert "coffee" not in [h["key"] for h in r["hits"]]


def test_video_hit_carries_its_best_moment(client):
    r = client.post(S, json={"text": "a taxi", "rerank": ["frames"], "k": 3}).json()
    bikes = next(h for h in r["hits"] if h["key"] == "bikes")
    assert bikes["kind"] == "video" and isinstance(bikes["moment"], float) and bikes["moment"] >= 0
    assert bikes["media"].endswith("/media")


def test_paging(client):
    full = client.post(S, json={"text": "a red motorcycle", "k": 10}).json()
    p1 = client.post(S, json={"text": "a red motorcycle", "k": 5}).json()
    p2 = client.post(S, json={"text": "a red motorcycle", "k": 5, "offset": p1["next_offset"]}).json()
    assert p1["has_more"] and p1["next_offset"] == 5 and p2["offset"] == 5
    assert [h["id"] for h in p1["hits"] + p2["hits"]] == [h["id"] for h in full["hits"]]
    assert [h["rank"] for h in p2["hits"]] == [6, 7, 8, 9, 10]
    n = client.get("/api/v1/indexes").json()[0]["items"]
    last = client.post(S, json={"text": "a red motorcycle", "k": 5, "offset": n - 2}).json()
    assert len(last["hits"]) == 2 and not last["has_more"] and last["next_offset"] is None


def test_vector_search_and_embed(client, service, ids, embedded):
    e = EmbedResponse.model_validate(client.post("/api/v1/embed", json={"text": "a photo of a cat"}).json())
    assert e.dim == 1000 and e.encoder == "embedded"
    ref = embedded.encode_texts(["a photo of a cat"])[0]
    assert float(np.dot(ref, e.vectors[0])) > 0.9999
    r = client.post(S, json={"vector": e.vectors[0], "k": 2}).json()
    assert r["hits"][0]["key"] == "chelsea" and r["query"]["kind"] == "vector"
    several = client.post("/api/v1/embed", json={"text": ["a cat", "a dog"], "index": "gallery"}).json()
    assert len(several["vectors"]) == 2
    stored = service.manager.get("gallery").index.vectors([ids["coffee"]])[0]
    img = client.post("/api/v1/embed", files={"image": ("x.png", png_of(service.manager.get("gallery").index.get(
        "key:coffee").uri), "image/png")}).json()
    assert float(np.dot(stored, img["vectors"][0])) > 0.999
    err(client.post(S, json={"vector": [0.1] * 7}), 422, "expected 1000 finite numbers")
    err(client.post(S, json={"vector": [0.0] * 1000}), 422, "not all zero")
    err(client.post("/api/v1/embed", json={}), 400, "one of them")
    err(client.post("/api/v1/embed", json={"text": ["x"] * 65}), 400, "1 to 64 texts")


def test_items_thumbnails_and_media_with_ranges(client, ids, service):
    it = ItemModel.model_validate(client.get(f"/api/v1/indexes/gallery/items/{ids['chelsea']}").json())
    assert it.key == "chelsea" and it.filename == "chelsea.png" and it.caption
    body = client.get(f"/api/v1/indexes/gallery/items/{ids['chelsea']}").text
    assert "/site-packages/" not in body  # no server paths
    r = client.get(it.thumbnail, params={"size": 128})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(r.content)).size) == 128
    again = client.get(it.thumbnail, params={"size": 128}, headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304
    err(client.get(it.thumbnail, params={"size": 100000}), 400, "thumbnail size must be one of")
    path = service.manager.get("gallery").index.get("key:chelsea").uri
    data = Path(path).read_bytes()
    full = client.get(it.media)
    assert full.status_code == 200 and full.content == data and full.headers["content-type"] == "image/png"
    part = client.get(it.media, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == data[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(data)}"
    vid = client.get(f"/api/v1/indexes/gallery/items/{ids['bikes']}/media", headers={"Range": "bytes=0-1023"})
    assert vid.status_code == 206 and vid.headers["content-type"] == "video/mp4" and len(vid.content) == 1024
    vthumb = client.get(f"/api/v1/indexes/gallery/items/{ids['bikes']}/thumbnail")
    assert vthumb.status_code == 200 and Image.open(io.BytesIO(vthumb.content)).format == "JPEG"


def test_healthz_metrics_docs_and_page(client, ids):
    assert client.get("/healthz").json() == {"status": "ok", "indexes": {"gallery": "v0001"}}
    client.post(S, json={"text": "a cup of coffee"})
    client.post(S, json={"item": ids["coffee"], "text": "but red", "rerank": ["emd:k=10"]})
    client.get("/api/v1/no-such-endpoint")  # an error of its own: the test does not lean on earlier ones
    m = client.get("/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    text = m.text
    assert 'mmretrieve_http_requests_total{endpoint="/api/v1/indexes/{name}/search",method="POST",status="200"}' in text
    assert 'mmretrieve_http_request_duration_seconds_bucket{endpoint="/api/v1/indexes/{name}/search",le="+Inf"}' in text
    assert 'mmretrieve_stage_duration_seconds_count{index="gallery",stage="coarse"}' in text
    assert 'mmretrieve_stage_duration_seconds_count{index="gallery",stage="emd"}' in text
    assert 'mmretrieve_batch_size_bucket{batcher="encode",encoder="embedded",kind="text",le="1.0"}' in text
    assert 'mmretrieve_batch_size_bucket{batcher="search",index="gallery",le="1.0"}' in text
    assert 'mmretrieve_index_info{index="gallery",version="v0001"} 1' in text
    assert "# TYPE mmretrieve_http_errors_total counter" in text
    assert "process_resident_memory_bytes" in text and "process_cpu_seconds_total" in text  # prometheus_client's
    om = client.get("/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"})
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    assert om.text.rstrip().endswith("# EOF") and "# TYPE mmretrieve_http_requests counter" in om.text
    spec = client.get("/openapi.json").json()
    assert "/api/v1/indexes/{name}/search" in spec["paths"] and "SearchRequest" in spec["components"]["schemas"]
    assert "multipart/form-data" in spec["paths"]["/api/v1/indexes/{name}/search"]["post"]["requestBody"]["content"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "cdn" not in docs.text.lower()
    page = client.get("/")
    assert page.status_code == 200 and "<script src=\"/static/app.js\"" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("/static/app.js", "/static/style.css"):
        a = client.get(asset)
        assert a.status_code == 200 and "http://" not in a.text and "https://" not in a.text


# ---- what an attacker sends -----------------------------------------------------------------------------
def test_uploads_over_the_cap_are_refused_with_413(client):
    big = b"\x89PNG" + b"\0" * (3 << 20)
    err(client.post(S, files={"image": ("big.png", big, "image/png")}), 413, "limit")
    err(client.post(S, json={"image": base64.b64encode(big).decode()}), 413, "limit")

    def chunks():  # no Content-Length: the body is counted as it arrives
        for _ in range(40):
            yield b"x" * (128 << 10)

    err(client.post(S, content=chunks(), headers={"content-type": "application/json"}), 413, "over the limit")


@pytest.mark.parametrize("name", ["bomb_above_2x.png", "bomb_between_1x_2x.png", "truncated.jpg", "random_bytes.jpg",
                                  "zero_byte.jpg", "text.jpg", "photoshop.png", "fits.png", "postscript.png"])
def test_bad_images_are_refused_with_a_clear_4xx(client, bad_files, name):
    path, reason = bad_files[name]
    data = path.read_bytes()
    r = client.post(S, files={"image": (name, data, "image/png")})
    err(r, 422, reason)
    r = client.post(S, json={"image": base64.b64encode(data).decode(), "text": "but red"})
    err(r, 422, reason)


def test_pixel_cap_is_below_pillows(client):
    r = client.post(S, files={"image": ("b.png", png_bomb(8000, 8000), "image/png")})  # 64 MP < Pillow's limit
    err(r, 422, "exceeds the limit of 40000000")


@pytest.mark.parametrize("path,status,fragment", [
    ("/api/v1/indexes/gallery/items/..%2F..%2Fetc%2Fpasswd/media", 404, "not found"),
    ("/api/v1/indexes/gallery/items/%2e%2e", 422, "item_id"),
    ("/api/v1/indexes/gallery/items/-1", 422, "item_id"),
    ("/api/v1/indexes/gallery/items/99999/media", 404, "no item with id 99999"),
    ("/api/v1/indexes/gallery/items/100000000000000000000000000000", 422, "item_id"),
    ("/api/v1/indexes/..%2F..%2Fetc/items/1", 404, "not found"),
    ("/api/v1/indexes/%2e%2e/items/1", 404, "serves no index '..'"),
    ("/api/v1/indexes/%2e%2e%2f%2e%2e%2fetc", 404, "not found"),
    ("/static/..%2F..%2F..%2Fconfig.py", 404, "not found"),
])
def test_no_path_reaches_the_filesystem(client, path, status, fragment):
    r = client.get(path)
    err(r, status, fragment)
    assert b"root:" not in r.content


@pytest.mark.parametrize("body,status,fragment", [
    ({"text": "x", "k": 10**9}, 400, "limit of 1000 results per page"),
    ({"text": "x", "k": 0}, 422, "k: input should be greater than or equal to 1"),
    ({"text": "x", "offset": -1}, 422, "offset: input should be greater than or equal to 0"),
    ({"text": "x", "offset": 10**7}, 400, "beyond this server's limit"),
    ({"text": "x", "k": "many"}, 422, "k: input should be a valid integer"),
    ({"text": "x", "kk": 3}, 422, "kk: extra inputs are not permitted"),
    ({"text": "   "}, 400, "empty query text"),
    ({"text": "x" * 1001}, 400, "more than the limit of 1000"),
    ({}, 400, "a search needs text"),
    ({"item": 1, "vector": [1.0] * 1000}, 400, "not item and vector"),
    ({"vector": [1.0] * 1000, "text": "x"}, 400, "a vector query takes no text"),
    ({"text": "x", "item": 10**30}, 422, "item: input should be less than or equal to"),
    ({"text": "x", "item_key": "../../etc/passwd"}, 404, "no item with key"),
    ({"text": "x", "item": 5, "fusion": "fancy"}, 400, "unknown fusion 'fancy'"),
    ({"text": "x", "item": 5, "fusion": "intersection", "fusion_options": {"k1": 10**8}}, 400, "k1=100000000"),
    ({"text": "x", "weight": 2}, 422, "weight: input should be less than or equal to 1"),
    ({"text": "x", "rerank": ["emd:patches=timm:vit_small_patch14_dinov2.lvd142m"]}, 400, "unknown option(s) 'patches'"),
    ({"text": "x", "rerank": ["emd:device=cuda"]}, 400, "unknown option(s) 'device'"),
    ({"text": "x", "rerank": ["mllm:model=Qwen/Qwen2-VL-2B-Instruct"]}, 400, "start the server with --mllm"),
    ({"text": "x", "rerank": ["emd:k=100000"]}, 400, "k must be an integer in 1..200"),
    ({"text": "x", "rerank": ["sleep"]}, 400, "not 'sleep'"),
    ({"text": "x", "rerank": ["frames"] * 5}, 400, "at most 4 rerank stages"),
    ({"text": "x", "rerank": ["emd"]}, 400, "needs an image or composed query"),
    ({"text": "x", "pipeline": "../../../etc/passwd"}, 400, "named by their name only"),
    ({"text": "x", "pipeline": "nope"}, 400, "no pipeline preset 'nope'"),
    ({"text": "x", "pipeline": "emd-dinov2"}, 400, "'patches'"),
    ({"text": "x", "pipeline": "emd", "rerank": ["frames"]}, 400, "not both"),
    ({"image": "!!!not base64!!!"}, 400, "not valid base64"),
])
def test_bad_requests_name_the_problem(client, body, status, fragment):
    err(client.post(S, json=body), status, fragment)


def test_bad_bodies(client):
    err(client.post(S, content=b"{not json", headers={"content-type": "application/json"}), 400, "not valid JSON")
    err(client.post(S, content=b"[1, 2]", headers={"content-type": "application/json"}), 400, "must be a JSON object")
    err(client.post(S, content=b"text=x", headers={"content-type": "text/plain"}), 400, "send application/json")
    err(client.post(S, files={"other": ("a.png", b"x", "image/png")}), 400, "the only file part is 'image'")
    err(client.post(S, data={"text": "x", "vector": "[1,"}), 400, "vector: not valid JSON")
    err(client.post("/api/v1/indexes/nope/search", json={"text": "x"}), 404, "serves no index")
    err(client.get("/api/v1/no-such-endpoint"), 404, "not found")


def test_host_header_and_cors(client, home, embedded):
    refused = client.get("/api/v1/indexes", headers={"host": "evil.example"})  # DNS rebinding: Starlette's check
    assert refused.status_code == 400 and refused.text == "Invalid host header"
    assert client.get("/api/v1/indexes", headers={"host": "evil.example:8000"}).status_code == 400
    assert client.get("/api/v1/indexes", headers={"host": "127.0.0.1:8000"}).status_code == 200
    assert client.get("/api/v1/indexes", headers={"host": "[::1]:8000"}).status_code == 200
    r = client.get("/api/v1/indexes", headers={"origin": "http://elsewhere.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    svc = make_service(home, embedded, cors_origins=["http://app.example"])
    try:
        with TestClient(create_app(svc), base_url="http://127.0.0.1") as c:
            r = c.get("/api/v1/indexes", headers={"origin": "http://app.example"})
            assert r.headers["access-control-allow-origin"] == "http://app.example"
            r = c.get("/api/v1/indexes", headers={"origin": "http://elsewhere.example"})
            assert "access-control-allow-origin" not in r.headers
    finally:
        svc.close()


def test_token_required_off_loopback_and_checked_in_constant_time(home, embedded, monkeypatch):
    import hmac

    from mmretrieve.errors import UsageError
    from mmretrieve.serve.config import check_bind

    with pytest.raises(UsageError, match="give an API token"):
        check_bind("192.0.2.10", None)
    with pytest.raises(UsageError, match="at least 16 characters"):
        check_bind("192.0.2.10", "short")
    assert "needs the bearer token" in check_bind("192.0.2.10", TOKEN)
    assert "no token needed" in check_bind("127.0.0.1", None) and "no token needed" in check_bind("::1", None)
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    svc = make_service(home, embedded, token=TOKEN, host="192.0.2.10")
    try:
        with TestClient(create_app(svc), base_url="http://192.0.2.10") as c:
            r = c.post(S, json={"text": "a cat"})
            err(r, 401, "missing or wrong API token")
            assert r.headers["www-authenticate"] == "Bearer"
            err(c.post(S, json={"text": "a cat"}, headers={"Authorization": "Bearer wrong-token-of-24-chars!"}), 401, "wrong")
            err(c.get("/metrics"), 401, "token")
            err(c.get("/api/v1/indexes/gallery/items/0/media"), 401, "token")
            ok = c.post(S, json={"text": "a cat"}, headers={"Authorization": f"Bearer {TOKEN}"})
            assert ok.status_code == 200
            c.cookies.set("mmretrieve_token", TOKEN)
            assert c.get("/api/v1/indexes/gallery/items/0/thumbnail").status_code == 200  # the page's <img> tags
            c.cookies.clear()
            assert c.get("/healthz").status_code == 200 and c.get("/").status_code == 200
            assert c.get("/api/v1/indexes", headers={"host": "anything.example"}).status_code == 401  # no host check
    finally:
        svc.close()
    assert calls, "the token was not compared with hmac.compare_digest"


def test_cli_refuses_a_public_bind_without_a_token_before_loading(tmp_path):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "mmretrieve", "serve", "gallery", "--host", "192.0.2.10",
                        "--index-dir", str(tmp_path)], capture_output=True, text=True, timeout=60,
                       env={**__import__("os").environ, "MMRETRIEVE_TOKEN": ""})
    assert p.returncode == 1 and "give an API token" in p.stderr, p.stderr


# ---- load, queues and time limits ---------------------------------------------------------------------------
def _gate(monkeypatch, svc):
    """Hold every search in its worker until the gate opens (so a queue can be filled deterministically)."""
    gate = threading.Event()
    run = svc._execute
    monkeypatch.setattr(svc, "_execute", lambda plan, q: (gate.wait(30), run(plan, q))[1])
    monkeypatch.setattr(svc, "_batchable", lambda plan, q: None)  # every search through _execute
    return gate


def test_heavy_requests_beyond_the_queue_get_503_with_retry_after(home, embedded, monkeypatch, ids):
    import httpx

    svc = make_service(home, embedded, heavy_workers=1, heavy_queue=1)
    gate = _gate(monkeypatch, svc)
    body = {"item": ids["motorcycle_left"], "text": "a horse", "rerank": ["emd:k=100"], "k": 20}
    try:
        with running_server(create_app(svc)) as base, httpx.Client(base_url=base, timeout=60) as http:
            with cf.ThreadPoolExecutor(50) as ex:
                futs = [ex.submit(http.post, S, json=body) for _ in range(50)]
                t0 = time.monotonic()
                while sum(f.done() for f in futs) < 48 and time.monotonic() - t0 < 30:
                    time.sleep(0.05)
                gate.set()
                answers = [f.result() for f in futs]
            codes = sorted(r.status_code for r in answers)
            assert codes == [200, 200] + [503] * 48, codes
            busy = next(r for r in answers if r.status_code == 503)
            assert int(busy.headers["retry-after"]) >= 1 and "busy" in busy.json()["error"]["message"]
            assert http.post(S, json=body).status_code == 200  # and it recovers
            metrics = http.get("/metrics").text
            assert 'mmretrieve_heavy_rejected_total{index="gallery"} 48' in metrics
    finally:
        gate.set()
        svc.close()


def test_a_request_past_its_time_limit_gets_504(home, embedded, monkeypatch):
    svc = make_service(home, embedded, request_timeout_s=0.3)
    gate = _gate(monkeypatch, svc)
    try:
        with TestClient(create_app(svc), base_url="http://127.0.0.1") as c:
            t0 = time.monotonic()
            err(c.post(S, json={"text": "a cat"}), 504, "no answer within the server's limit of 0.3 s")
            assert time.monotonic() - t0 < 5
            gate.set()
            assert c.post(S, json={"text": "a cat"}).status_code == 200
    finally:
        gate.set()
        svc.close()


def test_concurrent_searches_match_in_process_results(home, embedded, service):
    import httpx

    idx = service.manager.get("gallery").index
    texts = ["a photo of a cat", "a cup of coffee", "a red motorcycle", "a pagoda", "a rocket", "an orange flower",
             "a horse", "the moon"]
    expected = {t: idx.search(text=t, k=5).keys for t in texts}
    with running_server(create_app(service)) as base, httpx.Client(base_url=base, timeout=60) as http:
        def one(i):
            t = texts[i % len(texts)]
            return t, http.post(S, json={"text": t, "k": 5})

        with cf.ThreadPoolExecutor(16) as ex:
            answers = list(ex.map(one, range(64)))
    for t, r in answers:
        assert r.status_code == 200, r.text
        assert [h["key"] for h in r.json()["hits"]] == expected[t]


def test_concurrent_encodings_share_one_forward():
    from mmretrieve.serve.batching import EncodeBatcher

    started, release = threading.Event(), threading.Event()
    calls = []

    class Slow:
        name = "slow"

        def encode_texts(self, texts):
            calls.append(list(texts))
            started.set()
            release.wait(10)
            return np.stack([np.full(4, len(t), np.float32) for t in texts])

    b = EncodeBatcher(Slow(), max_batch=32)
    try:
        first = b.text("a")
        assert started.wait(10)
        rest = [b.text("b" * n) for n in range(2, 7)]
        release.set()
        assert first.result(10)[0] == 1 and [f.result(10)[0] for f in rest] == [2, 3, 4, 5, 6]
        assert calls == [["a"], ["bb", "bbb", "bbbb", "bbbbb", "bbbbbb"]]
    finally:
        release.set()
        b.close()
    one = EncodeBatcher(Slow(), batching=False)
    try:
        futs = [one.text("x" * n) for n in range(1, 4)]
        assert [f.result(10)[0] for f in futs] == [1, 2, 3]
    finally:
        one.close()


def test_each_query_side_is_encoded_once(client, embedded, monkeypatch, ids):
    counts = {"text": 0, "image": 0}
    texts, images = embedded.encode_texts, embedded.encode_images
    monkeypatch.setattr(embedded, "encode_texts", lambda t, **kw: counts.__setitem__("text", counts["text"] + 1) or texts(t, **kw))
    monkeypatch.setattr(embedded, "encode_images", lambda t, **kw: counts.__setitem__("image", counts["image"] + 1) or images(t, **kw))
    assert client.post(S, json={"text": "a photo of a cat"}).status_code == 200
    assert counts == {"text": 1, "image": 0}
    r = client.post(S, json={"item": ids["chelsea"], "text": "but a dog", "rerank": ["emd:k=10"], "fusion": "intersection"})
    assert r.status_code == 200 and counts == {"text": 2, "image": 0}  # the item's stored vector and patches


def test_a_new_index_version_is_picked_up_while_serving(tmp_path, embedded, samples):
    from mmretrieve.ingest import add_to_index, build_index

    src = tmp_path / "src"
    src.mkdir()
    by_id = {s.id: s for s in samples}
    for sid in ("coffee", "rocket", "moon"):
        shutil.copyfile(by_id[sid].path, src / Path(by_id[sid].path).name)
    build_index("live", src, encoder=embedded, index_dir=tmp_path / "idx")
    svc = Service(ServeConfig(indexes=["live"], index_dir=str(tmp_path / "idx"), reload_interval_s=0.1),
                  encoders={"embedded": embedded}).start()
    try:
        with TestClient(create_app(svc), base_url="http://127.0.0.1") as c:
            before = c.post("/api/v1/indexes/live/search", json={"text": "a photo of a cat", "k": 10}).json()
            assert before["version"] == "v0001" and len(before["hits"]) == 3
            old = svc.manager.get("live").index
            shutil.copyfile(by_id["chelsea"].path, src / "chelsea.png")
            add_to_index("live", src, index_dir=tmp_path / "idx", encoder=embedded)
            t0 = time.monotonic()
            while c.get("/api/v1/indexes/live").json()["version"] == "v0001" and time.monotonic() - t0 < 20:
                time.sleep(0.05)
            after = c.post("/api/v1/indexes/live/search", json={"text": "a photo of a cat", "k": 10}).json()
            assert after["version"] != "v0001" and Path(after["hits"][0]["key"]).name == "chelsea.png"
            assert c.get("/api/v1/indexes/live").json()["reloads"] == 1
            assert len(old) == 3 and len(old.search(text="a cup of coffee", k=10)) == 3  # the old snapshot still answers
            assert 'mmretrieve_index_reloads_total{index="live"} 1' in c.get("/metrics").text
    finally:
        svc.close()


def test_the_command_serves_until_interrupted(home):
    import os
    import signal
    import subprocess
    import sys

    import httpx
    from serve_helpers import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mmretrieve", "serve", "gallery", "--index-dir", str(home),
                             "--port", str(port), "--no-verify"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "MMRETRIEVE_TOKEN": ""})
    try:
        base = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        while time.monotonic() - t0 < 120 and proc.poll() is None:
            try:
                if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        r = httpx.post(base + S, json={"text": "a photo of a cat", "k": 3}, timeout=30)
        assert r.status_code == 200 and r.json()["hits"][0]["key"] == "chelsea"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert "no token needed" in out and f"page: http://127.0.0.1:{port}/" in out


def test_mllm_reranker_uses_the_servers_model_loaded_once(tmp_path, home, embedded, monkeypatch):
    from transformers.utils import logging as hf_logging

    from mmretrieve.rerank.mllm import MLLMReranker
    from mmretrieve.testing import write_tiny_vlm

    hf_logging.set_verbosity_error()
    model = write_tiny_vlm(tmp_path / "vlm", "qwen2_vl")
    loads = []
    real = MLLMReranker.load
    monkeypatch.setattr(MLLMReranker, "load", lambda self: (loads.append(1) if self._loaded is None else None, real(self))[1])
    svc = make_service(home, embedded, mllm=model)
    try:
        with TestClient(create_app(svc), base_url="http://127.0.0.1") as c:
            caps = c.get("/api/v1/indexes/gallery").json()["capabilities"]
            assert caps["rerankers"]["mllm"] is None
            r = c.post(S, json={"text": "a photo of a cat", "rerank": ["mllm:k=3"], "k": 3})
            assert r.status_code == 200, r.text
            assert r.json()["stages"] == ["coarse", "mllm"] and "p_yes" in r.json()["hits"][0]["extra"]
            r = c.post(S, json={"text": "a photo of a cat", "rerank": ["mllm:k=4,alpha=0.5"], "k": 4})
            assert r.status_code == 200 and r.json()["query"]["rerank"] == [{"name": "mllm", "k": 4, "alpha": 0.5}]
            err(c.post(S, json={"text": "x", "rerank": [f"mllm:model={tmp_path}/other"]}), 400, "unknown option(s) 'model'")
            err(c.post(S, json={"text": "x", "rerank": ["mllm:adapter=/tmp/x"]}), 400, "unknown option(s) 'adapter'")
    finally:
        svc.close()
    assert len(loads) == 1, "the vision-language model was loaded more than once"


def test_a_refused_heavy_request_gives_its_slot_back(home, embedded, bad_files, ids):
    svc = make_service(home, embedded, heavy_workers=1, heavy_queue=0)
    try:
        with TestClient(create_app(svc), base_url="http://127.0.0.1") as c:
            data = bad_files["truncated.jpg"][0].read_bytes()
            for _ in range(3):  # a slot is taken before decoding; a bad image must hand it back
                r = c.post(S, files={"image": ("t.jpg", data, "image/jpeg")}, data={"text": "x", "rerank": "emd:k=5"})
                err(r, 422, "truncated")
            ok = c.post(S, json={"item": ids["coffee"], "text": "but red", "rerank": ["emd:k=5"]})
            assert ok.status_code == 200, ok.text
            assert svc.heavy.depth == 0
    finally:
        svc.close()


def test_thumbnails_and_media_of_samples_inside_shards(tmp_path, samples, embedded):
    """An index built from webdataset and parquet shards: its hits have thumbnails and their original
    bytes (read from the shard); a shard cut short since answers 404 naming the problem, never a 500."""
    from mmretrieve.ingest import build_index
    from mmretrieve.testing.shards import truncate, write_parquet, write_webdataset

    home = tmp_path / "indexes"
    tars = write_webdataset(samples[:4], tmp_path / "wds", per_shard=2)
    write_parquet(samples[:3], tmp_path / "pq", per_file=3)
    build_index("wds", tmp_path / "wds", encoder=embedded, index_dir=home)
    build_index("pq", tmp_path / "pq", encoder=embedded, index_dir=home)
    svc = make_service(home, embedded, indexes=["wds", "pq"])
    try:
        with TestClient(create_app(svc), base_url="http://127.0.0.1") as c:
            for name, n in (("wds", 4), ("pq", 3)):
                idx = svc.manager.get(name).index
                items = list(idx.items(list(range(n))).values())
                assert len(items) == n
                for it in items:
                    info = c.get(f"/api/v1/indexes/{name}/items/{it.id}").json()
                    assert info["thumbnail"] and info["media"]
                    t = c.get(info["thumbnail"], params={"size": 64})
                    assert t.status_code == 200 and max(Image.open(io.BytesIO(t.content)).size) == 64
                    m = c.get(info["media"])
                    assert m.status_code == 200 and m.headers["content-type"].startswith("image/")
                    assert m.headers["x-content-type-options"] == "nosniff"
                    im = Image.open(io.BytesIO(m.content))
                    assert im.size == (it.width, it.height)
            idx = svc.manager.get("wds").index
            last = next(it for it in idx.items(list(range(4))).values() if it.uri.startswith(str(tars[-1])))
            truncate(tars[-1], 0.2)  # the shard is cut short after the build: not what was indexed
            err(c.get(f"/api/v1/indexes/wds/items/{last.id}/media"), 410, "changed since it was indexed")
            err(c.get(f"/api/v1/indexes/wds/items/{last.id}/thumbnail", params={"size": 128}), 410, "changed since")
    finally:
        svc.close()


def test_metrics_from_many_threads_add_up_and_services_do_not_mix():
    from mmretrieve.serve.metrics import Metrics

    a, b = Metrics(), Metrics()

    def work(n):
        for _ in range(500):
            a.inc("mmretrieve_timeouts_total", {"endpoint": "search"})
            a.observe("mmretrieve_stage_duration_seconds", 0.002, {"index": "g", "stage": "coarse"})

    with cf.ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(8)))
    text = a.render()[0].decode()
    assert 'mmretrieve_timeouts_total{endpoint="search"} 4000.0' in text
    assert 'mmretrieve_stage_duration_seconds_count{index="g",stage="coarse"} 4000.0' in text
    assert "mmretrieve_timeouts_total" not in b.render()[0].decode()  # its own registry

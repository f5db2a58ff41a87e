"""An index of imported embeddings whose model is not here (issue 17, item 16): searching by stored item
or by vector, and serving, never load the encoder; a query that needs encoding fails at once, clearly."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from mmretrieve.cli import main

HUB_NAME = "open_clip:ViT-B-32@laion2b_s34b_b79k"  # weights never cached on the test machines


@pytest.fixture()
def imported(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "vec.npy", rng.standard_normal((40, 16)).astype(np.float32))
    (tmp_path / "keys.txt").write_text("".join(f"k{i}\n" for i in range(40)))
    home = tmp_path / "home"
    for name, enc in (("mine", "my-model"), ("hub", HUB_NAME)):
        assert main(["index", "import", name, str(tmp_path / "vec.npy"), "--keys", str(tmp_path / "keys.txt"),
                     "--encoder", enc, "--normalize", "--index-dir", str(home), "-q"]) == 0
    return home


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "mmretrieve", *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture()
def loads(monkeypatch):
    """Every attempt to create an encoder, recorded (an attempt that fails leaves no encoder behind either)."""
    import mmretrieve.encoders as encoders

    calls: list[str] = []
    real = encoders.create_encoder

    def spy(name, *a, **kw):
        calls.append(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(encoders, "create_encoder", spy)
    return calls


@pytest.mark.parametrize("name", ["mine", "hub"])
def test_search_by_item_and_vector_without_the_encoder(imported, name, capsys, loads):
    import mmretrieve as mr

    capsys.readouterr()
    assert main(["search", name, "--item", "k3", "-k", "3", "--keep-reference", "--json", "--index-dir", str(imported)]) == 0
    import json

    hits = json.loads(capsys.readouterr().out)["hits"]
    assert hits[0]["key"] == "k3" and len(hits) == 3
    idx = mr.open_index(name, index_dir=imported)
    res = idx.search(vector=idx.vectors([hits[1]["id"]])[0], k=1)
    assert res.keys == [hits[1]["key"]]
    assert idx._encoder is None and loads == []  # nothing above even tried to load it


def test_an_uncached_hub_encoder_fails_fast_in_process(imported, loads):
    """The hub check answers at once offline: no wait for downloads or retries (generous bound)."""
    import mmretrieve as mr
    from mmretrieve.errors import EncoderUnavailableError

    idx = mr.open_index("hub", index_dir=imported)
    t0 = time.monotonic()
    with pytest.raises(EncoderUnavailableError, match="not in the local cache"):
        idx.search(text="a cat", k=2)
    assert time.monotonic() - t0 < 10 and loads == [HUB_NAME]
    assert idx.search(item="k2", k=1, exclude_reference=False).keys == ["k2"]  # the failed text query leaves the item searches working


@pytest.mark.parametrize("name,why", [("mine", "unknown encoder 'my-model'"), ("hub", "not in the local cache")])
def test_a_text_query_fails_fast_and_says_what_works(imported, name, why):
    t0 = time.monotonic()
    p = cli("search", name, "--text", "a cat", "--index-dir", str(imported))
    assert time.monotonic() - t0 < 30  # the interpreter's start-up included; no wait for the hub
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert f"index {name!r} was built with encoder" in p.stderr and why in p.stderr
    assert "--item" in p.stderr and "rebuild the index with a known encoder" in p.stderr


def test_served_without_its_encoder(imported, loads):
    pytest.importorskip("httpx", reason="FastAPI's test client needs httpx (the dev extra)")
    from fastapi.testclient import TestClient

    from mmretrieve.serve.app import create_app
    from mmretrieve.serve.config import ServeConfig
    from mmretrieve.serve.service import Service

    t0 = time.monotonic()
    svc = Service(ServeConfig(indexes=["mine", "hub"], index_dir=str(imported), reload_interval_s=0)).start()
    assert time.monotonic() - t0 < 30
    try:
        with TestClient(create_app(svc), base_url="http://127.0.0.1") as c:
            assert c.get("/healthz").status_code == 200
            for name in ("mine", "hub"):
                r = c.post(f"/api/v1/indexes/{name}/search", json={"item_key": "k5", "k": 2, "keep_reference": True})
                assert r.status_code == 200, r.text
                assert r.json()["hits"][0]["key"] == "k5"
                r = c.post(f"/api/v1/indexes/{name}/search", json={"vector": [0.25] * 16, "k": 2})
                assert r.status_code == 200, r.text
                r = c.post(f"/api/v1/indexes/{name}/search", json={"text": "a cat", "k": 2})
                assert r.status_code == 400, r.text
                msg = r.json()["error"]["message"]
                assert f"index {name!r} was built with encoder" in msg and "cannot be loaded on this server" in msg
                assert "by item (item_key / item_id) or by vector" in msg and "rebuild it with a known encoder" in msg
        assert sorted(loads) == sorted(["my-model", HUB_NAME])  # tried once at start, never again per request
    finally:
        svc.close()

"""Generative presets over HTTP: the cotrr preset (describe -> coarse -> listwise) on a tiny random
Qwen2-VL given as the server's --vlm: the description, the stage ranks and the cost in the response, the
generation cache on a repeated request, the generation counters of /metrics, and the policy (a request
never chooses the model; a preset that needs one on a server without it says so)."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'mmretrieve[serve]')")
pytest.importorskip("httpx", reason="FastAPI's test client needs httpx (the dev extra)")
pytest.importorskip("transformers", reason="the generative stages need transformers")

from fastapi.testclient import TestClient  # noqa: E402

from mmretrieve.serve import ServeConfig, Service, create_app  # noqa: E402
from mmretrieve.serve.models import SearchResponse  # noqa: E402

S = "/api/v1/indexes/gallery/search"


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    from transformers.utils import logging as hf_logging

    from mmretrieve.testing import write_tiny_vlm

    hf_logging.set_verbosity_error()
    return write_tiny_vlm(tmp_path_factory.mktemp("vlm"), "qwen2_vl")


def make_service(home, embedded, **kw) -> Service:
    cfg = dict(indexes=["gallery"], index_dir=str(home), reload_interval_s=0, request_timeout_s=120)
    cfg.update(kw)
    return Service(ServeConfig(**cfg), encoders={"embedded": embedded}).start()


def err(r, status: int, fragment: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    msg = r.json()["error"]["message"]
    assert fragment in msg, msg


def test_cotrr_preset_reports_description_ranks_cost_and_caches(serve_gallery, embedded, tiny_vlm, tmp_path,
                                                                monkeypatch):
    monkeypatch.setenv("MMRETRIEVE_GENERATION_CACHE", str(tmp_path / "cache" / "generations.sqlite"))
    svc = make_service(serve_gallery, embedded, vlm=tiny_vlm)
    try:
        with TestClient(create_app(svc), base_url="http://127.0.0.1") as c:
            caps = c.get("/api/v1/indexes/gallery").json()["capabilities"]
            assert caps["pipelines"]["cotrr"] is None, caps["pipelines"]
            assert caps["rerankers"]["listwise"] is None and caps["rerankers"]["pairwise"] is None
            item = c.post(S, json={"text": "a cat", "k": 1}).json()["hits"][0]["id"]
            body = {"item": item, "text": "a dog instead of the cat", "pipeline": "cotrr", "k": 5}
            r = c.post(S, json=body)
            assert r.status_code == 200, r.text
            res = SearchResponse.model_validate(r.json()).model_dump()
            assert res["stages"] == ["coarse", "listwise"]
            info = res["stage_info"]
            assert isinstance(info["describe"]["description"], str) and info["describe"]["description"]
            assert res["description"] == info["describe"]["description"]
            assert info["describe"]["cost"]["prompts"] == 1
            cost = info["listwise"]["cost"]
            assert cost["prompts"] >= 1 and cost["cache_hits"] == 0
            assert {"cost", "schedule"} <= set(info["listwise"])  # reasoning: only what a model wrote
            for h in res["hits"]:
                assert "coarse" in h["stage_ranks"] and "listwise" in h["stage_ranks"]
            assert r.json()["query"]["describe"]["fuse"] == "none"

            again = c.post(S, json=body).json()
            cost2 = again["stage_info"]["listwise"]["cost"]
            assert cost2["prompts"] == cost["prompts"] and cost2["cache_hits"] == cost2["prompts"]
            assert cost2["generated_tokens"] == 0
            d2 = again["stage_info"]["describe"]
            assert d2["cost"]["cache_hits"] == 1 and d2["cost"]["generated_tokens"] == 0
            assert d2["description"] == info["describe"]["description"]
            assert [h["id"] for h in again["hits"]] == [h["id"] for h in res["hits"]]

            m = c.get("/metrics").text
            lab = '{index="gallery",stage="listwise"}'
            assert f"mmretrieve_generation_prompts_total{lab} {float(2 * cost['prompts'])}" in m
            assert f"mmretrieve_generation_cache_hits_total{lab} {float(cost['prompts'])}" in m
            assert 'mmretrieve_generation_generated_tokens_total{index="gallery",stage="describe"}' in m
            assert "mmretrieve_generation_seconds_total" in m and "mmretrieve_generation_runs_total" in m
            assert 'mmretrieve_stage_duration_seconds_count{index="gallery",stage="describe"} 2.0' in m

            # a request's own listwise stage: the server's model, options within bounds
            r = c.post(S, json={"text": "a photo of a cat", "rerank": ["listwise:k=4,window=6"], "k": 4})
            assert r.status_code == 200, r.text
            assert r.json()["stage_info"]["listwise"]["cost"]["prompts"] >= 1

            # the model is the server's choice
            for spec in (f"listwise:model={tiny_vlm}", "listwise:api=http://127.0.0.1:9/v1,api_model=x",
                         "pairwise:api_key_env=HOME", "listwise:cache=/tmp/c", "pairwise:model=Qwen/Qwen2-VL-2B-Instruct"):
                err(c.post(S, json={"text": "x", "rerank": [spec]}), 400, "unknown option(s)")
            err(c.post(S, json={"text": "x", "rerank": ["listwise:window=500"]}), 400, "window must be an integer in 2..20")
            err(c.post(S, json={"text": "x", "rerank": ["listwise:k=150"]}), 400, "a generative stage's k must be")
    finally:
        svc.close()


def test_a_server_without_a_vlm_says_what_generative_presets_need(serve_gallery, embedded):
    svc = make_service(serve_gallery, embedded)
    try:
        with TestClient(create_app(svc), base_url="http://127.0.0.1") as c:
            caps = c.get("/api/v1/indexes/gallery").json()["capabilities"]
            for name in ("cotrr", "egocvr-pairwise"):
                assert "start the server with --vlm DIR" in caps["pipelines"][name], caps["pipelines"][name]
            assert "--vlm" in caps["rerankers"]["listwise"] and caps["pipelines"]["emd"] is None
            err(c.post(S, json={"text": "x", "pipeline": "cotrr"}), 400, "needs a vision-language model")
            err(c.post(S, json={"text": "x", "rerank": ["listwise:k=5"]}), 400, "start the server with --vlm")
    finally:
        svc.close()


def test_serve_command_line_takes_the_vlm(monkeypatch):
    from mmretrieve.cli import serve as cli_serve
    from mmretrieve.errors import UsageError

    seen = {}
    monkeypatch.setattr("mmretrieve.serve.server.serve", lambda config, print_fn=None: seen.setdefault("c", config))
    import argparse

    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    cli_serve.register(sub, argparse.ArgumentParser(add_help=False))
    args = p.parse_args(["serve", "gallery", "--vlm-api", "http://127.0.0.1:8001/v1", "--vlm-api-model", "m",
                         "--vlm-api-key-env", "KEY"])
    args.index_dir = None
    assert cli_serve.cmd_serve(args) == 0
    assert seen["c"].vlm_options() == {"api": "http://127.0.0.1:8001/v1", "api_model": "m", "api_key_env": "KEY"}
    with pytest.raises(UsageError, match="--vlm-api-model"):
        ServeConfig(indexes=["g"], vlm_api="http://x/v1").check()
    with pytest.raises(UsageError, match="not both"):
        ServeConfig(indexes=["g"], vlm="/m", vlm_api="http://x/v1", vlm_api_model="m").check()


def test_request_costs_and_the_servers_memory_are_bounded(tiny_vlm):
    """Review of issue 20: strategy=allpairs skipped the pairwise bound (k*(k-1) prompts), and every
    distinct option set (a seed) added a shared reranker that was never dropped."""
    from mmretrieve.errors import UsageError
    from mmretrieve.serve import safety
    from mmretrieve.serve.safety import RerankPolicy

    policy = RerankPolicy(max_rerank_k=100, vlm={"model": tiny_vlm})
    with pytest.raises(UsageError, match="strategy=allpairs .* k <= 8"):
        policy._stage("pairwise", {"k": 50, "strategy": "allpairs"}, None, preset=False, check=False)
    with pytest.raises(UsageError, match="strategy=allpairs"):
        policy._stage("pairwise", {"strategy": "allpairs"}, None, preset=False, check=False)  # the default k: 10
    policy._stage("pairwise", {"k": 8, "strategy": "allpairs"}, None, preset=False, check=False)
    for seed in range(safety.MAX_BASES + 50):
        policy._stage("listwise", {"k": 10, "seed": seed}, None, preset=False, check=False)
    assert len(policy._bases) <= safety.MAX_BASES

"""``bench generate`` (generative stages' throughput, a tiny random Qwen2-VL) and ``bench rankagg``
(listwise schedules and aggregation on a synthetic noisy block ranker): smoke runs through the CLI, the
exact ranker recovering the true order, and aggregation beating a single window under noise."""

from __future__ import annotations

import json

import pytest

from mmretrieve.bench import rankagg as bench_rankagg
from mmretrieve.errors import UsageError


def test_bench_generate_smoke_json(capsys):
    from mmretrieve.cli import main

    assert main(["bench", "generate", "--json", "--queries", "2", "--batch-sizes", "1,2", "--max-new-tokens", "4",
                 "--window", "4", "--pairs", "2", "--endpoint"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model_kind"] == "tiny" and "tiny random" in out["model"] and out["cache"] == "off"
    assert out["machine"]["cpu"] is not None and out["device"] in ("cpu", "cuda") and out["dtype"]
    rows = out["results"]
    want = {(b, s, bs) for b in ("local", "endpoint") for s in ("describe", "listwise", "pairwise") for bs in (1, 2)}
    assert {(r["backend"], r["stage"], r["batch_size"]) for r in rows} == want
    for r in rows:
        assert r["queries_per_s"] > 0 and r["prompts_per_s"] > 0 and r["tokens_per_s"] > 0 and r["s_per_query"] > 0
        assert r["generated_tokens"] > 0 and r["vs_batch_1"] > 0
        assert r["prompts"] == r["queries"] * (2 if r["stage"] == "pairwise" else 1)
        if r["batch_size"] == 1:
            assert r["vs_batch_1"] == 1.0
    t = out["target"]
    assert t["s_per_query_batch_1"] > 0 and t["s_per_query_best"] > 0
    if out["device"] == "cpu":
        assert t["applies"] is False and t["met"] is None


def test_bench_generate_prints_the_table_and_the_target(capsys):
    from mmretrieve.cli import main

    assert main(["bench", "generate", "--queries", "1", "--batch-sizes", "1,2", "--max-new-tokens", "2", "--window", "3",
                 "--stages", "describe,listwise"]) == 0
    text = capsys.readouterr().out
    assert "tiny random Qwen2-VL (smoke run: not a real model's figures)" in text
    for col in ("queries/s", "prompts/s", "tokens/s", "s/query", "vs batch 1"):
        assert col in text
    assert "under 1 s per query on one H100-class GPU with a 2B model" in text
    assert "describe + listwise" in text
    assert "pairwise " not in text.split("backend", 1)[1].split("target:")[0]


def test_bench_generate_refuses_2b_on_cpu_without_force(monkeypatch):
    import argparse

    import torch

    from mmretrieve.bench import generate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    p = argparse.ArgumentParser()
    generate.add_arguments(p)
    with pytest.raises(UsageError, match="--force"):
        generate.run(p.parse_args(["--size", "2b"]))
    with pytest.raises(UsageError, match="--api-model"):
        generate.run(p.parse_args(["--api", "http://127.0.0.1:1/v1"]))
    with pytest.raises(UsageError, match="batch-sizes"):
        generate.run(p.parse_args(["--batch-sizes", "0,2"]))


def test_bench_rankagg_smoke(capsys):
    from mmretrieve.cli import main

    assert main(["bench", "rankagg", "--json", "--candidates", "20", "--seeds", "2", "--sigmas", "0,1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [lv["sigma"] for lv in out["levels"]] == [0.0, 1.0]
    ms = out["levels"][1]["methods"]
    assert {"window", "sliding", "joint grid r2 winrate", "joint random r3 pagerank", "self-consistency x5"} <= set(ms)
    assert ms["first stage"]["calls"] == 0 and ms["window"]["calls"] == 1 and ms["self-consistency x5"]["calls"] == 5
    assert all(-1 <= m["tau_mean"] <= 1 and m["tau_sd"] >= 0 for m in ms.values())
    assert main(["bench", "rankagg", "--candidates", "12", "--seeds", "1", "--sigmas", "0"]) == 0
    assert "sigma 0: tau, calls" in capsys.readouterr().out


@pytest.mark.parametrize("noise", ["gauss", "swaps"])
def test_exact_ranker_recovers_the_true_order(noise):
    # one block holds every candidate: every method, one window included, sorts exactly
    small = bench_rankagg.evaluate(8, 10, 0.0, noise, 5.0, 3, 3)
    assert all(m["tau_mean"] == 1.0 for name, m in small.items() if name != "first stage")
    # more candidates than a window: sliding windows repeated until nothing moves sort exactly; one pass of
    # them or JointRank's r = 2, 3 designs see only some of the pairs, so they need not (measured ~0.86-0.99)
    big = bench_rankagg.evaluate(30, 10, 0.0, noise, 5.0, 3, 3)
    assert big["sliding until stable"]["tau_mean"] == 1.0
    assert big["first stage"]["tau_mean"] < 0.9


def test_aggregation_beats_a_single_window_under_noise():
    # 30 candidates, window 10, a noisy ranker: a single window leaves 20 candidates in the first stage's
    # order (tau ~0.75); JointRank's aggregated blocks see all of them (~0.88): a gap ~5x the margin
    res = bench_rankagg.evaluate(30, 10, 1.0, "gauss", 5.0, 4, 8)
    single = res["window"]["tau_mean"]
    for name in ("joint grid r2 winrate", "joint random r3 pagerank", "sliding"):
        assert res[name]["tau_mean"] > single + 0.05, (name, res[name], single)
    # within one window, shuffled rankings aggregated beat one noisy ranking of it (stronger noise, 10 seeds)
    win = bench_rankagg.evaluate(10, 10, 2.0, "gauss", 5.0, 6, 10)
    assert win["self-consistency x7"]["tau_mean"] > win["window"]["tau_mean"] + 0.03

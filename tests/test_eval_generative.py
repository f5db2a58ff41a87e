"""``mmretrieve eval cirr --pipeline cotrr`` on the CIR fixtures: per-stage metrics and generation cost,
the descriptions written next to the report, and a run killed with SIGKILL that resumes from the
generation cache (issue 20)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cir_fixtures import make_cirr

from mmretrieve.testing import write_tiny_vlm


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    return write_tiny_vlm(tmp_path_factory.mktemp("vlm") / "qwen2_vl", "qwen2_vl")


def _rows(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=5) as c:
            return int(c.execute("SELECT COUNT(*) FROM generations").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def test_eval_cotrr_reports_stages_cost_and_descriptions(tmp_path, samples, vlm, monkeypatch, capsys):
    from mmretrieve.cli import main

    monkeypatch.setenv("MMRETRIEVE_GENERATION_CACHE", str(tmp_path / "gen" / "generations.sqlite"))
    make_cirr(tmp_path / "cirr", samples)
    args = ["eval", "cirr", "--root", str(tmp_path / "cirr"), "--pipeline", "cotrr", "--vlm", vlm, "--cache",
            str(tmp_path / "c"), "--out", str(tmp_path / "o"), "--json"]
    assert main(args) == 0
    got = json.loads(capsys.readouterr().out)
    assert set(got) == {"coarse", "listwise", "cost"}
    assert "recall@1" in got["listwise"] and "recall_subset@1" in got["coarse"]
    n = json.loads((tmp_path / "o" / "report.json").read_text())["dataset"]["queries_evaluated"]
    assert got["cost"]["describe"]["prompts"] == n and got["cost"]["listwise"]["prompts"] == n
    assert got["cost"]["listwise"]["generated_tokens"] > 0
    lines = (tmp_path / "o" / "descriptions.jsonl").read_text().splitlines()
    assert len(lines) == n and all(json.loads(x)["description"] for x in lines)
    assert "## Generation cost" in (tmp_path / "o" / "report.md").read_text()
    assert main(args) == 0  # a re-run: everything from the cache
    again = json.loads(capsys.readouterr().out)
    assert all(c["generated_tokens"] == 0 and c["cache_hits"] == c["prompts"] for c in again["cost"].values())
    assert again["listwise"] == got["listwise"] and again["coarse"] == got["coarse"]


def test_eval_killed_with_sigkill_resumes_from_the_generation_cache(tmp_path, samples, vlm, capsys, monkeypatch):
    from mmretrieve.cli import main

    make_cirr(tmp_path / "cirr", samples)
    gen = tmp_path / "gen"
    args = ["eval", "cirr", "--root", str(tmp_path / "cirr"), "--pipeline", "cotrr", "--vlm", vlm, "--cache",
            str(tmp_path / "c"), "--json", "-q"]
    env = {**os.environ, "MMRETRIEVE_GENERATION_CACHE": str(gen / "generations.sqlite"), "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "mmretrieve", *args, "--out", str(tmp_path / "killed")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=os.setsid)
    db = gen / "generations.sqlite"
    deadline = time.monotonic() + 240
    try:
        while _rows(db) < 5 and proc.poll() is None and time.monotonic() < deadline:  # the descriptions and a listwise answer
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    done = _rows(db)
    assert done >= 5, "the run ended or stalled before the test could kill it mid-way"
    assert not (tmp_path / "killed" / "report.json").exists()
    monkeypatch.setenv("MMRETRIEVE_GENERATION_CACHE", str(gen / "generations.sqlite"))
    assert main([*args, "--out", str(tmp_path / "resumed")]) == 0
    got = json.loads(capsys.readouterr().out)
    hits = sum(c["cache_hits"] for c in got["cost"].values())
    asked = sum(c["prompts"] for c in got["cost"].values())
    assert hits == done < asked  # what was generated before the kill is not generated again, the rest is
    assert _rows(db) == asked


def test_eval_egocvr_pairwise_shows_clips_as_frames_and_judges_each_gallery(tmp_path, sample_by_id, embedded, vlm,
                                                                            monkeypatch):
    from test_video import make_egocvr

    from mmretrieve.eval import evaluate, load_dataset
    from mmretrieve.rerank.pipeline import pipeline_from_options

    monkeypatch.setenv("MMRETRIEVE_GENERATION_CACHE", str(tmp_path / "gen.sqlite"))
    make_egocvr(tmp_path / "ego", sample_by_id)
    ds = load_dataset("egocvr", tmp_path / "ego")
    pipe = pipeline_from_options(pipeline="egocvr-pairwise", vlm={"model": vlm})
    pipe.stages[0].gen.options["max_new_tokens"] = 4
    res = evaluate(ds, encoder=embedded, pipeline=pipe, cache=tmp_path / "cache", video={"num_frames": 4})
    assert res.stages == ["coarse", "pairwise"] and set(res.metrics["pairwise"]) == set(res.metrics["coarse"])
    queries = {q.qid: q for q in ds.queries}
    for qid, lists in res.rankings["pairwise"].items():  # per gallery: a permutation of the coarse list filtered to it
        for proto, ranked in lists.items():
            gallery = set(queries[qid].info[f"{proto}_gallery"])
            assert sorted(ranked) == sorted(x for x in res.rankings["coarse"][qid] if x in gallery)
    c = res.cost["pairwise"]
    assert c["prompts"] >= 2 and c["prompts"] % 2 == 0 and c["generated_tokens"] > 0  # both orders of every pair

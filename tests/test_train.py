"""``mmretrieve train verifier``: LoRA on the yes/no verifier, on a toy a tiny random model can learn.

The toy: every query asks for "the same picture tinted red"; the target is the reference photo tinted
red, the negatives are photos tinted blue. A tiny random Qwen2-VL (fp32) learns it in 200 steps (held-out
balanced accuracy 1.0 on seeds 0, 1, 2 when this was written; chance is 0.5)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    from transformers.utils import logging as hf_logging

    from mmretrieve.testing import write_tiny_vlm

    hf_logging.set_verbosity_error()
    return write_tiny_vlm(tmp_path_factory.mktemp("vlm") / "qwen2_vl", "qwen2_vl")


@pytest.fixture(scope="module")
def toy(tmp_path_factory, samples):
    """The red/blue toy as JSONL (3 triplets per photo) plus 3 bad lines."""
    root = tmp_path_factory.mktemp("toy")
    ids = [s.id for s in samples]
    for s in samples:
        im = Image.open(s.path).convert("RGB").resize((56, 56))
        Image.blend(im, Image.new("RGB", im.size, (255, 0, 0)), 0.5).save(root / f"red_{s.id}.png")
        Image.blend(im, Image.new("RGB", im.size, (0, 0, 255)), 0.5).save(root / f"blue_{s.id}.png")
    (root / "broken.png").write_bytes(b"not a png")
    lines = []
    for i, sid in enumerate(ids):
        for j in range(3):
            negs = [f"blue_{ids[(i + 1 + j * 3 + t) % len(ids)]}.png" for t in range(2)]
            lines.append({"reference": f"blue_{sid}.png", "text": "the same picture tinted red", "target": f"red_{sid}.png",
                          "negatives": negs})
    lines += [{"reference": "blue_coins.png", "text": "  ", "target": "red_coins.png"},
              {"reference": "nowhere.png", "text": "tinted red", "target": "red_coins.png"},
              {"reference": "blue_coins.png", "text": "tinted red", "target": "broken.png"}]
    f = root / "train.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")
    return f


def _args(model, toy, out, cache, *extra):
    return ["train", "verifier", "--model", model, "--data", "jsonl", "--file", str(toy), "--out", str(out),
            "--cache", str(cache), "--negatives", "0", "--val-queries", "12", "--val-k", "6", "--dtype", "fp32",
            "--device", "cpu", "--lr", "1e-2", "--batch-size", "8", "--rank", "8", "--lora-alpha", "16",
            "--dropout", "0.0", *extra]


def test_toy_is_learned_and_the_adapter_reranks(tiny_qwen, toy, tmp_path, capsys):
    from mmretrieve.cli import main
    from mmretrieve.index import open_index

    out = tmp_path / "run"
    assert main(_args(tiny_qwen, toy, out, tmp_path / "cache", "--max-steps", "200", "--json")) == 0
    rec = json.loads((out / "run.json").read_text())
    assert rec["status"] == "finished" and rec["steps"]["total"] == 200
    last = rec["metrics"][-1]
    assert rec["base"]["balanced_accuracy"] <= 0.6  # a random model: about chance
    assert last["balanced_accuracy"] >= 0.75, last
    # bad data: skipped, counted and listed with why
    reasons = {s["qid"]: s["reason"] for s in rec["data"]["skipped"]}
    assert len(reasons) == 4 and rec["data"]["counts"]["triplets_used"] == 66
    assert any(r == "empty text" for r in reasons.values())
    assert any("missing reference image" in r for r in reasons.values())
    assert any("target broken.png is not in the index" in r for r in reasons.values())
    assert any(r.startswith("unreadable line") for r in reasons.values())
    assert rec["data"]["fingerprints"]["annotations"]["train.jsonl"]
    assert rec["versions"]["peft"] and rec["config"]["seed"] == 0
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-200"]
    # the adapter through the existing code path: mllm:adapter= changes the verifier's ordering
    idx = open_index(next(p for p in (tmp_path / "cache").iterdir() if p.is_dir() and p.name.startswith("train-jsonl")))
    q = dict(image=str(toy.parent / "blue_horse.png"), text="the same picture tinted red", k=8)
    spec = f"mllm:model={tiny_qwen},k=8,dtype=fp32"
    base = [h.key for h in idx.search(**q, pipeline=spec)[:8]]
    adapted = idx.search(**q, pipeline=f"{spec},adapter={out / 'adapter'}")
    keys = [h.key for h in adapted[:8]]
    assert keys != base
    reds = [i for i, k in enumerate(keys) if k.startswith("red_")]
    blues = [i for i, k in enumerate(keys) if k.startswith("blue_")]
    assert reds and blues and max(reds) < min(blues), keys  # every red candidate above every blue one
    # and the server's verifier: serve --mllm DIR --adapter OUT/adapter
    from mmretrieve.errors import UsageError
    from mmretrieve.serve.config import ServeConfig
    from mmretrieve.serve.safety import RerankPolicy

    ServeConfig(indexes=["x"], mllm=tiny_qwen, adapter=str(out / "adapter")).check()
    with pytest.raises(UsageError, match="--adapter .* no such folder"):
        ServeConfig(indexes=["x"], mllm=tiny_qwen, adapter=str(tmp_path / "nope")).check()
    stage, _ = RerankPolicy(max_rerank_k=50, mllm=tiny_qwen, adapter=str(out / "adapter"))._stage(
        "mllm", {"k": 8}, None, preset=False, check=False)
    assert stage.adapter == str(out / "adapter")


def _adapter_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _cli(args, **kw):
    env = {**os.environ, "MMRETRIEVE_DECODER_START": "fork", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "mmretrieve", "--threads", "1", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)


def test_resume_after_kill_gives_the_same_adapter(tiny_qwen, toy, tmp_path):
    cache = tmp_path / "cache"
    extra = ["--max-steps", "60", "--save-every", "5", "--dropout", "0.1", "--seed", "3"]
    full = _cli(_args(tiny_qwen, toy, tmp_path / "full", cache, *extra))
    assert full.wait(timeout=300) == 0, full.stderr.read().decode()[-2000:]
    out = tmp_path / "killed"
    p = _cli(_args(tiny_qwen, toy, out, cache, *extra))
    deadline = time.time() + 240
    while not (out / "checkpoints" / "step-5").is_dir():
        assert p.poll() is None, p.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (out / "adapter").exists()  # killed mid-run
    steps = sorted(int(c.name.split("-")[1]) for c in (out / "checkpoints").glob("step-*"))
    assert steps and steps[-1] < 60
    again = _cli(_args(tiny_qwen, toy, out, cache, *extra))
    assert again.wait(timeout=300) == 0, again.stderr.read().decode()[-2000:]
    a, b = _adapter_weights(tmp_path / "full"), _adapter_weights(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-exact on CPU fp32
    assert len(list((out / "checkpoints").glob("step-*"))) == 2  # the last two kept
    rec = json.loads((out / "run.json").read_text())
    assert [m["step"] for m in rec["metrics"]] == [m["step"] for m in json.loads((tmp_path / "full" / "run.json").read_text())["metrics"]]
    # a damaged last checkpoint (truncated weights): set aside, named, and the run resumes from the one before
    last = out / "checkpoints" / "step-60" / "trainable.safetensors"
    last.write_bytes(last.read_bytes()[:100])
    fixed = _cli(_args(tiny_qwen, toy, out, cache, *extra))
    assert fixed.wait(timeout=300) == 0
    err = fixed.stderr.read().decode()
    assert "step-60 is damaged" in err and (out / "checkpoints" / "step-60.damaged").is_dir()
    c = _adapter_weights(out)
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_cirr_train_split_mines_hard_negatives(tmp_path, samples, embedded, tiny_qwen, capsys):
    from cir_fixtures import make_cirr

    from mmretrieve.train.data import build_data

    root = tmp_path / "cirr"
    make_cirr(root, samples)
    for kind, name in (("captions", "cap"), ("image_splits", "split")):
        (root / kind / f"{name}.rc2.train.json").write_text((root / kind / f"{name}.rc2.val.json").read_text())
    data = build_data("cirr", root=root, encoder=embedded, cache=tmp_path / "c", negatives=2, random_negatives=1,
                      val_queries=2, val_k=4, seed=0)
    assert data.counts["triplets_used"] == 8 and not data.skipped
    yes = [e for e in data.train if e.label == 1]
    no = [e for e in data.train if e.label == 0]
    assert len(yes) == len(no)  # balanced by repetition
    for e in no:
        assert e.candidate != e.reference  # the reference is never a negative, nor the target
    assert len(data.val_queries) == 2 and all(len(v.shortlist) == 4 for v in data.val_queries)
    assert data.fingerprints["annotations"]["captions/cap.rc2.train.json"]
    # the command end to end on the CIR fixture: a few steps, an adapter the verifier loads
    from mmretrieve.cli import main

    out = tmp_path / "run"
    assert main(["train", "verifier", "--model", tiny_qwen, "--data", "cirr", "--root", str(root), "--out", str(out),
                 "--cache", str(tmp_path / "c"), "--negatives", "2", "--val-queries", "2", "--val-k", "4",
                 "--dtype", "fp32", "--device", "cpu", "--batch-size", "4", "--rank", "2", "--max-steps", "4",
                 "--save-every", "2", "--json"]) == 0
    rec = json.loads((out / "run.json").read_text())
    assert rec["status"] == "finished" and rec["data"]["counts"]["triplets_used"] == 8
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_help_and_refusals(tiny_qwen, tmp_path, capsys):
    from mmretrieve.cli import main
    from mmretrieve.errors import TrainingError
    from mmretrieve.train.verifier import target_module_names

    with pytest.raises(SystemExit) as e:
        main(["train", "verifier", "--help"])
    assert e.value.code == 0 and "--negatives" in capsys.readouterr().out
    from transformers import AutoModelForImageTextToText

    m = AutoModelForImageTextToText.from_pretrained(tiny_qwen)
    names = target_module_names(m, None)
    assert names and all("language_model" in n for n in names)
    with pytest.raises(TrainingError, match="its linear layers are named"):
        target_module_names(m, "nosuch_proj")

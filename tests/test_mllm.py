"""The MLLM yes/no verifier on tiny random models of real architectures (Qwen2-VL, LLaVA, Idefics3),
loaded from local folders through the Auto classes exactly as real models are."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmretrieve import build_index, open_index
from mmretrieve.query import Query
from mmretrieve.rerank import create_reranker
from mmretrieve.rerank.mllm import MLLMError, resolve_answer_ids
from mmretrieve.testing import write_tiny_vlm

#: results depend on the precision `auto` picks: `make test` also runs these with fp32 forced
pytestmark = pytest.mark.precision

FAMILIES = ["qwen2_vl", "llava", "idefics3"]


@pytest.fixture(scope="module")
def tiny_vlms(tmp_path_factory):
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    base = tmp_path_factory.mktemp("vlm")
    return {f: write_tiny_vlm(base / f, f) for f in FAMILIES}


@pytest.fixture()
def photo_index(photo_dir, embedded):
    build_index("p", photo_dir, encoder=embedded, patches=True)
    return open_index("p")


def _direct_p_yes(model_dir, text: str, images, dtype=torch.float32) -> float:
    """Reference: processor + model called directly, softmax over the Yes/No logits at the last position,
    at ``dtype`` (the precision the reranker under test runs at: bf16 on CPUs with native bf16)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    proc = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype).eval()
    yes = proc.tokenizer.convert_tokens_to_ids("Yes")
    no = proc.tokenizer.convert_tokens_to_ids("No")
    batch = proc(text=[text], images=[images], return_tensors="pt")
    for k in ("pixel_values", "pixel_values_videos"):
        if k in batch:
            batch[k] = batch[k].to(dtype)
    with torch.no_grad():
        logits = model(**batch).logits[0, -1]
    return float(torch.softmax(logits[[yes, no]].float(), -1)[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_token_ids_and_p_yes(family, tiny_vlms, photo_index, sample_by_id):
    r = create_reranker("mllm", model=tiny_vlms[family], k=4, batch_size=1)
    proc = r.load()[0]
    # the configured answer words resolve to their single token ids
    assert r.load()[2:4] == (proc.tokenizer.convert_tokens_to_ids("Yes"), proc.tokenizer.convert_tokens_to_ids("No"))
    q = Query(image=sample_by_id["chelsea"].path, text="a cup of coffee")
    cand = r._image_of(photo_index, sample_by_id["coffee"].path)
    ref = r._image_of(photo_index, q.image)
    text, images = r.build(q, ref, cand)
    assert 'modified as follows: "a cup of coffee"? Answer Yes or No.' in text
    # phrasings of one request (FashionIQ's captions in both orders): the prompt asks with the first
    both = r.build(Query(image=q.image, text=["is red and has long sleeves", "has long sleeves and is red"]), ref, cand)[0]
    assert '"is red and has long sleeves"?' in both and "has long sleeves and is red" not in both
    assert len(images) == 2 and images[0] is ref and images[1] is cand
    image_marker = {"qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>", "llava": "<image>", "idefics3": "<image>"}[family]
    assert text.count(image_marker) == 2
    assert text.rstrip().endswith({"qwen2_vl": "assistant", "llava": "ASSISTANT:", "idefics3": "Assistant:"}[family])
    p = r.score_prompts([text], [images])[0]
    assert 0 < p < 1
    dtype = next(r.load()[1].parameters()).dtype  # auto: bf16 on CPUs with native bf16, else fp32
    assert p == pytest.approx(_direct_p_yes(tiny_vlms[family], text, images, dtype), abs=1e-5)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_batching_gives_the_same_scores_as_one_by_one(family, tiny_vlms, photo_index, sample_by_id):
    q = Query(image=sample_by_id["motorcycle_left"].path, text="a horse instead")
    ids = np.array(photo_index.meta.all_ids()[:7])
    one = create_reranker("mllm", model=tiny_vlms[family], k=7, batch_size=1).score(photo_index.view, q, ids, np.zeros(len(ids))).scores
    many = create_reranker("mllm", model=tiny_vlms[family], k=7, batch_size=4).score(photo_index.view, q, ids, np.zeros(len(ids))).scores
    np.testing.assert_allclose(one, many, atol=1e-5)
    assert len(set(np.round(one, 6))) > 1  # different candidates, different answers
    text_q = Query(text="a photo of a cat")
    a = create_reranker("mllm", model=tiny_vlms[family], k=7, batch_size=1).score(photo_index.view, text_q, ids, np.zeros(len(ids))).scores
    b = create_reranker("mllm", model=tiny_vlms[family], k=7, batch_size=3).score(photo_index.view, text_q, ids, np.zeros(len(ids))).scores
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_lora_adapter_is_applied(tiny_vlms, tmp_path, photo_index, sample_by_id):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(tiny_vlms["qwen2_vl"])
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    peft_model = get_peft_model(base, cfg)
    peft_model.save_pretrained(tmp_path / "lora")
    q = Query(text="a photo of a cat")
    ids = np.array(photo_index.meta.all_ids()[:4])
    # fp32 pinned: merged and unmerged adapters are compared for equality (bf16 rounds them apart)
    plain = create_reranker("mllm", model=tiny_vlms["qwen2_vl"], k=4, dtype="fp32").score(photo_index.view, q, ids, np.zeros(len(ids))).scores
    merged = create_reranker("mllm", model=tiny_vlms["qwen2_vl"], adapter=str(tmp_path / "lora"), k=4,
                             dtype="fp32").score(photo_index.view, q, ids, np.zeros(len(ids))).scores
    unmerged = create_reranker("mllm", model=tiny_vlms["qwen2_vl"], adapter=str(tmp_path / "lora"), merge_adapter=False,
                               k=4, dtype="fp32").score(photo_index.view, q, ids, np.zeros(len(ids))).scores
    assert np.abs(plain - merged).max() > 1e-4  # the adapter changes the answers
    np.testing.assert_allclose(merged, unmerged, atol=1e-4)  # merged or not, the same model


def test_refusals_say_how_to_provide_a_model(tiny_vlms, tmp_path):
    with pytest.raises(MLLMError, match="needs a vision-language model: mllm:model=Qwen/Qwen2-VL-2B-Instruct"):
        create_reranker("mllm")
    with pytest.raises(MLLMError, match="model folder not found"):
        create_reranker("mllm", model=str(tmp_path / "missing")).load()
    with pytest.raises(MLLMError, match="adapter folder not found"):
        create_reranker("mllm", model=tiny_vlms["llava"], adapter=str(tmp_path / "nope")).load()
    with pytest.raises(MLLMError, match="prompt preset 'nosuch' not found"):
        create_reranker("mllm", model=tiny_vlms["llava"], prompt="nosuch")
    r = create_reranker("mllm", model=tiny_vlms["llava"])
    tok = r.load()[0].tokenizer
    with pytest.raises(MLLMError, match="'Certainly' is .* tokens"):
        resolve_answer_ids(tok, "Certainly", "No")
    first = resolve_answer_ids(tok, "Certainly", "No", fallback="first")
    assert first[0] == tok.encode("Certainly", add_special_tokens=False)[0]


def test_verifier_after_emd_and_after_coarse(tiny_vlms, photo_index, sample_by_id):
    q = dict(image=sample_by_id["chelsea"].path, text="a cup of coffee", k=6)
    res = photo_index.search(**q, pipeline=f"emd:k=10|mllm:model={tiny_vlms['qwen2_vl']},k=5")
    assert res.stages == ["coarse", "emd", "mllm"]
    assert all("p_yes" in h.extra for h in res[:5]) and "mllm" in res[0].stage_ranks
    scores = [h.stage_scores["mllm"] for h in res[:5]]
    assert scores == sorted(scores, reverse=True)  # re-ranked by P(yes) (alpha = 1)
    res2 = photo_index.search(**q, pipeline=f"mllm:model={tiny_vlms['llava']},k=4,collage=true")
    assert res2.stages == ["coarse", "mllm"]


def test_eval_reports_the_verifier_and_compares_fusions(tiny_vlms, tmp_path, samples, embedded, capsys):
    from cir_fixtures import make_cirr

    from mmretrieve.cli import main
    from mmretrieve.eval import evaluate, evaluate_fusions, load_dataset

    make_cirr(tmp_path / "cirr", samples)
    ds = load_dataset("cirr", tmp_path / "cirr", "val")
    spec = f"mllm:model={tiny_vlms['qwen2_vl']},k=3,batch_size=3"
    res = evaluate_fusions(ds, ["sum", "intersection"], encoder=embedded, pipeline=spec, cache=tmp_path / "c")
    assert res.stages == ["sum/coarse", "sum/mllm", "intersection/coarse", "intersection/mllm"]
    for f in ("sum", "intersection"):
        single = evaluate(ds, fusion=f, encoder=embedded, cache=tmp_path / "c")
        assert res.metrics[f"{f}/coarse"] == pytest.approx(single.metrics["coarse"])
    out = tmp_path / "rep"
    assert main(["eval", "cirr", "--root", str(tmp_path / "cirr"), "--fusion", "sum,intersection", "--rerank", spec,
                 "--cache", str(tmp_path / "c"), "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"sum/coarse", "sum/mllm", "intersection/coarse", "intersection/mllm"}
    report = json.loads((out / "report.json").read_text())
    assert set(report["changes"]["@1"]) == {"sum/mllm", "intersection/mllm"}
    assert (out / "rankings" / "intersection-mllm" / "recall.json").is_file()


def test_bench_mllm_smoke(capsys):
    from mmretrieve.cli import main

    assert main(["bench", "mllm", "--json", "--families", "qwen2_vl", "--candidates", "6", "--batch-size", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    (r,) = [r for r in out["results"] if r["family"] == "qwen2_vl"]  # on a GPU the real-size row comes too
    assert r["family"] == "qwen2_vl" and r["candidates_per_s_batched"] > 0 and r["batching_speedup"] > 0

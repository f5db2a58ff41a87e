"""``mmretrieve bench mllm``: candidates per second of the yes/no verifier, batched vs. one by one.

Tiny random models of real architectures run on CPU anywhere; with ``--real-size`` (or on a GPU) a
Qwen2-VL-2B-sized configuration with random weights is timed (the cost of the real model, not its
answers) in the reranker's automatic dtype: bf16 on GPUs and on CPUs with native bf16, fp32 otherwise
(emulated bf16 on an AVX2 CPU did not finish 8 forward passes in 25 minutes)."""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

HELP = "MLLM yes/no verifier: candidates/s one by one vs. batched (tiny models; real-size on request)"

#: Qwen2-VL-2B-Instruct's published configuration (its config.json), for timing with random weights
QWEN2_VL_2B = {
    "text_config": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}),
    "vision_config": dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                          spatial_merge_size=2, temporal_patch_size=2),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--families", default="qwen2_vl,llava,idefics3", help="tiny model families to time")
    p.add_argument("--candidates", type=int, default=24, help="candidates scored per family (default 24)")
    p.add_argument("--batch-size", type=int, default=8, help="candidates per forward pass when batched (default 8)")
    p.add_argument("--real-size", action="store_true", help="also time a Qwen2-VL-2B-sized model (random weights, bf16)")


def _images(n: int):
    from mmretrieve.media.images import load_image
    from mmretrieve.media.samples import sample_images

    s = sample_images()
    return [load_image(s[i % len(s)].path) for i in range(n)]


def _time(reranker, texts, images, bs: int) -> float:
    reranker.batch_size = bs
    reranker.score_prompts(texts[:bs], images[:bs])  # warm-up
    t = time.perf_counter()
    reranker.score_prompts(texts, images)
    return len(texts) / (time.perf_counter() - t)


def _measure(model_dir: str, n: int, bs: int, label: str, **kw) -> dict:
    from mmretrieve.query import Query
    from mmretrieve.rerank.mllm import MLLMReranker

    r = MLLMReranker(model=model_dir, k=n, **kw)
    ims = _images(n + 1)
    q = Query(image="ref.jpg", text="the same but in red")
    ref = r._image_of(None, ims[0])
    built = [r.build(q, ref, r._image_of(None, im)) for im in ims[1:]]
    texts, images = [b[0] for b in built], [b[1] for b in built]
    one = _time(r, texts, images, 1)
    many = _time(r, texts, images, bs)
    dev = str(r.load()[4])
    return {"family": label, "device": dev, "candidates": n, "batch_size": bs,
            "candidates_per_s_one_by_one": round(one, 2), "candidates_per_s_batched": round(many, 2),
            "batching_speedup": round(many / one, 2)}


def run(args: argparse.Namespace) -> dict:
    from transformers.utils import logging as hf_logging

    from mmretrieve.testing import write_tiny_vlm

    hf_logging.set_verbosity_error()
    tmp = Path(tempfile.mkdtemp(prefix="mmr-bench-mllm-"))
    rows = []
    try:
        for fam in [f.strip() for f in args.families.split(",") if f.strip()]:
            d = write_tiny_vlm(tmp / fam, fam)
            rows.append(_measure(d, args.candidates, args.batch_size, fam))
        import torch

        if args.real_size or torch.cuda.is_available():
            n = max(4, min(args.candidates, 16)) if torch.cuda.is_available() else 2
            rows.append(_real_size(tmp, n, min(args.batch_size, n)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"benchmark": "mllm", "candidates": args.candidates, "results": rows}


def render(res: dict) -> list[str]:
    out = [f"mllm verifier: {res['candidates']} candidates, composed prompt (reference + candidate image)",
           f"  {'model':34s} {'device':8s} {'one by one':>12s} {'batched':>12s} {'speedup':>8s}"]
    for r in res["results"]:
        out.append(f"  {r['family']:34s} {r['device']:8s} {r['candidates_per_s_one_by_one']:9.2f}/s "
                   f"{r['candidates_per_s_batched']:9.2f}/s {r['batching_speedup']:7.2f}x  (batch {r['batch_size']})")
    return out


def _real_size(tmp: Path, n: int, bs: int) -> dict:
    """Qwen2-VL-2B-sized random model with the tiny family's processor (token ids re-mapped)."""
    import torch
    from transformers import AutoProcessor, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from mmretrieve.testing import write_tiny_vlm

    d = Path(write_tiny_vlm(tmp / "qwen2_vl_2b", "qwen2_vl"))
    proc = AutoProcessor.from_pretrained(d)
    tok = proc.tokenizer
    ids = {s: tok.convert_tokens_to_ids(s) for s in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    cfg = Qwen2VLConfig(text_config=QWEN2_VL_2B["text_config"], vision_config=QWEN2_VL_2B["vision_config"],
                        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    from mmretrieve.rerank.mllm import MLLMReranker

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = MLLMReranker(model=str(d))._torch_dtype(torch.device(dev))
    with torch.device(dev):
        model = Qwen2VLForConditionalGeneration(cfg).to(dtype)
    model.save_pretrained(d)
    del model
    # 448 px images (256 visual tokens each), as in the measured reference configuration
    proc.image_processor.max_pixels = proc.image_processor.min_pixels = 448 * 448
    proc.save_pretrained(d)
    label = f"Qwen2-VL-2B config (random, {str(dtype).replace('torch.', '')})"
    return _measure(str(d), n, bs, label, max_pixels=448 * 448)



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
    """Qwen2-VL-2B-sized random model with the tiny family's processor (token ids re-mapped), 448 px images
    (256 visual tokens each), as in the measured reference configuration."""
    import torch

    from mmretrieve.rerank.vlm import torch_dtype
    from mmretrieve.testing.tiny_vlm import write_qwen2_vl_2b_sized

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch_dtype("auto", dev)
    d = write_qwen2_vl_2b_sized(tmp / "qwen2_vl_2b", "auto", dev.type)
    label = f"Qwen2-VL-2B config (random, {str(dtype).replace('torch.', '')})"
    return _measure(str(d), n, bs, label, max_pixels=448 * 448)



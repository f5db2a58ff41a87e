"""``mmretrieve bench generate``: throughput of the generative stages, one prompt at a time vs. batched.

The prompts are the stages' own (``describe``: the reference image and the modification, one prompt per
query; ``listwise``: one window of ``--window`` candidate images per query; ``pairwise``: ``--pairs``
pairs per query), built from the packaged sample photos and answered by a ``LocalGenerator`` with the
cache off, once per batch size: queries/s, prompts/s, generated tokens/s and seconds per query, and the
ratio of each batched rate to the batch-size-1 rate, side by side.

- no ``--model``: a tiny random Qwen2-VL (a smoke run: the figures are a tiny random model's, not a real
  one's; its answers are random text, so it generates up to ``--max-new-tokens`` every time);
- ``--size 2b``: a Qwen2-VL-2B-sized configuration with random weights (the cost of the real model, not
  its answers) for GPU throughput checks; refused on a CPU without ``--force`` (minutes per prompt);
- ``--api URL --api-model NAME``: an OpenAI-compatible endpoint instead (batch size = requests in flight);
- ``--endpoint``: the same prompts also through a loopback ``serve_openai`` server over the same local
  model, local vs. endpoint.

The target it reports: a listwise window of 10 candidates plus a description under 1 s per query on one
H100-class GPU with a 2B model (measured only on such a GPU with a 2B-sized model).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

HELP = ("generative stages (describe, listwise, pairwise): queries/s, prompts/s, tokens/s per batch size "
        "(tiny random model by default)")

#: the per-query target (describe + one listwise window of 10) on one H100-class GPU with a 2B model
TARGET_S_PER_QUERY = 1.0
TARGET_WINDOW = 10
GPU_CLASS = ("H100", "H200", "H800", "GH200", "B200", "B100")
STAGES = ("describe", "listwise", "pairwise")
#: max_new_tokens per stage when --max-new-tokens is not given: the stages' defaults for a real model,
#: fewer for the tiny random one (it never stops early, so this is what it generates)
REAL_TOKENS = {"describe": 64, "listwise": 512, "pairwise": 8}
TINY_TOKENS = {"describe": 32, "listwise": 64, "pairwise": 8}
_MODIFICATIONS = ["the same but in red", "with a person in front of it", "seen from above at night",
                  "in black and white", "without the background", "as a drawing"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a local image-text-to-text model folder (default: a tiny random Qwen2-VL)")
    p.add_argument("--size", choices=("tiny", "2b"), default="tiny",
                   help="without --model: tiny (random, smoke run) or 2b (a Qwen2-VL-2B-sized config, random weights)")
    p.add_argument("--force", action="store_true", help="run --size 2b on a CPU anyway (slow: minutes per prompt)")
    p.add_argument("--api", help="an OpenAI-compatible endpoint (http://host:port/v1) to time instead of a local model")
    p.add_argument("--api-model", help="the model name the --api endpoint serves")
    p.add_argument("--endpoint", "--compare-endpoint", dest="endpoint", action="store_true",
                   help="also answer the same prompts through a loopback OpenAI-compatible server over the local model")
    p.add_argument("--batch-sizes", default="1,4,8", help="comma-separated batch sizes (default 1,4,8)")
    p.add_argument("--queries", type=int, default=8, help="queries per stage (default 8)")
    p.add_argument("--window", type=int, default=TARGET_WINDOW, help="candidates per listwise prompt (default 10)")
    p.add_argument("--pairs", type=int, default=3, help="pairwise prompts per query (default 3)")
    p.add_argument("--stages", default=",".join(STAGES), help="stages to time (default describe,listwise,pairwise)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens generated at most per prompt (default: describe 64, listwise 512, pairwise 8; "
                        "32/64/8 for the tiny model)")
    p.add_argument("--dtype", default="auto", help="model dtype: auto, fp32, bf16, fp16 (default auto)")
    p.add_argument("--max-pixels", type=int, default=448 * 448, help="pixels per image shown (default 448*448)")


def _batch_sizes(text: str) -> list[int]:
    from mmretrieve.errors import UsageError

    try:
        out = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UsageError(f"--batch-sizes: comma-separated integers, got {text!r}") from None
    if not out or out[0] < 1:
        raise UsageError(f"--batch-sizes: positive integers, got {text!r}")
    return out


# ---- the prompts ------------------------------------------------------------------------------------
def build_prompts(model: str | None, *, queries: int, window: int, pairs: int, max_pixels: int | None,
                  stages=STAGES) -> dict[str, dict[str, Any]]:
    """stage -> {"template", "prompts", "per_query"} for ``queries`` composed queries over the sample photos,
    built by the stages themselves (their templates, image sizes and candidate labels)."""
    from mmretrieve.media.samples import sample_images
    from mmretrieve.query import Query
    from mmretrieve.rerank.describe import Describer
    from mmretrieve.rerank.listwise import ListwiseReranker
    from mmretrieve.rerank.pairwise import PairwiseReranker

    samples = [s.path for s in sample_images()]
    if len(samples) < 2:
        from mmretrieve.errors import MMRetrieveError

        raise MMRetrieveError("bench generate: the packaged sample photos are not installed")
    opts = {"model": model or "unused", "max_pixels": max_pixels}
    qs = [Query(image=samples[i % len(samples)], text=_MODIFICATIONS[i % len(_MODIFICATIONS)]) for i in range(queries)]
    out: dict[str, dict[str, Any]] = {}
    if "describe" in stages:
        d = Describer(**opts)
        built = [d.prompt_for(q) for q in qs]
        out["describe"] = {"template": built[0][0], "prompts": [p for _, p in built], "per_query": 1}
    if "listwise" in stages or "pairwise" in stages:
        lw = ListwiseReranker(k=window, window=window, stride=max(1, window // 2), **opts)
        pictures = {i: lw.picture(samples[i % len(samples)]) for i in range(max(window, 2) + queries)}
    if "listwise" in stages:
        prompts = []
        for j, q in enumerate(qs):
            block = [(j + c) % len(pictures) for c in range(window)]
            tpl, p = lw.build_prompt(q, lw.query_picture(q), block, pictures)
            prompts.append(p)
        out["listwise"] = {"template": tpl, "prompts": prompts, "per_query": 1}
    if "pairwise" in stages:
        pw = PairwiseReranker(k=window, **opts)
        prompts = []
        for j, q in enumerate(qs):
            qimg = pw.query_picture(q)
            for k in range(pairs):
                a, b = (j + k) % len(pictures), (j + k + 1) % len(pictures)
                tpl, p = pw.build_prompt(q, qimg, pictures[a], pictures[b])
                prompts.append(p)
        out["pairwise"] = {"template": tpl, "prompts": prompts, "per_query": pairs}
    return out


# ---- timing -----------------------------------------------------------------------------------------
def time_stage(gen, prompts, template: str, queries: int) -> dict[str, float]:
    """Generate ``prompts`` once (after a warm-up of one batch) and the rates it ran at."""
    warm = getattr(gen, "batch_size", None) or getattr(gen, "concurrency", 1)
    gen.generate(prompts[:warm], template=template + "|warmup")
    t = time.perf_counter()
    _, cost = gen.generate(prompts, template=template)
    wall = time.perf_counter() - t
    return {"seconds": round(wall, 4), "prompts": len(prompts), "queries": queries,
            "queries_per_s": round(queries / wall, 3), "prompts_per_s": round(len(prompts) / wall, 3),
            "generated_tokens": cost.generated_tokens, "prompt_tokens": cost.prompt_tokens,
            "tokens_per_s": round(cost.generated_tokens / wall, 2), "s_per_query": round(wall / queries, 4)}


def _with_ratios(rows: list[dict]) -> list[dict]:
    """Each row's prompts/s over the batch-size-1 row's of the same stage and backend."""
    base = {(r["backend"], r["stage"]): r["prompts_per_s"] for r in rows if r["batch_size"] == 1}
    for r in rows:
        b = base.get((r["backend"], r["stage"]))
        r["vs_batch_1"] = round(r["prompts_per_s"] / b, 2) if b else None
    return rows


def _measure(make_gen, backend: str, built: dict, batch_sizes: list[int], tokens: dict[str, int],
             queries: int) -> list[dict]:
    rows = []
    for stage, b in built.items():
        for bs in batch_sizes:
            gen = make_gen(bs, tokens[stage])
            r = time_stage(gen, b["prompts"], b["template"], queries)
            rows.append({"backend": backend, "stage": stage, "batch_size": bs, "max_new_tokens": tokens[stage], **r})
            log.debug("%s %s batch %d: %.3f prompts/s", backend, stage, bs, r["prompts_per_s"])
    return rows


def _local(model_dir: str, dtype: str):
    from mmretrieve.rerank.generate import LocalGenerator

    def make(bs: int, max_new: int):
        return LocalGenerator(model_dir, batch_size=bs, max_new_tokens=max_new, dtype=dtype, cache=False,
                              what="bench-generate")
    return make


def _remote(url: str, name: str):
    from mmretrieve.rerank.endpoint import EndpointGenerator

    def make(bs: int, max_new: int):
        return EndpointGenerator(url, name, concurrency=bs, max_new_tokens=max_new, cache=False, what="bench-generate")
    return make


def _device_info(model_dir: str | None, dtype: str) -> dict[str, Any]:
    import torch

    from mmretrieve.rerank.vlm import torch_dtype
    from mmretrieve.runtime import resolve_device

    dev = resolve_device(None)
    info = {"device": dev.type, "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else None,
            "torch_threads": torch.get_num_threads()}
    if model_dir is not None:
        info["dtype"] = str(torch_dtype(dtype, dev)).replace("torch.", "")
    return info


def write_2b(directory: Path, dtype: str = "auto") -> str:
    """A Qwen2-VL-2B-sized random model (``testing.write_qwen2_vl_2b_sized``)."""
    from mmretrieve.testing.tiny_vlm import write_qwen2_vl_2b_sized

    return write_qwen2_vl_2b_sized(directory, dtype)


def _target(rows: list[dict], device: dict, model_kind: str, window: int) -> dict[str, Any]:
    """describe + listwise seconds per query (at batch 1 and at the best batch size) against the target."""
    local = [r for r in rows if r["backend"] != "endpoint"]
    by = {(r["stage"], r["batch_size"]): r["s_per_query"] for r in local}
    sizes = sorted({bs for (st, bs) in by if (("describe", bs) in by and ("listwise", bs) in by)})
    if not sizes:
        return {"measured": False, "why": "needs both the describe and the listwise stage"}
    per = {bs: round(by[("describe", bs)] + by[("listwise", bs)], 4) for bs in sizes}
    best = min(per, key=per.get)
    gpu = device.get("gpu") or ""
    on_class = any(g in gpu for g in GPU_CLASS)
    applies = on_class and model_kind == "2b" and window == TARGET_WINDOW
    return {"s_per_query_batch_1": per.get(1), "s_per_query_best": per[best], "best_batch_size": best,
            "by_batch_size": per, "target_s": TARGET_S_PER_QUERY, "applies": applies,
            "met": (per[best] < TARGET_S_PER_QUERY) if applies else None, "gpu": gpu or None}


def run(args: argparse.Namespace) -> dict:
    import torch
    from transformers.utils import logging as hf_logging

    from mmretrieve.errors import UsageError

    hf_logging.set_verbosity_error()
    sizes = _batch_sizes(args.batch_sizes)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise UsageError(f"--stages: choose from {', '.join(STAGES)}, got {args.stages!r}")
    if args.queries < 1 or args.window < 2 or args.pairs < 1:
        raise UsageError("--queries >= 1, --window >= 2 and --pairs >= 1")
    if bool(args.api) != bool(args.api_model):
        raise UsageError("--api needs --api-model (the model name the endpoint serves), and the other way round")
    if args.api and (args.model or args.size != "tiny"):
        raise UsageError("--api times an endpoint: give it without --model / --size")
    if args.size == "2b" and args.model:
        raise UsageError("--size 2b builds its own model: give --model or --size, not both")
    if args.size == "2b" and not torch.cuda.is_available() and not args.force:
        raise UsageError("--size 2b is meant for a GPU: a 2B-sized model on this CPU takes minutes per prompt "
                         "(a listwise window of 10 images is ~2,600 prompt tokens); add --force to run it anyway")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be >= 1")
    model_kind = "api" if args.api else ("local" if args.model else args.size)
    defaults = TINY_TOKENS if model_kind == "tiny" else REAL_TOKENS
    tokens = {s: args.max_new_tokens or defaults[s] for s in STAGES}

    tmp = Path(tempfile.mkdtemp(prefix="mmr-bench-generate-"))
    try:
        model_dir = args.model
        if model_kind == "tiny":
            from mmretrieve.testing import write_tiny_vlm

            model_dir = write_tiny_vlm(tmp / "qwen2_vl", "qwen2_vl")
        elif model_kind == "2b":
            t = time.perf_counter()
            model_dir = write_2b(tmp / "qwen2_vl_2b", args.dtype)
            log.info("built the 2B-sized random model in %.1f s", time.perf_counter() - t)
        built = build_prompts(model_dir, queries=args.queries, window=args.window, pairs=args.pairs,
                              max_pixels=args.max_pixels, stages=stages)
        device = _device_info(model_dir, args.dtype)
        if args.api:
            rows = _measure(_remote(args.api, args.api_model), "endpoint", built, sizes, tokens, args.queries)
        else:
            rows = _measure(_local(model_dir, args.dtype), "local", built, sizes, tokens, args.queries)
            if args.endpoint:
                from mmretrieve.testing.openai_server import serve_openai

                with serve_openai(model_dir, model_name="bench", dtype=device["dtype"]) as server:
                    rows += _measure(_remote(server.url, "bench"), "endpoint", built, sizes, tokens, args.queries)
        _with_ratios(rows)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    model_label = {"tiny": "tiny random Qwen2-VL (smoke run: not a real model's figures)",
                   "2b": "Qwen2-VL-2B-sized config, random weights (a real model's cost, not its answers)",
                   "local": str(args.model), "api": f"{args.api_model} at {args.api}"}[model_kind]
    return {"benchmark": "generate", "model": model_label, "model_kind": model_kind, "queries": args.queries,
            "window": args.window, "pairs_per_query": args.pairs, "batch_sizes": sizes, "max_new_tokens": tokens,
            "cache": "off", **device, "results": rows, "target": _target(rows, device, model_kind, args.window)}


def render(res: dict) -> list[str]:
    m = res.get("machine", {})
    out = [f"generative stages: {res['model']}",
           f"  machine: {m.get('cpu') or '?'}, {m.get('cores_available')} cores, torch threads {res.get('torch_threads')}, "
           f"device {res.get('device')}{' (' + res['gpu'] + ')' if res.get('gpu') else ''}, dtype {res.get('dtype', '-')}",
           f"  {res['queries']} queries; describe: 1 prompt/query (reference + text); listwise: 1 window of "
           f"{res['window']} candidates/query; pairwise: {res['pairs_per_query']} pairs/query; cache off; "
           f"max new tokens {', '.join(f'{k} {v}' for k, v in res['max_new_tokens'].items())}",
           f"  {'backend':9s}{'stage':9s}{'batch':>6s}{'queries/s':>11s}{'prompts/s':>11s}{'tokens/s':>10s}"
           f"{'s/query':>9s}{'vs batch 1':>11s}"]
    for r in res["results"]:
        ratio = f"{r['vs_batch_1']:.2f}x" if r.get("vs_batch_1") is not None else "-"
        out.append(f"  {r['backend']:9s}{r['stage']:9s}{r['batch_size']:6d}{r['queries_per_s']:11.3f}"
                   f"{r['prompts_per_s']:11.3f}{r['tokens_per_s']:10.1f}{r['s_per_query']:9.3f}{ratio:>11s}")
    ends = {r["backend"] for r in res["results"]}
    if {"local", "endpoint"} <= ends:
        loc = {(r["stage"], r["batch_size"]): r["prompts_per_s"] for r in res["results"] if r["backend"] == "local"}
        out.append("  endpoint vs local (prompts/s; endpoint batch size = requests in flight, the server answers one by one):")
        for r in res["results"]:
            if r["backend"] == "endpoint" and (r["stage"], r["batch_size"]) in loc:
                out.append(f"    {r['stage']:9s} batch {r['batch_size']:3d}: {r['prompts_per_s'] / loc[(r['stage'], r['batch_size'])]:.2f}x")
    t = res["target"]
    goal = (f"target: a listwise window of {TARGET_WINDOW} candidates plus a description under "
            f"{TARGET_S_PER_QUERY:g} s per query on one H100-class GPU with a 2B model")
    out.append("  " + goal)
    if t.get("s_per_query_best") is None:
        out.append(f"    not measured: {t.get('why')}")
        return out
    measured = (f"    measured here: describe + listwise {t['s_per_query_best']:.3f} s/query at batch {t['best_batch_size']}"
                + (f", {t['s_per_query_batch_1']:.3f} s/query at batch 1"
                   if t.get("s_per_query_batch_1") is not None and t["best_batch_size"] != 1 else ""))
    out.append(measured)
    if t["applies"]:
        out.append(f"    on {t['gpu']} with a 2B-sized model: {'MET' if t['met'] else 'NOT MET'}")
    elif res.get("device") != "cuda":
        out.append("    this run is on a CPU: the target applies to a GPU and was not measured here")
    else:
        why = []
        if res.get("model_kind") != "2b":
            why.append("the model is not the 2B-sized one (--size 2b)")
        if not any(g in (t.get("gpu") or "") for g in GPU_CLASS):
            why.append(f"{t.get('gpu')} is not H100-class")
        if res.get("window") != TARGET_WINDOW:
            why.append(f"the window is {res.get('window')}, not {TARGET_WINDOW}")
        out.append(f"    the target does not apply to this run: {'; '.join(why)}")
    return out

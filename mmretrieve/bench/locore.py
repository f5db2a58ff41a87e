"""``mmretrieve bench locore``: the ``locore`` reranker's cost per query -- one Longformer pass over the
query and ``K`` candidates of ``--descriptors`` descriptors each (``(1 + K) * (descriptors + 2)`` tokens;
K = 100 and 48 descriptors make LOCORE's 5050-token sequence, padded to 5120).

Random weights (the cost does not depend on them): ``--size tiny`` (the test checkpoint's shape, hidden
32, 2 layers) and ``--size base`` (Longformer-base's shape: hidden 768, 12 layers, window 512, 5122
positions, 768-dim descriptors -- the published LOCORE model). Synthetic descriptors stand in for the
patch store, so the figure is the model's cost alone (descriptor look-up is ``emd``'s, measured by
``bench rerank``). The machine's fp32 matmul rate (SGEMM) is measured in the same run for scale.
"""

from __future__ import annotations

import argparse

import numpy as np

HELP = "locore reranker: cost per query of one long-context pass over K candidates (tiny / Longformer-base shapes)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-K", type=int, default=100, help="candidates per query (default 100, one window)")
    p.add_argument("--descriptors", type=int, default=48, help="descriptors per image (default 48)")
    p.add_argument("--size", default="tiny,base", help="model shapes, comma-separated: tiny, base (default tiny,base)")
    p.add_argument("--queries", type=int, default=2, help="timed queries per size (default 2; median reported)")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda when present)")
    p.add_argument("--dtype", default="auto", help="auto (fp16 on GPU, fp32 on CPU), fp32, bf16, fp16")


def _net(size: str, descriptors: int, K: int):
    from transformers import LongformerConfig

    from mmretrieve.rerank.locore import LocoreNet
    from mmretrieve.testing.tiny_locore import tiny_locore_config

    if size == "base":
        return LocoreNet(LongformerConfig(attention_window=[512] * 12, max_position_embeddings=5122), local_dim=768), 768
    if size == "tiny":
        return LocoreNet(tiny_locore_config(max_images=K + 1, num_descriptors=descriptors), local_dim=32), 32
    raise SystemExit(f"unknown size {size!r}; expected tiny or base")


def _one(size: str, args) -> dict:
    import torch

    from mmretrieve.bench.common import times
    from mmretrieve.rerank.locore import LocoreReranker, select_descriptors
    from mmretrieve.runtime import torch_dtype

    torch.manual_seed(0)
    net, dim = _net(size, args.descriptors, args.K)
    r = LocoreReranker(model="(in memory)", k=args.K, window=args.K, num_descriptors=args.descriptors,
                       device=args.device, dtype=args.dtype)
    r._net = net.to(device=r._dev, dtype=torch_dtype(r._dtype)).eval()
    r.check_fits(r._net, args.K)
    rng = np.random.default_rng(0)
    q = select_descriptors(rng.normal(size=(256, dim)).astype(np.float32), args.descriptors)
    c = tuple(np.stack(x) for x in zip(*(select_descriptors(rng.normal(size=(256, dim)).astype(np.float32),
                                                            args.descriptors) for _ in range(args.K))))
    pos = list(range(args.K))

    def run():
        r.local_scores(q, c, pos, sliding=False)
        if r._dev.type == "cuda":
            torch.cuda.synchronize()

    ts = times(run, repeat=max(1, args.queries), warmup=1)
    return {"size": size, "hidden": net.hidden, "layers": int(net.config.num_hidden_layers), "dtype": r._dtype,
            "device": str(r._dev), "tokens": (1 + args.K) * (args.descriptors + 2), "ms_per_query": float(np.median(ts)) * 1e3,
            "ms_all": [t * 1e3 for t in ts]}


def run(args) -> dict:
    import torch

    from mmretrieve.bench.common import sgemm_flops

    rows = [_one(s.strip(), args) for s in str(args.size).split(",") if s.strip()]
    return {"K": args.K, "descriptors": args.descriptors, "threads": torch.get_num_threads(),
            "sgemm_gflops": sgemm_flops(m=1000, k=512, n=20_000) / 1e9, "rows": rows}


def render(res: dict) -> list[str]:
    out = [f"locore: one pass over the query + K={res['K']} candidates x {res['descriptors']} descriptors; "
           f"{res['threads']} torch threads; machine SGEMM {res['sgemm_gflops']:.0f} GFLOP/s"]
    for r in res["rows"]:
        out.append(f"  {r['size']:<5} hidden {r['hidden']:>3}, {r['layers']:>2} layers, {r['tokens']} tokens, "
                   f"{r['device']} {r['dtype']}: {r['ms_per_query']:.1f} ms/query")
    return out

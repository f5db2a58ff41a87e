"""``mmretrieve bench rankagg``: how well each listwise schedule recovers a true order from a noisy block
ranker (synthetic, no model), and how many ranker calls it spends.

``--candidates`` N candidates have a true order (candidate ``i`` is the ``i``-th best); the shortlist the
schedules start from is a first stage's noisy order (true scores plus Gaussian noise of ``--first-sigma``).
The block ranker sorts each block it is shown by its true scores perturbed afresh on every call: Gaussian
noise of standard deviation ``sigma`` on the scores (``--noise gauss``; the true scores are ``-i``, one
unit apart), or ``sigma`` random adjacent swaps of the block's true order (``--noise swaps``). Methods:

- ``first stage``: the shortlist as given (0 calls);
- ``window``: one window of the first ``window`` candidates re-ranked, the rest untouched (1 call);
- ``sliding``: RankGPT's back-to-front windows, stride ``window / 2``, one pass; ``sliding xP``: passes
  repeated until one changes nothing (at most ``N`` passes) -- with an exact ranker this sorts;
- ``joint grid|random rR winrate|pagerank``: JointRank's block designs, every candidate in ``r`` blocks,
  aggregated by win rate or PageRank;
- ``self-consistency xS``: the first window ranked ``S`` times in shuffled orders, aggregated by win rate
  (the rest untouched).

Kendall tau against the true order over ``--seeds`` seeds, mean ± sd, per noise level (``sigma = 0`` is
the exact ranker).
"""

from __future__ import annotations

import argparse
import random
import statistics
from collections.abc import Callable, Sequence

import numpy as np

HELP = "listwise schedules and rank aggregation on a synthetic noisy block ranker: Kendall tau and ranker calls"

COVERS_ALL = "covers all"  # a method that shows every candidate to the ranker


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--candidates", type=int, default=30, help="candidates in the shortlist (default 30)")
    p.add_argument("--window", type=int, default=10, help="candidates per ranker call (default 10)")
    p.add_argument("--sigmas", default="0,0.5,1,2", help="noise levels of the block ranker (default 0,0.5,1,2)")
    p.add_argument("--noise", choices=("gauss", "swaps"), default="gauss",
                   help="gauss: Gaussian noise of sigma on the scores; swaps: sigma random adjacent swaps per call")
    p.add_argument("--first-sigma", type=float, default=5.0,
                   help="noise of the first stage's order the schedules start from (default 5)")
    p.add_argument("--shuffles", type=int, default=4, help="shuffled rankings for self-consistency (default 4)")
    p.add_argument("--seeds", type=int, default=10, help="seeds per noise level (default 10)")


class BlockRanker:
    """Ranks a block of candidates (ints; smaller = truly better) with fresh noise on every call; counts calls."""

    def __init__(self, sigma: float, noise: str, rng: np.random.Generator) -> None:
        self.sigma, self.noise, self.rng, self.calls = float(sigma), noise, rng, 0

    def __call__(self, block: Sequence[int]) -> list[int]:
        self.calls += 1
        block = list(block)
        if self.noise == "gauss":
            scores = -np.asarray(block, np.float64) + self.rng.normal(0.0, self.sigma, len(block)) * (self.sigma > 0)
            return [block[j] for j in np.argsort(-scores, kind="stable")]
        out = sorted(block)
        for _ in range(int(round(self.sigma))):
            if len(out) > 1:
                j = int(self.rng.integers(len(out) - 1))
                out[j], out[j + 1] = out[j + 1], out[j]
        return out


def _sliding_until_stable(order: list[int], rank: Callable, window: int, stride: int, max_passes: int) -> list[int]:
    from mmretrieve.rerank import rankagg

    for _ in range(max_passes):
        new = rankagg.sliding_window(order, rank, window=window, stride=stride)
        if new == order:
            return new
        order = new
    return order


def _self_consistency(order: list[int], rank: Callable, window: int, shuffles: int, seed: int) -> list[int]:
    from mmretrieve.rerank import rankagg

    head = order[:window]
    rnd = random.Random(seed)
    shown = [list(head)] + [rnd.sample(head, len(head)) for _ in range(shuffles)]
    pos = {c: j for j, c in enumerate(head)}
    rankings = [[pos[c] for c in rankagg.complete_ranking(s, rank(s))] for s in shown]
    return [head[j] for j in rankagg.aggregate(len(head), rankings, method="winrate")] + order[window:]


def methods(window: int, shuffles: int, n: int) -> dict[str, tuple[Callable, bool]]:
    """name -> (fn(order, rank, seed) -> order, whether it shows every candidate to the ranker)."""
    from mmretrieve.rerank import rankagg

    stride = max(1, window // 2)
    out: dict[str, tuple[Callable, bool]] = {
        "first stage": (lambda o, rank, seed: list(o), False),
        "window": (lambda o, rank, seed: rankagg.complete_ranking(o[:window], rank(o[:window])) + o[window:], n <= window),
        "sliding": (lambda o, rank, seed: rankagg.sliding_window(o, rank, window=window, stride=stride), True),
        "sliding until stable": (lambda o, rank, seed: _sliding_until_stable(o, rank, window, stride, n), True),
    }
    for kind in ("grid", "random"):
        for r in (2, 3):
            for agg in ("winrate", "pagerank"):
                def fn(o, rank, seed, kind=kind, r=r, agg=agg):
                    return rankagg.joint_rank(o, lambda blocks: [rank(b) for b in blocks], block_size=window, r=r,
                                              kind=kind, method=agg, seed=seed)
                out[f"joint {kind} r{r} {agg}"] = (fn, True)
    out[f"self-consistency x{shuffles + 1}"] = (
        lambda o, rank, seed: _self_consistency(o, rank, window, shuffles, seed), n <= window)
    return out


def evaluate(n: int, window: int, sigma: float, noise: str, first_sigma: float, shuffles: int,
             seeds: int) -> dict[str, dict]:
    """method -> {"tau_mean", "tau_sd", "calls", "covers_all"} over ``seeds`` seeds at one noise level."""
    from mmretrieve.rerank import rankagg

    truth = list(range(n))
    taus: dict[str, list[float]] = {}
    calls: dict[str, list[int]] = {}
    ms = methods(window, shuffles, n)
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        first = [int(i) for i in np.argsort(np.arange(n) + rng.normal(0.0, first_sigma, n), kind="stable")]
        for name, (fn, _) in ms.items():
            ranker = BlockRanker(sigma, noise, np.random.default_rng([seed, 1]))
            got = fn(list(first), ranker, seed)
            assert sorted(got) == truth, name
            taus.setdefault(name, []).append(rankagg.kendall_tau(got, truth))
            calls.setdefault(name, []).append(ranker.calls)
    return {name: {"tau_mean": round(statistics.fmean(t), 4), "tau_sd": round(statistics.pstdev(t), 4),
                   "calls": round(statistics.fmean(calls[name]), 1), "covers_all": ms[name][1]}
            for name, t in taus.items()}


def run(args: argparse.Namespace) -> dict:
    from mmretrieve.errors import UsageError

    try:
        sigmas = [float(s) for s in args.sigmas.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--sigmas: comma-separated numbers, got {args.sigmas!r}") from None
    if not sigmas or min(sigmas) < 0:
        raise UsageError("--sigmas: one or more numbers >= 0")
    if args.candidates < 2 or args.window < 2 or args.seeds < 1 or args.shuffles < 0:
        raise UsageError("--candidates >= 2, --window >= 2, --seeds >= 1, --shuffles >= 0")
    levels = [{"sigma": s, "methods": evaluate(args.candidates, args.window, s, args.noise, args.first_sigma,
                                               args.shuffles, args.seeds)} for s in sigmas]
    return {"benchmark": "rankagg", "candidates": args.candidates, "window": args.window, "noise": args.noise,
            "first_sigma": args.first_sigma, "seeds": args.seeds, "shuffles": args.shuffles, "levels": levels}


def render(res: dict) -> list[str]:
    noise = ("Gaussian noise of sigma on scores 1 apart" if res["noise"] == "gauss"
             else "sigma random adjacent swaps per call")
    out = [f"rank aggregation: {res['candidates']} candidates, window {res['window']}, block ranker: {noise}; "
           f"first stage: Gaussian noise {res['first_sigma']:g}; Kendall tau vs. the truth over {res['seeds']} seeds "
           "(mean ± sd); calls = ranker calls per query"]
    names = list(res["levels"][0]["methods"])
    out.append(f"  {'method':28s}" + "".join(f"{'sigma ' + format(lv['sigma'], 'g') + ': tau, calls':>26s}"
                                            for lv in res["levels"]))
    for name in names:
        ms = [lv["methods"][name] for lv in res["levels"]]
        cells = "".join(f"{m['tau_mean']:>13.3f} ± {m['tau_sd']:<4.2f}{m['calls']:>6.1f}" for m in ms)
        star = "" if ms[0]["covers_all"] else " *"
        out.append(f"  {name + star:28s}{cells}")
    out.append("  * sees only the first window (the rest keep the first stage's order)")
    return out

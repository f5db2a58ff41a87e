"""Listwise re-ranking schedules and rank aggregation: pure functions over candidate positions.

A generative re-ranker (issue 20: CoTRR-style listwise ranking, pairwise judging) sees a few candidates
per prompt. This module says which candidates go together and how the partial answers become one
ranking; it calls no model (``rank_block`` is whatever ranks a list of positions, best first).

- ``sliding_window``: RankGPT's schedule, windows of ``window`` moved from the back of the shortlist to
  the front by ``stride``, each window re-ranked in place (a strong candidate near the back can climb
  to the top in one pass, ``(window - stride)`` places per step).
- ``block_design`` + ``aggregate``: JointRank's: overlapping blocks in which every candidate appears
  ``r`` times (a random design, or a grid whose rows, columns and wrapped diagonals are the blocks),
  each block ranked independently (in one batch), and the
  implied pairwise comparisons aggregated into one ranking by **win rate** or by **PageRank** over the
  "lost to" graph.
- ``complete_ranking``: what a model's partial or damaged answer means: the positions it ranked (first
  occurrence, in range) in its order, then the ones it left out in their previous order.

Every function returns a permutation of its input whatever the ranker does, so a parser's failure can
cost quality, never a candidate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

RankFn = Callable[[list[int]], Sequence[int]]


def complete_ranking(items: Sequence[int], answer: Sequence[int]) -> list[int]:
    """``answer`` (the model's order of some of ``items``, possibly with repeats or strangers) made into a
    permutation of ``items``: the ranked ones first in the answer's order, the others after them in their
    order in ``items``."""
    allowed = set(items)
    seen: set[int] = set()
    head = []
    for a in answer:
        if a in allowed and a not in seen:
            seen.add(a)
            head.append(a)
    return head + [i for i in items if i not in seen]


def sliding_windows(n: int, window: int, stride: int) -> list[tuple[int, int]]:
    """The (start, end) spans RankGPT ranks, back to front: the last window first, then each ``stride``
    earlier, the first one starting at 0."""
    if window < 1 or stride < 1:
        raise ValueError("window and stride must be >= 1")
    if n <= window:
        return [(0, n)] if n else []
    spans, end = [], n
    while True:
        start = max(0, end - window)
        spans.append((start, end))
        if start == 0:
            return spans
        end -= stride


def sliding_window(order: Sequence[int], rank_block: RankFn, *, window: int = 10, stride: int = 5) -> list[int]:
    """``order`` (candidate positions, best first) re-ranked window by window (``sliding_windows``)."""
    out = list(order)
    for s, e in sliding_windows(len(out), window, stride):
        block = out[s:e]
        out[s:e] = complete_ranking(block, list(rank_block(list(block))))
    return out


def block_design(n: int, block_size: int, r: int = 2, *, kind: str = "grid", seed: int = 0) -> list[list[int]]:
    """Blocks of at most ``block_size`` positions out of ``range(n)`` in which every position appears in
    ``r`` blocks (``kind="random"``: ``r`` shuffles cut into blocks; ``"grid"``: the positions laid in a
    grid ``block_size`` wide, blocks its rows, its columns and wrapped diagonals: with a prime width and
    no more rows than the width, two positions share at most one block, as in an affine plane; more
    directions than the grid has fall back to random blocks)."""
    if n <= block_size:
        return [list(range(n))] if n else []
    if kind not in ("grid", "random"):
        raise ValueError(f"unknown block design {kind!r}; expected 'grid' or 'random'")
    rng = np.random.default_rng(seed)
    blocks: list[list[int]] = []
    if kind == "grid":
        b = block_size
        rows = -(-n // b)
        side = max(rows, b)  # a square of side >= b holds the grid; missing cells are skipped
        perm = rng.permutation(n)
        cell = {}
        for j, p in enumerate(perm):
            cell[(j // b, j % b)] = int(p)
        directions = [None, 0] + list(range(1, side))  # rows, columns, then diagonals of slope 1, 2, ...
        for d in directions[:r]:
            if d is None:  # rows
                groups = [[cell[(i, c)] for c in range(b) if (i, c) in cell] for i in range(rows)]
            else:  # cells (i, c) with c - d * i = const (mod b): columns for d = 0
                groups = [[cell[(i, (k + d * i) % b)] for i in range(rows) if (i, (k + d * i) % b) in cell]
                          for k in range(b)]
            for g in groups:  # a column longer than a block is cut
                blocks += [g[s:s + b] for s in range(0, len(g), b) if g[s:s + b]]
        if r <= len(directions):
            return blocks
        r -= len(directions)
    for _ in range(r):
        perm = [int(p) for p in rng.permutation(n)]
        blocks += [perm[s:s + block_size] for s in range(0, n, block_size)]
    return blocks


def wins_matrix(n: int, rankings: Sequence[Sequence[int]]) -> np.ndarray:
    """``W[i, j]``: how many of ``rankings`` (each a list of positions, best first) put ``i`` above ``j``."""
    W = np.zeros((n, n), np.float64)
    for rk in rankings:
        rk = list(rk)
        for a in range(len(rk)):
            for b in range(a + 1, len(rk)):
                W[rk[a], rk[b]] += 1
    return W


def win_rate(W: np.ndarray) -> np.ndarray:
    """Each position's share of won comparisons (0.5 when it was never compared)."""
    games = W + W.T
    played = games.sum(1)
    return np.where(played > 0, W.sum(1) / np.maximum(played, 1), 0.5)


def pagerank(W: np.ndarray, *, damping: float = 0.85, iters: int = 200, tol: float = 1e-12) -> np.ndarray:
    """PageRank over the comparison graph, each loss an edge from the loser to its winner (weighted by
    how often): a position beaten only by strong ones still ranks high."""
    n = len(W)
    if n == 0:
        return np.zeros(0)
    L = W.T.copy()  # L[i, j]: times i lost to j
    out = L.sum(1, keepdims=True)
    P = np.where(out > 0, L / np.maximum(out, 1e-300), 1.0 / n)  # a position that never lost spreads evenly
    x = np.full(n, 1.0 / n)
    for _ in range(iters):
        nx = (1 - damping) / n + damping * (x @ P)
        if np.abs(nx - x).sum() < tol:
            return nx
        x = nx
    return x


AGGREGATORS = {"winrate": win_rate, "pagerank": pagerank}


def aggregate(n: int, rankings: Sequence[Sequence[int]], *, method: str = "winrate",
              prior: Sequence[int] | None = None) -> list[int]:
    """One ranking of ``range(n)`` from block ``rankings`` (best first); ties keep the ``prior`` order
    (default: position order)."""
    return aggregate_wins(wins_matrix(n, rankings), method=method, prior=prior)


def aggregate_wins(W: np.ndarray, *, method: str = "winrate", prior: Sequence[int] | None = None) -> list[int]:
    """One ranking of ``range(len(W))`` from a wins matrix (``wins_matrix``, ``pair_wins``); ties keep
    the ``prior`` order (default: position order)."""
    if method not in AGGREGATORS:
        raise ValueError(f"unknown aggregation {method!r}; expected one of {', '.join(AGGREGATORS)}")
    n = len(W)
    score = AGGREGATORS[method](W)
    prior_rank = np.empty(n, np.int64)
    prior_rank[np.asarray(list(prior) if prior is not None else range(n), np.int64)] = np.arange(n)
    return [int(i) for i in np.lexsort((prior_rank, -np.round(score, 12)))]


def joint_rank(order: Sequence[int], rank_blocks: Callable[[list[list[int]]], Sequence[Sequence[int]]], *,
               block_size: int = 10, r: int = 2, kind: str = "grid", method: str = "winrate", seed: int = 0) -> list[int]:
    """``order`` (candidate positions, best first) re-ranked the JointRank way: the blocks of
    ``block_design`` ranked at once by ``rank_blocks`` (a list of blocks -> a ranking per block; one
    batch), aggregated by ``method``; ties keep ``order``."""
    order = list(order)
    n = len(order)
    blocks = [[order[i] for i in blk] for blk in block_design(n, block_size, r, kind=kind, seed=seed)]
    answers = list(rank_blocks(blocks))
    if len(answers) != len(blocks):
        raise ValueError(f"rank_blocks answered {len(answers)} rankings for {len(blocks)} blocks")
    index = {c: i for i, c in enumerate(order)}
    rankings = [[index[c] for c in complete_ranking(blk, ans)] for blk, ans in zip(blocks, answers)]
    return [order[i] for i in aggregate(n, rankings, method=method)]


def merge_sort(items: Sequence[int], compare: Callable[[list[tuple[int, int]]], Sequence[float]]) -> tuple[list[int], list[tuple[int, int, float]]]:
    """``items`` sorted best first by a pairwise judge, O(n log n) comparisons asked in batches: every
    merge of a level advances in lockstep, so ``compare`` gets one pair from each (a list of ``(a, b)``
    -> for each, how much ``a`` beats ``b`` in [0, 1]; >= 0.5 puts ``a`` first). Returns the order and every
    comparison made ``(a, b, p)``. Stable: on a tie (0.5) the earlier item stays first."""
    runs = [[x] for x in items]
    seen: list[tuple[int, int, float]] = []
    while len(runs) > 1:
        pairs = [(runs[j], runs[j + 1]) for j in range(0, len(runs) - 1, 2)]
        merged: list[list[int]] = [[] for _ in pairs]
        heads = [[0, 0] for _ in pairs]
        while True:
            active = [m for m, (a, b) in enumerate(pairs) if heads[m][0] < len(a) and heads[m][1] < len(b)]
            if not active:
                break
            asks = [(pairs[m][0][heads[m][0]], pairs[m][1][heads[m][1]]) for m in active]
            answers = list(compare(asks))
            if len(answers) != len(asks):
                raise ValueError(f"compare answered {len(answers)} times for {len(asks)} pairs")
            for m, (a, b), p in zip(active, asks, answers):
                seen.append((a, b, float(p)))
                if float(p) >= 0.5:
                    merged[m].append(a)
                    heads[m][0] += 1
                else:
                    merged[m].append(b)
                    heads[m][1] += 1
        for m, (a, b) in enumerate(pairs):
            merged[m] += a[heads[m][0]:] + b[heads[m][1]:]
        runs = merged + ([runs[-1]] if len(runs) % 2 else [])
    return (runs[0] if runs else []), seen


def pair_wins(n: int, outcomes: Sequence[tuple[int, int, float]]) -> np.ndarray:
    """``W[i, j]`` = how much position ``i`` beat position ``j`` over ``outcomes`` ``(i, j, p)`` (p: i's share)."""
    W = np.zeros((n, n))
    for i, j, p in outcomes:
        W[i, j] += p
        W[j, i] += 1.0 - p
    return W


def kendall_tau(a: Sequence[int], b: Sequence[int]) -> float:
    """Kendall's tau between two orders of the same items (1: identical, -1: reversed)."""
    pos = {x: i for i, x in enumerate(b)}
    r = np.array([pos[x] for x in a])
    n = len(r)
    if n < 2:
        return 1.0
    conc = sum(int((r[i + 1:] > r[i]).sum()) for i in range(n - 1))
    pairs = n * (n - 1) // 2
    return (2 * conc - pairs) / pairs


__all__ = ["complete_ranking", "sliding_windows", "sliding_window", "block_design", "wins_matrix", "win_rate",
           "pagerank", "aggregate", "joint_rank", "kendall_tau", "AGGREGATORS", "merge_sort", "pair_wins", "aggregate_wins"]

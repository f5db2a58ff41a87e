"""Listwise schedules and rank aggregation (issue 20's JointRank / RankGPT building blocks): golden cases
worked out by hand, an exact oracle ranker, and a noisy one."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mmretrieve.rerank.rankagg import (
    aggregate,
    block_design,
    complete_ranking,
    joint_rank,
    kendall_tau,
    pagerank,
    sliding_window,
    sliding_windows,
    win_rate,
    wins_matrix,
)


def test_a_partial_or_damaged_answer_becomes_a_permutation():
    items = [4, 7, 1, 9]
    assert complete_ranking(items, [9, 4]) == [9, 4, 7, 1]  # the omitted keep their order, after
    assert complete_ranking(items, [9, 9, 42, -1, 7]) == [9, 7, 4, 1]  # repeats and strangers ignored
    assert complete_ranking(items, []) == items


def test_sliding_windows_go_back_to_front():
    assert sliding_windows(20, 10, 5) == [(10, 20), (5, 15), (0, 10)]
    assert sliding_windows(12, 10, 5) == [(2, 12), (0, 7)]
    assert sliding_windows(8, 10, 5) == [(0, 8)] and sliding_windows(0, 10, 5) == []
    with pytest.raises(ValueError):
        sliding_windows(5, 0, 1)


def _oracle(truth):
    rank = {c: i for i, c in enumerate(truth)}
    return lambda block: sorted(block, key=rank.__getitem__)


def test_one_pass_with_an_oracle_brings_the_true_top_to_the_front():
    rng = np.random.default_rng(0)
    for _ in range(20):
        truth = [int(x) for x in rng.permutation(40)]
        shown = [int(x) for x in rng.permutation(40)]
        out = sliding_window(shown, _oracle(truth), window=10, stride=5)
        assert sorted(out) == sorted(shown)
        assert out[:5] == truth[:5]  # window - stride places are carried forward to the top


def test_block_designs_show_every_candidate_r_times():
    for kind, n, b, r in [("grid", 49, 7, 2), ("grid", 49, 7, 3), ("grid", 30, 7, 4), ("random", 37, 10, 3),
                          ("grid", 100, 10, 2)]:
        blocks = block_design(n, b, r, kind=kind, seed=1)
        counts = np.bincount(np.concatenate(blocks), minlength=n)
        assert (counts == r).all(), (kind, n, b, r)
        assert all(0 < len(x) <= b for x in blocks)
    blocks = block_design(49, 7, 8, kind="grid")  # a prime width: an affine plane, pairs meet at most once
    met = np.zeros((49, 49), int)
    for blk in blocks:
        for a, c in itertools.combinations(blk, 2):
            met[a, c] += 1
            met[c, a] += 1
    assert met.max() == 1 and (met + np.eye(49, dtype=int)).min() == 1  # all 8 directions: every pair once
    assert block_design(5, 10, 3) == [[0, 1, 2, 3, 4]]


def test_aggregators_on_a_hand_worked_case():
    # a beats b and c, b beats c, in two blocks: (a, b) and (b, c) and one (a, c)
    W = wins_matrix(3, [[0, 1], [1, 2], [0, 2]])
    assert W.tolist() == [[0, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert win_rate(W).tolist() == [1.0, 0.5, 0.0]
    pr = pagerank(W)
    assert pr[0] > pr[1] > pr[2] and abs(pr.sum() - 1) < 1e-9
    assert aggregate(3, [[0, 1], [1, 2], [0, 2]], method="pagerank") == [0, 1, 2]
    assert aggregate(3, [], prior=[2, 0, 1]) == [2, 0, 1]  # nothing compared: the prior order
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate(3, [], method="borda")


@pytest.mark.parametrize("method", ["winrate", "pagerank"])
def test_joint_rank_with_an_oracle_recovers_the_order(method):
    rng = np.random.default_rng(3)
    taus = []
    for _ in range(10):
        truth = [int(x) for x in rng.permutation(49)]
        shown = [int(x) for x in rng.permutation(49)]
        oracle = _oracle(truth)
        out = joint_rank(shown, lambda blocks, o=oracle: [o(b) for b in blocks], block_size=7, r=8, method=method)
        assert sorted(out) == sorted(shown) and out[0] == truth[0]
        taus.append(kendall_tau(out, truth))
    assert min(taus) > 0.97, taus  # every pair met once (r = 8 directions of a 7 x 7 grid)


def test_aggregation_beats_one_window_with_a_noisy_ranker():
    """A ranker that sees the true scores plus noise: blocks met r = 3 times and aggregated order the
    whole list better (Kendall tau with the truth) than ranking each block once."""
    rng = np.random.default_rng(7)

    def noisy(truth_score):
        return lambda blocks: [sorted(b, key=lambda c: -(truth_score[c] + rng.normal(0, 8))) for b in blocks]

    once, thrice = [], []
    for _ in range(30):
        score = rng.permutation(50).astype(float)
        truth = [int(i) for i in np.argsort(-score)]
        shown = [int(x) for x in rng.permutation(50)]
        once.append(kendall_tau(joint_rank(shown, noisy(score), block_size=10, r=1, kind="random"), truth))
        thrice.append(kendall_tau(joint_rank(shown, noisy(score), block_size=10, r=3), truth))
    # measured: mean tau 0.63 once, 0.73 with r = 3 (30 lists of 50, noise sd 8 on scores 0..49)
    assert np.mean(thrice) > np.mean(once) + 0.05, (np.mean(once), np.mean(thrice))
    assert (np.array(thrice) > np.array(once)).mean() >= 0.9


def test_random_answers_never_lose_a_candidate():
    rng = np.random.default_rng(11)
    shown = list(range(23))
    garbage = lambda blocks: [list(rng.integers(-5, 40, rng.integers(0, 12))) for _ in blocks]  # noqa: E731
    for method in ("winrate", "pagerank"):
        assert sorted(joint_rank(shown, garbage, block_size=6, r=2, method=method)) == shown
    assert sorted(sliding_window(shown, lambda b: list(rng.integers(-5, 40, 7)), window=6, stride=3)) == shown
    with pytest.raises(ValueError, match="rankings for"):
        joint_rank(shown, lambda blocks: [], block_size=6)

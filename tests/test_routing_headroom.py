"""benchmarks/routing_headroom.py: a set chosen per group on one half of the questions and
scored on the other, against values worked out by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))


def test_crossfit_by_hand():
    from routing_headroom import crossfit

    # set A answers group 0 and the odd questions of group 1; set B the even ones of group 1
    correct = np.array([[1, 0]] * 4 + [[0, 1], [1, 0], [0, 1], [1, 0]], dtype=float)
    fold = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    groups = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    # group 1: half 1 picks A (wrong on half 0's questions), half 0 picks B (wrong on half 1's)
    np.testing.assert_array_equal(crossfit(correct, groups, fold), [1, 1, 1, 1, 0, 0, 0, 0])
    # one group: half 1 picks A (4 of 4); half 0 ties 2-2 and takes the first set, A
    np.testing.assert_array_equal(crossfit(correct, np.zeros(8, int), fold),
                                  [1, 1, 1, 1, 0, 1, 0, 1])
    # a group with no question in the other half takes that half's best set overall
    lone = np.array([0, 1, 0, 1, 2, 1, 0, 1])
    assert crossfit(correct, lone, fold)[4] == correct[4, 0]


def test_kmeans():
    from routing_headroom import kmeans

    x = np.concatenate([np.random.default_rng(1).normal(c, 0.01, (10, 2)) for c in (0, 5)])
    assign = kmeans(x, 2, seed=0)
    assert len(set(assign[:10])) == len(set(assign[10:])) == 1 and assign[0] != assign[10]

"""benchmarks/depth_redundancy.py: which set sizes a model gets, and the search's phases."""

import sys
from pathlib import Path

import click
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import depth_redundancy  # noqa: E402


@pytest.mark.parametrize(("blocks", "available", "want"), [
    # 10/20/30% of 30 are 3, 6, 9 blocks; 1, 2, 4, 8 always
    (30, 9, {1: ["k=1"], 2: ["k=2"], 3: ["10%"], 4: ["k=4"], 6: ["20%"], 8: ["k=8"],
             9: ["30%"]}),
    # 2.4, 4.8, 7.2 round to 2, 5, 7; 2 is both a fixed size and 10%
    (24, 8, {1: ["k=1"], 2: ["k=2", "10%"], 4: ["k=4"], 5: ["20%"], 7: ["30%"],
             8: ["k=8"]}),
    # a search of 5 phases on 18 blocks: 1.8 -> 2, 3.6 -> 4, 5.4 -> 5; 8 left out
    (18, 5, {1: ["k=1"], 2: ["k=2", "10%"], 4: ["k=4", "20%"], 5: ["30%"]}),
])
def test_set_sizes_by_hand(blocks, available, want):
    assert depth_redundancy.set_sizes(blocks, available) == want


def test_search_phases_in_removal_order():
    search = {"candidates": [{"loss": "fidelity", "skip": [3, 7, 9],
                              "trajectory": [{"block": 9}, {"block": 3}, {"block": 7}]}]}
    assert [p["block"] for p in depth_redundancy.search_phases(search)] == [9, 3, 7]
    with pytest.raises(click.ClickException):
        depth_redundancy.search_phases({"candidates": []})

"""benchmarks/router_compare.py: paired differences of two routers' rows, by hand."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import router_compare  # noqa: E402


def results(routes: list[str], kl: list[float], agreement: list[float]) -> dict:
    return {"prompts_file": "packaged", "split": "heldout", "limit": None, "max_tokens": 8,
            "system_prompt": None, "candidates": ["k1", "k2", "dense"],
            "sets": {"dense": [], "k1": [5], "k2": [5, 7]},
            "routed": {"routed@0.5": "tolerance 0.5"},
            "prompts": [{"id": f"p{i}", "routes": {"routed@0.5": r},
                         "routed@0.5": {"kl": k, "agreement": g}}
                        for i, (r, k, g) in enumerate(zip(routes, kl, agreement, strict=True))]}


def test_paired_rows_by_hand():
    a = results(["k1", "k2", "dense", "k1"], [0.2, 0.4, 0.0, 0.1], [0.8, 0.6, 1.0, 0.9])
    b = results(["k1", "k1", "k2", "dense"], [0.2, 0.3, 0.5, 0.0], [0.8, 0.7, 0.5, 1.0])
    (row,) = router_compare.compare(a, b, resamples=200)
    assert row["skip_a"] == pytest.approx((1 + 2 + 0 + 1) / 4)
    assert row["skip_b"] == pytest.approx((1 + 1 + 2 + 0) / 4)
    assert row["same_choice"] == pytest.approx(0.25)
    assert row["kl_diff"]["diff"] == pytest.approx(np.mean([0.0, 0.1, -0.5, 0.1]))
    assert row["agreement_diff"]["diff"] == pytest.approx(np.mean([0.0, -0.1, 0.5, -0.1]))
    assert row["kl_diff"]["low"] <= row["kl_diff"]["diff"] <= row["kl_diff"]["high"]
    assert "| routed@0.5 | 1.00 | 1.00 | 25% |" in router_compare.markdown([row], ("a", "b"))


def test_different_prompts_are_refused():
    a = results(["k1"], [0.1], [0.9])
    b = results(["k1"], [0.1], [0.9])
    b["prompts"][0]["id"] = "other"
    with pytest.raises(SystemExit, match="different prompts"):
        router_compare.compare(a, b)
    b = results(["k1"], [0.1], [0.9])
    b["max_tokens"] = 64
    with pytest.raises(SystemExit, match="max_tokens"):
        router_compare.compare(a, b)


def test_reroute_summary_by_hand():
    import reroute_eval

    def task(correct_pudding, above):
        return {"dense_above_chance": above,
                "questions": [{"qid": f"q{i}", "correct": {"pudding": c}}
                              for i, c in enumerate(correct_pudding)]}

    results = {"tasks": {"a": task([1, 0, 0, 1], True), "b": task([0, 0], False)}}
    routed = {"a": {"correct": [1, 1, 0, 1]}, "b": {"correct": [1, 0]}}
    rows = reroute_eval.summary(results, routed, ("pudding",), resamples=200)
    assert rows["a"]["rerouted"] == 0.75 and rows["a"]["pudding"] == 0.5
    assert rows["Avg"]["rerouted"] == pytest.approx((0.75 + 0.5) / 2)
    assert rows["Avg"]["minus pudding"]["diff"] == pytest.approx((0.25 + 0.5) / 2)
    assert rows["Avg above chance"]["minus pudding"]["diff"] == pytest.approx(0.25)

"""`pudding pareto` on hand-made fidelity, eval and bench results, against hand-computed values."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import run_cli

from pudding_mlx.errors import PuddingError
from pudding_mlx.fidelity.pareto import pareto_points, speedup_at

SETS = {"dense": [], "a2": [1, 2], "b2": [3, 4], "c4": [1, 2, 3, 4]}
KL = {  # per prompt
    "dense": [0.0, 0.0, 0.0, 0.0],
    "a2": [0.2, 0.4, 0.2, 0.4],  # mean 0.3
    "b2": [0.1, 0.1, 0.3, 0.3],  # mean 0.2: the static curve's point at 2
    "c4": [0.9, 0.7, 0.5, 0.7],  # mean 0.7
    "routed@0.5": [0.1, 0.2, 0.3, 0.2],
    "routed:k2": [0.1, 0.1, 0.2, 0.4],
}
SKIPPED = {"dense": 0.0, "a2": 2.0, "b2": 2.0, "c4": 4.0, "routed@0.5": 3.0, "routed:k2": 2.0}


def fidelity_results() -> dict:
    prompts = [{"id": f"p{i}", **{row: {"kl": v[i]} for row, v in KL.items()}}
               for i in range(4)]
    return {"num_blocks": 10, "sets": SETS, "summary": {row: {} for row in KL},
            "mean_skipped": SKIPPED, "prompts": prompts, "command": "pudding fidelity x",
            "bundle": "b", "n": 4}


CORRECT = {  # per task, per question
    "t1": {"dense": [1, 1, 1, 0], "static:a2": [1, 0, 1, 0], "static:c4": [0, 0, 1, 0],
           "static:best": [1, 0, 1, 0], "pudding": [1, 1, 0, 0], "oracle": [1, 1, 1, 1]},
    "t2": {"dense": [1, 1, 0, 0, 1, 1], "static:a2": [1, 0, 0, 0, 1, 1],
           "static:c4": [0, 0, 0, 0, 1, 0], "static:best": [1, 0, 0, 0, 1, 1],
           "pudding": [1, 1, 0, 0, 1, 0], "oracle": [1, 1, 1, 1, 1, 1]},
}
EVAL_SKIPPED = {"t1": 3.0, "t2": 2.0}  # the routed method's per task: mean 2.5


def eval_results() -> dict:
    tasks = {}
    for t, per in CORRECT.items():
        n = len(per["dense"])
        skipped = {"dense": 0.0, "static:a2": 2.0, "static:c4": 4.0, "static:best": 2.0,
                   "pudding": EVAL_SKIPPED[t], "oracle": 1.0}
        tasks[t] = {"questions": [{"qid": f"{t}{i}", "correct": {m: v[i] for m, v in per.items()}}
                                  for i in range(n)],
                    "results": {m: {"mean_skipped": s} for m, s in skipped.items()}}
    return {"num_blocks": 10, "sets": {k: v for k, v in SETS.items() if k != "dense"},
            "methods": list(CORRECT["t1"]), "tasks": tasks,
            "averages": {"six": {"tasks": ["t1", "t2"]}}, "command": "pudding eval x",
            "bundle": "b", "limit": 6}


def points(result: dict) -> dict:
    return {p["row"]: p for p in result["points"]}


def test_kl_against_the_interpolated_static_curve():
    result = pareto_points(fidelity_results(), None, {}, resamples=500)
    curve = [(c["skipped"], c["row"]) for c in result["static_curves"]["kl"]]
    assert curve == [(0, "dense"), (2, "b2"), (4, "c4")]  # b2 beats a2 at size 2
    p = points(result)
    assert p["b2"]["series"] == "static" and "vs_static" not in p["b2"]["metrics"]["kl"]
    # routed@0.5 at 3 blocks: halfway between b2 and c4, prompt by prompt
    ref = 0.5 * np.array(KL["b2"]) + 0.5 * np.array(KL["c4"])
    vs = p["routed@0.5"]["metrics"]["kl"]["vs_static"]
    assert vs["diff"] == pytest.approx(np.mean(np.array(KL["routed@0.5"]) - ref))  # -0.25
    assert vs["low"] <= vs["diff"] <= vs["high"] < 0
    assert p["routed@0.5"]["series"] == "tolerance"
    assert p["routed@0.5"]["metrics"]["kl"]["fraction"] == pytest.approx(0.3)
    k2 = p["routed:k2"]
    assert k2["series"] == "fixed-k"
    assert k2["metrics"]["kl"]["vs_static"]["diff"] == pytest.approx(0.2 - 0.2)
    assert k2["metrics"]["kl"]["mean"] == pytest.approx(0.2)


def test_accuracy_averages_tasks_equally_against_the_static_curve():
    result = pareto_points(None, eval_results(), {}, resamples=500)
    p = points(result)
    assert set(p) == {"dense", "a2", "c4", "routed"}  # static:best and oracle left out
    assert p["routed"]["series"] == "default"
    acc = p["routed"]["metrics"]["accuracy"]
    assert acc["mean"] == pytest.approx((2 / 4 + 3 / 6) / 2)
    assert acc["skipped"] == pytest.approx(2.5)
    # at 2.5 blocks: 3/4 of a2 and 1/4 of c4, question by question, then tasks averaged
    diffs = []
    for t in ("t1", "t2"):
        c = {m: np.array(v, dtype=float) for m, v in CORRECT[t].items()}
        diffs.append(np.mean(c["pudding"] - (0.75 * c["static:a2"] + 0.25 * c["static:c4"])))
    assert acc["vs_static"]["diff"] == pytest.approx(np.mean(diffs))


def test_decode_speedup_interpolates_time_not_speed():
    bench = {2: 1.1, 4: 1.25}
    assert speedup_at(bench, 0) == pytest.approx(1.0)
    assert speedup_at(bench, 4) == pytest.approx(1.25)
    assert speedup_at(bench, 3) == pytest.approx(1 / ((1 / 1.1 + 1 / 1.25) / 2))
    assert speedup_at(bench, 1) == pytest.approx(1 / ((1 + 1 / 1.1) / 2))
    assert speedup_at(bench, 5) is None
    result = pareto_points(fidelity_results(), None, bench, resamples=200)
    assert points(result)["routed@0.5"]["decode_speedup"] == pytest.approx(speedup_at(bench, 3))


def test_runs_of_different_bundles_are_refused():
    ev = eval_results()
    ev["sets"]["a2"] = [5, 6]
    with pytest.raises(PuddingError, match="different sets"):
        pareto_points(fidelity_results(), ev, {})
    with pytest.raises(PuddingError, match="give a fidelity run"):
        pareto_points(None, None, {})


def test_cli_writes_json_markdown_and_plot(tmp_path, monkeypatch, capsys):
    (tmp_path / "fid").mkdir()
    (tmp_path / "ev").mkdir()
    (tmp_path / "fid" / "results.json").write_text(json.dumps(fidelity_results()))
    (tmp_path / "ev" / "results.json").write_text(json.dumps(eval_results()))
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "bench.json").write_text(json.dumps({"summary": {"skipped": 4, "generation": [
        {"gen_tokens": 16, "decode_speedup": 1.1}, {"gen_tokens": 64, "decode_speedup": 1.2}]}}))
    out = tmp_path / "out"
    code, _, err = run_cli(["pareto", "--fidelity", str(tmp_path / "fid"),
                            "--eval", str(tmp_path / "ev"), "--bench", str(bench), "-o", str(out),
                            "--resamples", "200"], monkeypatch, capsys)
    assert code == 0, err
    result = json.loads((out / "pareto.json").read_text())
    assert result["bench"] == {"4": 1.2}  # the longest generation row
    p = points(result)
    assert set(p["a2"]["metrics"]) == {"kl", "accuracy"}
    assert "routed@0.5" in (out / "pareto.md").read_text()
    assert (out / "pareto.png").stat().st_size > 0


def test_report_without_matplotlib_keeps_json_and_markdown(tmp_path, capsys):
    from pudding_mlx.files import write_report

    def no_matplotlib(path):
        raise ImportError("No module named 'matplotlib'")

    drawn = []
    write_report(tmp_path / "r", "pareto", {"a": 1}, "# md\n",
                 {"x.png": no_matplotlib, "y.png": drawn.append})
    assert json.loads((tmp_path / "r" / "pareto.json").read_text()) == {"a": 1}
    assert (tmp_path / "r" / "pareto.md").read_text() == "# md\n"
    assert drawn == [tmp_path / "r" / "y.png"]  # one missing plot does not stop the others
    assert "matplotlib is not installed: no x.png" in capsys.readouterr().err

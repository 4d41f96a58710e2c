"""`pudding eval-compare`: paired differences of two eval runs, by hand and end to end."""

import json

import pytest
from helpers import run_cli, tiny_bundle
from test_evaluate import write_data

from pudding_mlx.errors import PuddingError
from pudding_mlx.evaluation.compare import compare_runs


def _run(correct: dict[str, dict[str, list[int]]], order=None) -> dict:
    """A results.json of `pudding eval` with per-question correctness {task: {method: [...]}}."""
    tasks = {}
    for t, by_method in correct.items():
        n = len(next(iter(by_method.values())))
        idx = order or list(range(n))
        tasks[t] = {"questions": [{"qid": f"{t}-{i}", "correct": {m: v[i] for m, v in
                                                                  by_method.items()}}
                                  for i in idx]}
    methods = list(next(iter(correct.values())))
    return {"methods": methods, "tasks": tasks,
            "averages": {"six": {"tasks": list(correct)},
                         "above_chance": {"tasks": list(correct)[:1]}}}


def test_paired_differences_by_hand():
    ref = _run({"arc_easy": {"dense": [1, 1, 0, 0], "static": [1, 0, 0, 0]},
                "piqa": {"dense": [1, 1], "static": [0, 1]}})
    # the other run lists its questions in another order: they are matched by qid
    other = _run({"arc_easy": {"dense": [1, 0, 0, 1], "static": [0, 0, 0, 0]},
                  "piqa": {"dense": [0, 1], "static": [0, 1]}})
    other["tasks"]["arc_easy"]["questions"].reverse()
    c = compare_runs(ref, other, resamples=500)
    d = c["tasks"]["arc_easy"]["dense"]
    assert (d["reference"], d["other"], d["alike"], d["n"]) == (0.5, 0.5, 2, 4)
    assert d["diff"]["diff"] == 0.0
    s = c["tasks"]["arc_easy"]["static"]
    assert (s["other"] - s["reference"], s["alike"]) == (-0.25, 3)
    assert s["diff"]["low"] <= -0.25 <= s["diff"]["high"]
    # six-task average over the two tasks: dense (0 + -0.5) / 2, static (-0.25 + 0) / 2
    six = c["averages"]["six"]
    assert six["dense"]["diff"]["diff"] == pytest.approx(-0.25)
    assert six["static"]["diff"]["diff"] == pytest.approx(-0.125)
    assert six["dense"]["reference"] == pytest.approx(0.75)
    assert c["averages"]["above_chance"]["tasks"] == ["arc_easy"]
    assert c["averages"]["above_chance"]["static"]["diff"]["diff"] == pytest.approx(-0.25)


def test_other_questions_are_refused():
    ref = _run({"piqa": {"dense": [1, 0]}})
    other = _run({"piqa": {"dense": [1, 0, 1]}})
    with pytest.raises(PuddingError, match="piqa: other questions than the reference"):
        compare_runs(ref, other, "q4")


def test_cli_on_two_bundles(tmp_path, monkeypatch, capsys):
    """Two different tiny models evaluated on the same questions, then compared: every figure
    from the two results.json files' per-question answers."""
    data = write_data(tmp_path / "data", n=6)
    outs = []
    for seed in (0, 1):
        tb = tiny_bundle(tmp_path / f"b{seed}", seed=seed)
        out = tmp_path / f"eval{seed}"
        code, _, err = run_cli(["eval", str(tb.path), "-o", str(out), "--data-dir", str(data),
                                "--tasks", "arc_easy,piqa", "--methods", "dense,static,pudding",
                                "--resamples", "50"], monkeypatch, capsys)
        assert code == 0, err
        outs.append(out)
    code, text, err = run_cli(["eval-compare", str(outs[0]), str(outs[1]), "-o",
                               str(tmp_path / "cmp"), "--resamples", "50"], monkeypatch, capsys)
    assert code == 0, err
    a, b = (json.loads((o / "results.json").read_text()) for o in outs)
    c = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    (o,) = c["others"]
    assert o["methods"] == ["dense", "static:static", "pudding"]
    for t in ("arc_easy", "piqa"):
        right_b = {q["qid"]: q["correct"] for q in b["tasks"][t]["questions"]}
        for m in o["methods"]:
            got = o["tasks"][t][m]
            assert got["reference"] == a["tasks"][t]["results"][m]["score"]
            assert got["other"] == b["tasks"][t]["results"][m]["score"]
            assert got["alike"] == sum(q["correct"][m] == right_b[q["qid"]][m]
                                       for q in a["tasks"][t]["questions"])
    assert (tmp_path / "cmp" / "compare.md").read_text() in text + "\n"

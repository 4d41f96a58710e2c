"""benchmarks/router_ablation.py's derived label folders: a seeded per-task sample of the
questions, and WinoGrande's router text as the labels wrote it before the fix (the sentence
before the blank), everything else as labelled."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from test_labels import _config, setup  # noqa: F401  (the module fixture)

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))


def test_derived_labels(setup, tmp_path):  # noqa: F811
    from router_ablation import derive_labels

    from convert.label_store import read_labels
    from convert.labels import make_labels

    root, _, _ = setup
    make_labels(tmp_path / "labels", _config(root), device="cpu")
    full = read_labels(tmp_path / "labels")
    rows = {(t, q, c): i for i, (t, q, c) in enumerate(zip(full.task, full.qid, full.choice,
                                                          strict=True))}

    one = read_labels(derive_labels(tmp_path / "labels", tmp_path / "one", 1, "before-blank"))
    per_task = {t: len({q for k, q in zip(one.task, one.qid, strict=True) if k == t})
                for t in set(full.task)}
    assert per_task == {"arc_easy": 1, "piqa": 1, "winogrande": 1}
    for i in range(len(one)):  # every row of a kept question, values as labelled
        j = rows[(one.task[i], one.qid[i], one.choice[i])]
        np.testing.assert_array_equal(one.loglik[i], full.loglik[j])
        assert one.text[i] == full.text[j]
        if one.task[i] == "winogrande":  # the tiny data's two sentences, cut at the blank
            assert one.context[i] in ("She poured the water into the glass because the",
                                      "The egg was in the water because")
        else:
            assert one.context[i] == full.context[j]
    assert sum(t == "winogrande" for t in one.task) == 2  # both choices of the question

    every = read_labels(derive_labels(tmp_path / "labels", tmp_path / "all", None, "sentence"))
    assert sorted(zip(every.qid, every.choice, every.context, strict=True)) == sorted(
        zip(full.qid, full.choice, full.context, strict=True))
    # done once: a second call leaves the folder as it is
    before = (tmp_path / "all" / "shard-00000.parquet").stat().st_mtime_ns
    derive_labels(tmp_path / "labels", tmp_path / "all", None, "sentence")
    assert (tmp_path / "all" / "shard-00000.parquet").stat().st_mtime_ns == before

"""The router reads the same text for a question when its labels are made (`pudding label`,
then `train-router --inputs context`) and when it is evaluated (`pudding eval`)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from test_labels import _config, setup  # noqa: F401  (the module fixture)


def _paths(tmp_path, root, inputs: str) -> tuple[dict, dict]:
    """(task, qid) -> the router's text on the training path (label folder, then
    train-router's question_inputs) and on the eval path (router_scores)."""
    from convert.label_store import read_labels
    from convert.labels import label_examples, make_labels
    from convert.router_metrics import group_questions
    from convert.train_router import question_inputs
    from pudding_mlx.evaluation.routes import router_scores
    from pudding_mlx.evaluation.scoring import ScoreCache

    cfg = _config(root)
    make_labels(tmp_path / "labels", cfg, device="cpu")
    t = read_labels(tmp_path / "labels")
    q = group_questions(t.task, t.qid, t.choice, t.gold, t.loglik, t.context)
    trained_on = dict(zip(q.keys, question_inputs(q, t, inputs), strict=True))

    seen = []  # what the eval path hands the router

    def scores_batch(texts):
        seen.extend(texts)
        return np.zeros((len(texts), 1))

    pm = SimpleNamespace(candidates=[SimpleNamespace(name="A")], router=SimpleNamespace(
        scores_batch=scores_batch, inputs=inputs),
        manifest=SimpleNamespace(static=SimpleNamespace(name="A"), files={}))
    examples = label_examples(cfg)
    evaluated = {}
    for task in cfg.tasks:
        task_examples = [e for e in examples if e.task == task]
        start = len(seen)
        router_scores(pm, ScoreCache(tmp_path / f"cache-{inputs}", {}), task, task_examples)
        evaluated.update({(task, ex.qid): text
                          for ex, text in zip(task_examples, seen[start:], strict=True)})
    return trained_on, evaluated


def test_label_and_eval_paths_give_the_router_the_same_text(setup, tmp_path):  # noqa: F811
    trained_on, evaluated = _paths(tmp_path, setup[0], "context")
    assert trained_on == evaluated and len(evaluated) == 10
    # WinoGrande: the whole sentence with its blank, not the part before the blank
    wino = [text for (task, _), text in trained_on.items() if task == "winogrande"]
    assert wino and all("_" in text and text.endswith(".") for text in wino)


def test_a_choices_router_reads_the_same_question_and_choices(setup, tmp_path):  # noqa: F811
    trained_on, evaluated = _paths(tmp_path, setup[0], "choices")
    assert trained_on == evaluated and len(evaluated) == 10
    texts = set(evaluated.values())
    assert "Question: Which gas do plants need?\nAnswer:\noxygen\ncarbon dioxide\nwater" in texts
    assert ("She poured the water into the glass because the _ was empty.\n"
            "water was empty.\nglass was empty.") in texts

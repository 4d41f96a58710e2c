"""static:best and static:task-best: the candidate with the best likelihood loss on
calibration data, over all calibration tasks and per task."""

from __future__ import annotations

import click
import numpy as np

from ..data import calibration_examples
from ..errors import PuddingError
from ..tasks import CALIBRATION_TASKS
from .scoring import set_scores

BEST_CRITERION = ("mean token log-likelihood of the gold answer (method prompt format: the "
                  "search's likelihood loss) on a seeded train-split slice of each calibration "
                  "task (HellaSwag: its holdout)")


def best_static(pm, scorer, cache, n: int, seed: int, data_dir: str | None) -> dict:
    """The candidate with the best likelihood loss on a train-split slice (see BEST_CRITERION)."""
    per_task: dict[str, int] = {}
    values: dict[str, list[float]] = {c.name: [] for c in pm.candidates}
    for task in CALIBRATION_TASKS:
        try:
            examples = calibration_examples(task, n, seed, data_dir)
        except PuddingError as e:
            click.echo(f"static:best: skipping {task} ({e})", err=True)
            continue
        per_task[task] = len(examples)
        for c in pm.candidates:
            got = set_scores(scorer, cache, f"best-slice-{task}", examples, c.skip, "prompt",
                             gold_only=True)
            values[c.name] += [got[e.qid][0][0] / got[e.qid][1][0] for e in examples]
    if not per_task:
        raise PuddingError("static:best: no calibration task has train data; pass --data-dir")
    means = {name: float(np.mean(v)) for name, v in values.items()}
    best = max(means, key=lambda name: means[name])
    # per task: the same criterion on that task's slice alone (static:task-best)
    task_means = {t: {c: float(np.mean(v[at:at + n])) for c, v in values.items()}
                  for t, n, at in zip(per_task, per_task.values(),
                                      np.cumsum([0, *per_task.values()]), strict=False)}
    task_best = {t: max(m, key=lambda c: m[c]) for t, m in task_means.items()}
    return {"name": best, "criterion": BEST_CRITERION, "mean_loglik": means,
            "slice": per_task, "seed": seed, "task_mean_loglik": task_means,
            "task_best": task_best}

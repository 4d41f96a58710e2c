"""The per-task and averaged results of `pudding eval`: accuracies, paired bootstrap intervals
of pudding against every other method, skip frequencies and per-question rows."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .stats import above_chance, chance_level, paired_bootstrap


def task_summary(task, split: str, examples, outcomes: dict, sets: dict[str, list[int]],
                  num_blocks: int, resamples: int, seed: int, per_question: list[str]) -> dict:
    """One task's results; `_correct` holds the per-question outcomes for `averages`."""
    n = len(examples)
    num_choices = [len(e.choices) for e in examples]

    def skipped(name: str | None) -> list[int]:
        return [] if name is None else sets[name]

    results = {}
    for m, o in outcomes.items():
        results[m] = {
            "acc": float(np.mean(o["acc"])),
            "acc_norm": None if task.name == "winogrande" else float(np.mean(o["acc_norm"])),
            "score": float(np.mean(o["correct"])),
            "correct": int(np.sum(o["correct"])),
            "mean_skipped": float(np.mean([len(skipped(c)) for c in o["chosen"]])),
        }
    pairs = {}
    if "pudding" in outcomes:
        for m in outcomes:
            if m != "pudding":
                pairs[m] = paired_bootstrap([(outcomes["pudding"]["correct"],
                                              outcomes[m]["correct"])],
                                            resamples, seed).to_dict()
    skip_freq = None
    if "pudding" in outcomes:
        counts = np.zeros(num_blocks)
        for name in outcomes["pudding"]["chosen"]:
            counts[skipped(name)] += 1
        skip_freq = (counts / n).tolist()
    questions = []
    for q, e in enumerate(examples):
        row = {"qid": e.qid, "gold": e.gold,
               "correct": {m: o["correct"][q] for m, o in outcomes.items()}}
        row.update({m: outcomes[m]["chosen"][q] for m in per_question})
        questions.append(row)
    dense = outcomes.get("dense")
    return {
        "split": split + (" minus the calibration holdout" if task.name == "hellaswag" else ""),
        "metric": task.metric,
        "n": n,
        "chance": chance_level(num_choices),
        "dense_above_chance": (above_chance(float(np.mean(dense["correct"])), num_choices)
                               if dense else None),
        "results": results,
        "pairs": pairs,
        "skip_frequency": skip_freq,
        # the set each task-level method chose for this task
        "task_sets": {m: o["chosen"][0] for m, o in outcomes.items()
                      if m in ("static:task-best", "oracle:task") and o["chosen"]},
        "questions": questions,
        "_correct": {m: o["correct"] for m, o in outcomes.items()},
    }


def averages(per_task: dict, methods: list[str], eval_tasks: Sequence[str], resamples: int,
             seed: int) -> dict:
    """Mean over the six headline tasks (those evaluated) and over those where dense is above
    chance, with paired bootstrap intervals of pudding vs every other method."""
    six = [t for t in eval_tasks if t in per_task]
    groups = {"six": six,
              "above_chance": [t for t in six if per_task[t]["dense_above_chance"]]}
    out = {}
    for key, names in groups.items():
        if not names:
            continue
        entry = {"tasks": names,
                 "results": {m: float(np.mean([per_task[t]["results"][m]["score"]
                                               for t in names])) for m in methods},
                 "pairs": {}}
        if "pudding" in methods:
            for m in methods:
                if m != "pudding":
                    entry["pairs"][m] = paired_bootstrap(
                        [(per_task[t]["_correct"]["pudding"], per_task[t]["_correct"][m])
                         for t in names], resamples, seed).to_dict()
        out[key] = entry
    for t in per_task.values():
        del t["_correct"]
    return out

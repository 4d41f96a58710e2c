"""Router targets, the question split and routing metrics, computed from the label rows.

Label rows are one per (question, answer choice); `loglik[r, c]` is the mean answer-token
log-likelihood of row r's choice with candidate c's blocks skipped. Everything here is numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pudding_mlx.errors import PuddingError

TARGETS = ("likelihood", "margin")


@dataclass
class Questions:
    """The label rows grouped by question (task, qid)."""

    keys: list[tuple[str, str]]  # (task, qid) per question, sorted
    row_question: np.ndarray  # (rows,) question index of each row
    gold_loglik: np.ndarray  # (questions, candidates) loglik of the correct answer
    margin: np.ndarray  # (questions, candidates) correct minus mean of the distractors
    correct: np.ndarray  # (questions, candidates) bool: the correct answer ranks first
    contexts: list[str]  # the text the router reads once per question (see question_context)

    def targets(self, kind: str) -> np.ndarray:
        if kind == "likelihood":
            return self.gold_loglik
        if kind == "margin":
            return self.margin
        raise PuddingError(f"unknown target {kind!r}; expected one of {TARGETS}")

    @property
    def tasks(self) -> np.ndarray:
        return np.array([t for t, _ in self.keys])


def group_questions(
    task: list[str], qid: list[str], choice: np.ndarray, gold: np.ndarray,
    loglik: np.ndarray, context: list[str], where: str = "labels",
) -> Questions:
    """Group rows by (task, qid); every question needs exactly one row per choice 0..n-1."""
    keys = sorted(set(zip(task, qid, strict=True)))
    index = {k: i for i, k in enumerate(keys)}
    row_question = np.array([index[k] for k in zip(task, qid, strict=True)], dtype=np.int64)
    rows_of: list[list[int]] = [[] for _ in keys]
    for r, q in enumerate(row_question):
        rows_of[q].append(r)
    num_c = loglik.shape[1]
    gold_ll = np.empty((len(keys), num_c))
    margin = np.empty((len(keys), num_c))
    correct = np.empty((len(keys), num_c), dtype=bool)
    contexts = []
    for q, rows in enumerate(rows_of):
        rows = sorted(rows, key=lambda r: choice[r])
        g = int(gold[rows[0]])
        if [int(choice[r]) for r in rows] != list(range(len(rows))) or not 0 <= g < len(rows):
            raise PuddingError(f"{where}: question {keys[q]} has choices "
                               f"{[int(choice[r]) for r in rows]} and gold {g}")
        ll = loglik[rows]  # (choices, candidates), in choice order
        gold_ll[q] = ll[g]
        others = np.delete(ll, g, axis=0)
        margin[q] = ll[g] - others.mean(0) if len(others) else np.nan
        correct[q] = ll.argmax(0) == g  # argmax takes the first of tied choices, as lm-eval
        contexts.append(question_context([context[r] for r in rows]))
    return Questions(keys, row_question, gold_ll, margin, correct, contexts)


def question_context(texts: list[str]) -> str:
    """What the router reads once per question: the common prefix of the rows' prompts, cut
    back to a whole word ("Question: ...\\nAnswer:"; for WinoGrande, whose prompt per choice
    is the sentence up to the blank filled with that option, the sentence before the blank)."""
    if len(texts) == 1:
        return texts[0]
    a, b = min(texts), max(texts)  # the common prefix of all strings is that of min and max
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    prefix = a[:n]
    if n < len(a) and not prefix[-1:].isspace():
        prefix = prefix[: max(prefix.rfind(" "), prefix.rfind("\n"), 0)]
    return prefix.rstrip()


def split_questions(keys: list[tuple[str, str]], eval_fraction: float, seed: int) -> np.ndarray:
    """Bool mask over questions, True = eval. Seeded, per task, so each task is split 80/20."""
    is_eval = np.zeros(len(keys), dtype=bool)
    rng = np.random.default_rng(seed)
    for task in sorted({t for t, _ in keys}):
        idx = np.array([i for i, (t, _) in enumerate(keys) if t == task])
        n_eval = int(round(len(idx) * eval_fraction))
        is_eval[rng.permutation(idx)[:n_eval]] = True
    return is_eval


def decision_metrics(
    q: Questions, target: str, questions: np.ndarray, chosen: np.ndarray
) -> dict[str, float]:
    """Metrics of routing decisions: decision i picks candidate chosen[i] for question
    questions[i]. A question routed several times (once per row) counts once, its decisions
    averaged.

    top1: the chosen candidate has the best target (ties count as agreement);
    regret: best target minus the chosen candidate's, in target units (nats per token);
    loglik_regret: the same for the correct answer's log-likelihood, whatever the target;
    acc: the correct answer ranks first among the choices under the chosen candidate.
    """
    t = q.targets(target)
    per = {
        "top1": t[questions, chosen] >= t[questions].max(1),
        "regret": t[questions].max(1) - t[questions, chosen],
        "loglik_regret": q.gold_loglik[questions].max(1) - q.gold_loglik[questions, chosen],
        "acc": q.correct[questions, chosen],
    }
    uniq, inverse = np.unique(questions, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(uniq))
    weights = 1.0 / counts[inverse] / len(uniq)
    return {k: float(np.sum(v.astype(float) * weights)) for k, v in per.items()}


def baseline_metrics(
    q: Questions, target: str, train: np.ndarray, evals: np.ndarray
) -> dict[str, dict]:
    """The best single fixed candidate (chosen on the train questions), a uniformly random
    choice (exact expectation) and the per-question oracle, on the eval questions."""
    t = q.targets(target)
    num_c = t.shape[1]
    best = int(np.argmax(t[train].mean(0)))
    fixed = [decision_metrics(q, target, evals, np.full(len(evals), c)) for c in range(num_c)]
    random = {k: float(np.mean([f[k] for f in fixed])) for k in fixed[0]}
    oracle = decision_metrics(q, target, evals, t[evals].argmax(1))
    return {"best_fixed": {"candidate": best, **fixed[best]}, "random": random,
            "oracle": oracle, "fixed": fixed}

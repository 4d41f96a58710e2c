"""Router targets, the question split and routing metrics, computed from the label rows.

Likelihood label rows are one per (question, answer choice); `loglik[r, c]` is the mean
answer-token log-likelihood of row r's choice with candidate c's blocks skipped. Fidelity label
rows are one per chat prompt; `kl[r, c]` is candidate c's mean KL to dense (lower is better),
and a fidelity router is judged by the tolerance rule it will run under (`fidelity_metrics`).
Everything here is numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pudding_mlx.errors import PuddingError
from pudding_mlx.routing import within_tolerance

TARGETS = ("likelihood", "margin", "fidelity")
# KL tolerances (nats/token) at which a fidelity router's decisions are measured
TOLERANCES = (0.05, 0.1, 0.25, 0.5, 1.0)


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


# -- fidelity routers --


def tolerance_choice(pred: np.ndarray, sizes: np.ndarray, tolerance: float) -> np.ndarray:
    """Per row of predicted KLs (rows, candidates): the runtime's tolerance rule
    (`pudding_mlx.routing.within_tolerance`), -1 where it skips nothing."""
    picks = [within_tolerance(row.tolist(), sizes.tolist(), tolerance) for row in pred]
    return np.array([-1 if p is None else p for p in picks], dtype=int)


def _picked(values: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """values[r, chosen[r]] per row; 0 where chosen is -1 (dense's KL)."""
    got = values[np.arange(len(chosen)), np.maximum(chosen, 0)]
    return np.where(chosen < 0, 0.0, got)


def static_curve(kl_train: np.ndarray, kl_eval: np.ndarray, sizes: np.ndarray,
                 names: list[str]) -> list[dict]:
    """Per size (dense, k = 0, first): the candidate with the lowest mean train KL among
    those of that size, and its mean eval KL."""
    curve = [{"size": 0, "candidate": "dense", "kl": 0.0}]
    for k in sorted(set(sizes.tolist()) - {0}):
        of_k = np.flatnonzero(sizes == k)
        best = of_k[np.argmin(kl_train[:, of_k].mean(0))]
        curve.append({"size": int(k), "candidate": names[best],
                      "kl": float(kl_eval[:, best].mean())})
    return curve


def hull_kl(curve: list[dict], size: float) -> float | None:
    """The lowest mean KL a per-prompt mix of the curve's static sets reaches at mean size
    `size` (the lower convex hull of the points); None beyond the largest size."""
    hull: list[tuple[float, float]] = []
    for p in sorted((c["size"], c["kl"]) for c in curve):
        while len(hull) >= 2 and ((hull[-1][0] - hull[-2][0]) * (p[1] - hull[-2][1])
                                  <= (hull[-1][1] - hull[-2][1]) * (p[0] - hull[-2][0])):
            hull.pop()
        hull.append(p)
    if size > hull[-1][0] + 1e-9:
        return None
    xs, ys = zip(*hull, strict=True)
    return float(np.interp(size, xs, ys))


def fidelity_metrics(kl: np.ndarray, agreement: np.ndarray, pred: np.ndarray,
                     sizes: np.ndarray, names: list[str], kl_train: np.ndarray,
                     tolerances=TOLERANCES) -> dict:
    """A fidelity router's decisions on held-out prompts (true `kl`, `agreement`; predicted
    `pred`; all (prompts, candidates)), against static sets chosen on the train prompts'
    labels `kl_train`.

    tolerance: at each tolerance, the router's and the oracle's (the true KLs used as
    predictions) mean blocks skipped, mean true KL, agreement, the share of prompts whose true
    KL is within the tolerance, and the share sent to dense; beside them the lowest KL static
    sets reach at the router's mean size (`hull_kl` of `static_curve`).
    fixed_k: per candidate size, routing among that size's candidates (lowest prediction)
    against the best static set of that size and the oracle."""
    def decisions(chosen: np.ndarray) -> dict:
        size = np.where(chosen < 0, 0, sizes[np.maximum(chosen, 0)])
        true = _picked(kl, chosen)
        return {"mean_skip": float(size.mean()), "kl": float(true.mean()),
                "agreement": float(np.where(chosen < 0, 1.0, _picked(agreement, chosen)).mean()),
                "dense": float((size == 0).mean())}

    curve = static_curve(kl_train, kl, sizes, names)
    out: dict = {"static": curve, "tolerance": [], "fixed_k": []}
    for tol in tolerances:
        router, oracle = tolerance_choice(pred, sizes, tol), tolerance_choice(kl, sizes, tol)
        row = {"tolerance": tol, "router": decisions(router), "oracle": decisions(oracle)}
        row["router"]["within"] = float((_picked(kl, router) <= tol).mean())
        row["static_kl"] = hull_kl(curve, row["router"]["mean_skip"])
        out["tolerance"].append(row)
    for c in curve[1:]:
        of_k = np.flatnonzero(sizes == c["size"])
        router = of_k[np.argmin(pred[:, of_k], axis=1)]
        oracle = of_k[np.argmin(kl[:, of_k], axis=1)]
        out["fixed_k"].append({
            "size": c["size"], "candidates": len(of_k), "best_fixed": c["candidate"],
            "router": decisions(router), "best_fixed_kl": c["kl"], "oracle": decisions(oracle),
            "top1": float((_picked(kl, router) <= _picked(kl, oracle)).mean())})
    return out


def default_tolerance(metrics: dict, kl_target: float) -> float:
    """A fidelity bundle's default tolerance from its router's held-out metrics
    (`fidelity_metrics`): the largest measured tolerance whose routed mean true KL stays at or
    below `kl_target`; the smallest measured one when none does (the safest on offer)."""
    rows = metrics.get("tolerance") or []
    if not rows:
        raise PuddingError("router metrics have no tolerance rows (not a fidelity router?)")
    ok = [r["tolerance"] for r in rows if r["router"]["kl"] <= kl_target]
    return float(max(ok) if ok else min(r["tolerance"] for r in rows))

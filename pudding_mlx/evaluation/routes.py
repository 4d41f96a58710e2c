"""The router's picks on `pudding eval` questions: its scores per question (cached), and the
candidate a routing policy picks from them."""

from __future__ import annotations

from ..routing import Policy
from .scoring import digest


def router_scores(pm, cache, task: str, examples, batch: int = 32
                  ) -> dict[str, list[float] | None]:
    """qid -> the router's scores for the question (router output order; cached), None for an
    empty text (which PuddingModel.route sends to the static set unasked)."""
    names = [c.name for c in pm.candidates]
    qids = [e.qid for e in examples]
    inputs = pm.router.inputs

    def compute(idx: list[int]) -> list[list[float] | None]:
        texts = [examples[i].router_input(inputs) for i in idx]
        out: list[list[float] | None] = [None] * len(texts)
        live = [j for j, t in enumerate(texts) if t.strip()]
        for s in range(0, len(live), batch):
            part = live[s:s + batch]
            scores = pm.router.scores_batch([texts[j] for j in part])
            for j, row in zip(part, scores, strict=True):
                out[j] = [float(x) for x in row]
        return out

    router_files = sorted((k, v) for k, v in pm.manifest.files.items() if k.startswith("router/"))
    router = digest([router_files, names])
    extra = {"router": router, "text": f"router_input-{inputs}-v1"}
    # one file per router, so bundles sharing a --cache do not evict each other's
    return cache.fill(task, f"router-scores-{router[:12]}", qids, compute, chunk=512,
                      desc=f"{task} routing", extra=extra)


def route_questions(pm, scores: dict[str, list[float] | None], policy: Policy
                    ) -> dict[str, str | None]:
    """qid -> name of the candidate `policy` picks from the question's router
    scores, None for skip nothing; an empty text gets the static set."""
    names = [c.name for c in pm.candidates]
    out: dict[str, str | None] = {}
    for qid, row in scores.items():
        if row is None:
            out[qid] = pm.manifest.static.name
        else:
            index = pm.pick(row, policy)
            out[qid] = None if index is None else names[index]
    return out

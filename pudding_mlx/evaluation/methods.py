"""The rows of `pudding eval`: how each method picks a skip set per question, from scores.

- dense / static:<name>: one fixed set for every question;
- static:best: the candidate with the best likelihood on a calibration slice of all tasks;
- static:task-best: per task, the candidate best on that task's calibration slice (the cheapest
  "router": it only recognises the task; tasks without a slice take static:best);
- pudding: the router's pick for the question (the bundle's rule: the best prediction, or for
  a fidelity router the tolerance rule at --tolerance or the bundle's default);
- routed@X / routed:kN: the router's pick by the tolerance rule at X, or the best prediction
  among the candidates of N blocks (`routing.py`);
- oracle: the candidate that ranks the gold answer best (largest margin of gold over the best
  distractor, first candidate on ties): a per-question upper bound for any router;
- oracle:task: per task, the candidate with the most correct answers on the evaluated
  questions themselves (first on ties): a hindsight upper bound for any task-level router;
- random: a seeded uniform pick among the candidates.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import PuddingError
from ..routing import Policy
from .sets import set_key
from .stats import decide, gold_margin

# kind -> table label; the table lists methods in this order
LABELS = {"dense": "dense", "static": "static:", "best": "static:best",
          "task-best": "static:task-best", "pudding": "pudding", "routed": "routed",
          "oracle": "oracle", "oracle-task": "oracle:task", "random": "random"}
ROUTED = ("pudding", "routed")  # kinds whose pick is the router's
PER_QUESTION = ("pudding", "routed", "oracle", "random")  # kinds whose pick varies by question
ALL_CANDIDATES = ("oracle", "oracle-task", "random")  # kinds that need every candidate scored
DEFAULT_METHODS = "dense,static:*,static:best,static:task-best,pudding,oracle,oracle:task,random"


@dataclass(frozen=True)
class Method:
    kind: str  # a key of LABELS
    set_name: str = ""  # the fixed set of kind "static"
    policy: Policy = Policy()  # kind "routed": routed@X or routed:kN (kind "pudding": the default)

    def __str__(self) -> str:
        if self.kind == "routed":
            return str(self.policy)
        return LABELS[self.kind] + self.set_name if self.kind == "static" else LABELS[self.kind]

    @property
    def rank(self) -> int:
        return list(LABELS).index(self.kind)


def parse_methods(spec: str, sets: dict[str, list[int]], candidates: Sequence[str],
                  static_name: str) -> list[Method]:
    """Methods in table order from e.g. "dense,static:*,pudding": dense, static (the bundle's
    static set), static:<name>, static:* (every named set), static:best, static:task-best,
    pudding (also "routed"), routed@X (tolerance X), routed:kN (fixed k = N), oracle,
    oracle:task, random; "all" is the default list."""
    by_label = {label: Method(kind) for kind, label in LABELS.items()
                if kind not in ("static", "routed")}
    tokens = [t.strip() for t in (DEFAULT_METHODS if spec == "all" else spec).split(",")]
    out: list[Method] = []
    for t in filter(None, tokens):
        if t == "static":
            t = f"static:{static_name}"
        if t == "static:*":
            out += [Method("static", n)
                    for n in [*candidates, *(n for n in sets if n not in candidates)]]
        elif t in by_label:
            out.append(by_label[t])
        elif t.startswith("static:") and t.removeprefix("static:") in sets:
            out.append(Method("static", t.removeprefix("static:")))
        elif (policy := Policy.parse(t)) is not None:
            out.append(Method("pudding") if policy == Policy() else Method("routed", policy=policy))
        else:
            raise PuddingError(f"--methods: unknown method {t!r}; use dense, static, "
                               f"static:<{'|'.join(sets)}>, static:*, static:best, "
                               "static:task-best, pudding, routed@X, routed:kN, oracle, "
                               "oracle:task, random")
    return sorted(dict.fromkeys(out), key=lambda m: m.rank)


def needed_sets(methods: Sequence[Method], sets: dict[str, list[int]], candidates: list[str],
                fixed: dict[str, str | None],
                routes: dict[str, dict[str, str | None]] | None) -> list[list[int]]:
    """The distinct skip sets to score for one task; `fixed` names the set of static:best and
    static:task-best for it, `routes` the sets the router picked (see `task_outcomes`)."""
    need: list[list[int]] = []
    for m in methods:
        if m.kind == "dense":
            need.append([])
        elif m.kind == "static":
            need.append(sets[m.set_name])
        elif m.kind in ("best", "task-best"):
            need.append(sets[fixed[m.kind]])
        elif m.kind in ROUTED:
            need += [[] if n is None else sets[n] for n in routes[str(m)].values()]
        else:
            need += [sets[c] for c in candidates]
    return list({set_key(s): s for s in need}.values())


def task_outcomes(task, examples, methods: Sequence[Method], sets: dict[str, list[int]],
                  candidates: list[str], scores: dict[str, dict],
                  routes: dict[str, dict[str, str | None]] | None,
                  fixed: dict[str, str | None], seed: int) -> dict[str, dict]:
    """Per method (by label): chosen set per question (None: skip nothing) and per-question
    correctness (acc and acc_norm). `routes` maps each router method's label to its pick per
    qid."""
    norm = task.metric == "acc_norm"
    rng = np.random.default_rng([seed, zlib.crc32(task.name.encode())])
    random_pick = rng.integers(0, len(candidates), size=len(examples))

    def lls(name: str | None, e) -> list[float]:
        return scores["dense" if name is None else set_key(sets[name])][e.qid][0]

    def correct(name: str | None, e) -> int:
        return int(decide(lls(name, e), e.choices, norm) == e.gold)

    def task_oracle() -> str:
        totals = [sum(correct(c, e) for e in examples) for c in candidates]
        return candidates[int(np.argmax(totals))]

    def choose(m: Method) -> list[str | None]:
        if m.kind == "oracle":
            return [candidates[int(np.argmax([gold_margin(lls(c, e), e.choices, e.gold, norm)
                                              for c in candidates]))] for e in examples]
        if m.kind in ROUTED:
            return [routes[str(m)][e.qid] for e in examples]
        if m.kind == "random":
            return [candidates[i] for i in random_pick]
        if m.kind == "oracle-task":
            return [task_oracle()] * len(examples)
        if m.kind == "dense":
            return [None] * len(examples)
        return [m.set_name if m.kind == "static" else fixed[m.kind]] * len(examples)

    out = {}
    for m in methods:
        chosen = choose(m)
        acc = [int(decide(lls(c, e), e.choices, False) == e.gold)
               for c, e in zip(chosen, examples, strict=True)]
        acc_norm = [int(decide(lls(c, e), e.choices, True) == e.gold)
                    for c, e in zip(chosen, examples, strict=True)]
        out[str(m)] = {"chosen": chosen, "acc": acc, "acc_norm": acc_norm,
                       "correct": acc_norm if norm else acc}
    return out

"""The routing rules: which candidate a router's predictions choose.

A router predicts one value per candidate, in the order of its outputs; what the value means is
the router's `target` (pudding.json router.target). "likelihood" and "margin" routers predict
a score, higher is better. A "fidelity" router predicts the degradation a candidate causes,
mean KL(dense || set) in nats per token, lower is better (dense's true value is 0).

- best rule (the paper's): the candidate with the best prediction;
- tolerance rule (fidelity routers): the candidate that skips the most blocks among those whose
  predicted degradation is at most the tolerance; equal sizes go to the lower prediction, then
  to the earlier candidate. When none qualifies: dense, that is the dense candidate (0 blocks)
  if the bundle has one, else no candidate (skip nothing);
- fixed-k rule (any router): the best prediction among the candidates of exactly k blocks.

Standard library only, so the torch side can apply the same rules.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import PuddingError

LOWER_IS_BETTER = ("fidelity",)  # router targets whose prediction is a degradation
_POLICY = re.compile(r"routed(?:@(?P<tol>[^,]+)|:k(?P<k>\d+))?")


@dataclass(frozen=True)
class Policy:
    """How a prompt's router scores choose a set: the bundle's default rule, a tolerance
    (fidelity routers), or fixed k. Written "routed", "routed@0.5" or "routed:k4"."""

    tolerance: float | None = None
    k: int | None = None

    def __post_init__(self):
        if self.tolerance is not None and self.k is not None:
            raise PuddingError("a route takes a tolerance or a fixed k, not both")
        if self.tolerance is not None:
            check_tolerance(self.tolerance)
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int)
                                   or self.k < 0):
            raise PuddingError(f"k must be a non-negative integer, got {self.k!r}")

    def __str__(self) -> str:
        if self.tolerance is not None:
            return f"routed@{self.tolerance:g}"
        return "routed" if self.k is None else f"routed:k{self.k}"

    @classmethod
    def parse(cls, text: str) -> Policy | None:
        """"routed", "routed@0.5", "routed:k4" -> a Policy; anything else -> None."""
        m = _POLICY.fullmatch(text.strip())
        if m is None:
            return None
        if m["tol"] is not None:
            try:
                return cls(tolerance=float(m["tol"]))
            except ValueError:
                raise PuddingError(f"{text!r}: the tolerance must be a number") from None
        return cls(k=None if m["k"] is None else int(m["k"]))


def check_tolerance(x: float) -> float:
    """A tolerance is a number >= 0 (predicted KL to dense, nats/token); inf allows any set."""
    if isinstance(x, bool) or not isinstance(x, int | float) or math.isnan(x) or x < 0:
        raise PuddingError(f"the tolerance must be a number >= 0 (predicted KL to dense, "
                           f"nats/token), got {x!r}")
    return float(x)


def within_tolerance(predicted: Sequence[float], sizes: Sequence[int],
                     tolerance: float) -> int | None:
    """The tolerance rule: index of the chosen candidate, None for skip nothing."""
    predicted = [float(p) for p in predicted]
    ok = [i for i, p in enumerate(predicted) if p <= tolerance]  # NaN never qualifies
    if not ok:
        ok = [i for i, n in enumerate(sizes) if n == 0]
        if not ok:
            return None
    return min(ok, key=lambda i: (-sizes[i], _rank(predicted[i], True), i))


def fixed_k(scores: Sequence[float], sizes: Sequence[int], k: int,
            lower_is_better: bool) -> int:
    """The fixed-k rule: index of the best prediction among the candidates of k blocks."""
    _check_k(sizes, k)
    ok = [i for i, n in enumerate(sizes) if n == k]
    return min(ok, key=lambda i: (_rank(float(scores[i]), lower_is_better), i))


def _check_k(sizes: Sequence[int], k: int) -> None:
    if k not in sizes:
        raise PuddingError(f"no candidate skips exactly {k} blocks (the candidates skip "
                           f"{', '.join(map(str, sorted(set(sizes))))})")


def best(scores: Sequence[float], lower_is_better: bool) -> int:
    """The paper's rule: index of the best prediction (the first of equal ones)."""
    return min(range(len(scores)), key=lambda i: (_rank(float(scores[i]), lower_is_better), i))


def _rank(x: float, lower_is_better: bool) -> float:
    """Sort key: smaller is better; NaN is worst."""
    if math.isnan(x):
        return math.inf
    return x if lower_is_better else -x


def check_policy(target: str, policy: Policy, default: float | None,
                 sizes: Sequence[int]) -> float | None:
    """The tolerance `policy` routes with (None: no tolerance applies), or a one-line error
    when the router cannot take one, a fidelity router has none to use, or no candidate has
    the fixed k blocks."""
    if policy.k is not None:
        _check_k(sizes, policy.k)
    if target not in LOWER_IS_BETTER:
        if policy.tolerance is not None:
            raise PuddingError(
                f"a tolerance needs a router that predicts each set's degradation (target "
                f"'fidelity'); this bundle's router predicts a {target} score per set, higher "
                f"is better, which no tolerance applies to")
        return None
    if policy.k is not None:
        return None
    tolerance = policy.tolerance if policy.tolerance is not None else default
    if tolerance is None:
        raise PuddingError("this bundle's router predicts KL to dense (target 'fidelity') and "
                           "pudding.json gives no default tolerance: pass --tolerance X "
                           "(nats/token) or a fixed k")
    return tolerance


def choose(scores: Sequence[float], sizes: Sequence[int], target: str, policy: Policy,
           default_tolerance: float | None = None) -> int | None:
    """Index of the candidate `policy` picks from one prompt's router scores (candidates in
    router output order, `sizes` = blocks each skips); None means skip nothing."""
    lower = target in LOWER_IS_BETTER
    tolerance = check_policy(target, policy, default_tolerance, sizes)
    if policy.k is not None:
        return fixed_k(scores, sizes, policy.k, lower)
    if tolerance is not None:
        return within_tolerance(scores, sizes, tolerance)
    return best(scores, lower)

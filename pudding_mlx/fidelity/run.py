"""`pudding fidelity`'s run: the dense continuations, every set's metrics on them
(`metrics.py` has the definitions), the routed rows, and the summaries with bootstrap intervals.

Results are cached per (set, prompt text) under the output folder (`evaluation.scoring.ScoreCache`),
so an interrupted run resumes and a larger --limit only computes the new prompts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import PuddingError
from ..evaluation.scoring import ScoreCache, digest
from ..evaluation.sets import named_sets, set_key
from ..evaluation.stats import paired_bootstrap
from ..masking import check_skip
from ..model import clean_text
from ..prompts import ChatPrompt, read_prompts, select
from ..routing import Policy
from .metrics import METRICS, SetMetrics, forced_logprobs, greedy_continuation, measure

CACHE_TASK = "fidelity"  # the cache's folder name
CONTINUATIONS = "continuations"  # the cache file of the dense continuations
FORMAT = "fidelity-v1"  # bump when a metric's definition changes (invalidates caches)


# --- many prompts, cached ------------------------------------------------------------------------


def measure_all(pm, cache: ScoreCache, prompts: Sequence[ChatPrompt],
                skips: dict[str, list[int]], max_tokens: int, system_prompt: str | None,
                chunk: int = 8) -> tuple[dict[str, list[int]], dict[str, dict[str, SetMetrics]]]:
    """(prompt key -> dense continuation, set key -> prompt key -> SetMetrics) for every prompt
    and set; cached values are reused, new ones saved after every `chunk` prompts."""
    from tqdm.auto import tqdm

    conts = cache.load(CACHE_TASK, CONTINUATIONS)
    raw = {name: cache.load(CACHE_TASK, name) for name in skips}
    todo = list({p.key: p for p in prompts
                 if p.key not in conts or any(p.key not in raw[n] for n in skips)}.values())
    with tqdm(total=len(todo), desc="fidelity", unit="prompt", leave=False) as bar:
        for start in range(0, len(todo), chunk):
            for p in todo[start:start + chunk]:
                ids = pm.encode(p.text, True, system_prompt)
                if p.key not in conts:
                    conts[p.key] = greedy_continuation(pm, ids, max_tokens)
                ref = forced_logprobs(pm, [], ids, conts[p.key])
                for name, skip in skips.items():
                    if p.key not in raw[name]:
                        raw[name][p.key] = measure(pm, skip, ids, conts[p.key], ref).to_dict()
                bar.update(1)
            cache.save(CACHE_TASK, CONTINUATIONS, conts)
            for name in skips:
                cache.save(CACHE_TASK, name, raw[name])
    values = {name: {p.key: SetMetrics.from_dict(raw[name][p.key]) for p in prompts}
              for name in skips}
    return {p.key: conts[p.key] for p in prompts}, values


def prompt_scores(pm, cache: ScoreCache, prompts: Sequence[ChatPrompt]
                  ) -> dict[str, list[float] | None]:
    """prompt key -> the router's scores for the raw text (router output order; cached), None
    for an empty text (which `PuddingModel.route` sends to the static set unasked)."""
    router_files = sorted((k, v) for k, v in pm.manifest.files.items() if k.startswith("router/"))
    extra = {"router": digest([router_files, [c.name for c in pm.candidates]])}
    keys = [p.key for p in prompts]

    def one(text: str) -> list[float] | None:
        text = clean_text(text)  # one prompt at a time, exactly as PuddingModel.route reads it
        return [float(x) for x in pm.router.scores(text)] if text.strip() else None

    return cache.fill(CACHE_TASK, "router-scores", keys,
                      lambda idx: [one(prompts[i].text) for i in idx], chunk=256,
                      desc="routing", extra=extra)


def route_prompts(pm, scores: dict[str, list[float] | None], policy: Policy) -> dict[str, str]:
    """prompt key -> name of the candidate `policy` picks ("dense" for skip nothing; an empty
    prompt gets the static set, as `PuddingModel.route` does)."""
    names = [c.name for c in pm.candidates]
    out = {}
    for key, row in scores.items():
        if row is None:
            out[key] = pm.manifest.static.name
        else:
            index = pm.pick(row, policy)
            out[key] = "dense" if index is None else names[index]
    return out


# --- the run -------------------------------------------------------------------------------------


@dataclass
class FidelitySettings:
    bundle: str
    output: str
    prompts: str | None = None  # a prompts file [default: the packaged set]
    split: str = "heldout"
    limit: int | None = None
    max_tokens: int = 64
    system_prompt: str | None = None
    extra_sets: dict[str, list[int]] = field(default_factory=dict)
    # routed rows: "routed" (the bundle's rule, at `tolerance` for a fidelity router),
    # "routed@X" (tolerance X), "routed:kN" (the best prediction among the sets of N blocks)
    routed: tuple[str, ...] = ("routed",)
    tolerance: float | None = None
    router_backend: str = "auto"
    seed: int = 0
    resamples: int = 2000
    verify: bool = True
    command: str = ""


def fingerprint(pm, settings: FidelitySettings) -> dict:
    """What the cached values depend on: model files, N, the chat template's inputs, FORMAT."""
    model_files = sorted((k, v) for k, v in pm.manifest.files.items() if k.startswith("model/"))
    return {"backend": "mlx", "model": digest(model_files), "format": FORMAT,
            "max_tokens": settings.max_tokens, "chat_template": True,
            "system_prompt": settings.system_prompt}


def row_sets(sets: dict[str, list[int]], routed: Sequence[str] = ("routed",)
             ) -> dict[str, list[int] | None]:
    """Table rows in order: dense, the candidates, the static set, extra sets, then the routed
    rows (None: the set varies by prompt). A set may be called "dense" only if it skips
    nothing (a bundle's dense candidate)."""
    for name, skip in sets.items():
        if (name == "dense" and skip) or name in routed:
            raise PuddingError(f"a skip set may not be called {name!r} (a row of its own)")
    rows: dict[str, list[int] | None] = {"dense": []}
    rows.update(sets)
    rows.update(dict.fromkeys(routed))
    return rows


def routed_policies(settings: FidelitySettings) -> dict[str, Policy]:
    """Row name -> routing policy of every routed row (see FidelitySettings.routed)."""
    out = {}
    for spec in settings.routed:
        policy = Policy.parse(spec)
        if policy is None:
            raise PuddingError(f"--routed {spec!r}: expected routed, routed@X or routed:kN")
        out[str(policy)] = Policy(settings.tolerance) if policy == Policy() else policy
    if not out:
        raise PuddingError("--routed: no routed row to measure")
    if settings.tolerance is not None and "routed" not in out:
        raise PuddingError("--tolerance sets the tolerance of the routed row, which --routed "
                           "leaves out; use routed@X rows instead")
    return out


def run_fidelity(settings: FidelitySettings) -> dict:
    """Measure every set on the chosen prompts and write results.json / results.md /
    fidelity.png to settings.output. Returns the results dict."""
    from ..model import load
    from .report import write_all

    tic = time.perf_counter()
    out = Path(settings.output)
    prompts = select(read_prompts(settings.prompts), settings.split, settings.limit,
                     settings.seed)
    pm = load(settings.bundle, router_backend=settings.router_backend, verify=settings.verify)
    sets = named_sets(pm, settings.extra_sets)
    for name, skip in settings.extra_sets.items():
        try:
            check_skip(pm.model, skip)
        except PuddingError as e:
            raise PuddingError(f"set {name!r}: {e}") from None
    policies = routed_policies(settings)
    for policy in policies.values():
        pm.check_policy(policy)  # a bad tolerance or k fails before any measuring
    rows = row_sets(sets, list(policies))
    skips = {set_key(s): list(s) for s in rows.values() if s is not None}
    cache = ScoreCache(out / "cache", fingerprint(pm, settings))
    scores = prompt_scores(pm, cache, prompts)
    routes = {row: route_prompts(pm, scores, policy) for row, policy in policies.items()}
    conts, values = measure_all(pm, cache, prompts, skips, settings.max_tokens,
                                settings.system_prompt)
    named = {"dense": [], **sets}  # what a routed row's pick skips

    def row_skip(row: str, p: ChatPrompt) -> list[int]:
        return named[routes[row][p.key]] if rows[row] is None else rows[row]

    metrics = {row: [values[set_key(row_skip(row, p))][p.key] for p in prompts]
               for row in rows}
    base = "routed" if "routed" in routes else next(iter(routes))
    results = {
        "command": settings.command,
        "bundle": str(Path(settings.bundle).resolve()),
        "base_model": pm.manifest.base_model,
        "num_blocks": pm.manifest.num_blocks,
        "prompts_file": str(Path(settings.prompts).resolve()) if settings.prompts else "packaged",
        "split": settings.split,
        "limit": settings.limit,
        "max_tokens": settings.max_tokens,
        "system_prompt": settings.system_prompt,
        "seed": settings.seed,
        "resamples": settings.resamples,
        "n": len(prompts),
        "sources": _counts(p.source for p in prompts),
        "mean_tokens": float(np.mean([len(c) for c in conts.values()])),
        "candidates": [c.name for c in pm.candidates],
        "static": pm.manifest.static.name,
        "sets": {row: skip for row, skip in rows.items() if skip is not None},
        "router_target": pm.manifest.router.target,
        "tolerance": settings.tolerance,
        "routed": {row: str(policy) for row, policy in policies.items()},  # as applied
        "route_counts": _counts(routes[base][p.key] for p in prompts),
        "route_counts_by_row": {row: _counts(r[p.key] for p in prompts)
                                for row, r in routes.items()},
        "mean_skipped": {row: float(np.mean([len(row_skip(row, p)) for p in prompts]))
                         for row in rows},
        "summary": {row: summarise(m, settings.resamples, settings.seed)
                    for row, m in metrics.items()},
        "pairs_base": base,
        "pairs": {row: pair(metrics[base], m, settings.resamples, settings.seed)
                  for row, m in metrics.items() if row != base},
        "by_position": {row: by_position(m, settings.max_tokens) for row, m in metrics.items()},
        "prompts": [{"id": p.id, "source": p.source, "route": routes[base][p.key],
                     "routes": {row: r[p.key] for row, r in routes.items()},
                     "router_scores": scores[p.key], "tokens": len(conts[p.key]),
                     **{row: metrics[row][i].summary() for row in rows}}
                    for i, p in enumerate(prompts)],
        "seconds": round(time.perf_counter() - tic, 1),
    }
    write_all(out, results)
    return results


def _counts(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


# --- statistics ----------------------------------------------------------------------------------


def _column(ms: Sequence[SetMetrics], metric: str) -> np.ndarray:
    return np.array([m.summary()[metric] for m in ms])


def summarise(ms: Sequence[SetMetrics], resamples: int, seed: int) -> dict:
    """Per metric: the mean over prompts with a 95% bootstrap interval; also the perplexity
    exp(mean NLL) and the share of prompts whose whole continuation the set reproduces."""
    zeros = np.zeros(len(ms))
    out = {}
    for metric in METRICS:
        col = _column(ms, metric)
        out[metric] = asdict(paired_bootstrap([(col, zeros)], resamples, seed))
    out["ppl"] = float(np.exp(out["nll"]["diff"]))
    out["full_match"] = float(np.mean([m.diverge == m.tokens for m in ms]))
    return out


def pair(a: Sequence[SetMetrics], b: Sequence[SetMetrics], resamples: int, seed: int) -> dict:
    """a minus b per metric, paired over prompts, with a 95% bootstrap interval."""
    return {metric: asdict(paired_bootstrap([(_column(a, metric), _column(b, metric))],
                                            resamples, seed))
            for metric in METRICS}


def by_position(ms: Sequence[SetMetrics], max_tokens: int) -> dict[str, list[float | None]]:
    """Mean KL at each continuation position (over prompts that reach it), and the share of
    prompts whose greedy output still equals dense after t tokens, t = 1..max_tokens (a
    continuation reproduced up to its end-of-sequence token matches for every t)."""
    kl: list[float | None] = []
    for t in range(max_tokens):
        vals = [m.kl[t] for m in ms if len(m.kl) > t]
        kl.append(float(np.mean(vals)) if vals else None)
    matching = [float(np.mean([m.diverge >= t or m.diverge == m.tokens for m in ms]))
                for t in range(1, max_tokens + 1)]
    return {"kl": kl, "matching": matching}

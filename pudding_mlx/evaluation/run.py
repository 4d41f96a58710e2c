"""`pudding eval`: zero-shot accuracy of dense, static, routed (PuDDing), oracle and random skip
sets on the commonsense tasks, side by side, with paired bootstrap intervals.

Protocol (lm-evaluation-harness, zero-shot): each task's lm-eval context and choices
(`pudding_mlx.tasks`, target delimiter " "), acc = argmax of the summed log-likelihood, acc_norm =
argmax of it divided by the choice's length in characters, WinoGrande partial scoring.

Every skip set that some method needs is scored once per question (cached in --output, so an
interrupted run resumes); the methods only pick, per question, whose scores count:
- dense / static:<name>: one fixed set for every question;
- pudding: the router's pick for the question, made once from the question alone
  (`Example.router_text`); routed@X / routed:kN: the same router scores, picked by the
  tolerance rule at X or among the sets of N blocks (`routing.py`);
- oracle: the candidate that ranks the gold answer best (largest margin of gold over the best
  other choice under the task's metric): correct whenever any candidate is;
- random: a uniformly random candidate per question (seeded).

Splits: validation, or test for ARC / OpenBookQA when a local test split exists; HellaSwag
always excludes its holdout (`pudding_mlx.tasks.split_holdout`: the calibration and label rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import click

from ..errors import PuddingError
from ..plugins import EVAL_BACKENDS, plugins
from ..routing import Policy
from ..tasks import EVAL_TASKS, get_task
from .examples import eval_examples
from .methods import (
    DEFAULT_METHODS,
    PER_QUESTION,
    ROUTED,
    Method,
    needed_sets,
    parse_methods,
    task_outcomes,
)
from .routes import route_questions, router_scores
from .scoring import set_scores, unscored
from .sets import named_sets, set_key
from .static_best import best_static
from .summary import averages, task_summary

DEFAULT_TASKS = ("arc_challenge", "arc_easy", "boolq", "hellaswag", "piqa", "winogrande",
                 "openbookqa")


@dataclass
class EvalSettings:
    bundle: str
    output: str
    tasks: tuple[str, ...] = DEFAULT_TASKS
    methods: str = DEFAULT_METHODS
    limit: int | None = None  # per task: a seeded random subset, kept in data order
    backend: str = "mlx"
    dequantize: bool = False  # mlx backend: score a quantised model's dequantised weights
    torch_model: str | None = None  # torch backend: HF source [default: the bundle's model/]
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 16
    tolerance: float | None = None  # pudding's, for a fidelity router [default: the bundle's]
    extra_sets: dict[str, list[int]] = field(default_factory=dict)
    baseline: str | None = None  # the row the delta column compares to [default: bundle static]
    best_slice: int = 32  # static:best: train examples per calibration task
    data_dir: str | None = None
    seed: int = 0
    resamples: int = 2000
    verify: bool = True
    cache: str | None = None  # per-set scores [default: <output>/cache]
    command: str = ""


@dataclass
class _Run:
    """What every task of one run shares."""

    settings: EvalSettings
    pm: object  # PuddingModel
    methods: list[Method]
    sets: dict[str, list[int]]
    candidates: list[str]
    policies: dict[str, Policy]  # routed method -> its policy
    scorer: object
    cache: object  # ScoreCache
    best: dict | None  # best_static's result, when a method needs it


def run_eval(settings: EvalSettings) -> dict:
    """Score, derive every method, compare, and write results.json / results.md / the heat map
    to settings.output. Returns the results dict."""
    from ..model import load
    from .report import write_all
    from .scoring import ScoreCache

    out = Path(settings.output)
    tasks = [get_task(t) for t in settings.tasks]
    backends = plugins(EVAL_BACKENDS)
    if settings.dequantize and settings.backend != "mlx":
        raise PuddingError("--dequantize applies to the mlx backend only")
    if settings.backend != "mlx" and settings.backend not in backends:
        raise PuddingError(f"--backend {settings.backend}: expected one of "
                           f"{', '.join(['mlx', *backends])}")
    pm = load(settings.bundle, verify=settings.verify, lazy=settings.backend != "mlx")
    sets = named_sets(pm, settings.extra_sets)
    candidates = [c.name for c in pm.candidates]
    static_name = pm.manifest.static.name
    methods = parse_methods(settings.methods, sets, candidates, static_name)
    policies = _policies(pm, methods, settings.tolerance)
    labels = [str(m) for m in methods]
    baseline = settings.baseline or f"static:{static_name}"
    if baseline not in labels:
        baseline = None if settings.baseline is None else _bad_baseline(settings.baseline, labels)
    scorer = _scorer(pm, settings, backends)
    cache = ScoreCache(settings.cache or out / "cache", scorer.fingerprint)
    best = None
    if any(m.kind in ("best", "task-best") for m in methods):
        seed = int(pm.manifest.extra.get("search_settings", {}).get("seed", settings.seed))
        best = best_static(pm, scorer, cache, settings.best_slice, seed, settings.data_dir)
        click.echo(f"static:best = {best['name']} (mean gold log-lik "
                   f"{best['mean_loglik'][best['name']]:.4f})", err=True)
    run = _Run(settings, pm, methods, sets, candidates, policies, scorer, cache, best)
    per_task = {task.name: _eval_task(run, task, f"{i}/{len(tasks)}")
                for i, task in enumerate(tasks, 1)}
    results = {
        "command": settings.command,
        "bundle": str(Path(settings.bundle).resolve()),
        "base_model": pm.manifest.base_model,
        "num_blocks": pm.manifest.num_blocks,
        "backend": scorer.description,
        "limit": settings.limit,
        "seed": settings.seed,
        "resamples": settings.resamples,
        "methods": labels,
        "tolerance": settings.tolerance,
        "router_target": pm.manifest.router.target,
        "baseline": baseline,
        "candidates": candidates,
        "static": static_name,
        "sets": sets,
        "static_best": best,
        "tasks": per_task,
        "averages": averages(per_task, labels, EVAL_TASKS, settings.resamples, settings.seed),
    }
    write_all(out, results)
    return results


def _policies(pm, methods: list[Method], tolerance: float | None) -> dict[str, Policy]:
    """The policy of every routed method, each checked against the bundle's router."""
    if tolerance is not None and not any(m.kind == "pudding" for m in methods):
        raise PuddingError("--tolerance sets the tolerance of the pudding method, which "
                           "--methods leaves out; use routed@X methods instead")
    policies = {str(m): Policy(tolerance) if m.kind == "pudding" else m.policy
                for m in methods if m.kind in ROUTED}
    for policy in policies.values():
        pm.check_policy(policy)  # a bad tolerance or k fails before any scoring
    return policies


def _scorer(pm, settings: EvalSettings, backends: dict):
    """The MLX scorer, or the --backend plugin's on the model `_torch_source` names."""
    from .scoring import MLXScorer

    if settings.backend == "mlx":
        return MLXScorer(pm, settings.dequantize)
    try:
        backend_class = backends[settings.backend].load()
    except ImportError as e:
        raise PuddingError(f"--backend {settings.backend} needs a package that is not "
                           f"installed ({e}); pip install 'pudding-mlx[train]'") from None
    source = _torch_source(pm, settings)
    click.echo(f"Loading {source} for the {settings.backend} backend", err=True)
    return backend_class(source, settings.device, settings.dtype, settings.batch_size)


def _torch_source(pm, settings: EvalSettings) -> str:
    """The HF source for the torch backend: --torch-model, else the bundle's model/ folder when
    transformers can read it (not MLX-quantized), else the manifest's base model."""
    import json

    if settings.torch_model:
        return settings.torch_model
    config = json.loads((pm.path / "model" / "config.json").read_text())
    if "quantization" in config:
        return pm.manifest.base_model
    return str(pm.path / "model")


def _eval_task(run: _Run, task, position: str) -> dict:
    """Score the sets one task needs (cached), then summarise every method on it."""
    s = run.settings
    split, examples = eval_examples(task.name, s.data_dir, s.limit, s.seed)
    if not examples:
        raise PuddingError(f"{task.name}/{split}: no examples")
    routes = None
    if run.policies:
        picked = router_scores(run.pm, run.cache, task.name, examples)
        routes = {label: route_questions(run.pm, picked, policy)
                  for label, policy in run.policies.items()}
    best = run.best
    fixed = {"best": best and best["name"],
             "task-best": best and best["task_best"].get(task.name, best["name"])}
    need = needed_sets(run.methods, run.sets, run.candidates, fixed, routes)
    plan = getattr(run.scorer, "plan", None)  # a backend that scores a task's sets together
    if plan:
        plan(unscored(run.cache, task.name, examples, need))
    scores = {}
    for si, skip in enumerate(need, 1):
        click.echo(f"[task {position} {task.name} ({split}, {len(examples)} q)] "
                   f"set {si}/{len(need)}: {set_key(skip)}", err=True)
        scores[set_key(skip)] = set_scores(run.scorer, run.cache, task.name, examples, skip)
    if plan:
        plan([])
    outcomes = task_outcomes(task, examples, run.methods, run.sets, run.candidates, scores,
                             routes, fixed, s.seed)
    return task_summary(task, split, examples, outcomes, run.sets, run.pm.manifest.num_blocks,
                        s.resamples, s.seed,
                        [str(m) for m in run.methods if m.kind in PER_QUESTION])


def _bad_baseline(name: str, methods: list[str]):
    raise PuddingError(f"--baseline {name!r} is not among the methods {methods}")

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

import shlex
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from ..bundle import read_candidates
from ..data import calibration_examples, default_data_dirs, find_split, load_examples
from ..errors import PuddingError
from ..options import no_verify_option
from ..plugins import EVAL_BACKENDS, plugins
from ..routing import Policy
from ..tasks import CALIBRATION_TASKS, EVAL_TASKS, get_task
from .methods import (
    DEFAULT_METHODS,
    PER_QUESTION,
    ROUTED,
    needed_sets,
    parse_methods,
    set_key,
    task_outcomes,
)
from .scoring import digest
from .stats import above_chance, chance_level, paired_bootstrap

DEFAULT_TASKS = ("arc_challenge", "arc_easy", "boolq", "hellaswag", "piqa", "winogrande",
                 "openbookqa")
TEST_SPLIT_TASKS = ("arc_challenge", "arc_easy", "openbookqa")
BEST_CRITERION = ("mean token log-likelihood of the gold answer (method prompt format: the "
                  "search's likelihood loss) on a seeded train-split slice of each calibration "
                  "task (HellaSwag: its holdout)")


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


# --- data ----------------------------------------------------------------------------------------


def eval_split(task: str, data_dir: str | None) -> str:
    """"test" for ARC and OpenBookQA when a local test split exists, else "validation"."""
    if task in TEST_SPLIT_TASKS:
        dirs = [Path(data_dir)] if data_dir else default_data_dirs()
        if any(find_split(d, task, "test") for d in dirs):
            return "test"
    return "validation"


def eval_examples(task: str, data_dir: str | None, limit: int | None, seed: int):
    """(split, examples): the evaluation rows of a task, a seeded subset of `limit` of them."""
    split = eval_split(task, data_dir)
    examples = load_examples(task, split, data_dir)  # HellaSwag: minus the holdout
    if limit is not None and limit < len(examples):
        rng = np.random.default_rng([seed, zlib.crc32(task.encode())])
        # a prefix of one permutation: a larger --limit extends a smaller one (cache reuse)
        keep = np.sort(rng.permutation(len(examples))[:limit])
        examples = [examples[i] for i in keep]
    return split, examples


# --- skip sets and methods -----------------------------------------------------------------------


def parse_set(value: str) -> tuple[str, list[int]]:
    """--extra-set "name=3,7,9" -> ("name", [3, 7, 9])."""
    name, sep, blocks = value.partition("=")
    try:
        skip = sorted(int(b) for b in blocks.split(",") if b.strip())
    except ValueError:
        skip = None
    if not sep or not name or skip is None or name in ("best", "*"):
        raise PuddingError(f"--extra-set {value!r}: expected NAME=3,7,9 (NAME not 'best')")
    return name, skip


def read_sets_file(path: str | Path) -> dict[str, list[int]]:
    """Named skip sets from a candidates file (`bundle.read_candidates`: `pudding search`'s
    output, a JSON list, or one set such as the SLEB baseline's)."""
    return {c.name: c.skip for c in read_candidates(path)[0]}


def named_sets(pm, extra: dict[str, list[int]]) -> dict[str, list[int]]:
    """Every fixed set by name: the candidates (router order), the bundle's static set, extras."""
    sets = {c.name: sorted(c.skip) for c in pm.candidates}
    static = pm.manifest.static
    if sets.get(static.name, sorted(static.skip)) != sorted(static.skip):
        raise PuddingError(f"{pm.path}: static set {static.name!r} differs from the candidate "
                           "of the same name")
    sets[static.name] = sorted(static.skip)
    for name, skip in extra.items():
        if name in sets and sets[name] != skip:
            raise PuddingError(f"extra set {name!r} clashes with a bundle set of that name")
        sets[name] = skip
    return sets


# --- scoring -------------------------------------------------------------------------------------


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


def unscored(cache, task: str, examples, skips: Sequence[Sequence[int]]) -> list:
    """The sets whose cached eval-format scores miss some of the examples."""
    out = []
    for skip in skips:
        done = cache.load(task, set_key(skip), {"format": "eval"})
        if any(e.qid not in done for e in examples):
            out.append(skip)
    return out


def set_scores(scorer, cache, task: str, examples, skip: Sequence[int], fmt: str = "eval",
               gold_only: bool = False) -> dict[str, list]:
    """qid -> [summed log-probs, token counts] of a question's requests under one skip set."""
    qids = [e.qid for e in examples]

    def requests(e):
        reqs = e.eval if fmt == "eval" else e.prompt
        return [reqs[e.gold]] if gold_only else list(reqs)

    def compute(idx: list[int]) -> list:
        return [list(r) for r in scorer.score([requests(examples[i]) for i in idx], skip)]

    name = set_key(skip) + ("-gold" if gold_only else "")
    return cache.fill(task, name, qids, compute, scorer.chunk, f"{task} {set_key(skip)}",
                      extra={"format": fmt})


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


# --- methods from scores -------------------------------------------------------------------------


# --- the run -------------------------------------------------------------------------------------


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


def run_eval(settings: EvalSettings) -> dict:
    """Score, derive every method, compare, and write results.json / results.md / the heat map
    to settings.output. Returns the results dict."""
    from ..model import load
    from .report import write_all
    from .scoring import MLXScorer, ScoreCache

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
    if settings.tolerance is not None and not any(m.kind == "pudding" for m in methods):
        raise PuddingError("--tolerance sets the tolerance of the pudding method, which "
                           "--methods leaves out; use routed@X methods instead")
    policies = {str(m): Policy(settings.tolerance) if m.kind == "pudding" else m.policy
                for m in methods if m.kind in ROUTED}
    for policy in policies.values():
        pm.check_policy(policy)  # a bad tolerance or k fails before any scoring
    labels = [str(m) for m in methods]
    baseline = settings.baseline or f"static:{static_name}"
    if baseline not in labels:
        baseline = None if settings.baseline is None else _bad_baseline(settings.baseline, labels)

    if settings.backend == "mlx":
        scorer = MLXScorer(pm, settings.dequantize)
        backend = scorer.description
    else:
        try:
            backend_class = backends[settings.backend].load()
        except ImportError as e:
            raise PuddingError(f"--backend {settings.backend} needs a package that is not "
                               f"installed ({e}); pip install 'pudding-mlx[train]'") from None
        source = _torch_source(pm, settings)
        click.echo(f"Loading {source} for the {settings.backend} backend", err=True)
        scorer = backend_class(source, settings.device, settings.dtype, settings.batch_size)
        backend = scorer.description
    cache = ScoreCache(settings.cache or out / "cache", scorer.fingerprint)

    best = None
    if any(m.kind in ("best", "task-best") for m in methods):
        seed = int(pm.manifest.extra.get("search_settings", {}).get("seed", settings.seed))
        best = best_static(pm, scorer, cache, settings.best_slice, seed, settings.data_dir)
        click.echo(f"static:best = {best['name']} (mean gold log-lik "
                   f"{best['mean_loglik'][best['name']]:.4f})", err=True)

    per_task = {}
    for ti, task in enumerate(tasks, 1):
        split, examples = eval_examples(task.name, settings.data_dir, settings.limit,
                                        settings.seed)
        if not examples:
            raise PuddingError(f"{task.name}/{split}: no examples")
        routes = None
        if policies:
            picked = router_scores(pm, cache, task.name, examples)
            routes = {label: route_questions(pm, picked, policy)
                      for label, policy in policies.items()}
        fixed = {"best": best and best["name"],
                 "task-best": best and best["task_best"].get(task.name, best["name"])}
        need = needed_sets(methods, sets, candidates, fixed, routes)
        plan = getattr(scorer, "plan", None)  # a backend that scores a task's sets together
        if plan:
            plan(unscored(cache, task.name, examples, need))
        scores = {}
        for si, skip in enumerate(need, 1):
            click.echo(f"[task {ti}/{len(tasks)} {task.name} ({split}, {len(examples)} q)] "
                       f"set {si}/{len(need)}: {set_key(skip)}", err=True)
            scores[set_key(skip)] = set_scores(scorer, cache, task.name, examples, skip)
        if plan:
            plan([])
        outcomes = task_outcomes(task, examples, methods, sets, candidates, scores, routes,
                                 fixed, settings.seed)
        per_task[task.name] = _task_summary(task, split, examples, outcomes, sets,
                                            pm.manifest.num_blocks, settings,
                                            [str(m) for m in methods if m.kind in PER_QUESTION])

    results = {
        "command": settings.command,
        "bundle": str(Path(settings.bundle).resolve()),
        "base_model": pm.manifest.base_model,
        "num_blocks": pm.manifest.num_blocks,
        "backend": backend,
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
        "averages": _averages(per_task, labels, EVAL_TASKS, settings),
    }
    write_all(out, results)
    return results


def _bad_baseline(name: str, methods: list[str]):
    raise PuddingError(f"--baseline {name!r} is not among the methods {methods}")


def _task_summary(task, split: str, examples, outcomes: dict, sets: dict[str, list[int]],
                  num_blocks: int, settings: EvalSettings, per_question: list[str]) -> dict:
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
                                            settings.resamples, settings.seed).to_dict()
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


def _averages(per_task: dict, methods: list[str], eval_tasks: Sequence[str],
              settings: EvalSettings) -> dict:
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
                         for t in names], settings.resamples, settings.seed).to_dict()
        out[key] = entry
    for t in per_task.values():
        del t["_correct"]
    return out


# --- the command ---------------------------------------------------------------------------------


@click.command("eval")
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False),
              help="Folder for results.md/.json, skip_heatmap.png and the resumable cache.")
@click.option("--tasks", default=",".join(DEFAULT_TASKS), show_default=True)
@click.option("--methods", default="all", show_default=True,
              help=f"Comma list; 'all' = {DEFAULT_METHODS}. static = the bundle's static set, "
                   "static:<name> any candidate or extra set, static:* all of them.")
@click.option("--limit", type=int, default=None,
              help="Questions per task: a seeded random subset (kept in data order).")
@click.option("--tolerance", type=float, default=None, metavar="X",
              help="The pudding method's tolerance (fidelity routers; see generate "
                   "--tolerance) [default: the bundle's]. routed@X methods set their own.")
@click.option("--backend", type=click.Choice(["mlx", *plugins(EVAL_BACKENDS)]), default="mlx",
              show_default=True)
@click.option("--dequantize", is_flag=True,
              help="mlx backend, quantised bundle: score with the weights dequantised to float "
                   "once at load (the same model up to float rounding; much faster on CPUs, "
                   "whose quantised matmul is slow).")
@click.option("--torch-model", default=None,
              help="torch backend: HF id/folder/GGUF [default: the bundle's model/ folder].")
@click.option("--device", default="auto", show_default=True, help="torch backend device.")
@click.option("--dtype", default="auto", show_default=True, help="torch backend dtype.")
@click.option("--batch-size", type=int, default=16, show_default=True,
              help="torch backend rows per batch.")
@click.option("--extra-set", multiple=True, help="Another fixed set, NAME=3,7,9 (repeatable).")
@click.option("--sets-file", type=click.Path(exists=True, dir_okay=False),
              help="More fixed sets from a candidates JSON file (e.g. a SLEB run).")
@click.option("--baseline", default=None,
              help="Method the delta column compares to [default: the bundle's static set].")
@click.option("--best-slice", type=int, default=32, show_default=True,
              help="static:best: train examples per calibration task.")
@click.option("--data-dir", default=None, type=click.Path(file_okay=False))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resamples", type=int, default=2000, show_default=True,
              help="Bootstrap resamples for the confidence intervals.")
@no_verify_option("Skip the bundle's sha256 checks.")
@click.option("--cache", type=click.Path(file_okay=False), default=None,
              help="Folder of scores kept per skip set [default: OUTPUT/cache]; runs of bundles "
                   "with the same model can share one (each file records what made it).")
def evaluate(bundle, output, tasks, methods, limit, tolerance, backend, dequantize, torch_model,
             device, dtype, batch_size, extra_set, sets_file, baseline, best_slice, data_dir,
             seed, resamples, no_verify, cache):
    """Zero-shot accuracy of dense, static, routed, oracle and random skip sets, side by side."""
    extra = read_sets_file(sets_file) if sets_file else {}
    for value in extra_set:
        name, skip = parse_set(value)
        extra[name] = skip
    if limit is not None and limit < 1:
        raise PuddingError("--limit must be positive")
    settings = EvalSettings(
        bundle=bundle, output=output, tasks=tuple(t.strip() for t in tasks.split(",") if t),
        methods=methods, limit=limit, backend=backend, dequantize=dequantize,
        torch_model=torch_model, device=device, dtype=dtype, batch_size=batch_size,
        tolerance=tolerance, extra_sets=extra, baseline=baseline,
        best_slice=best_slice, data_dir=data_dir, seed=seed, resamples=resamples,
        verify=not no_verify, cache=cache, command="pudding " + shlex.join(sys.argv[1:]))
    results = run_eval(settings)
    from .report import markdown

    click.echo(markdown(results))
    click.echo(f"Wrote {Path(output) / 'results.md'}, results.json and skip_heatmap.png")

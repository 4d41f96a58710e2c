"""`pudding build`: search -> labels -> router training -> convert, in one resumable command.

Every step writes into the work folder and records in steps/<step>.json the inputs it ran
with (its settings plus a fingerprint of the previous step's output) and a fingerprint of what
it wrote. A rerun reuses a step whose inputs and output are unchanged; a step whose inputs
changed starts over, and the steps below it follow because their inputs hold its output's
fingerprint. An interrupted step continues where it stopped (each step is resumable itself).

Work folder:
    search/candidates.json    `pudding search` (--from-run: a finished search's first k phases)
    labels/                   `pudding label`
    router/                   `pudding train-router` (router/, metrics.json)
    steps/<step>.json         {"inputs", "state", "output", "seconds", "cpu_seconds"}
The bundle itself goes to --out (`pudding convert`).

The quality build (a profile with target "fidelity") runs `pudding search --losses fidelity`
into search/fidelity.json, then a "candidates" step writes search/candidates.json: the search's
first phases at each of `sizes` (nested sets), dense and the sets of `task_candidates`; labels
are KL to dense on the train prompts, the router predicts them, and convert writes the default
tolerance `router_metrics.default_tolerance` picks from the router's held-out metrics.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from pudding_mlx.errors import PuddingError
from pudding_mlx.files import read_json, write_json

from .build_status import build_status
from .identity import content_identity, hash_files, source_identity
from .profiles import PROFILES, STEPS, Profile, make_profile


@dataclass
class Step:
    name: str
    inputs: dict  # everything the output depends on; JSON-serialisable
    output: Path  # the file or folder the step writes
    run: Callable[[], None]
    fingerprint: Callable[[], str]  # of the written output
    keep_stale: bool = False  # the step replaces a stale output itself (atomically)


@dataclass
class StepResult:
    name: str
    reused: bool
    seconds: float
    fingerprint: str


def data_identity(data_dir: str | None, tasks: Iterable[str]) -> dict:
    """The task folders the data loader will read from (`--data-dir` or the default ones),
    by content."""
    from pudding_mlx.data import default_data_dirs

    dirs = [Path(data_dir)] if data_dir else default_data_dirs()
    return {t: [content_identity(d / t) for d in dirs if (d / t).is_dir()] for t in tasks}


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def run_step(work: Path, step: Step, echo: Callable[[str], None] = click.echo,
             shipped: Path | None = None) -> StepResult:
    """Reuse the step's output when its inputs and output are unchanged, else (re)run it;
    a `shipped` products folder (shipped.py) may supply the output first."""
    step.inputs = json.loads(json.dumps(step.inputs))  # tuples -> lists, as read back
    if shipped is not None:
        from .shipped import adopt

        adopt(work, shipped, step.name, step.inputs, step.output, echo)
    record_path = work / "steps" / f"{step.name}.json"
    record = (read_json(record_path, "delete it to rerun the step")
              if record_path.exists() else None)
    same_inputs = record is not None and record.get("inputs") == step.inputs
    if same_inputs and record.get("state") == "done" and step.output.exists():
        fingerprint = step.fingerprint()
        if fingerprint == record.get("output"):
            echo(f"[{step.name}] reused {step.output} (inputs unchanged)")
            return StepResult(step.name, True, 0.0, fingerprint)
    if not same_inputs and step.output.exists() and not step.keep_stale:
        # Made with other inputs (or by an unrecorded run): the step would refuse to resume it.
        echo(f"[{step.name}] inputs changed; removing {step.output}")
        remove(step.output)
    elif same_inputs and record.get("state") != "done":
        echo(f"[{step.name}] resuming an interrupted run")
    write_json(record_path, {"inputs": step.inputs, "state": "running"})
    echo(f"[{step.name}] running")
    start, cpu = time.perf_counter(), time.process_time()
    try:
        step.run()
    except BaseException as e:  # Ctrl-C or an error: `--status` must not say "running"
        state = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        write_json(record_path, {"inputs": step.inputs, "state": state})
        raise
    seconds = time.perf_counter() - start
    fingerprint = step.fingerprint()
    # of this run only: an interrupted step's earlier runs are in its own outputs' timings
    write_json(record_path, {"inputs": step.inputs, "state": "done", "output": fingerprint,
                               "seconds": round(seconds, 1),
                               "cpu_seconds": round(time.process_time() - cpu, 1)})
    echo(f"[{step.name}] done in {seconds:.1f} s")
    return StepResult(step.name, False, seconds, fingerprint)


def _invoke(command: click.Command, args: list) -> None:
    """Run another `pudding` subcommand in this process (its errors propagate)."""
    command.main([str(a) for a in args], prog_name=f"pudding {command.name}",
                 standalone_mode=False)


def candidates_fingerprint(path: Path) -> str:
    """The candidate sets only (names and blocks): timings in the file do not matter below."""
    from pudding_mlx.bundle import read_candidates

    sets = [(c.name, sorted(c.skip)) for c in read_candidates(path)[0]]
    return hashlib.sha256(json.dumps(sets).encode()).hexdigest()


def trajectory_fingerprint(path: Path) -> str:
    """A search run by the order its blocks were removed in (what its smaller k depend on)."""
    doc = json.loads(path.read_text())
    if not doc.get("complete"):
        raise PuddingError(f"{path}: the search did not finish")
    order = [[p["block"] for p in c["trajectory"]] for c in doc["candidates"]]
    return hashlib.sha256(json.dumps(order).encode()).hexdigest()


def prompts_identity(prompts: str) -> dict:
    """The chat prompts file (or the packaged set) by content."""
    from pudding_mlx.prompts import PACKAGED

    return {"files": content_identity(Path(prompts) if prompts else PACKAGED)}


def quality_candidates(search_run: Path, sizes: Iterable[int], task_candidates: str,
                       out: Path) -> None:
    """candidates.json of a quality build: the fidelity run's first phases at each size
    (nested), dense, then the task candidates' sets."""
    from pudding_mlx.bundle import read_candidates

    from .search import first_phases

    doc = json.loads(search_run.read_text())
    cands = [c for n in sizes for c in first_phases(doc, n)["candidates"]]
    cands.append({"name": "dense", "skip": []})
    if task_candidates:
        tasks_doc = json.loads(Path(task_candidates).read_text())
        if isinstance(tasks_doc, dict) and tasks_doc.get("complete") is False:
            raise PuddingError(f"{task_candidates}: its search has not finished")
        cands += [{"name": c.name, "skip": c.skip} for c in read_candidates(task_candidates)[0]]
    names = [c["name"] for c in cands]
    if len(set(names)) != len(names):
        raise PuddingError(f"{task_candidates}: its candidate names clash with {names}")
    write_json(out, {"settings": doc["settings"], "candidates": cands})


@dataclass
class Pipeline:
    """The build's steps as factories of `Step`; `previous(name)` is the fingerprint a finished
    step produced (the factories are called in order, after the step before has run)."""

    model: str
    out: Path
    work: Path
    p: Profile
    data_dir: str | None
    previous: Callable[[str], str]

    def __post_init__(self):
        p, work = self.p, self.work
        self.candidates_file = work / "search" / "candidates.json"
        self.labels_dir, self.router_out = work / "labels", work / "router"
        self.fidelity_run = work / "search" / "fidelity.json"
        self.data_args = ["--data-dir", self.data_dir] if self.data_dir else []
        self.prompt_args = ["--prompts", p.prompts] if p.prompts else []
        self.quality = p.target == "fidelity"
        self.common = {"model": source_identity(self.model), "device": p.device}
        if self.quality:
            self.common["prompts"] = prompts_identity(p.prompts)

    def steps(self) -> list[Callable[[], Step]]:
        if self.quality:
            return [self.fidelity_search, self.pick_candidates, self.fidelity_labels,
                    self.router, self.convert]
        return [self.search, self.labels, self.router, self.convert]

    def _search(self, inputs: dict, args: list, out: Path,
                fingerprint: Callable[[Path], str] = candidates_fingerprint) -> Step:
        from .search_cli import search

        return Step("search", inputs, out, lambda: _invoke(search, args),
                    lambda: fingerprint(out))

    def fidelity_search(self) -> Step:
        p, run = self.p, self.fidelity_run
        inputs = {**self.common, "losses": ["fidelity"], "k": p.k, "samples": p.samples,
                  "seed": p.search_seed, "max_tokens": p.max_tokens, "dtype": p.torch_dtype}
        args = ["--model", self.model, "--losses", "fidelity", "--k", p.k, "--samples",
                p.samples, "--seed", p.search_seed, "--max-tokens", p.max_tokens, "--device",
                p.device, "--dtype", p.torch_dtype, "--out", run, *self.prompt_args]
        return self._search(inputs, args, run, trajectory_fingerprint)

    def pick_candidates(self) -> Step:
        p, candidates, tasks_file = self.p, self.candidates_file, self.p.task_candidates
        inputs = {"search": self.previous("search"), "sizes": p.sizes, "task_candidates":
                  candidates_fingerprint(Path(tasks_file)) if tasks_file else None}
        return Step("candidates", inputs, candidates,
                    lambda: quality_candidates(self.fidelity_run, p.sizes, tasks_file,
                                               candidates),
                    lambda: candidates_fingerprint(candidates))

    def search(self) -> Step:
        p, candidates = self.p, self.candidates_file
        if p.from_run:  # `pudding search --from-run`: no compute, so no model or data inputs
            inputs = {"from_run": trajectory_fingerprint(Path(p.from_run)), "k": p.k}
            args = ["--k", p.k, "--from-run", p.from_run, "--out", candidates]
            return self._search(inputs, args, candidates)
        inputs = {**self.common, "data": data_identity(self.data_dir, p.tasks),
                  "tasks": p.tasks, "losses": p.losses, "k": p.k, "samples": p.samples,
                  "seed": p.search_seed, "dtype": p.torch_dtype}
        args = ["--model", self.model, "--tasks", ",".join(p.tasks), "--losses",
                ",".join(p.losses), "--k", p.k, "--samples", p.samples, "--seed",
                p.search_seed, "--device", p.device, "--dtype", p.torch_dtype, "--out",
                candidates, *self.data_args]
        return self._search(inputs, args, candidates)

    def _labels(self, inputs: dict, args: list) -> Step:
        from .labels import label

        labels_dir = self.labels_dir
        return Step("labels", inputs, labels_dir, lambda: _invoke(label, args),
                    lambda: hash_files(labels_dir.glob("*.parquet"), labels_dir))

    def labels(self) -> Step:
        p = self.p
        label_tasks = p.label_tasks or p.tasks
        inputs = {**self.common, "data": data_identity(self.data_dir, label_tasks),
                  "tasks": label_tasks, "candidates": self.previous("search"),
                  "max_examples_per_task": p.max_examples_per_task,
                  "label_limits": p.label_limits, "seed": p.label_seed, "dtype": p.torch_dtype}
        limit = ["--max-examples-per-task", p.max_examples_per_task] \
            if p.max_examples_per_task else []
        limit += [a for v in p.label_limits for a in ("--task-limit", v)]
        args = ["--candidates", self.candidates_file, "--out", self.labels_dir, "--model",
                self.model, "--tasks", ",".join(label_tasks), *limit, "--seed", p.label_seed,
                "--dtype", p.torch_dtype, "--device", p.device, *self.data_args]
        return self._labels(inputs, args)

    def fidelity_labels(self) -> Step:
        p = self.p
        inputs = {**self.common, "candidates": self.previous("candidates"),
                  "max_tokens": p.max_tokens, "limit": p.label_limit, "seed": p.label_seed,
                  "dtype": p.torch_dtype}
        limit = ["--limit", p.label_limit] if p.label_limit else []
        args = ["--candidates", self.candidates_file, "--out", self.labels_dir, "--target",
                "fidelity", "--model", self.model, "--split", "train", "--max-tokens",
                p.max_tokens, *limit, "--seed", p.label_seed, "--dtype", p.torch_dtype,
                "--device", p.device, *self.prompt_args]
        return self._labels(inputs, args)

    def router(self) -> Step:
        if self.p.router == "in-model":
            return self.in_model_router()
        from .assets import minilm_path
        from .train_router import train_router

        p, router_out = self.p, self.router_out
        backbone = p.backbone or str(minilm_path())
        inputs = {"labels": self.previous("labels"), "backbone": source_identity(backbone),
                  "max_length": p.router_max_length, "epochs": p.epochs,
                  "batch_size": p.batch_size, "lr": p.lr, "warmup_steps": p.warmup_steps,
                  "device": p.device}
        args = [self.labels_dir, "--out", router_out, "--backbone", backbone,
                "--max-length", p.router_max_length, "--epochs", p.epochs,
                "--batch-size", p.batch_size, "--lr", p.lr, "--warmup-steps", p.warmup_steps,
                "--device", p.device]
        if self.quality:
            inputs["target"] = "fidelity"
            args += ["--target", "fidelity"]
        else:  # the text it routes on (issue 11; the released code trained on rows), and
            # the search's dtype (bf16 autocast: 1.5-3.3x per step on CPUs with AMX)
            dtype = p.torch_dtype if p.torch_dtype in ("auto", "bfloat16") else "float32"
            inputs.update(inputs="context", dtype=dtype)
            args += ["--inputs", "context", "--dtype", dtype]
        return Step("router", inputs, router_out, lambda: _invoke(train_router, args),
                    self._router_fingerprint)

    def in_model_router(self) -> Step:
        """A head on the LLM's hidden state after its first blocks (convert/in_model.py)."""
        from .train_router import train_router

        inputs = {"labels": self.previous("labels"), "router": "in-model",
                  "model": self.common["model"], "blocks": self.p.router_blocks}
        args = [self.labels_dir, "--out", self.router_out, "--router", "in-model", "--model",
                self.model, "--blocks", self.p.router_blocks]
        if self.quality:
            inputs["target"] = "fidelity"
            args += ["--target", "fidelity"]
        return Step("router", inputs, self.router_out, lambda: _invoke(train_router, args),
                    self._router_fingerprint)

    def _router_fingerprint(self) -> str:
        weights = self.router_out / "router"
        return hash_files((f for f in weights.rglob("*") if f.is_file()), weights)

    def convert(self) -> Step:
        from .to_bundle import convert

        p, out, router_out = self.p, self.out, self.router_out
        inputs = {"model": self.common["model"],
                  "candidates": self.previous("candidates" if self.quality else "search"),
                  "router": self.previous("router"), "dtype": p.dtype, "coreml": p.coreml}
        args = ["--model", self.model, "--candidates", self.candidates_file, "--router",
                router_out / "router", "--out", out, "--dtype", p.dtype,
                "--coreml" if p.coreml else "--no-coreml"]
        if self.quality:
            from .router_metrics import default_tolerance

            metrics = read_json(router_out / "metrics.json")
            tolerance = default_tolerance(metrics, p.kl_target)
            inputs.update(kl_target=p.kl_target, tolerance=tolerance)
            args += ["--tolerance", tolerance]
        manifest = out / "pudding.json"
        return Step("convert", inputs, manifest, lambda: _invoke(convert, args),
                    lambda: hash_files([manifest], out), keep_stale=True)


def make_steps(model: str, out: Path, work: Path, p: Profile, data_dir: str | None,
               previous: Callable[[str], str]) -> list[Callable[[], Step]]:
    """The pipeline as step factories (see `Pipeline`)."""
    return Pipeline(model, out, work, p, data_dir, previous).steps()


def run_build(model: str | None, out: str | Path, work: str | Path, profile: Profile,
              data_dir: str | None = None, echo: Callable[[str], None] = click.echo,
              until: str = "convert", shipped: Path | None = None) -> list[StepResult]:
    """Run (or reuse) every step up to `until`; returns what each step did. Steps with a
    matching product in `shipped` (shipped.py) take it instead of computing."""
    from .assets import default_model

    model = str(model or default_model())
    out, work = Path(out).absolute(), Path(work).absolute()
    if work == out or work in out.parents or out in work.parents:
        raise PuddingError(f"--work {work} and --out {out} must not contain each other")
    work.mkdir(parents=True, exist_ok=True)
    done: dict[str, str] = {}
    results = []
    for factory in make_steps(model, out, work, profile, data_dir, done.__getitem__):
        step = factory()
        result = run_step(work, step, echo, shipped)
        done[step.name] = result.fingerprint
        results.append(result)
        if step.name == until:
            break
    return results


def _tasks(ctx, param, value):
    if value is None:
        return None
    return [t.strip() for t in value.split(",") if t.strip()] or None


def _ints(ctx, param, value):
    try:
        return None if value is None else [int(v) for v in _tasks(ctx, param, value) or []]
    except ValueError:
        raise click.BadParameter("comma-separated integers, e.g. 2,4,6,8") from None


@click.command("build")
@click.option("--model", default=None,
              help="HF hub id, HF folder or GGUF file [default: SmolLM2-135M-Instruct GGUF].")
@click.option("--out", "-o", type=click.Path(file_okay=False),
              help="Bundle folder to write (required unless --status).")
@click.option("--work", required=True, type=click.Path(file_okay=False),
              help="Folder for the steps' outputs (kept, reused by reruns).")
@click.option("--profile", "profile_name", type=click.Choice(list(PROFILES)), default="quick",
              show_default=True, help="quick: a small demo build; paper: the paper's settings; "
              "quality: a fidelity router over nested chat sets and dense, with a default "
              "tolerance.")
@click.option("--tasks", callback=_tasks, help="Comma-separated calibration/label tasks.")
@click.option("--losses", callback=_tasks, help="Search losses: likelihood,margin.")
@click.option("-k", "--k", "k", type=int, help="Blocks skipped per candidate set.")
@click.option("--samples", type=int, help="Calibration examples per task (search).")
@click.option("--from-run", type=click.Path(exists=True, dir_okay=False),
              help="Instead of searching, take the first -k phases of this finished search "
                   "(e.g. a k = 6 build's search/candidates.json).")
@click.option("--max-examples-per-task", type=int,
              help="Router-label questions per task (0: all).")
@click.option("--label-tasks", callback=_tasks, help="Comma-separated tasks to label [profile].")
@click.option("--label-limits", callback=_tasks,
              help="Comma-separated TASK=N label caps over --max-examples-per-task [profile].")
@click.option("--epochs", type=int, help="Router training epochs.")
@click.option("--batch-size", type=int, help="Router training batch size.")
@click.option("--lr", type=float, help="Router learning rate.")
@click.option("--warmup-steps", type=int, help="Router learning-rate warm-up steps.")
@click.option("--router", type=click.Choice(["encoder", "in-model"]),
              help="encoder: a text encoder (--backbone), the paper's; in-model: a linear head "
                   "on the LLM's hidden state after its first --router-blocks blocks "
                   "[profile].")
@click.option("--router-blocks", type=int,
              help="in-model: the first blocks whose output the head reads [1].")
@click.option("--backbone", help="Router encoder: HF id or folder [default: MiniLM-L6].")
@click.option("--router-max-length", type=int, help="Router input tokens.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]),
              help="MLX weights in the bundle [profile default: float32 on Linux, else float16].")
@click.option("--torch-dtype", help="Search/label dtype: auto, float32, bfloat16, float16.")
@click.option("--device", help="Torch device for search, labels, training: auto, cpu, cuda, mps.")
@click.option("--coreml/--no-coreml", default=None, help="Export router.mlpackage.")
@click.option("--data-dir", type=click.Path(file_okay=False),
              help="Folder laid out like <task>/<split>.arrow [default: the packaged data].")
@click.option("--sizes", callback=_ints,
              help="quality: comma-separated candidate sizes cut from the k search "
              "[1,2,3,4,6,8].")
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False),
              help="quality: chat prompts JSONL (train rows are used) [default: packaged].")
@click.option("--max-tokens", type=int, help="quality: dense continuation length [64].")
@click.option("--label-limit", type=int, help="quality: train prompts labelled (0: all).")
@click.option("--kl-target", type=float,
              help="quality: the default tolerance is the largest whose held-out routed mean "
                   "KL to dense is at most this (nats/token) [0.25].")
@click.option("--task-candidates", type=click.Path(exists=True, dir_okay=False),
              help="quality: a candidates file (e.g. a paper build's) whose sets join the "
                   "bundle.")
@click.option("--threads", type=int,
              help="Torch CPU threads [default: torch's]; 1 is fastest on a busy machine.")
@click.option("--until", type=click.Choice(STEPS),
              default="convert", show_default=True,
              help="Stop after this step: e.g. the torch steps on a GPU machine without MLX, "
                   "then the same command with the same --work on the Mac reuses them.")
@click.option("--status", is_flag=True,
              help="Print where the --work folder stands (steps, search phases, label shards, "
                   "router epochs, with times) and exit.")
def build(model, out, work, profile_name, data_dir, max_examples_per_task, threads, until,
          status, **overrides):
    """Search, label, train the router and convert: a bundle from a checkpoint in one command.

    Each step's output stays in --work; a rerun reuses the steps whose inputs did not change
    and continues an interrupted one."""
    if status:
        if not Path(work).is_dir():
            raise PuddingError(f"--work {work}: no such folder")
        click.echo(build_status(work), nl=False)
        return
    if out is None:
        raise click.UsageError("Missing option '--out' / '-o'.")
    if threads:
        import torch

        torch.set_num_threads(threads)
    profile = make_profile(profile_name, max_examples_per_task=max_examples_per_task,
                           **overrides)
    click.echo(f"profile {profile_name}: " + ", ".join(
        f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
        for k, v in asdict(profile).items()))
    start = time.perf_counter()
    results = run_build(model, out, work, profile, data_dir, until=until)
    click.echo("step        time")
    for r in results:
        click.echo(f"{r.name:<11} {'reused' if r.reused else f'{r.seconds:.1f} s'}")
    what = f"bundle {out}" if until == "convert" else f"steps up to {until} in {work}"
    click.echo(f"{what} ({time.perf_counter() - start:.1f} s in all)")

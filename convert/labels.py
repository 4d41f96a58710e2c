"""`pudding label`: router labels for every candidate, of one of two targets.

likelihood (the paper): one row per (question, answer choice) of each task's training split;
for each candidate omission set S, the row of choice a gets l_S(x, a): the mean answer-token
log-probability of a with S's blocks skipped (in the order of candidates.json). The router's
targets are derived from these rows at training time (`router_metrics`).
fidelity (`--target fidelity`): one row per chat prompt (the packaged set's train split, or a
user file); for each candidate, the mean KL(dense || S) in nats per token over dense's own
greedy continuation of the prompt, and the top-1 agreement with dense (`convert/fidelity.py`;
the definition of `pudding fidelity`). No gold answers are needed.
Storage: `label_store` (parquet shards + meta.json, which records the target).

Shared prefixes: candidates that skip the same blocks up to some block share the hidden state
entering it, so each batch walks the candidates as a trie over blocks (`_walk`) and every
distinct prefix runs once (fidelity labels walk dense with them: the reference shares every
prefix). The counts of block evaluations, with and without sharing, go into meta.json.

Resuming: a shard is written whole or not at all; a rerun labels only the missing shards.
Candidates may be appended (the old list a prefix of the new): each shard gets the new columns.

Data-parallel: under `torchrun`/`accelerate launch` each rank labels the shards whose index is
its rank modulo the world size; shards depend only on their questions, so the folder ends
identical to a single process's.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click
import numpy as np

from pudding_mlx.bundle import read_candidates
from pudding_mlx.errors import PuddingError
from pudding_mlx.files import remove_stale_temps, write_json
from pudding_mlx.prompts import ChatPrompt
from pudding_mlx.tasks import CALIBRATION_TASKS, Example

from .dist import Dist, joined
from .label_store import META, VALUES, read_meta, shard_path, write_shard
from .resume import changed_settings

FORMAT = 2  # 2: the context column holds Example.router_text (WinoGrande: the whole sentence)
FIDELITY_FORMAT = 1  # bump when the fidelity labels' definition changes


@dataclass
class LabelConfig:
    model: str
    candidates: list[dict]  # {"name", "skip"} in candidates.json order
    tasks: list[str] = field(default_factory=lambda: list(CALIBRATION_TASKS))
    max_examples_per_task: int | None = None
    task_limits: dict[str, int] = field(default_factory=dict)  # per-task caps over the above
    seed: int = 42
    dtype: str = "auto"  # resolved to a torch dtype name before it is recorded
    batch_size: int = 16
    shard_size: int = 64  # questions per shard
    data_dir: str | None = None
    split: str = "train"


@dataclass
class FidelityLabelConfig:
    model: str
    candidates: list[dict]  # {"name", "skip"} in candidates.json order
    prompts: str | None = None  # a prompts file (prompts.read_prompts); None: packaged
    split: str = "train"  # of the prompts: train, heldout or all
    limit: int | None = None  # a seeded subset of the split (prompts.select)
    seed: int = 42
    max_tokens: int = 64  # N, dense's continuation length
    system_prompt: str | None = None
    # float32, not "auto": dense's greedy continuation depends on the dtype (bf16 changed it on
    # 4 of 8 SmolLM2 prompts against the float32 MLX bundle)
    dtype: str = "float32"
    batch_size: int = 8  # prompts per teacher-forced forward
    shard_size: int = 32  # prompts per shard


def candidate_table(path: str | Path) -> list[dict]:
    """[{"name", "skip"}] of a candidates file, in file order (what the label meta records)."""
    return [{"name": c.name, "skip": c.skip} for c in read_candidates(path)[0]]


def parse_task_limits(values) -> dict[str, int]:
    """("piqa=2000", ...) -> {"piqa": 2000}."""
    out = {}
    for v in values:
        task, _, n = v.partition("=")
        if not n.isdigit() or not task:
            raise PuddingError(f"--task-limit {v!r}: expected TASK=N")
        out[task.strip()] = int(n)
    return out


def label_examples(cfg: LabelConfig) -> list[Example]:
    """The questions to label: a seeded sample of each task's split, task after task."""
    from pudding_mlx.data import load_examples, sample_examples

    return [ex for task in cfg.tasks
            for ex in sample_examples(load_examples(task, cfg.split, cfg.data_dir),
                                      cfg.task_limits.get(task, cfg.max_examples_per_task),
                                      cfg.seed)]


def label_prompts(cfg: FidelityLabelConfig) -> list[ChatPrompt]:
    """The chat prompts to label: a seeded subset of a split, in file order."""
    from pudding_mlx.prompts import read_prompts, select

    return select(read_prompts(cfg.prompts), cfg.split, cfg.limit, cfg.seed)


# -- the candidate trie --


def score_candidates(runner, batches, n_requests: int, skips: list[list[int]],
                     share_prefix: bool = True) -> np.ndarray:
    """(requests, candidates) mean answer-token log-probs, each candidate skipping its blocks."""
    import torch

    from .scoring import walk_candidates

    out = np.zeros((n_requests, len(skips)))
    with torch.inference_mode():
        for batch in batches:
            sums = walk_candidates(runner, batch, skips, lambda h, _, b=batch: runner.head(h, b),
                                   share_prefix)
            for c in range(len(skips)):
                out[batch.requests, c] = sums[c] / batch.counts
    return out


def fidelity_candidates(runner, batches, n_requests: int, skips: list[list[int]],
                        share_prefix: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(requests, candidates) mean KL(dense || candidate) and top-1 agreement per answer token
    (each request: a prompt and dense's continuation of it)."""
    import torch

    from .scoring import kl_to_reference, walk_candidates

    kl = np.zeros((n_requests, len(skips)))
    agree = np.zeros((n_requests, len(skips)))
    with torch.inference_mode():
        for batch in batches:
            ref = {}

            def leaf(h, members, batch=batch, ref=ref):
                lp = runner.logprobs(h, batch)
                if 0 in members:  # dense, the first leaf of the walk
                    ref["lp"] = lp
                per_token = kl_to_reference(ref["lp"], lp)
                return [runner.per_request(v, batch) / batch.counts for v in per_token]

            values = walk_candidates(runner, batch, [[], *skips], leaf, share_prefix)
            for c in range(len(skips)):
                kl[batch.requests, c], agree[batch.requests, c] = values[c + 1]
    return kl, agree


def _check_meta(out: Path, settings: dict) -> bool:
    """True when out/meta.json has the same settings and nothing more to do. Candidates may be
    appended to a finished folder (its candidates a prefix of the new list); anything else that
    differs is an error."""
    if not (out / META).is_file():
        return False
    meta = read_meta(out)
    old = meta.get("settings") or {}
    diff = changed_settings(old, settings, ignore=["candidates"])
    n = len(old.get("candidates", []))
    if diff or old.get("candidates") != settings["candidates"][:n]:
        raise PuddingError(f"{out / META}: labels made with other settings "
                           f"({', '.join(diff or ['candidates'])}); pass --overwrite or another"
                           " --out (new candidates may only be appended)")
    return old == settings and bool(meta.get("complete"))


def _read_values(path: Path, column: str) -> np.ndarray:
    """A per-candidate list column of a written shard as (rows, candidates) float32."""
    import pyarrow.parquet as pq

    col = pq.read_table(path, columns=[column])[column].combine_chunks()
    return np.asarray(col.flatten(), dtype=np.float32).reshape(len(col), -1)


def _shard_width(path: Path, column: str) -> int:
    """Candidates already labelled in a shard (0 if it does not exist)."""
    import pyarrow.parquet as pq

    if not path.is_file():
        return 0
    first = pq.read_table(path, columns=[column])[column][0].as_py()
    return len(first)


def make_labels(out: str | Path, cfg: LabelConfig | FidelityLabelConfig, device: str = "auto",
                overwrite: bool = False, share_prefix: bool = True) -> dict:
    """Write the label folder (resuming a partial one); returns its meta. The config's type
    chooses the target: LabelConfig likelihood, FidelityLabelConfig fidelity."""
    with joined(device) as dev:  # torchrun's / accelerate's process group, if any
        return _make_labels(Path(out), cfg, dev, overwrite, share_prefix)


def _items(cfg: LabelConfig | FidelityLabelConfig) -> tuple[str, dict, list, dict]:
    """(target, settings, items to label, meta counts) of a config."""
    if isinstance(cfg, FidelityLabelConfig):
        from pudding_mlx.evaluation.scoring import digest

        prompts = label_prompts(cfg)
        settings = {"format": FIDELITY_FORMAT, "target": "fidelity", **asdict(cfg),
                    "prompts_digest": digest([p.key for p in prompts])}
        return "fidelity", settings, prompts, {"num_prompts": len(prompts),
                                               "rows": len(prompts)}
    settings = {"format": FORMAT, **asdict(cfg)}
    examples = label_examples(cfg)
    return "likelihood", settings, examples, {"num_questions": len(examples),
                                              "rows": sum(len(e.prompt) for e in examples)}


def _likelihood_shard(runner, tokenizer, cfg: LabelConfig, exs: list[Example],
                      skips: list[list[int]], old: Path | None, share_prefix: bool
                      ) -> tuple[dict, int]:
    """The shard's rows, labelled for `skips` (after the columns of `old`, when candidates
    are appended); and the block evaluations this would need without prefix sharing."""
    from pudding_mlx.tasks import encode_requests

    requests = [r for ex in exs for r in ex.prompt]
    batches = runner.prepare(encode_requests(tokenizer, requests), cfg.batch_size)
    ll = score_candidates(runner, batches, len(requests), skips, share_prefix)
    if old is not None:
        ll = np.concatenate([_read_values(old, "loglik"), ll], axis=1)
    naive = sum(b.rows for b in batches) * sum(runner.num_blocks - len(s) for s in skips)
    return {
        "task": [ex.task for ex in exs for _ in ex.prompt],
        "qid": [ex.qid for ex in exs for _ in ex.prompt],
        "choice": [c for ex in exs for c in range(len(ex.prompt))],
        "gold": [ex.gold for ex in exs for _ in ex.prompt],
        "text": [t for ex in exs for t in ex.texts],
        "context": [ex.router_text for ex in exs for _ in ex.prompt],
        "loglik": ll.astype(np.float32).tolist(),
    }, naive


def _fidelity_shard(runner, tokenizer, cfg: FidelityLabelConfig, prompts: list[ChatPrompt],
                    skips: list[list[int]], old: Path | None, share_prefix: bool
                    ) -> tuple[dict, int]:
    """As `_likelihood_shard`; dense's continuations are generated once (an appending run
    reads them from the shard)."""
    import pyarrow.parquet as pq

    from pudding_mlx.prompts import encode_chat

    from .fidelity import chat_requests

    if old is None:
        requests = chat_requests(runner.model, tokenizer, prompts, cfg.max_tokens,
                                 cfg.system_prompt)
    else:
        conts = pq.read_table(old, columns=["continuation"])["continuation"].to_pylist()
        requests = [(encode_chat(tokenizer, p.text, True, cfg.system_prompt), c)
                    for p, c in zip(prompts, conts, strict=True)]
    batches = runner.prepare(requests, cfg.batch_size)
    kl, agree = fidelity_candidates(runner, batches, len(requests), skips, share_prefix)
    if old is not None:
        kl = np.concatenate([_read_values(old, "kl"), kl], axis=1)
        agree = np.concatenate([_read_values(old, "agreement"), agree], axis=1)
    # without sharing: dense, then each candidate, from the embeddings
    naive = sum(b.rows for b in batches) * sum(runner.num_blocks - len(s) for s in [[], *skips])
    return {
        "id": [p.id for p in prompts], "source": [p.source for p in prompts],
        "split": [p.split for p in prompts], "text": [p.text for p in prompts],
        "continuation": [c for _, c in requests],
        "kl": kl.astype(np.float32).tolist(), "agreement": agree.astype(np.float32).tolist(),
    }, naive


def _cost_bucket(item: Example | ChatPrompt) -> tuple[str, int]:
    """Where an item's labelling time is counted, and its weight: text length."""
    if isinstance(item, Example):
        return item.task, 1 + sum(len(c) + len(a) for c, a in item.prompt)
    return "chat", 1 + len(item.text)


def _start(out: Path, cfg: LabelConfig | FidelityLabelConfig, target: str, settings: dict,
           items: list, counts: dict, runs: list, ranks: Dist) -> tuple[list[list], dict]:
    """The items cut into shards, and the label folder's meta.json (not complete) written."""
    if not items:
        raise PuddingError(f"no {'prompts' if target == 'fidelity' else 'examples'} to label"
                           + ("" if target == "fidelity" else f" for tasks {cfg.tasks}"))
    shards = [items[i : i + cfg.shard_size] for i in range(0, len(items), cfg.shard_size)]
    meta = {"target": target, "settings": settings, "candidates": cfg.candidates,
            "num_shards": len(shards), **counts, "complete": False, "runs": runs}
    ranks.barrier()  # every rank has read the old meta before rank 0 replaces it
    if ranks.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out)
        write_json(out / META, meta)
    ranks.barrier()
    return shards, meta


class _TaskCost:
    """Labelling time per task (a fidelity run: one "chat" entry), a shard's time shared out by
    its items' text length: what a cost table per 1,000 questions reads."""

    def __init__(self, items: list):
        self.kinds = sorted({_cost_bucket(item)[0] for item in items})
        self.spent = dict.fromkeys(self.kinds, 0.0)
        self.counted = dict.fromkeys(self.kinds, 0)

    def add(self, shard: list, seconds: float) -> None:
        buckets = [_cost_bucket(x) for x in shard]
        total = sum(size for _, size in buckets)
        for task, size in buckets:
            self.spent[task] += seconds * size / total
            self.counted[task] += 1

    def per_task(self) -> dict[str, tuple[float, int]]:
        return {t: (self.spent[t], self.counted[t]) for t in self.kinds}


def _make_labels(out: Path, cfg: LabelConfig | FidelityLabelConfig, dev, overwrite: bool,
                 share_prefix: bool) -> dict:
    import torch
    from tqdm.auto import tqdm

    from .assets import load_causal_lm
    from .device import choose_dtype
    from .scoring import BlockRunner

    dtype = choose_dtype(dev, cfg.dtype)
    cfg.dtype = str(dtype).removeprefix("torch.")
    ranks = Dist()
    if overwrite and ranks.rank == 0 and out.exists():
        shutil.rmtree(out)
    ranks.barrier()
    t0, cpu0 = time.perf_counter(), time.process_time()
    target, settings, items, counts = _items(cfg)
    if _check_meta(out, settings):  # every rank raises the same error on a mismatch
        return read_meta(out)
    runs = read_meta(out).get("runs", []) if (out / META).is_file() else []

    shards, meta = _start(out, cfg, target, settings, items, counts, runs, ranks)
    model, tokenizer = load_causal_lm(cfg.model, dtype=dtype, device=dev)
    runner = BlockRunner(model)
    skips = [c["skip"] for c in cfg.candidates]
    bad = [c["name"] for c in cfg.candidates if any(not 0 <= b < runner.num_blocks
                                                      for b in c["skip"])]
    if bad:
        raise PuddingError(f"candidates {bad} skip blocks outside 0..{runner.num_blocks - 1}")
    label_shard = _fidelity_shard if target == "fidelity" else _likelihood_shard
    mine = [i for i in range(len(shards)) if i % ranks.world == ranks.rank]
    width = {i: _shard_width(shard_path(out, i), VALUES[target]) for i in mine}
    todo = [i for i in mine if width[i] < len(skips)]
    unit = "prompt" if target == "fidelity" else "q"
    bar = tqdm(total=sum(len(shards[i]) for i in mine), desc=f"labels (rank {ranks.rank})"
               if ranks.world > 1 else "labels", unit=unit,
               initial=sum(len(shards[i]) for i in mine if i not in todo))

    cost = _TaskCost(items)

    def run_stats(shards_run: int, evals: int, naive: int, cpu: float,
                  per_task: dict[str, tuple[float, int]]) -> dict:
        # of this run; a resumed or appending run counts only the work it did
        return {"seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(cpu, 1),
                "shards_run": shards_run, "candidates": len(skips), "processes": ranks.world,
                "dtype": cfg.dtype, "device": str(dev.type), "block_evals": evals,
                "naive_block_evals": naive, "share_prefix": share_prefix,
                "torch_threads": torch.get_num_threads(),
                "per_task": {t: {"items": n, "seconds": round(sec, 1)}
                             for t, (sec, n) in per_task.items() if n}}

    naive = 0  # block evaluations without prefix sharing: each candidate from the embeddings
    for done, i in enumerate(todo, 1):
        start = time.perf_counter()
        # candidates appended to a finished shard: keep its columns
        old = shard_path(out, i) if width[i] else None
        rows, n = label_shard(runner, tokenizer, cfg, shards[i], skips[width[i]:], old,
                              share_prefix)
        naive += n
        write_shard(out, i, rows, target)
        cost.add(shards[i], time.perf_counter() - start)
        if ranks.world == 1:  # an interrupted run keeps its cost (several ranks: at the end)
            partial = run_stats(done, runner.evals, naive, time.process_time() - cpu0,
                                cost.per_task())
            write_json(out / META, {**meta, "runs": [*runs, {**partial, "partial": True}]})
        bar.update(len(shards[i]))
        bar.set_postfix(block_evals=runner.evals)
    bar.close()
    kinds = cost.kinds
    evals, naive, shards_run, cpu, *sums = ranks.sum(
        [runner.evals, naive, len(todo), time.process_time() - cpu0,
         *(cost.spent[t] for t in kinds), *(cost.counted[t] for t in kinds)])
    per_task = dict(zip(kinds, zip(sums[:len(kinds)], sums[len(kinds):], strict=True),
                        strict=True))
    stats = run_stats(shards_run, evals, naive, cpu, per_task)
    return _finish(out, len(shards), {**meta, "stats": stats, "runs": [*runs, stats]}, ranks)


def _finish(out: Path, num_shards: int, meta: dict, ranks: Dist) -> dict:
    """meta.json marked complete once every rank's shards are written."""
    ranks.barrier()
    missing = [i for i in range(num_shards) if not shard_path(out, i).is_file()]
    if missing:
        raise PuddingError(f"{out}: shards {missing[:5]} were not written")
    meta["complete"] = True
    if ranks.rank == 0:
        write_json(out / META, meta)
    ranks.barrier()
    return meta


LIKELIHOOD_ONLY = ("tasks", "max_examples_per_task", "task_limits", "data_dir")
FIDELITY_ONLY = ("prompts", "limit", "max_tokens", "system_prompt")


@click.command("label")
@click.option("--candidates", "candidates_path", required=True, type=click.Path(dir_okay=False),
              help="candidates.json from `pudding search`.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Label folder: meta.json and parquet shards.")
@click.option("--target", type=click.Choice(["likelihood", "fidelity"]), default="likelihood",
              show_default=True, help="likelihood: answer log-likelihoods of task questions "
              "(the paper); fidelity: KL to dense on chat prompts (no gold answers needed).")
@click.option("--model", default=None, help="HF id, HF folder or GGUF file [default: the "
              "model in candidates.json's settings, else the packaged SmolLM2-135M].")
@click.option("--tasks", default=",".join(CALIBRATION_TASKS), show_default=True,
              help="Comma-separated task names (likelihood).")
@click.option("--max-examples-per-task", type=int, default=None,
              help="A seeded sample of this many questions per task [default: all] "
                   "(likelihood).")
@click.option("--task-limit", "task_limits", multiple=True, callback=lambda c, p, v:
              parse_task_limits(v), metavar="TASK=N",
              help="Questions for one task, over --max-examples-per-task (repeatable; "
                   "likelihood).")
@click.option("--data-dir", default=None, type=click.Path(file_okay=False),
              help="A folder laid out like shared/data (<task>/<split>.arrow) (likelihood).")
@click.option("--prompts", default=None, type=click.Path(dir_okay=False),
              help="Chat prompts: JSONL or one per line [default: the packaged set] "
                   "(fidelity).")
@click.option("--limit", type=int, default=None,
              help="A seeded subset of this many prompts of the split [default: all] "
                   "(fidelity).")
@click.option("--max-tokens", type=int, default=64, show_default=True,
              help="Dense continuation length N (fidelity).")
@click.option("--system-prompt", default=None, help="System message in the chat template "
              "(fidelity).")
@click.option("--split", default="train", show_default=True,
              help="Split to label: a task split (HellaSwag 'train' is the fixed validation "
                   "holdout), or for fidelity the prompts' train, heldout or all.")
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--dtype", default=None,
              help="auto (bf16 on CPUs with fast bf16 and on GPUs), float32, bfloat16, float16 "
                   "[default: auto for likelihood, float32 for fidelity].")
@click.option("--batch-size", type=int, default=None,
              help="Packed rows (one question, all choices; or one prompt) per forward "
                   "[default: 16 likelihood, 8 fidelity].")
@click.option("--shard-size", type=int, default=None,
              help="Questions or prompts per shard (an interruption loses at most one shard) "
                   "[default: 64 likelihood, 32 fidelity].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, mps.")
@click.option("--threads", type=int, default=None,
              help="CPU threads per process [default: torch's]; 1 is fastest on a busy machine.")
@click.option("--no-share-prefix", is_flag=True,
              help="Run every candidate from the embeddings (for timing the prefix sharing).")
@click.option("--overwrite", is_flag=True, help="Discard labels already in --out.")
def label(candidates_path, out, target, model, split, seed, dtype, batch_size, shard_size,
          device, threads, no_share_prefix, overwrite, **options):
    """Label training questions (or chat prompts) with every candidate's answer
    log-likelihoods (or KL to dense): the router's training data.

    Runs data-parallel under torchrun / accelerate launch (one set of shards per process)."""
    from pudding_mlx.files import check_writable_file

    from .assets import default_model

    ctx = click.get_current_context()
    wrong = LIKELIHOOD_ONLY if target == "fidelity" else FIDELITY_ONLY
    flags = {p.name: p.opts[0] for p in ctx.command.params}
    if given := [flags[n] for n in wrong
                 if ctx.get_parameter_source(n) != click.core.ParameterSource.DEFAULT]:
        raise PuddingError(f"{', '.join(given)}: not an option of --target {target}")
    check_writable_file(Path(out) / META)  # before the model loads
    if threads:
        import torch

        torch.set_num_threads(threads)
    if model is None:
        model = json.loads(Path(candidates_path).read_text()).get("settings", {}).get(
            "model") if Path(candidates_path).is_file() else None
        model = model or default_model()
    common = {"model": str(model), "candidates": candidate_table(candidates_path),
              "split": split, "seed": seed}
    if dtype is not None:
        common["dtype"] = dtype
    if batch_size is not None:
        common["batch_size"] = batch_size
    if shard_size is not None:
        common["shard_size"] = shard_size
    if target == "fidelity":
        cfg = FidelityLabelConfig(**common, **{k: options[k] for k in FIDELITY_ONLY})
    else:
        cfg = LabelConfig(**common, tasks=[t.strip() for t in options["tasks"].split(",")
                                           if t.strip()],
                          **{k: options[k] for k in LIKELIHOOD_ONLY if k != "tasks"})
    meta = make_labels(out, cfg, device=device, overwrite=overwrite,
                       share_prefix=not no_share_prefix)
    s = meta.get("stats", {})
    if int(os.environ.get("RANK", "0")) == 0:
        what = (f"{meta['num_prompts']} prompts" if target == "fidelity"
                else f"{meta['num_questions']} questions, {meta['rows']} rows")
        click.echo(f"{out}: {what}, {len(cfg.candidates)} candidates, "
                   f"{meta['num_shards']} shards")
        if s:
            click.echo(f"{s['seconds']:.0f} s on {s['processes']} process(es), {s['dtype']}; "
                       f"block evaluations {s['block_evals']} (without prefix sharing "
                       f"{s['naive_block_evals']})")

"""`pudding label`: router labels, one row per (question, answer choice), for every candidate.

For each training question of each task and each candidate omission set S, the row of choice a
gets l_S(x, a): the mean answer-token log-probability of a with S's blocks skipped (in the
order of candidates.json). The router's targets are derived from these rows at training time
(`router_metrics`). Storage: `label_store` (parquet shards + meta.json).

Shared prefixes: candidates that skip the same blocks up to some block share the hidden state
entering it, so each batch walks the candidates as a trie over blocks (`_walk`) and every
distinct prefix runs once. The counts of block evaluations, with and without sharing, go into
meta.json.

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
from pudding_mlx.tasks import CALIBRATION_TASKS, Example

from .dist import Dist, joined
from .label_store import META, read_meta, shard_path, write_shard
from .resume import changed_settings

FORMAT = 2  # 2: the context column holds Example.router_text (WinoGrande: the whole sentence)


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


# -- the candidate trie --


def _walk(runner, batch, h, start: int, group: list[tuple[int, frozenset]], out: dict) -> None:
    """Run blocks from `start` for candidates that agree on every block before it (sharing
    hidden state h); split the group at the first block they disagree on."""
    b = start
    while b < runner.num_blocks and len({b in s for _, s in group}) == 1:
        b += 1
    h = runner.run(h, batch, [i for i in range(start, b) if i not in group[0][1]])
    if b == runner.num_blocks:
        sums = runner.head(h, batch)
        for c, _ in group:
            out[c] = sums
        return
    _walk(runner, batch, h, b + 1, [g for g in group if b in g[1]], out)
    _walk(runner, batch, runner.run(h, batch, [b]), b + 1, [g for g in group if b not in g[1]],
          out)


def score_candidates(runner, batches, n_requests: int, skips: list[list[int]],
                     share_prefix: bool = True) -> np.ndarray:
    """(requests, candidates) mean answer-token log-probs, each candidate skipping its blocks."""
    import torch

    out = np.zeros((n_requests, len(skips)))
    sets = [(c, frozenset(s)) for c, s in enumerate(skips)]
    with torch.inference_mode():
        for batch in batches:
            sums: dict[int, np.ndarray] = {}
            h = runner.embed(batch)
            for group in [sets] if share_prefix else [[s] for s in sets]:
                _walk(runner, batch, h, 0, group, sums)
            for c in range(len(skips)):
                out[batch.requests, c] = sums[c] / batch.counts
    return out


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


def _read_loglik(path: Path) -> np.ndarray:
    import pyarrow.parquet as pq

    col = pq.read_table(path, columns=["loglik"])["loglik"].combine_chunks()
    return np.asarray(col.flatten(), dtype=np.float32).reshape(len(col), -1)


def _shard_width(path: Path) -> int:
    """Candidates already labelled in a shard (0 if it does not exist)."""
    import pyarrow.parquet as pq

    if not path.is_file():
        return 0
    first = pq.read_table(path, columns=["loglik"])["loglik"][0].as_py()
    return len(first)


def make_labels(out: str | Path, cfg: LabelConfig, device: str = "auto",
                overwrite: bool = False, share_prefix: bool = True) -> dict:
    """Write the label folder (resuming a partial one); returns its meta."""
    with joined(device) as dev:  # torchrun's / accelerate's process group, if any
        return _make_labels(Path(out), cfg, dev, overwrite, share_prefix)


def _make_labels(out: Path, cfg: LabelConfig, dev, overwrite: bool, share_prefix: bool) -> dict:
    import torch
    from tqdm.auto import tqdm

    from pudding_mlx.tasks import encode_requests

    from .assets import load_causal_lm
    from .device import choose_dtype
    from .scoring import BlockRunner

    dtype = choose_dtype(dev, cfg.dtype)
    cfg.dtype = str(dtype).removeprefix("torch.")
    settings = {"format": FORMAT, **asdict(cfg)}
    ranks = Dist()
    if overwrite and ranks.rank == 0 and out.exists():
        shutil.rmtree(out)
    ranks.barrier()
    if _check_meta(out, settings):  # every rank raises the same error on a mismatch
        return read_meta(out)
    runs = read_meta(out).get("runs", []) if (out / META).is_file() else []

    t0 = time.perf_counter()
    examples = label_examples(cfg)
    if not examples:
        raise PuddingError(f"no examples to label for tasks {cfg.tasks}")
    shards = [examples[i : i + cfg.shard_size] for i in range(0, len(examples), cfg.shard_size)]
    meta = {"settings": settings, "candidates": cfg.candidates, "num_shards": len(shards),
            "num_questions": len(examples), "rows": sum(len(e.prompt) for e in examples),
            "complete": False, "runs": runs}
    ranks.barrier()  # every rank has read the old meta before rank 0 replaces it
    if ranks.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out)
        write_json(out / META, meta)
    ranks.barrier()

    model, tokenizer = load_causal_lm(cfg.model, dtype=dtype, device=dev)
    runner = BlockRunner(model)
    skips = [c["skip"] for c in cfg.candidates]
    bad = [c["name"] for c in cfg.candidates if any(not 0 <= b < runner.num_blocks
                                                      for b in c["skip"])]
    if bad:
        raise PuddingError(f"candidates {bad} skip blocks outside 0..{runner.num_blocks - 1}")
    mine = [i for i in range(len(shards)) if i % ranks.world == ranks.rank]
    width = {i: _shard_width(shard_path(out, i)) for i in mine}
    todo = [i for i in mine if width[i] < len(skips)]
    bar = tqdm(total=sum(len(shards[i]) for i in mine), desc=f"labels (rank {ranks.rank})"
               if ranks.world > 1 else "labels", unit="q",
               initial=sum(len(shards[i]) for i in mine if i not in todo))
    naive = 0  # block evaluations without prefix sharing: each candidate from the embeddings
    for i in todo:
        exs = shards[i]
        requests = [r for ex in exs for r in ex.prompt]
        batches = runner.prepare(encode_requests(tokenizer, requests), cfg.batch_size)
        ll = score_candidates(runner, batches, len(requests), skips[width[i]:], share_prefix)
        if width[i]:  # candidates appended to a finished shard: keep its columns
            ll = np.concatenate([_read_loglik(shard_path(out, i)), ll], axis=1)
        naive += sum(b.rows for b in batches) * sum(runner.num_blocks - len(s)
                                                    for s in skips[width[i]:])
        write_shard(out, i, {
            "task": [ex.task for ex in exs for _ in ex.prompt],
            "qid": [ex.qid for ex in exs for _ in ex.prompt],
            "choice": [c for ex in exs for c in range(len(ex.prompt))],
            "gold": [ex.gold for ex in exs for _ in ex.prompt],
            "text": [t for ex in exs for t in ex.texts],
            "context": [ex.router_text for ex in exs for _ in ex.prompt],
            "loglik": ll.astype(np.float32).tolist(),
        })
        bar.update(len(exs))
        bar.set_postfix(block_evals=runner.evals)
    bar.close()
    seconds = time.perf_counter() - t0
    evals, naive, shards_run = ranks.sum([runner.evals, naive, len(todo)])
    ranks.barrier()
    missing = [i for i in range(len(shards)) if not shard_path(out, i).is_file()]
    if missing:
        raise PuddingError(f"{out}: shards {missing[:5]} were not written")
    stats = {  # of this run; a resumed or appending run counts only the work it did
        "seconds": round(seconds, 1), "shards_run": shards_run, "candidates": len(skips),
        "processes": ranks.world, "dtype": cfg.dtype, "device": str(dev.type),
        "block_evals": evals, "naive_block_evals": naive, "share_prefix": share_prefix,
        "torch_threads": torch.get_num_threads()}
    meta.update(complete=True, stats=stats, runs=[*runs, stats])
    if ranks.rank == 0:
        write_json(out / META, meta)
    ranks.barrier()
    return meta


@click.command("label")
@click.option("--candidates", "candidates_path", required=True, type=click.Path(dir_okay=False),
              help="candidates.json from `pudding search`.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Label folder: meta.json and parquet shards.")
@click.option("--model", default=None, help="HF id, HF folder or GGUF file [default: the "
              "model in candidates.json's settings, else the packaged SmolLM2-135M].")
@click.option("--tasks", default=",".join(CALIBRATION_TASKS), show_default=True,
              help="Comma-separated task names.")
@click.option("--max-examples-per-task", type=int, default=None,
              help="A seeded sample of this many questions per task [default: all].")
@click.option("--task-limit", "task_limits", multiple=True, callback=lambda c, p, v:
              parse_task_limits(v), metavar="TASK=N",
              help="Questions for one task, over --max-examples-per-task (repeatable).")
@click.option("--split", default="train", show_default=True,
              help="Split to label (HellaSwag 'train' is the fixed validation holdout).")
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--dtype", default="auto", show_default=True,
              help="auto (bf16 on CPUs with fast bf16 and on GPUs), float32, bfloat16, float16.")
@click.option("--batch-size", type=int, default=16, show_default=True,
              help="Packed rows (one question, all choices) per forward pass.")
@click.option("--shard-size", type=int, default=64, show_default=True,
              help="Questions per shard (an interruption loses at most one shard).")
@click.option("--data-dir", default=None, type=click.Path(file_okay=False),
              help="A folder laid out like shared/data (<task>/<split>.arrow).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, mps.")
@click.option("--no-share-prefix", is_flag=True,
              help="Run every candidate from the embeddings (for timing the prefix sharing).")
@click.option("--overwrite", is_flag=True, help="Discard labels already in --out.")
def label(candidates_path, out, model, tasks, max_examples_per_task, task_limits, split, seed,
          dtype,
          batch_size, shard_size, data_dir, device, no_share_prefix, overwrite):
    """Label training questions with every candidate's answer log-likelihoods (router data).

    Runs data-parallel under torchrun / accelerate launch (one set of shards per process)."""
    from pudding_mlx.files import check_writable_file

    from .assets import default_model

    check_writable_file(Path(out) / META)  # before the model loads
    if model is None:
        model = json.loads(Path(candidates_path).read_text()).get("settings", {}).get(
            "model") if Path(candidates_path).is_file() else None
        model = model or default_model()
    cfg = LabelConfig(model=str(model), candidates=candidate_table(candidates_path),
                      tasks=[t.strip() for t in tasks.split(",") if t.strip()],
                      max_examples_per_task=max_examples_per_task, task_limits=task_limits,
                      seed=seed, dtype=dtype,
                      batch_size=batch_size, shard_size=shard_size, data_dir=data_dir,
                      split=split)
    meta = make_labels(out, cfg, device=device, overwrite=overwrite,
                       share_prefix=not no_share_prefix)
    s = meta.get("stats", {})
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(f"{out}: {meta['num_questions']} questions, {meta['rows']} rows, "
                   f"{len(cfg.candidates)} candidates, {meta['num_shards']} shards")
        if s:
            click.echo(f"{s['seconds']:.0f} s on {s['processes']} process(es), {s['dtype']}; "
                       f"block evaluations {s['block_evals']} (without prefix sharing "
                       f"{s['naive_block_evals']})")

"""What the torch steps of a `pudding build` cost on one device: the greedy search's phases,
label time per 1,000 questions of each task, and router training seconds per step.

The search runs phase-major (phase 1 of every task and loss, then phase 2, ...) until
--search-budget seconds are spent, so a cut-off run still samples every task; a phase left out
is estimated from its task's last timed phase (the slower loss: the two share scores), scaled
by its number of trials.

--random-weights reads only the configs and tokenizers of --model and --backbone and draws the
weights: the cost depends on shapes and token counts, not on weight values (the search's path,
and so its prefix reuse, does differ), so a machine that cannot hold the checkpoint still
measures it.

    python benchmarks/build_cost.py --device cuda --model cfg/smollm2 --backbone cfg/minilm \\
        --random-weights --data-dir data --out cost.json
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import click


def random_copy(source: str, dest: Path, causal: bool, seed: int = 0) -> str:
    """An HF folder with `source`'s config and tokenizer and random weights."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    path, kw = Path(source), {}
    if path.suffix == ".gguf":
        source, kw = str(path.parent), {"gguf_file": path.name}
    config = AutoConfig.from_pretrained(source, **kw)
    torch.manual_seed(seed)
    (AutoModelForCausalLM if causal else AutoModel).from_config(config).save_pretrained(dest)
    AutoTokenizer.from_pretrained(source, **kw).save_pretrained(dest)
    return str(dest)


def time_search(model, tok, tasks, losses, k, samples, data_dir, batch_size, budget) -> dict:
    from convert.search import (
        GreedyRun,
        SetScorer,
        candidate_name,
        greedy_search,
        tokenize_examples,
    )
    from pudding_mlx.data import calibration_examples

    start = time.perf_counter()
    scorers, runs = {}, []
    for task in tasks:
        exs = tokenize_examples(tok, calibration_examples(task, samples, 0, data_dir))
        scorers[task] = SetScorer(model, exs, batch_size, state_budget_gb=4.0)
        runs += [GreedyRun.new(candidate_name(task, loss, k), task, loss, 0) for loss in losses]
    setup = time.perf_counter() - start
    n = scorers[tasks[0]].num_blocks - 2  # blocks that may be removed (not the first or last)
    for phase in range(1, k + 1):
        if time.perf_counter() - start > budget:
            break
        for run in runs:
            run.candidate.k = phase
            greedy_search(scorers[run.candidate.task], run)
    timed = sum(p.seconds for r in runs for p in r.trajectory)
    estimate = timed
    for r in runs:  # the phases left: seconds per trial of the task's last timed phase
        last = len(r.trajectory)
        per_trial = max((o.trajectory[-1].seconds / (n - last + 1) for o in runs
                         if o.candidate.task == r.candidate.task and len(o.trajectory) == last),
                        default=float("nan")) if last else float("nan")
        estimate += sum(per_trial * (n - p + 1) for p in range(last + 1, k + 1))
    return {"setup_seconds": round(setup, 1), "phases_timed": sum(len(r.trajectory) for r in runs),
            "phases": len(runs) * k, "timed_seconds": round(timed, 1),
            "estimated_seconds": round(estimate, 1),
            "per_candidate": {r.name: [round(p.seconds, 2) for p in r.trajectory]
                              for r in runs}}


def time_labels(model_path, candidates, tasks, per_task, data_dir, dtype, batch_size, device,
                work: Path) -> tuple[Path, dict]:
    from convert.labels import LabelConfig, make_labels

    def config(n):
        return LabelConfig(model=model_path, candidates=candidates, tasks=tasks,
                           max_examples_per_task=n, data_dir=data_dir, dtype=dtype,
                           batch_size=batch_size)

    make_labels(work / "warm-up", config(2), device=device)  # first-call costs out of timing
    meta = make_labels(work / "labels", config(per_task), device=device)
    stats = meta["stats"]
    return work / "labels", {
        "seconds": stats["seconds"], "dtype": stats["dtype"], "questions": meta["num_questions"],
        "minutes_per_1000": {t: round(1000 * c["seconds"] / c["items"] / 60, 3)
                             for t, c in stats["per_task"].items()}}


def time_router(labels: Path, backbone: str, epochs: int, batch_size: int, dtype: str,
                device: str, work: Path) -> dict:
    from convert.train_router import TrainConfig, train

    cfg = TrainConfig(backbone=backbone, epochs=epochs, batch_size=batch_size, warmup_steps=0,
                      dtype=dtype)
    metrics = train(labels, work / "router", cfg, device=device)
    # the first epoch pays for the GPU's warm-up; per-epoch evaluation and checkpoints are
    # left out (the paper's 359-step epochs spread them thin)
    later = metrics["history"][1:] or metrics["history"]
    per_epoch = metrics["steps"] / len(metrics["history"])
    return {"steps": metrics["steps"], "train_seconds": metrics["train_seconds"],
            "epoch_step_seconds": [h["seconds"] for h in metrics["history"]],
            "seconds_per_step": round(sum(h["seconds"] for h in later)
                                      / (per_epoch * len(later)), 4),
            "dtype": dtype, "batch_size": batch_size}


@click.command()
@click.option("--model", default=None, help="[default: SmolLM2-135M GGUF]")
@click.option("--backbone", default=None, help="Router encoder [default: MiniLM-L6].")
@click.option("--random-weights", is_flag=True,
              help="Only the configs and tokenizers of --model and --backbone; random weights.")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True, help="Search and label dtype.")
@click.option("--data-dir", default=None, type=click.Path(file_okay=False))
@click.option("--candidates", default="examples/results/smollm2-paper/build/search/"
              "candidates.json", show_default=True, help="The sets to label.")
@click.option("--tasks", default="arc_challenge,arc_easy,hellaswag,piqa,winogrande",
              show_default=True, help="Search tasks.")
@click.option("--label-tasks", default="arc_challenge,arc_easy,hellaswag,piqa,winogrande,"
              "openbookqa", show_default=True)
@click.option("-k", "--k", "k", default=6, show_default=True)
@click.option("--samples", default=128, show_default=True, help="Calibration examples per task.")
@click.option("--search-budget", default=120.0, show_default=True,
              help="Seconds of search phases timed; the rest is estimated.")
@click.option("--search-batch-size", default=16, show_default=True)
@click.option("--label-questions", default=200, show_default=True, help="Per task.")
@click.option("--label-batch-size", default=16, show_default=True)
@click.option("--router-epochs", default=3, show_default=True)
@click.option("--router-dtype", default="auto", show_default=True)
@click.option("--steps", default="search,labels,router", show_default=True)
@click.option("--out", default=None, type=click.Path(), help="Write the report as JSON.")
def main(model, backbone, random_weights, device, dtype, data_dir, candidates, tasks,
         label_tasks, k, samples, search_budget, search_batch_size, label_questions,
         label_batch_size, router_epochs, router_dtype, steps, out):
    import torch

    from convert import assets
    from convert.device import choose_dtype, resolve_device
    from convert.labels import candidate_table

    steps = steps.split(",")
    dev = resolve_device(device)
    work = Path(tempfile.mkdtemp(prefix="build-cost-"))
    model = model or assets.default_model()
    backbone = backbone or str(assets.minilm_path())
    if random_weights:
        model = random_copy(model, work / "model", causal=True)
        backbone = random_copy(backbone, work / "backbone", causal=False)
    report = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type,
              "torch": torch.__version__, "model": model, "random_weights": random_weights}

    def save():
        text = json.dumps(report, indent=1)
        click.echo(text)
        if out:
            Path(out).write_text(text + "\n")

    if "search" in steps:
        torch_dtype = choose_dtype(dev, dtype)
        lm, tok = assets.load_causal_lm(model, dtype=torch_dtype, device=dev)
        report["search"] = {"dtype": str(torch_dtype).removeprefix("torch."), "k": k,
                            "samples": samples, "batch_size": search_batch_size,
                            **time_search(lm, tok, tasks.split(","), ["likelihood", "margin"],
                                          k, samples, data_dir, search_batch_size,
                                          search_budget)}
        del lm
        save()
    if "labels" in steps:
        labels, report["labels"] = time_labels(
            model, candidate_table(candidates), label_tasks.split(","), label_questions,
            data_dir, dtype, label_batch_size, device, work)
        save()
        if "router" in steps:
            report["router"] = time_router(labels, backbone, router_epochs, 32, router_dtype,
                                           device, work)
            save()


if __name__ == "__main__":
    main()

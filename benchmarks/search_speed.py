"""Naive vs prefix-reuse vs prefix+state-reuse greedy search, side by side in one run.

The searches get the same model, examples and batches; their phases alternate (naive phase 1,
prefix phase 1, full phase 1, naive phase 2, ...) so a busy machine slows all alike. Reports
whether they chose the same blocks with the same losses, the block evaluations (one block
applied to one packed row), wall and CPU time, and each one's ratio to naive.

    python benchmarks/search_speed.py --task arc_easy --samples 16 -k 3 --out speed.json
"""

from __future__ import annotations

import json
import time

import click


@click.command()
@click.option("--model", "model_path", default=None, help="[default: SmolLM2-135M GGUF]")
@click.option("--task", default="arc_easy", show_default=True)
@click.option("--loss", default="likelihood", show_default=True)
@click.option("--samples", default=16, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("-k", "--k", "k", default=3, show_default=True)
@click.option("--dtype", default="auto", show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--out", default=None, type=click.Path(), help="Write the report as JSON.")
def main(model_path, task, loss, samples, seed, k, dtype, batch_size, out):
    from convert import assets
    from convert.device import choose_dtype, resolve_device
    from convert.scoring import answer_logprobs
    from convert.search import GreedyRun, SetScorer, greedy_search, tokenize_examples
    from pudding_mlx.data import calibration_examples

    dev = resolve_device("auto")
    torch_dtype = choose_dtype(dev, dtype)
    model_path = model_path or assets.default_model()
    model, tok = assets.load_causal_lm(model_path, dtype=torch_dtype, device=dev)
    exs = tokenize_examples(tok, calibration_examples(task, samples, seed))
    answer_logprobs(model, tok, [("Warm up", " the kernels")])  # first-call costs out of timing
    modes = {"naive": {"reuse_prefix": False}, "prefix": {"state_budget_gb": 0},
             "full": {}}
    runs = {name: (SetScorer(model, exs, batch_size, **kw), GreedyRun.new(name, task, loss, 0),
                   [], []) for name, kw in modes.items()}
    for phase in range(1, k + 1):
        for scorer, run, wall, cpu in runs.values():
            run.candidate.k = phase
            start, cpu_start = time.perf_counter(), time.process_time()
            greedy_search(scorer, run)
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu_start)
    blocks = {name: [p.block for p in c.trajectory] for name, (_, c, _, _) in runs.items()}
    losses = {name: [p.loss for p in c.trajectory] for name, (_, c, _, _) in runs.items()}
    evals = {name: s.runner.evals for name, (s, _, _, _) in runs.items()}
    wall = {name: w for name, (_, _, w, _) in runs.items()}
    cpu = {name: c for name, (_, _, _, c) in runs.items()}
    report = {
        "model": str(model_path), "task": task, "loss": loss, "samples": samples, "k": k,
        "dtype": str(torch_dtype).removeprefix("torch."), "batch_size": batch_size,
        "same_blocks": all(b == blocks["naive"] for b in blocks.values()),
        "same_losses": all(v == losses["naive"] for v in losses.values()),
        "blocks": blocks["full"], "losses": losses,
        "block_evals": evals, "seconds": wall, "cpu_seconds": cpu,
        "eval_ratio": {m: evals["naive"] / evals[m] for m in modes},
        "wall_ratio": {m: sum(wall["naive"]) / sum(wall[m]) for m in modes},
        "cpu_ratio": {m: sum(cpu["naive"]) / sum(cpu[m]) for m in modes},
    }
    text = json.dumps(report, indent=1)
    click.echo(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()

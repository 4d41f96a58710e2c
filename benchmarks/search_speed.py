"""Naive vs prefix-reuse greedy search, side by side in one run.

Both searches get the same model, examples and batches; their phases alternate (naive phase 1,
prefix phase 1, naive phase 2, ...) so a busy machine slows both alike. Reports whether they
chose the same blocks with the same losses, the block evaluations (one block applied to one
packed row) and the wall-time ratio.

    python benchmarks/search_speed.py --task arc_easy --samples 16 -k 2 --out speed.json
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
@click.option("-k", "--k", "k", default=2, show_default=True)
@click.option("--dtype", default="auto", show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--out", default=None, type=click.Path(), help="Write the report as JSON.")
def main(model_path, task, loss, samples, seed, k, dtype, batch_size, out):
    from convert import assets
    from convert.data import calibration_examples
    from convert.device import choose_dtype, resolve_device
    from convert.scoring import answer_logprobs
    from convert.search import Candidate, SetScorer, greedy_search, tokenize_examples

    dev = resolve_device("auto")
    torch_dtype = choose_dtype(dev, dtype)
    model_path = model_path or assets.default_model()
    model, tok = assets.load_causal_lm(model_path, dtype=torch_dtype, device=dev)
    exs = tokenize_examples(tok, calibration_examples(task, samples, seed))
    answer_logprobs(model, tok, [("Warm up", " the kernels")])  # first-call costs out of timing
    runs = {}
    for name, reuse in (("naive", False), ("prefix", True)):
        runs[name] = (SetScorer(model, exs, batch_size, reuse_prefix=reuse),
                      Candidate(name, task, loss, 0), [])
    for phase in range(1, k + 1):
        for scorer, cand, times in runs.values():
            cand.k = phase
            start = time.perf_counter()
            greedy_search(scorer, cand)
            times.append(time.perf_counter() - start)
    (ns, nc, nt), (ps, pc, pt) = runs["naive"], runs["prefix"]
    report = {
        "model": str(model_path), "task": task, "loss": loss, "samples": samples, "k": k,
        "dtype": str(torch_dtype).removeprefix("torch."),
        "same_blocks": [p.block for p in nc.trajectory] == [p.block for p in pc.trajectory],
        "blocks": [p.block for p in pc.trajectory],
        "loss_naive": [p.loss for p in nc.trajectory],
        "loss_prefix": [p.loss for p in pc.trajectory],
        "block_evals": {"naive": ns.runner.evals, "prefix": ps.runner.evals},
        "seconds": {"naive": nt, "prefix": pt},
        "eval_ratio": ns.runner.evals / ps.runner.evals,
        "wall_ratio": sum(nt) / sum(pt),
    }
    text = json.dumps(report, indent=1)
    click.echo(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()

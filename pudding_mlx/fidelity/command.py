"""`pudding fidelity`: KL to dense, top-1 agreement, perplexity and first divergence of every
skip set (and the routed choice) on generated text; see `run.py` for the definitions."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from ..errors import PuddingError
from ..evaluation.sets import parse_set, read_sets_file
from ..options import no_verify_option, parse_skip, router_backend_option
from ..prompts import SPLITS


def parse_skip_option(value: str) -> tuple[str, list[int]]:
    """--skip "3,7,9" -> ("skip:3,7,9", [3, 7, 9]); --skip "name=3,7,9" -> ("name", [...])."""
    if "=" in value:
        return parse_set(value)
    skip = sorted(parse_skip(value))
    if not skip:
        raise PuddingError("--skip needs at least one block (dense is always measured)")
    return "skip:" + ",".join(map(str, skip)), skip


@click.command("fidelity")
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False),
              help="Folder for results.md/.json, fidelity.png and the resumable cache.")
@click.option("--prompts", default=None, type=click.Path(dir_okay=False),
              help="Prompts file: one prompt per line, or JSONL with a \"text\" field "
                   "[default: the packaged chat prompts].")
@click.option("--split", type=click.Choice(SPLITS), default="heldout", show_default=True,
              help="Which prompts: held-out (reported numbers), train, or all.")
@click.option("--limit", type=int, default=None,
              help="At most this many prompts: a seeded subset, kept in file order.")
@click.option("--max-tokens", "-m", type=int, default=64, show_default=True,
              help="Length N of the dense greedy continuation.")
@click.option("--system-prompt", default=None, help="System prompt for the chat template.")
@click.option("--skip", "skips", multiple=True, metavar="[NAME=]3,7,9",
              help="Another skip set to measure (repeatable).")
@click.option("--sets-file", type=click.Path(exists=True, dir_okay=False),
              help="More skip sets from a candidates JSON file (e.g. a SLEB run).")
@click.option("--routed", "routed_specs", multiple=True, metavar="routed@X,routed:kN",
              help="The routed rows (comma list, repeatable): routed (the bundle's rule), "
                   "routed@X (tolerance X), routed:kN (best of the N-block sets) "
                   "[default: routed].")
@click.option("--tolerance", type=float, default=None, metavar="X",
              help="The routed row's tolerance (fidelity routers; see generate --tolerance) "
                   "[default: the bundle's].")
@router_backend_option()
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resamples", type=int, default=2000, show_default=True,
              help="Bootstrap resamples for the confidence intervals.")
@no_verify_option("Skip the bundle's sha256 checks.")
def fidelity(bundle, output, prompts, split, limit, max_tokens, system_prompt, skips, sets_file,
             routed_specs, tolerance, router_backend, seed, resamples, no_verify):
    """How far each skip set moves the model from dense on generated text.

    For every prompt the dense model writes a greedy continuation; then dense, every candidate,
    the static set, the routed choices and any --skip/--sets-file set are measured on it:
    KL(dense || set) and top-1 agreement per token (teacher-forced), the continuation's
    perplexity under the set, and how many tokens the set's own greedy output matches dense.
    """
    from .report import markdown
    from .run import FidelitySettings, run_fidelity

    if limit is not None and limit < 1:
        raise PuddingError("--limit must be positive")
    if max_tokens < 1:
        raise PuddingError("--max-tokens must be at least 1")
    if resamples < 1:
        raise PuddingError("--resamples must be positive")
    extra = read_sets_file(sets_file) if sets_file else {}
    for value in skips:
        name, skip = parse_skip_option(value)
        extra[name] = skip
    routed = tuple(s.strip() for spec in routed_specs for s in spec.split(",") if s.strip())
    settings = FidelitySettings(
        bundle=bundle, output=output, prompts=prompts, split=split, limit=limit,
        max_tokens=max_tokens, system_prompt=system_prompt, extra_sets=extra,
        routed=routed or ("routed",), tolerance=tolerance, router_backend=router_backend,
        seed=seed, resamples=resamples, verify=not no_verify,
        command="pudding " + shlex.join(sys.argv[1:]))
    results = run_fidelity(settings)
    click.echo(markdown(results))
    click.echo(f"Wrote {Path(output) / 'results.md'}, results.json and fidelity.png "
               f"({results['seconds']:.0f} s)")

"""`pudding bench`: dense vs routed speed, side by side, against the ideal that skipping allows.

This module runs the measurements in order and writes the report; each kind of measurement
lives in its own module: timing (requests and trials), summary (medians, speedups, ideals),
router (--router-study), memory (--memory), table and plot.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..errors import PuddingError
from ..options import no_verify_option, route_options
from .machine import machine_info
from .memory import memory_compare
from .result import Result, Settings
from .router import project_router, router_study
from .summary import model_facts, summarise
from .table import format_table
from .timing import Trial, make_prompt, measure, run_request, wrapper_overhead

if TYPE_CHECKING:
    from ..model import PuddingModel


def run_bench(pm: PuddingModel, settings: Settings, route_mode: str = "router",
              skip: list[int] | None = None, progress: Callable[[], None] = lambda: None,
              tolerance: float | None = None) -> Result:
    """Every measurement of `settings` on a loaded PuddingModel (routed as
    PuddingModel.route(text, route_mode, skip, tolerance))."""
    text_source = Path(settings.prompt_file).read_text() if settings.prompt_file else None
    pm.tokenizer.eos_token_ids = set()  # never stop early, like mlx_lm.benchmark
    kinds = ["dense", "routed"] + (["mlx-lm"] if settings.compare_mlx_lm else [])
    points = [(p, 1) for p in settings.prompt_lengths]
    points += [(settings.gen_prompt, g) for g in settings.gen_lengths]
    facts = model_facts(pm)
    machine = machine_info()
    prompts, routes = {}, {}
    for p in dict.fromkeys(p for p, _ in points):
        tokens = make_prompt(pm.tokenizer, p, settings.seed + p, text_source)
        prompts[p] = (tokens, pm.tokenizer.decode(tokens))
        routes[p] = pm.route(prompts[p][1], route_mode, skip, tolerance, tokens=tokens)
    skips = {len(r.skip) for r in routes.values()}
    if skips == {0}:
        hint = ("; no set is predicted within the tolerance, raise it"
                if any(r.tolerance is not None for r in routes.values()) else "")
        raise PuddingError(f"the routed request skips no block; nothing to compare{hint}")
    if len(skips) != 1:
        raise PuddingError(f"the prompts were routed to sets of different sizes {sorted(skips)};"
                           " pass --skip or --static to compare one set")
    trials = []
    for p, g in points:
        tokens, text = prompts[p]

        def request(kind: str, tokens=tokens, text=text, g=g) -> Trial:
            return run_request(pm, kind, tokens, text, g, route_mode, skip, tolerance)

        trials += measure(request, kinds, settings.trials, settings.warmup, progress)
    route = routes[settings.gen_prompt if settings.gen_lengths else max(routes)]
    result = Result(settings, machine, facts,
                    {"mode": route_mode, "name": route.name, "skip": route.skip,
                     "tolerance": route.tolerance,
                     "per_prompt": {f"p{p}": {"name": r.name, "skip": r.skip,
                                              "predicted": r.predicted}
                                    for p, r in routes.items()},
                     "router_backend": pm.router.backend,
                     "router_max_length": pm.router.max_length},
                    trials)
    # all routes skip as many blocks; the generation rows' decode ideal uses their own set
    result.summary = summarise(trials, facts, route.skip)
    if settings.router_study:
        texts = {p: prompts[p][1] for p in settings.prompt_lengths or prompts}
        result.router_study = router_study(pm, texts, settings.trials)
        project_router(result.router_study, result.summary["ttft"])
    p = min(prompts)
    result.overhead = wrapper_overhead(pm, route, prompts[p][0])
    if hasattr(os, "getloadavg"):
        result.machine["load_average_at_end"] = os.getloadavg()
    return result


def _lengths(ctx, param, value: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected numbers like 128,256, got {value!r}") from None
    if any(v < 1 for v in out):
        raise click.BadParameter(f"lengths must be positive, got {value!r}")
    return out


@click.command()
@click.option("--bundle", "-b", required=True, type=click.Path(), help="PuDDing bundle folder.")
@click.option("--prompt-lengths", default="128,256,512", show_default=True, callback=_lengths,
              help="Prompt lengths of the time-to-first-token measurements ('' for none).")
@click.option("--gen-lengths", default="128,256,512", show_default=True, callback=_lengths,
              help="Generated tokens of the prefill+generation measurements ('' for none).")
@click.option("--gen-prompt", default=128, show_default=True, type=click.IntRange(1),
              help="Prompt length of the prefill+generation measurements.")
@click.option("--trials", "-n", default=5, show_default=True, type=click.IntRange(1))
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(0))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--prompt-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Real text (repeated to length) instead of random tokens.")
@click.option("--compare-mlx-lm", is_flag=True,
              help="Also time plain mlx_lm.stream_generate on the same model.")
@click.option("--router-study", is_flag=True,
              help="Time the router with shorter inputs, fewer layers and mx.compile.")
@click.option("--memory", is_flag=True,
              help="Peak memory dense vs routed with lazy loading (fresh processes).")
@click.option("--memory-requests", default=4, show_default=True, type=click.IntRange(1),
              help="Requests (different random prompts) of the memory runs.")
@click.option("--memory-budget", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="GB", help="Also run the memory requests keeping only the blocks of "
              "recently used sets that fit in GB (blocks only; implies --memory).")
@click.option("--output", "-o", type=click.Path(file_okay=False), default=None,
              help="Write bench.json and bench.png into this folder.")
@click.option("--note", multiple=True, help="A note stored in bench.json (repeatable).")
@no_verify_option()
@route_options
def bench(bundle, prompt_lengths, gen_lengths, gen_prompt, trials, warmup, seed, prompt_file,
          compare_mlx_lm, router_study, memory, memory_requests, memory_budget, output, note,
          no_verify, route_mode, skip, tolerance, router_backend):
    """Dense vs routed speed, side by side, against the ideal speedup of the skipped blocks.

    The routed set comes from the router (or --static / --skip); --dense is meaningless here.
    """
    from tqdm import tqdm

    from ..model import load
    from ..routing import Policy

    if route_mode == "dense" and skip is None:
        raise PuddingError("--dense: pudding bench always runs dense; choose the routed set "
                           "with the router (default), --static or --skip")
    if not prompt_lengths and not gen_lengths:
        raise PuddingError("nothing to measure: --prompt-lengths and --gen-lengths are empty")
    settings = Settings(prompt_lengths, gen_lengths, gen_prompt, trials, warmup, seed,
                        prompt_file, compare_mlx_lm, router_study)
    pm = load(bundle, router_backend=router_backend, verify=not no_verify)
    if route_mode == "router" and skip is None:
        pm.check_policy(Policy(tolerance))  # a bad --tolerance fails before any measuring
    kinds = 3 if compare_mlx_lm else 2
    total = (len(prompt_lengths) + len(gen_lengths)) * kinds * (trials + warmup)
    with tqdm(total=total, desc="bench", unit="request") as bar:
        result = run_bench(pm, settings, route_mode, skip, lambda: bar.update(), tolerance)
    result.notes = list(note)
    if memory or memory_budget:
        prompts = [pm.tokenizer.decode(make_prompt(pm.tokenizer, 128, seed + i))
                   for i in range(memory_requests)]
        result.memory = memory_compare(bundle, route_mode, skip, prompts, router_backend,
                                       memory_budget and memory_budget * 1e9, tolerance)
    click.echo(format_table(result))
    if output:
        from .plot import plot

        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(result.to_dict(), indent=1) + "\n")
        plot(result.to_dict(), out / "bench.png")
        click.echo(f"Wrote {out / 'bench.json'} and {out / 'bench.png'}")

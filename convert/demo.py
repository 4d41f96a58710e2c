"""`pudding demo`: build the demo SmolLM2 bundle once (cached), then route a few prompts.

For each prompt it shows the omission set the router chose, the router's time, the dense and
the routed answer side by side, how far the routed set is from dense on the dense answer
(KL and top-1 agreement, teacher-forced: `pudding_mlx.fidelity.metrics`), and decoding speed
routed vs dense over the same number of tokens.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import click

from pudding_mlx.errors import PuddingError
from pudding_mlx.options import TOLERANCE_HELP, describe_route

PROMPTS = (
    ("science question", "Why do plants need sunlight to grow?"),
    ("physical common sense",
     "How can I keep a wet umbrella from making the floor wet when I come inside?"),
    ("reading comprehension",
     "The town library opens at nine on weekdays, but on Sundays it opens at noon and closes "
     "at five. Question: At what time does the library open on Sunday?"),
    ("small talk", "Hi! What is your favourite season of the year, and why?"),
)


def cache_folder() -> Path:
    """$PUDDING_CACHE, else $XDG_CACHE_HOME/pudding-mlx, else ~/.cache/pudding-mlx."""
    if os.environ.get("PUDDING_CACHE"):
        return Path(os.environ["PUDDING_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pudding-mlx"


def demo_bundle(rebuild: bool) -> Path:
    """The cached demo bundle, built (or rebuilt, or a crashed build continued) if needed.

    It is the `demo` profile's quality-aware bundle: a fidelity router over nested sets of 1-4
    blocks and dense, routed by its default tolerance, so the answers stay near dense's. A
    bundle cached by an older pudding (a likelihood router) is built again.
    """
    from pudding_mlx.bundle import read_manifest

    from .build import run_build
    from .profiles import PROFILES

    root = cache_folder() / "demo"
    bundle, work = root / "bundle", root / "work"
    cached = (bundle / "pudding.json").is_file()
    if cached and not rebuild and read_manifest(bundle).router.target != "fidelity":
        click.echo(f"{bundle} was built by an older pudding (no fidelity router); building the "
                   "demo bundle again")
        rebuild = True
    if rebuild:
        for path in (bundle, work):
            shutil.rmtree(path, ignore_errors=True)
    elif cached:
        click.echo(f"Using the cached bundle {bundle} (--rebuild builds it again)")
        return bundle
    click.echo(f"Building the demo SmolLM2-135M bundle in {root} (first run only; "
               "about a quarter hour on two CPU cores)")
    # The demo is built from packaged assets only: no hub look-ups.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    run_build(None, bundle, work, PROFILES["demo"])
    click.echo(f"Built {bundle} in {time.perf_counter() - start:.0f} s")
    return bundle


def suppress_tokens(ids) -> Callable:
    """An mlx-lm logits processor that never picks `ids`, so a dense run decodes exactly as
    many tokens as the routed one did."""
    import mlx.core as mx

    ids = sorted(ids)
    mask: list = []

    def processor(tokens, logits):
        if not mask:
            m = mx.zeros((logits.shape[-1],), dtype=logits.dtype)
            m[mx.array(ids)] = -float("inf")
            mask.append(m)
        return logits + mask[0]

    return processor


def run_prompt(pm, prompt: str, max_tokens: int, tolerance: float | None = None) -> dict:
    """Route and answer `prompt`; answer it dense too and measure the routed set's KL to dense
    on that answer; then time a dense run as long as the routed answer."""
    from pudding_mlx.fidelity.metrics import compare, forced_logprobs, greedy_continuation

    route = pm.route(prompt, tolerance=tolerance)
    pieces = list(pm.stream_generate(prompt, max_tokens=max_tokens, route=route))
    routed, text = pieces[-1], "".join(p.text for p in pieces)
    n = routed.generation_tokens
    ids = pm.encode(prompt)
    answer = greedy_continuation(pm, ids, max_tokens)
    ref = forced_logprobs(pm, [], ids, answer)
    kl, agree, _ = compare(ref, forced_logprobs(pm, route.skip, ids, answer), answer)
    eos = set(pm.tokenizer.eos_token_ids)
    dense_text = pm.tokenizer.decode([t for t in answer if t not in eos])
    no_eos = suppress_tokens(eos)
    *_, dense = pm.stream_generate(prompt, max_tokens=n, mode="dense",
                                   logits_processors=[no_eos])
    return {"route": route, "text": text.strip(), "tokens": n, "dense_text": dense_text.strip(),
            "kl": float(kl.mean()), "agreement": float(agree.mean()),
            "routed_tps": routed.generation_tps, "dense_tps": dense.generation_tps,
            "dense_tokens": dense.generation_tokens}


@click.command("demo")
@click.option("--bundle", "-b", type=click.Path(exists=True, file_okay=False), default=None,
              help="Use this bundle instead of building the demo one.")
@click.option("--rebuild", is_flag=True, help="Build the cached demo bundle again from scratch.")
@click.option("--max-tokens", "-m", type=int, default=48, show_default=True,
              help="Tokens per answer.")
@click.option("--tolerance", type=float, default=None, metavar="X", help=TOLERANCE_HELP)
def demo(bundle, rebuild, max_tokens, tolerance):
    """Route a handful of prompts of different kinds; compare the routed answers with dense
    ones (KL to dense) and routed vs dense speed.

    With no --bundle, the demo bundle (SmolLM2-135M-Instruct, a MiniLM router of KL to dense,
    packaged prompts) is built on the first run and cached under $PUDDING_CACHE or
    ~/.cache/pudding-mlx/demo."""
    from pudding_mlx.model import load
    from pudding_mlx.routing import Policy

    if max_tokens < 1:
        raise PuddingError("--max-tokens must be at least 1")
    if bundle is not None and rebuild:
        raise PuddingError("--rebuild rebuilds the cached bundle; it cannot go with --bundle")
    began = time.perf_counter()
    bundle = Path(bundle) if bundle else demo_bundle(rebuild)
    start = time.perf_counter()
    pm = load(bundle)
    n_blocks = pm.manifest.num_blocks
    click.echo(f"Loaded {bundle} in {time.perf_counter() - start:.1f} s: "
               f"{pm.manifest.base_model}, {n_blocks} blocks, "
               f"{len(pm.candidates)} candidate omission sets, router {type(pm.router).__name__}")
    pm.check_policy(Policy(tolerance))
    list(pm.stream_generate("Hello", max_tokens=2, mode="dense"))  # warm-up for fair timings
    rows = []
    for i, (kind, prompt) in enumerate(PROMPTS, 1):
        r = run_prompt(pm, prompt, max_tokens, tolerance)
        route = r["route"]
        speedup = r["routed_tps"] / r["dense_tps"]
        click.echo(f"\n[{i}/{len(PROMPTS)}] {kind}\n> {prompt}")
        click.echo(describe_route(route, n_blocks))
        click.echo(f"dense answer:  {r['dense_text']}")
        click.echo(f"routed answer: {r['text']}")
        click.echo(f"routed vs dense on the dense answer: KL {r['kl']:.3f} nats/token, top-1 "
                   f"agreement {100 * r['agreement']:.0f}%")
        click.echo(f"speed over {r['tokens']} tokens: routed {r['routed_tps']:.1f} tokens/s, "
                   f"dense {r['dense_tps']:.1f} tokens/s ({speedup:.2f}x)")
        rows.append((kind, route, r["kl"], r["routed_tps"], r["dense_tps"]))
    click.echo("\nprompt                  skipped  router ms  KL to dense  routed tok/s  "
               "dense tok/s")
    for kind, route, kl, routed, dense in rows:
        click.echo(f"{kind:<23} {len(route.skip):>7}  {route.seconds * 1e3:>9.1f}  {kl:>11.3f}  "
                   f"{routed:>12.1f}  {dense:>11.1f}")
    click.echo(f"demo done in {time.perf_counter() - began:.0f} s")

"""`pudding generate`: route one prompt, then generate like `mlx_lm.generate`."""

from __future__ import annotations

import functools
import sys

import click

from .errors import PuddingError
from .routing import check_tolerance

NO_TEMPLATE = "note: the tokenizer has no chat template (a base model); "


def parse_skip(text: str) -> list[int]:
    """'3,7,9' -> [3, 7, 9]; '' -> [] (dense)."""
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise PuddingError(f"--skip takes block numbers like 3,7,9, got {text!r}") from None


TOLERANCE_HELP = ("Fidelity routers: skip the most blocks among the sets whose predicted "
                  "KL to dense is at most X nats/token (dense when none is) [default: the "
                  "bundle's].")


def route_options(f):
    """The routing overrides every command takes: --dense, --static, --skip, --tolerance,
    --router-backend.

    The command receives `route_mode` ("router" | "dense" | "static"), `skip`
    (list[int] | None) and `tolerance` (float | None) instead of the raw flags, ready for
    PuddingModel.route.
    """

    @click.option("--dense", is_flag=True, help="Skip no block (ignore the router).")
    @click.option("--static", "static_", is_flag=True, help="Use the bundle's static set.")
    @click.option("--skip", "skip_text", default=None, metavar="3,7,9",
                  help="Skip exactly these blocks (0-based).")
    @click.option("--tolerance", type=float, default=None, metavar="X", help=TOLERANCE_HELP)
    @click.option("--router-backend", type=click.Choice(["auto", "mlx", "coreml"]),
                  default="auto", show_default=True,
                  help="auto: Core ML on macOS when router.mlpackage exists, else MLX.")
    @functools.wraps(f)
    def wrapper(*args, dense: bool, static_: bool, skip_text: str | None,
                tolerance: float | None, **kwargs):
        if dense + static_ + (skip_text is not None) > 1:
            raise PuddingError("--dense, --static and --skip exclude each other")
        if tolerance is not None and dense + static_ + (skip_text is not None):
            raise PuddingError("--tolerance picks among the router's sets; it cannot go with "
                               "--dense, --static or --skip")
        mode = "dense" if dense else "static" if static_ else "router"
        skip = parse_skip(skip_text) if skip_text is not None else None
        if tolerance is not None:
            check_tolerance(tolerance)
        return f(*args, route_mode=mode, skip=skip, tolerance=tolerance, **kwargs)

    return wrapper


def describe_route(route, num_blocks: int) -> str:
    blocks = ",".join(map(str, route.skip)) or "none"
    text = f"Route: {route.name} (skips blocks {blocks} of {num_blocks}"
    if route.reason in ("router", "none within tolerance"):
        text += f"; router {route.seconds * 1e3:.1f} ms"
        if route.truncated:
            text += ", prompt truncated for the router"
        if route.predicted is not None:
            text += f"; predicted KL to dense {route.predicted:.4f} nats/token"
        if route.tolerance is not None:
            text += (f", tolerance {route.tolerance:g}" if route.index is not None
                     else f"; no set predicted within tolerance {route.tolerance:g}")
        elif route.k is not None:
            text += f", best of the {route.k}-block sets"
    else:
        text += f"; {route.reason}"
    return text + ")"


def read_prompt(prompt: str) -> str:
    """`-` reads stdin (invalid UTF-8 replaced); `\\n` and `\\t` escapes expand like mlx-lm."""
    if prompt == "-":
        return sys.stdin.buffer.read().decode("utf-8", errors="replace")
    return prompt.replace("\\n", "\n").replace("\\t", "\t")


@click.command()
@click.option("--bundle", "-b", required=True, type=click.Path(), help="PuDDing bundle folder.")
@click.option("--prompt", "-p", default="hello", show_default=True,
              help="The prompt, or - to read it from stdin.")
@click.option("--max-tokens", "-m", default=100, show_default=True, type=int)
@click.option("--temp", default=0.0, show_default=True, type=float)
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--seed", default=None, type=int, help="PRNG seed for sampling.")
@click.option("--system-prompt", default=None, help="System prompt for the chat template.")
@click.option("--ignore-chat-template", is_flag=True, help="Feed the prompt as is.")
@click.option("--max-kv-size", default=None, type=int, help="Rotating KV cache size.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the bundle files.")
@route_options
def generate(bundle, prompt, max_tokens, temp, top_p, seed, system_prompt,
             ignore_chat_template, max_kv_size, no_verify, route_mode, skip, tolerance,
             router_backend):
    """Route a prompt to an omission set and generate with those blocks skipped.

    An empty or whitespace-only prompt is not routed: it gets the bundle's static set.
    """
    import mlx.core as mx
    from mlx_lm.sample_utils import make_sampler

    from .model import load

    if max_tokens < 1:
        raise PuddingError("--max-tokens must be at least 1")
    if seed is not None:
        mx.random.seed(seed)
    prompt = read_prompt(prompt)
    pm = load(bundle, router_backend=router_backend, verify=not no_verify)
    if not ignore_chat_template and not pm.has_chat_template:
        click.echo(NO_TEMPLATE + "the prompt is fed as plain text"
                   + (", without --system-prompt" if system_prompt else ""), err=True)
    tokens = pm.encode(prompt, not ignore_chat_template, system_prompt)
    if not tokens:
        raise PuddingError("the prompt is empty (and no chat template is applied)")
    context = pm.config.get("max_position_embeddings")
    if isinstance(context, int) and len(tokens) + max_tokens > context:
        click.echo(f"note: the prompt ({len(tokens)} tokens) plus --max-tokens {max_tokens} "
                   f"exceed the model's context of {context} tokens; expect worse output",
                   err=True)
    route = pm.route(prompt, route_mode, skip, tolerance)
    click.echo(describe_route(route, pm.manifest.num_blocks))
    click.echo("=" * 10)
    last = None
    for last in pm.stream_generate(
        tokens,
        max_tokens=max_tokens,
        route=route,
        sampler=make_sampler(temp, top_p),
        max_kv_size=max_kv_size,
    ):
        click.echo(last.text, nl=False)
    click.echo()
    click.echo("=" * 10)
    click.echo(f"Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.3f} tokens-per-sec")
    click.echo(f"Generation: {last.generation_tokens} tokens, "
               f"{last.generation_tps:.3f} tokens-per-sec")
    click.echo(f"Peak memory: {last.peak_memory:.3f} GB")

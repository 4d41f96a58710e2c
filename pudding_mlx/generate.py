"""`pudding generate`: route one prompt, then generate like `mlx_lm.generate`."""

from __future__ import annotations

import sys

import click

from .errors import PuddingError
from .options import NO_TEMPLATE, describe_route, no_verify_option, route_options


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
@no_verify_option()
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
    route = pm.route(prompt, route_mode, skip, tolerance, tokens=tokens)
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

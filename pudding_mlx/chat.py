"""`pudding chat`: a conversation with one KV cache, like `mlx_lm.chat`, under a routed mask.

A skipped block has no cache, so the route cannot change freely between turns. By default the
conversation is routed once, on its first user turn. With `route_each_turn`, every user turn is
routed; when the set changes, the whole conversation so far is prefilled again under the new
mask into a fresh cache.
"""

from __future__ import annotations

import sys
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field

import click

from .errors import PuddingError
from .model import PuddingModel, Route, clean_text
from .options import NO_TEMPLATE, describe_route, no_verify_option, route_options

HELP = "Commands: 'q' quits, 'r' starts a new conversation, 'h' shows this help."


@dataclass
class Conversation:
    pm: PuddingModel
    mode: str = "router"
    skip: Sequence[int] | None = None
    route_each_turn: bool = False
    system_prompt: str | None = None
    max_kv_size: int | None = None
    tolerance: float | None = None  # fidelity routers: see PuddingModel.route
    route: Route | None = None
    cache: list | None = None
    tokens: list[int] = field(default_factory=list)  # everything in the cache, in order
    reprefilled: int = 0  # tokens of history prefilled again in the last turn

    def reset(self) -> None:
        self.route, self.cache, self.tokens, self.reprefilled = None, None, [], 0

    def ask(self, query: str, max_tokens: int = 256, **kwargs) -> Generator:
        """Stream the answer to one user turn (mlx-lm GenerationResponse objects).

        Like mlx_lm.chat, each turn's chat template is applied to that turn alone and appended
        to the cache. Without a template (a base model) the turns are plain text: the first as
        `encode` gives it, each later one on a new line after the reply, with no BOS.
        """
        if not query.strip():
            raise PuddingError("empty message")
        if self.tokens and not self.pm.has_chat_template:
            new = list(self.pm.tokenizer.encode("\n" + clean_text(query),
                                                add_special_tokens=False))
        else:
            new = self.pm.encode(query, system_prompt=self.system_prompt)
        self.reprefilled = 0
        if self.route is None or self.route_each_turn:
            route = self.pm.route(query, self.mode, self.skip, self.tolerance, tokens=new)
            if self.route is None or route.skip != self.route.skip:
                self.reprefilled = len(self.tokens)
                new = self.tokens + new
                self.tokens = []
                self.cache = self.pm.make_cache(route, self.max_kv_size)
            self.route = route
        self.tokens += new
        produced = 0
        for response in self.pm.stream_generate(new, max_tokens=max_tokens, route=self.route,
                                                prompt_cache=self.cache, **kwargs):
            # Every generated token is fed to the cache (EOS too) before it is reported.
            if response.generation_tokens > produced:
                self.tokens.append(response.token)
                produced = response.generation_tokens
            yield response


def read_line(stream) -> str:
    """One line of input; bytes that are not UTF-8 become U+FFFD instead of an error."""
    raw = getattr(stream, "buffer", None)
    return raw.readline().decode("utf-8", errors="replace") if raw else stream.readline()


@click.command()
@click.option("--bundle", "-b", required=True, type=click.Path(), help="PuDDing bundle folder.")
@click.option("--max-tokens", "-m", default=256, show_default=True, type=int)
@click.option("--temp", default=0.0, show_default=True, type=float)
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--system-prompt", default=None)
@click.option("--max-kv-size", default=None, type=int, help="Rotating KV cache size.")
@click.option("--route-each-turn", is_flag=True,
              help="Route every user turn; a changed set re-prefills the conversation.")
@no_verify_option()
@route_options
def chat(bundle, max_tokens, temp, top_p, seed, system_prompt, max_kv_size, route_each_turn,
         no_verify, route_mode, skip, tolerance, router_backend):
    """Chat with a bundle; one KV cache per conversation (routed on its first turn by default).

    Empty lines are ignored.
    """
    import mlx.core as mx
    from mlx_lm.sample_utils import make_sampler

    from .model import load
    from .routing import Policy

    if max_tokens < 1:
        raise PuddingError("--max-tokens must be at least 1")
    mx.random.seed(seed)
    pm = load(bundle, router_backend=router_backend, verify=not no_verify)
    if route_mode == "router" and skip is None:
        pm.check_policy(Policy(tolerance))  # a bad --tolerance fails now, not at the first turn
    conv = Conversation(pm, route_mode, skip, route_each_turn, system_prompt, max_kv_size,
                        tolerance)
    sampler = make_sampler(temp, top_p)
    click.echo(f"[pudding chat: {pm.manifest.base_model}, {pm.manifest.num_blocks} blocks, "
               f"router on {pm.router.backend}] {HELP}")
    if not pm.has_chat_template:
        click.echo(f"[{NO_TEMPLATE}turns are fed as plain text, each on a new line"
                   + (", without --system-prompt" if system_prompt else "") + "]")
    while True:
        click.echo(">> ", nl=False)
        line = read_line(sys.stdin)
        if not line:
            click.echo()
            break
        query = line.strip()
        if query == "q":
            break
        if query == "r":
            conv.reset()
            click.echo("[new conversation]")
            continue
        if query == "h":
            click.echo(HELP)
            continue
        if not query:
            continue
        last = None
        for last in conv.ask(line.rstrip("\n"), max_tokens=max_tokens, sampler=sampler):
            click.echo(last.text, nl=False)
        click.echo()
        note = f"; re-prefilled {conv.reprefilled} tokens" if conv.reprefilled else ""
        click.echo(f"[{describe_route(conv.route, pm.manifest.num_blocks)}; "
                   f"{last.generation_tps:.1f} tokens/s{note}]")

"""`pudding serve`: a bundle behind an OpenAI-compatible endpoint (the app is `server.py`)."""

from __future__ import annotations

import ipaddress
import os
import sys
from contextlib import suppress
from pathlib import Path

import click

from ..options import no_verify_option, router_backend_option
from .batch import batchable
from .server import ServeConfig, Server


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@click.command()
@click.option("--bundle", "-b", required=True, type=click.Path(), help="PuDDing bundle folder.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; only this machine can connect unless you change it.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", default=None, envvar="PUDDING_API_KEY",
              help="Require 'Authorization: Bearer KEY' on /v1 (or set PUDDING_API_KEY).")
@click.option("--decode-concurrency", default=8, show_default=True, type=click.IntRange(1),
              help="Requests decoded together, each under its own route.")
@click.option("--prompt-concurrency", default=4, show_default=True, type=click.IntRange(1),
              help="Waiting prompts prefilled between two decode steps.")
@click.option("--max-queue", default=8, show_default=True, type=click.IntRange(0),
              help="Requests that may wait while the decode batch is full; more get 503.")
@click.option("--max-tokens-limit", default=2048, show_default=True, type=click.IntRange(1),
              help="Cap on max_tokens of every request (and its default).")
@click.option("--max-body-mb", default=4.0, show_default=True, type=click.FloatRange(0),
              help="Larger request bodies get 413.")
@click.option("--prompt-cache-mb", default=512.0, show_default=True, type=click.FloatRange(0),
              help="Memory for KV caches kept between requests (least recently used go).")
@router_backend_option()
@no_verify_option()
def serve(bundle, host, port, api_key, decode_concurrency, prompt_concurrency, max_queue,
          max_tokens_limit, max_body_mb, prompt_cache_mb, router_backend, no_verify):
    """Serve a bundle behind an OpenAI-compatible API (/v1/chat/completions, /v1/completions,
    /v1/models, /health). Model names: the bundle folder's name (routed), NAME:dense,
    NAME:static."""
    from ..model import load

    pm = load(bundle, router_backend=router_backend, verify=not no_verify)
    config = ServeConfig(Path(bundle).resolve().name, host, port, api_key, max_queue,
                         max_tokens_limit, int(max_body_mb * 2**20), int(prompt_cache_mb * 2**20),
                         decode_concurrency, prompt_concurrency)
    if not batchable(pm.model):
        click.echo("note: this model's forward cannot run block by block, so requests are "
                   "decoded one at a time (--decode-concurrency 1)", err=True)
    if not is_loopback(host) and not api_key:
        click.echo(f"warning: serving on {host} without --api-key: anyone who can reach this "
                   "port can use the model", err=True)
    click.echo(f"pudding serve: models {config.name}, {config.name}:dense, "
               f"{config.name}:static on http://{host}:{port}/v1", err=True)
    with suppress(KeyboardInterrupt):  # uvicorn re-raises the Ctrl-C it handled
        Server(pm, config).run()
    # The server has shut down and its worker thread has ended. Exit now: the interpreter's
    # teardown can race MLX's stream threads and abort ("terminate called without an active
    # exception", seen about once in three Ctrl-C tests on a 2-core machine).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

"""A loaded bundle: the mlx-lm model, its router, and generation with the routed blocks skipped."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.generate import GenerationResponse
from mlx_lm.generate import stream_generate as lm_stream_generate
from mlx_lm.models.cache import make_prompt_cache

from .bundle import (
    Candidate,
    Manifest,
    check_safetensors,
    check_skip_set,
    read_manifest,
    verify_files,
)
from .errors import BundleError, PuddingError
from .in_model import InModelRouter, Prefix, load_in_model_router
from .masking import check_skip, num_blocks, protected_blocks, run_blocks, skip_view
from .prompts import clean_text, encode_chat
from .router import Router, load_router
from .routing import LOWER_IS_BETTER, Policy, check_policy, choose

MODES = ("router", "dense", "static")


@dataclass
class Route:
    """Which blocks one request skips, and why."""

    index: int | None  # position in the router's outputs; None when not chosen by the router
    name: str  # candidate name, "dense", the static set's name, or "skip:3,7,9"
    skip: list[int]  # 0-based blocks skipped, sorted
    scores: np.ndarray | None = None  # the router's scores, in manifest.router.outputs order
    # time spent routing: tokenize + router forward; an in-model router's pooling and head
    # only (the first blocks it reads are prefill work, timed in `prefix.seconds`)
    seconds: float = 0.0
    truncated: bool = False  # the prompt was cut to the router's max_length tokens
    # "router", "dense", "static", "skip", "empty prompt", or "none within tolerance" (the
    # router predicted every set above the tolerance and the bundle has no dense candidate)
    reason: str = "router"
    predicted: float | None = None  # fidelity routers: the chosen set's predicted KL to dense
    tolerance: float | None = None  # the tolerance the set was chosen within
    k: int | None = None  # the size the set was chosen among (fixed-k rule)
    # an in-model router's first blocks over the prompt, for the prefill to continue from
    prefix: Prefix | None = field(default=None, repr=False, compare=False)


@dataclass
class PuddingModel:
    path: Path
    manifest: Manifest
    model: nn.Module  # the mlx-lm model (all blocks)
    tokenizer: object  # mlx-lm TokenizerWrapper
    router: Router | InModelRouter
    config: dict = field(default_factory=dict)

    # --- routing -------------------------------------------------------------------------------

    def route(self, prompt: str, mode: str = "router", skip: Sequence[int] | None = None,
              tolerance: float | None = None, k: int | None = None,
              tokens: Sequence[int] | None = None) -> Route:
        """Choose the blocks to skip for `prompt` (the raw user text, not the templated one).

        mode "router" asks the router (an empty or whitespace-only prompt gets the static
        fallback set without asking it) and picks by the rules of `routing.py`: a fidelity
        router within `tolerance` (default: the bundle's), or among the sets of `k` blocks;
        "dense" skips nothing, "static" takes the bundle's static set; an explicit `skip` list
        overrides the mode. An in-model router reads `tokens` (the prompt as it will be
        prefilled; default: `prompt` as it was trained to read it) and keeps its first blocks'
        work in `Route.prefix` for `stream_generate`.
        """
        prompt = clean_text(prompt)
        policy = Policy(tolerance, k)
        if policy != Policy() and (skip is not None or mode != "router"):
            raise PuddingError("a tolerance or fixed k applies to the router, not to dense, "
                               "static or an explicit skip set")
        if skip is not None:
            s = list(check_skip(self.model, skip))
            return Route(None, "skip:" + ",".join(map(str, s)), s, reason="skip")
        if mode not in MODES:
            raise PuddingError(f"route mode must be one of {MODES}, got {mode!r}")
        if mode == "dense":
            return Route(None, "dense", [], reason="dense")
        tolerance = self.check_policy(policy)
        in_model = isinstance(self.router, InModelRouter)
        if tokens is not None and not in_model:
            tokens = None  # an encoder router reads the text
        if mode == "static" or not (prompt.strip() or tokens):
            static = self.manifest.static
            return Route(None, static.name, sorted(static.skip),
                         reason="static" if mode == "static" else "empty prompt")
        tic = time.perf_counter()
        prefix, truncated = None, False
        if in_model:
            prefix = self.router.prefix(self.router.tokens(prompt) if tokens is None
                                        else list(tokens))
            tic += prefix.seconds  # prefill work, not routing's
            scores = self.router.head(prefix.hidden)
        else:
            enc = self.router.encode([prompt])
            scores, truncated = self.router.forward(enc)[0], enc.truncated[0]
        seconds = time.perf_counter() - tic
        route = self._routed(scores, policy, tolerance, seconds, truncated)
        route.prefix = prefix if prefix is not None and len(prefix.tokens) > 1 else None
        return route

    def _routed(self, scores: np.ndarray, policy: Policy, tolerance: float | None,
                seconds: float, truncated: bool) -> Route:
        index = self.pick(scores, policy)
        fidelity = self.manifest.router.target in LOWER_IS_BETTER
        if index is None:
            return Route(None, "dense", [], scores, seconds, truncated,
                         "none within tolerance", tolerance=tolerance)
        c = self.candidates[index]
        return Route(index, c.name, sorted(c.skip), scores, seconds, truncated,
                     predicted=float(scores[index]) if fidelity else None,
                     tolerance=tolerance, k=policy.k)

    def check_policy(self, policy: Policy | None = None) -> float | None:
        """The tolerance `policy` routes with on this bundle's router (None: none applies), or a
        one-line error (a tolerance for a likelihood router, a fidelity router without one)."""
        r = self.manifest.router
        return check_policy(r.target, policy or Policy(), r.tolerance, self.sizes)

    def pick(self, scores: Sequence[float], policy: Policy | None = None) -> int | None:
        """Index (router output order) of the candidate `policy` picks from one prompt's router
        scores; None means skip nothing."""
        r = self.manifest.router
        return choose(scores, self.sizes, r.target, policy or Policy(), r.tolerance)

    @property
    def has_chat_template(self) -> bool:
        """False for a base model's tokenizer: prompts are then fed as plain text."""
        return bool(getattr(self.tokenizer, "has_chat_template", False))

    @property
    def candidates(self) -> list[Candidate]:
        """Candidate sets in the order of the router's outputs."""
        return self.manifest.ordered_candidates()

    @property
    def sizes(self) -> list[int]:
        """Blocks each candidate skips, in the order of the router's outputs."""
        return [len(c.skip) for c in self.candidates]

    # --- the model under a route ---------------------------------------------------------------

    def view(self, skip: Sequence[int] | Route) -> nn.Module:
        """The model running without the blocks `skip` (shares every weight with `model`)."""
        return skip_view(self.model, skip.skip if isinstance(skip, Route) else skip)

    def make_cache(self, skip: Sequence[int] | Route, max_kv_size: int | None = None) -> list:
        """A fresh prompt cache for the kept blocks only."""
        return make_prompt_cache(self.view(skip), max_kv_size=max_kv_size)

    def encode(self, prompt: str, chat_template: bool = True,
               system_prompt: str | None = None) -> list[int]:
        """Prompt token ids, with the chat template applied like mlx_lm.generate does; without
        one (a base model) the plain text, as `mlx_lm.generate --ignore-chat-template` would."""
        return encode_chat(self.tokenizer, prompt, chat_template, system_prompt)

    # --- generation ----------------------------------------------------------------------------

    def _prepare(self, prompt: str | list[int], route: Route | None, mode: str,
                 skip: Sequence[int] | None, chat_template: bool, system_prompt: str | None):
        tokens = (
            self.encode(prompt, chat_template, system_prompt) if isinstance(prompt, str)
            else list(prompt)
        )
        if not tokens:
            raise PuddingError("the prompt is empty (and the tokenizer has no chat template)")
        if route is None:
            route = self.route(prompt if isinstance(prompt, str) else "", mode, skip,
                               tokens=tokens)
        return route, tokens

    def stream_generate(
        self,
        prompt: str | list[int],
        max_tokens: int = 256,
        route: Route | None = None,
        mode: str = "router",
        skip: Sequence[int] | None = None,
        chat_template: bool = True,
        system_prompt: str | None = None,
        **kwargs,
    ) -> Generator[GenerationResponse, None, None]:
        """mlx_lm.stream_generate with the routed blocks skipped for prefill and decode.

        `prompt` is the user's text (routed raw, then templated) or token ids (then pass
        `route`, or it is routed as an empty prompt; an in-model router reads the ids). Other
        kwargs (sampler, prompt_cache, max_kv_size, ...) go to mlx-lm; a given prompt_cache
        must come from `make_cache(route)`. A route whose `prefix` holds these very tokens
        continues the prefill from it (into a fresh cache) instead of rerunning the first
        blocks; the prefix is used up then.
        """
        route, tokens = self._prepare(prompt, route, mode, skip, chat_template, system_prompt)
        view, prefix, cache = self.view(route), route.prefix, kwargs.get("prompt_cache")
        fresh = cache is None or not any(getattr(c, "offset", 0) for c in cache)
        if (prefix is None or prefix.tokens != tokens or not fresh
                or kwargs.get("max_kv_size") is not None):
            yield from lm_stream_generate(view, self.tokenizer, tokens, max_tokens=max_tokens,
                                          **kwargs)
            return
        route.prefix = None  # its caches become this generation's
        kwargs["prompt_cache"] = cache if cache is not None else self.make_cache(route)
        tic = time.perf_counter()
        self._continue_prefill(route, prefix, kwargs["prompt_cache"])
        seconds = prefix.seconds + time.perf_counter() - tic
        # mlx-lm prefills the last token only: report the whole prompt as it would
        for r in lm_stream_generate(view, self.tokenizer, tokens[-1:], max_tokens=max_tokens,
                                    **kwargs):
            yield dataclasses.replace(r, prompt_tokens=len(tokens),
                                      prompt_tps=len(tokens) / (seconds + 1 / r.prompt_tps))

    def prefill(self, route: Route, tokens: Sequence[int], cache: list, start: int = 0,
                check: Callable[[], None] | None = None, step: int = 2048) -> None:
        """Fill `cache` (from `make_cache(route)`, holding `tokens[:start]`) with the rest of
        `tokens` but the last, in chunks of `step` tokens as mlx-lm's generate_step does; the
        decoding goes on from the last token. A fresh cache continues from the route's
        `prefix` when it holds these very tokens (the prefix is used up then). `check` runs
        before each chunk (it may raise to stop)."""
        prefix, tokens = route.prefix, list(tokens)
        if prefix is not None and start == 0 and prefix.tokens == tokens:
            route.prefix = None
            self._continue_prefill(route, prefix, cache)
            return
        view = self.view(route)
        for i in range(start, len(tokens) - 1, step):
            if check is not None:
                check()
            view(mx.array(tokens[i:min(i + step, len(tokens) - 1)])[None], cache=cache)
            mx.eval([c.state for c in cache])

    def _continue_prefill(self, route: Route, prefix: Prefix, cache: list) -> None:
        """Fill `cache` (for `route`'s kept blocks) with the prompt but its last token: the
        first blocks' caches from `prefix`, the other kept blocks run from its hidden states."""
        p = len(prefix.cache)
        kept = [i for i in range(self.manifest.num_blocks) if i not in set(route.skip)]
        cache[:p] = prefix.cache
        run_blocks(self.model, kept[p:], cache[p:], hidden=prefix.hidden)
        mx.eval([c.state for c in cache])

    def generate(
        self,
        prompt: str | list[int],
        max_tokens: int = 256,
        route: Route | None = None,
        mode: str = "router",
        skip: Sequence[int] | None = None,
        chat_template: bool = True,
        system_prompt: str | None = None,
        **kwargs,
    ) -> str:
        """The text of `stream_generate` (mlx_lm.generate's loop, without its printing)."""
        return "".join(r.text for r in self.stream_generate(
            prompt, max_tokens, route, mode, skip, chat_template, system_prompt, **kwargs))


def rope_theta_fix(config: dict) -> dict:
    """mlx-lm overrides for a config whose RoPE bases sit only under `rope_parameters`.

    mlx-lm 0.32 reads the top-level keys and silently falls back to its defaults otherwise.
    Gemma 3 keeps one entry per attention type; mlx-lm reads the full-attention base as
    `rope_theta` and the sliding one as `rope_local_base_freq`.
    """
    params = config.get("rope_parameters")
    if not isinstance(params, dict):
        return {}
    if isinstance(params.get("full_attention"), dict):
        sources = {"rope_theta": params["full_attention"],
                   "rope_local_base_freq": params.get("sliding_attention")}
    else:
        sources = {"rope_theta": params}
    return {key: float(p["rope_theta"]) for key, p in sources.items()
            if key not in config and isinstance(p, dict) and "rope_theta" in p}


def load_lm(folder: str | Path, lazy: bool = False):
    """mlx_lm.load of an mlx-lm (or plain HF) folder, with `rope_theta_fix` applied."""
    from mlx_lm import load as lm_load

    folder = Path(folder)
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{config_path}: missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise BundleError(f"{config_path}: expected a JSON object")
    model_type = config.get("model_type")
    # mlx-lm imports `mlx_lm.models.<model_type>`: a plain name only, never a dotted path.
    if not isinstance(model_type, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", model_type):
        raise BundleError(f"{config_path}: missing or invalid model_type {model_type!r}")
    for weights in sorted(folder.glob("model*.safetensors")):
        check_safetensors(weights)
    try:
        model, tokenizer = lm_load(str(folder), model_config=rope_theta_fix(config), lazy=lazy,
                                   tokenizer_config={"trust_remote_code": False})
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise BundleError(f"{folder}: mlx-lm cannot load this model ({e})") from None
    except Exception as e:  # mlx-lm and mlx raise bare RuntimeError/TypeError/... on bad files
        raise BundleError(
            f"{folder}: mlx-lm cannot load this model ({type(e).__name__}: {e})"
        ) from e
    return model, tokenizer, config


def load(path: str | Path, router_backend: str = "auto", verify: bool = True,
         lazy: bool = False) -> PuddingModel:
    """Load a PuDDing bundle: check it, load the model with mlx-lm and the router.

    `verify` checks every file's sha256 (files are always checked to exist).
    """
    path = Path(path)
    manifest = read_manifest(path)
    verify_files(path, manifest, hashes=verify)
    model, tokenizer, config = load_lm(path / "model", lazy=lazy)
    where = path / "model"
    try:
        n = num_blocks(model)
    except PuddingError as e:
        raise BundleError(f"{where / 'config.json'}: model_type {config.get('model_type')!r}: "
                          f"{e}") from None
    if n != manifest.num_blocks:
        raise BundleError(f"{where}: model has {n} blocks but the manifest says "
                          f"{manifest.num_blocks}")
    protected = protected_blocks(model)
    for c in [*manifest.candidates, manifest.static]:
        try:
            check_skip_set(c.skip, n, protected, f"candidate {c.name!r}")
        except PuddingError as e:
            raise BundleError(f"{path / 'pudding.json'}: {e}") from None
    r = manifest.router
    if r.kind == "in-model":
        router = load_in_model_router(path, r, model, tokenizer, router_backend)
    else:
        router = load_router(path, r.outputs, r.max_length, r.pooling, router_backend,
                             r.target)
    return PuddingModel(path, manifest, model, tokenizer, router, config)

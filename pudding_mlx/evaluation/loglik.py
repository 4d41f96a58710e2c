"""Log-likelihood of continuations under an MLX model (lm-eval's `loglikelihood`, on MLX).

Requests are tokenised like the torch side (`tasks.encode_requests`: context and
continuation encoded separately, no special tokens), so both backends score the same tokens.
Requests that share a context (every choice of a question except in WinoGrande) prefill it
once into a cache of the kept blocks; the continuations are then scored on top of it as one
batch (mlx_lm.evaluate runs them one by one, each on a deep copy of the cache).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache, can_trim_prompt_cache, trim_prompt_cache

from ..errors import PuddingError
from ..tasks import TokenRequest


def _score(logits: mx.array, targets: Sequence[int]) -> tuple[mx.array, mx.array]:
    """Summed log p(target_t) from logits [T, V] in float32, and whether every target is the
    argmax."""
    logits, targets = logits.astype(mx.float32), mx.array(targets)
    lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return (mx.take_along_axis(lp, targets[:, None], axis=-1).sum(),
            mx.all(mx.argmax(logits, axis=-1) == targets))


def _batched(cache: list, n: int) -> list | None:
    """A batch of n copies of a prefilled cache, or None unless every entry is a plain KVCache
    (mlx-lm has no public cache copy; other cache kinds take the trim path)."""
    if not all(type(c) is KVCache for c in cache):
        return None
    out = []
    for c in cache:
        k, v = c.keys[..., :c.offset, :], c.values[..., :c.offset, :]
        copy = KVCache()
        copy.update_and_fetch(mx.repeat(k, n, axis=0), mx.repeat(v, n, axis=0))
        out.append(copy)
    return out


def continuation_logprobs(model: nn.Module, make_cache: Callable[[], list],
                          context: list[int], continuations: Sequence[list[int]]
                          ) -> list[tuple[float, bool]]:
    """(summed log-prob, greedy) of each continuation after `context`; the context is run once.

    Greedy: every token of the continuation is the model's argmax (lm-eval's is_greedy). The
    continuations run as one right-padded batch on copies of the context's cache (padding
    comes after every real token, so the causal mask keeps it out), or one by one with the
    cache trimmed back after each (or on a deep copy) when it cannot be batched.
    """
    cache = make_cache()
    if len(context) > 1:
        # Fill the cache without evaluating the logits (MLX is lazy), as mlx-lm's prefill does:
        # the LM head then runs at one context position, not all (Gemma's is 262k wide).
        model(mx.array(context[:-1])[None], cache=cache)
        mx.eval([c.state for c in cache])
    last = model(mx.array(context[-1:])[None], cache=cache)[0]
    scores = [_score(last, [c[0]]) for c in continuations]
    rest = [i for i, c in enumerate(continuations) if len(c) > 1]
    batch = _batched(cache, len(rest)) if len(rest) > 1 else None
    if batch is not None:
        width = max(len(continuations[i]) for i in rest) - 1
        ids = [continuations[i][:-1] + [0] * (width + 1 - len(continuations[i])) for i in rest]
        logits = model(mx.array(ids), cache=batch)
        for b, i in enumerate(rest):
            cont = continuations[i]
            s, g = _score(logits[b, :len(cont) - 1], cont[1:])
            scores[i] = (scores[i][0] + s, scores[i][1] & g)
    else:
        # A rotating cache past its window cannot be trimmed back: each continuation then
        # runs on its own deep copy (as mlx_lm.evaluate does for every request).
        trim = can_trim_prompt_cache(cache)
        for i in rest:
            cont = continuations[i]
            c = cache if trim else copy.deepcopy(cache)
            s, g = _score(model(mx.array(cont[:-1])[None], cache=c)[0], cont[1:])
            scores[i] = (scores[i][0] + s, scores[i][1] & g)
            mx.eval(scores[i])
            if trim:
                trim_prompt_cache(cache, len(cont) - 1)
    return [(s.item(), g.item()) for s, g in scores]


def loglikelihoods(model: nn.Module, make_cache: Callable[[], list],
                   token_requests: Sequence[TokenRequest],
                   max_length: int = 2048) -> list[tuple[float, bool]]:
    """(summed log-prob, greedy) of every request's continuation.

    Consecutive requests with the same context ids share one prefill. Each context is cut from
    the left so that it and its continuation fit `max_length` positions, as in the torch backend.
    """
    reqs = []
    for ctx, cont in token_requests:
        if len(cont) > max_length:
            raise PuddingError(f"a continuation of {len(cont)} tokens exceeds max_length "
                               f"{max_length}")
        reqs.append((ctx[-(max_length - len(cont) + 1):], cont))
    out: list[tuple[float, bool]] = []
    i = 0
    while i < len(reqs):
        j = i
        while j < len(reqs) and reqs[j][0] == reqs[i][0]:
            j += 1
        out += continuation_logprobs(model, make_cache, reqs[i][0], [c for _, c in reqs[i:j]])
        i = j
    return out


def score_requests(model: nn.Module, make_cache: Callable[[], list],
                   token_requests: Sequence[TokenRequest],
                   max_length: int = 2048) -> tuple[list[float], list[int]]:
    """(summed log-prob, token count) of every request's continuation (see `loglikelihoods`)."""
    out = loglikelihoods(model, make_cache, token_requests, max_length)
    return [s for s, _ in out], [len(cont) for _, cont in token_requests]

"""Log-likelihood of continuations under an MLX model (lm-eval's `loglikelihood`, on MLX).

Requests are tokenised like the torch side (`convert.scoring.encode_requests`: context and
continuation encoded separately, no special tokens), so both backends score the same tokens.
Requests that share a context (every choice of a question except in WinoGrande) prefill it
once into a cache of the kept blocks; the continuations are then scored on top of it as one
batch (mlx_lm.evaluate runs them one by one, each on a deep copy of the cache).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache, can_trim_prompt_cache, trim_prompt_cache

from .errors import PuddingError

TokenRequest = tuple[list[int], list[int]]


def encode_requests(tokenizer, requests: Sequence[tuple[str, str]]) -> list[TokenRequest]:
    """Token ids (context, continuation) per request, exactly as the torch backend makes them."""
    from convert.scoring import encode_requests as encode

    return encode(tokenizer, requests)


def _token_logprobs(logits: mx.array, targets: Sequence[int]) -> mx.array:
    """log p(target_t) from logits [T, V], in float32."""
    logits = logits.astype(mx.float32)
    lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return mx.take_along_axis(lp, mx.array(targets)[:, None], axis=-1)[:, 0]


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
                          context: list[int], continuations: Sequence[list[int]]) -> list[float]:
    """Summed log-prob of each continuation after `context`; the context is run once.

    The continuations then run as one right-padded batch on copies of the context's cache
    (padding comes after every real token, so the causal mask keeps it out), or one by one
    with the cache trimmed back after each when the cache cannot be copied.
    """
    cache = make_cache()
    last = model(mx.array(context)[None], cache=cache)[0, -1:]
    totals = [_token_logprobs(last, [c[0]])[0] for c in continuations]
    rest = [i for i, c in enumerate(continuations) if len(c) > 1]
    batch = _batched(cache, len(rest)) if len(rest) > 1 else None
    if batch is not None:
        width = max(len(continuations[i]) for i in rest) - 1
        ids = [continuations[i][:-1] + [0] * (width + 1 - len(continuations[i])) for i in rest]
        logits = model(mx.array(ids), cache=batch)
        for b, i in enumerate(rest):
            cont = continuations[i]
            totals[i] = totals[i] + _token_logprobs(logits[b, :len(cont) - 1], cont[1:]).sum()
    else:
        if not can_trim_prompt_cache(cache):
            raise PuddingError("this model's cache can neither be copied nor trimmed; cannot "
                               "share the context between continuations")
        for i in rest:
            cont = continuations[i]
            logits = model(mx.array(cont[:-1])[None], cache=cache)[0]
            totals[i] = totals[i] + _token_logprobs(logits, cont[1:]).sum()
            mx.eval(totals[i])
            trim_prompt_cache(cache, len(cont) - 1)
    return [t.item() for t in totals]


def score_requests(model: nn.Module, make_cache: Callable[[], list],
                   token_requests: Sequence[TokenRequest],
                   max_length: int = 2048) -> tuple[list[float], list[int]]:
    """(summed log-prob, token count) of every request's continuation.

    Consecutive requests with the same context ids share one prefill. Each context is cut from
    the left so that it and its continuation fit `max_length` positions, as in the torch backend.
    """
    reqs = []
    for ctx, cont in token_requests:
        if len(cont) > max_length:
            raise PuddingError(f"a continuation of {len(cont)} tokens exceeds max_length "
                               f"{max_length}")
        reqs.append((ctx[-(max_length - len(cont) + 1):], cont))
    sums: list[float] = []
    i = 0
    while i < len(reqs):
        j = i
        while j < len(reqs) and reqs[j][0] == reqs[i][0]:
            j += 1
        sums += continuation_logprobs(model, make_cache, reqs[i][0], [c for _, c in reqs[i:j]])
        i = j
    return sums, [len(c) for _, c in reqs]

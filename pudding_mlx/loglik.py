"""Log-likelihood of continuations under an MLX model (lm-eval's `loglikelihood`, on MLX).

Requests are tokenised like the torch side (`convert.scoring.encode_requests`: context and
continuation encoded separately, no special tokens), so both backends score the same tokens.
Requests that share a context (every choice of a question except in WinoGrande) prefill it
once into a cache of the kept blocks; each continuation is then fed on top of it and the cache
is trimmed back to the context. mlx_lm.evaluate instead re-runs the shared prefix per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

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


def continuation_logprobs(model: nn.Module, make_cache: Callable[[], list],
                          context: list[int], continuations: Sequence[list[int]]) -> list[float]:
    """Summed log-prob of each continuation after `context`; the context is run once."""
    cache = make_cache()
    if not can_trim_prompt_cache(cache):
        raise PuddingError("this model's cache cannot be trimmed; cannot share the context")
    last = model(mx.array(context)[None], cache=cache)[0, -1:]
    first = last.astype(mx.float32) - mx.logsumexp(last.astype(mx.float32), axis=-1)
    out = []
    for cont in continuations:
        total = first[0, cont[0]]
        if len(cont) > 1:
            logits = model(mx.array(cont[:-1])[None], cache=cache)[0]
            total = total + _token_logprobs(logits, cont[1:]).sum()
        out.append(total.item())
        trim_prompt_cache(cache, len(cont) - 1)
    return out


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

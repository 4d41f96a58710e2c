"""Forwards over the kept blocks for mlx-lm models whose own forward ties a block's attention
to its position in the block list.

mlx-lm's gemma3_text picks each block's mask by loop index (`i % sliding_window_pattern`) and
builds the masks from `cache[0]` and `cache[pattern - 1]`, so running it over a shorter block
list gives kept blocks the wrong attention. Here each kept block gets the mask of its own type
(mlx-lm sets `self_attn.is_sliding` from the block's original index), built from the cache of
a kept block of that type; everything else is mlx-lm's forward, line for line. The caches come
from the model's own `make_cache`, picked by original index (`SkipView`), so sliding blocks
keep a RotatingKVCache of the window's size.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask

Forward = Callable[..., mx.array]


def gemma3_text(model: nn.Module, blocks: list, inputs: mx.array, cache: list | None = None,
                input_embeddings: mx.array | None = None) -> mx.array:
    """mlx_lm.models.gemma3_text.Model.__call__ running `blocks` (the kept ones, in order)."""
    inner = model.model
    h = inner.embed_tokens(inputs) if input_embeddings is None else input_embeddings
    h = h * mx.array(inner.args.hidden_size**0.5, mx.bfloat16).astype(h.dtype)
    if cache is None:
        cache = [None] * len(blocks)
    sliding = [block.self_attn.is_sliding for block in blocks]
    masks: dict[bool, object] = {}
    for s, c in zip(sliding, cache, strict=True):
        if s not in masks:
            masks[s] = create_attention_mask(h, c, window_size=inner.window_size if s else None)
    for block, c, s in zip(blocks, cache, sliding, strict=True):
        h = block(h, masks[s], c)
    out = inner.norm(h)
    return inner.embed_tokens.as_linear(out) if model.tie_word_embeddings else model.lm_head(out)


# Keyed by the mlx-lm model module (the config's model_type after mlx-lm's remapping).
FORWARDS: dict[str, Forward] = {"gemma3_text": gemma3_text}


def arch_forward(model: nn.Module) -> Forward | None:
    """pudding's forward over kept blocks for `model`, or None to run mlx-lm's own."""
    module = type(model).__module__
    prefix = "mlx_lm.models."
    return FORWARDS.get(module[len(prefix):]) if module.startswith(prefix) else None

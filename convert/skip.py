"""Skipping decoder blocks of an HF causal LM in torch: a skipped block is the identity."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager

from pudding_mlx.bundle import check_skip_set
from pudding_mlx.errors import PuddingError


def decoder_layers(model):
    """The decoder block list (`model.model.layers`) of an HF causal LM."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise PuddingError(f"{type(model).__name__}: no model.layers list; only decoder-only HF "
                           "causal LMs with a model.layers block list are supported")
    return layers


@contextmanager
def skipped(model, skip: Iterable[int]):
    """Run `model` with the blocks in `skip` removed (0-based). Use with use_cache=False: the
    kept blocks keep their own layer_idx, so an HF KV cache would be indexed wrongly."""
    import torch

    layers = decoder_layers(model)
    skip = set(check_skip_set(skip, len(layers)))
    # HF forwards pick each layer's mask (Gemma 3: and RoPE) by index in config.layer_types.
    config = model.model.config
    types = getattr(config, "layer_types", None)
    model.model.layers = torch.nn.ModuleList(b for i, b in enumerate(layers) if i not in skip)
    if isinstance(types, list) and len(types) == len(layers):
        config.layer_types = [t for i, t in enumerate(types) if i not in skip]
    try:
        yield model
    finally:
        model.model.layers = layers
        if isinstance(types, list):
            config.layer_types = types

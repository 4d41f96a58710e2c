"""The in-model router: a linear head on the LLM's own hidden state after its first blocks.

Every candidate keeps blocks 0..p-1 (the manifest checks it), so one prefill serves routing
and generation: those blocks run once over the prompt, their output is mean-pooled over every
token but the last (which generation feeds one step later), the head scores each candidate,
and the prefill goes on from the same hidden states and caches through the chosen set's
remaining blocks (`PuddingModel.stream_generate`). Routing's own cost is the pooling and one
[C, D] matmul; a separate encoder (router.py) costs a sixth of a 135M model.

router/ holds router_config.json (RouterConfig, kind "in-model") and model.safetensors with
head.weight [C, D], head.bias [C] and head.center [D]: scores = weight @ (pooled - center)
+ bias (the training's feature scale is folded into the weight).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from .bundle import RouterConfig, RouterInfo
from .errors import BundleError, PuddingError
from .masking import check_split, run_blocks
from .prompts import encode_chat, pooled_tokens
from .router import check_router_config, read_weights


@dataclass
class Prefix:
    """The first blocks' work on one prompt, which the prefill continues from."""

    tokens: list[int]  # the whole prompt
    hidden: mx.array  # [1, len(tokens) - 1, D]: after the first blocks, before the final norm
    cache: list  # one cache per first block, at offset len(tokens) - 1
    seconds: float  # time to run the first blocks


class InModelRouter:
    """Scores each candidate from the LLM's pooled hidden state after `blocks` blocks."""

    backend = "mlx"
    kind = "in-model"
    max_length = None  # it reads the whole prompt: the prefill runs over all of it anyway

    def __init__(self, folder: Path, config: RouterConfig, model: nn.Module, tokenizer):
        self.folder = Path(folder)
        self.outputs = list(config.outputs)
        self.blocks = config.blocks
        self.inputs = config.inputs
        self.chat_template = config.chat_template
        self.model, self.tokenizer = model, tokenizer
        path = self.folder / "model.safetensors"
        weights = read_weights(path)
        w, b, c = (weights.get(f"head.{k}") for k in ("weight", "bias", "center"))
        hidden = getattr(getattr(model, "args", None), "hidden_size", None)
        if (w is None or b is None or c is None or w.ndim != 2 or b.shape != (w.shape[0],)
                or c.shape != (w.shape[1],)):
            raise BundleError(f"{path}: expected head.weight [C, D], head.bias [C] and "
                              "head.center [D]")
        if w.shape[0] != len(self.outputs):
            raise BundleError(f"{path}: router head has {w.shape[0]} outputs but the manifest "
                              f"lists {len(self.outputs)} candidates")
        if hidden is not None and w.shape[1] != hidden:
            raise BundleError(f"{path}: router head reads {w.shape[1]} features but the model's "
                              f"hidden size is {hidden}")
        self.weight, self.bias, self.center = (a.astype(mx.float32) for a in (w, b, c))
        # now, on this thread's stream: `pudding serve` routes on its worker thread, and MLX
        # cannot run there a lazy array made on another thread
        mx.eval(self.weight, self.bias, self.center)

    def tokens(self, text: str) -> list[int]:
        """The token ids the router reads for `text` (what it was trained on)."""
        return encode_chat(self.tokenizer, text, self.chat_template)

    def prefix(self, tokens: Sequence[int]) -> Prefix:
        """Run the first blocks over `tokens` but the last, with fresh caches."""
        tic = time.perf_counter()
        cache = make_prompt_cache(self.model)[: self.blocks]
        ids = mx.array(pooled_tokens(tokens))[None]
        hidden = run_blocks(self.model, range(self.blocks), cache, inputs=ids)
        mx.eval(hidden, [c.state for c in cache])
        return Prefix(list(tokens), hidden, cache, time.perf_counter() - tic)

    def head(self, hidden: mx.array) -> np.ndarray:
        """Scores [num_outputs] from hidden states [1, L, D]: mean-pooled, then the head."""
        pooled = hidden[0].astype(mx.float32).mean(axis=0)
        return np.array(self.weight @ (pooled - self.center) + self.bias)

    def scores(self, text: str) -> np.ndarray:
        """Scores [num_outputs] of one prompt."""
        return self.head(self.prefix(self.tokens(text)).hidden)

    def scores_batch(self, texts: list[str]) -> np.ndarray:
        """Scores [n, num_outputs], one prompt at a time (no padding to get wrong)."""
        return np.stack([self.scores(t) for t in texts])


def load_in_model_router(bundle: Path, info: RouterInfo, model: nn.Module, tokenizer,
                         backend: str = "auto") -> InModelRouter:
    """The bundle's in-model router over the loaded LLM; router/ must match the manifest."""
    if backend == "coreml":
        raise PuddingError("an in-model router runs in MLX with the LLM (its router.mlpackage "
                           "is the head alone, for apps); use --router-backend mlx or auto")
    folder = Path(bundle) / "router"
    rc = check_router_config(folder, info.outputs, info.max_length, info.pooling, info.target)
    if (rc.kind, rc.blocks) != (info.kind, info.blocks):
        raise BundleError(f"{folder}: router kind {rc.kind!r} over {rc.blocks} blocks differs "
                          f"from the manifest's {info.kind!r} over {info.blocks}")
    try:
        check_split(model)
    except PuddingError as e:
        raise BundleError(f"{folder}: {e}") from None
    return InModelRouter(folder, rc, model, tokenizer)

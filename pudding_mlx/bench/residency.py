"""Keep only the blocks of recently used skip sets in memory (`pudding bench --memory-budget`).

A block leaves memory by getting its parameters back as lazy arrays on the model's
safetensors files (mx.load reads nothing until an array is evaluated); the evaluated arrays
are dropped, and the block is read again from disk the next time a request uses it. Works on
a model loaded with mlx-lm as stored (no quantization or dtype change at load time).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import PuddingError
from ..masking import layer_owner


class Residency:
    """Blocks of the most recently used sets stay resident while they fit `budget` bytes."""

    def __init__(self, model: nn.Module, folder: str | Path, budget: float):
        self.blocks = layer_owner(model).layers
        self.prefix = "model.layers." if layer_owner(model) is not model else "layers."
        self.files = sorted(Path(folder).glob("*.safetensors"))
        if not self.files:
            raise PuddingError(f"{folder}: no *.safetensors files to read blocks back from")
        self.budget = budget
        self.recent: list[tuple[int, ...]] = []  # kept blocks of each set, most recent first
        self.evicted: set[int] = set()

    def block_bytes(self, i: int) -> int:
        return sum(v.nbytes for _, v in tree_flatten(self.blocks[i].parameters()))

    def use(self, skip: Sequence[int]) -> list[int]:
        """Note a request that skips `skip`; evict what no longer fits. Returns evicted blocks."""
        skipped = set(skip)
        kept = tuple(i for i in range(len(self.blocks)) if i not in skipped)
        self.recent = [kept, *[k for k in self.recent if k != kept]]
        resident: set[int] = set()
        for k in self.recent:
            grown = resident | set(k)
            if resident and sum(map(self.block_bytes, grown)) > self.budget:
                break
            resident = grown
        if sum(map(self.block_bytes, resident)) > self.budget:
            raise PuddingError(f"--memory-budget {self.budget / 1e9:.3f} GB is smaller than one "
                               "set's kept blocks")
        self.recent = [k for k in self.recent if set(k) <= resident]
        out = [i for i in range(len(self.blocks)) if i not in resident and i not in self.evicted]
        self._evict(out)
        self.evicted = (self.evicted | set(out)) - resident
        return out

    def _evict(self, blocks: list[int]) -> None:
        if not blocks:
            return
        lazy = {}
        for f in self.files:
            lazy.update(mx.load(str(f)))
        for i in blocks:
            pre = f"{self.prefix}{i}."
            new = {k[len(pre):]: v for k, v in lazy.items() if k.startswith(pre)}
            old = dict(tree_flatten(self.blocks[i].parameters()))
            if {k: (v.shape, v.dtype) for k, v in new.items()} != {
                    k: (v.shape, v.dtype) for k, v in old.items()}:
                raise PuddingError(f"{self.files[0].parent}: block {i} on disk differs from the "
                                   "loaded one (converted at load time?); cannot evict it")
            self.blocks[i].update(tree_unflatten(list(new.items())))

"""A decode batch whose rows skip different blocks (the continuous batching of `pudding serve`).

Each block has a lane: the rows whose route keeps the block, and one mlx-lm `BatchKVCache` over
just those rows (left-padded, so rows of different lengths share it). A decode step runs the
model's own forward (`masking.running`) with its block list replaced by the lanes: each lane
gathers its rows, runs its block over them with the mask of its own cache and scatters the
result back, so a row that skips the block keeps its hidden state (the identity on the
residual stream). Embedding, final norm and head are the model's. A row's caches hold its kept
blocks only, as in single-request generation: it joins with the caches of its own prefill and
leaves with them.

A model whose forward cannot run block by block (Gemma 3 picks each block's mask by its index)
decodes one request at a time instead (`OneRow`, with `decode_concurrency` 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import BatchKVCache, KVCache

from ..errors import PuddingError
from ..masking import check_split, layer_owner, running, skip_view


class Lane:
    """One block over the rows that keep it, called by the forward in the block's place."""

    def __init__(self, block: nn.Module):
        self.block = block
        self.rows: list[int] = []  # positions in the batch, ascending
        self.cache: BatchKVCache | None = None
        self.index: mx.array | None = None  # `rows`, unless they are the whole batch

    def __getattr__(self, name: str):
        # the forward may read a block's attributes (llama's `use_sliding`)
        return getattr(self.__dict__["block"], name)

    def __call__(self, h: mx.array, mask, cache: BatchKVCache) -> mx.array:
        # The forward's mask comes from another lane's cache, whose padding differs.
        if self.index is None:
            return self.block(h, create_attention_mask(h, cache), cache=cache)
        rows = h[self.index]
        h[self.index] = self.block(rows, create_attention_mask(rows, cache), cache=cache)
        return h


def batchable(model: nn.Module) -> bool:
    """Whether `RoutedBatch` can decode this model (its forward runs over any block list)."""
    try:
        check_split(model)
    except PuddingError:
        return False
    return True


def decode_batch(model: nn.Module) -> RoutedBatch | OneRow:
    return RoutedBatch(model) if batchable(model) else OneRow(model)


class OneRow:
    """The decode batch of a model that cannot run block by block: one row, decoded through
    its route's skip view with its own caches (of any kind, e.g. Gemma 3's rotating ones)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.row: tuple[nn.Module, list] | None = None

    def __len__(self) -> int:
        return 0 if self.row is None else 1

    def add(self, skip: Sequence[int], cache: list) -> None:
        if self.row is not None:
            raise PuddingError("this model decodes one request at a time")
        self.row = (skip_view(self.model, skip), cache)

    def remove(self, row: int, keep_cache: bool = False) -> list | None:
        _, cache = self.row
        self.row = None
        return cache if keep_cache else None

    def step(self, tokens: Sequence[int]) -> mx.array:
        view, cache = self.row
        return view(mx.array(tokens)[:, None], cache=cache)[:, -1]


class RoutedBatch:
    """Rows decoded together, each without its own skipped blocks."""

    def __init__(self, model: nn.Module):
        check_split(model)  # the lanes run through the model's forward, masks per lane
        self.model = model
        self.lanes = [Lane(block) for block in layer_owner(model).layers]
        self.skips: list[tuple[int, ...]] = []  # each row's skipped blocks

    def __len__(self) -> int:
        return len(self.skips)

    def add(self, skip: Sequence[int], cache: list) -> None:
        """Append a row that skips `skip`; `cache` (one KVCache per kept block, as
        `PuddingModel.make_cache` makes them) holds its tokens so far."""
        skip = tuple(sorted(skip))
        kept = [lane for i, lane in enumerate(self.lanes) if i not in skip]
        if len(cache) != len(kept) or any(type(c) is not KVCache for c in cache):
            raise PuddingError("a batched row needs one plain KVCache per kept block")
        row = len(self.skips)
        for lane, c in zip(kept, cache, strict=True):
            one = BatchKVCache.merge([c])
            if lane.cache is None:
                lane.cache = one
            else:
                lane.cache.extend(one)
            lane.rows.append(row)
        self.skips.append(skip)
        self._index()

    def remove(self, row: int, keep_cache: bool = False) -> list | None:
        """Drop `row`; with `keep_cache`, return its caches (one KVCache per kept block)."""
        caches = []
        for lane in self.lanes:
            if row in lane.rows:
                k = lane.rows.index(row)
                if keep_cache:
                    caches.append(lane.cache.extract(k))
                others = [m for m in range(len(lane.rows)) if m != k]
                if others:
                    lane.cache.filter(mx.array(others))
                else:
                    lane.cache = None
            lane.rows = [r - (r > row) for r in lane.rows if r != row]
        del self.skips[row]
        self._index()
        if not keep_cache:
            return None
        mx.eval([c.state for c in caches])  # a lazy slice would keep the batch's cache alive
        return caches

    def _index(self) -> None:
        for lane in self.lanes:
            whole = len(lane.rows) == len(self.skips)
            lane.index = None if whole or not lane.rows else mx.array(lane.rows)

    def step(self, tokens: Sequence[int]) -> mx.array:
        """Logits [B, V] after feeding one token per row (in row order)."""
        lanes = [lane for lane in self.lanes if lane.rows]
        with running(self.model, lanes):
            logits = self.model(mx.array(tokens)[:, None], cache=[lane.cache for lane in lanes])
        return logits[:, -1]

"""KV caches kept between requests, so that the next turn of a chat prefills only its new tokens.

An entry is (skip set, tokens, mlx-lm prompt cache holding exactly those tokens). A request
continues from the entry with the same skip set that shares the longest token prefix with it;
a request under another skip set finds nothing and prefills everything under its own mask.
Entries are bounded by their total size in bytes; the least recently used go first. Like
mlx_lm.server's LRUPromptCache, an entry that is only partly reused is copied and trimmed, and
an entry whose tokens all lead the request is handed over whole.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache


@dataclass
class Entry:
    skip: tuple[int, ...]
    tokens: list[int]
    cache: list

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.cache)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else n


class PromptCache:
    """An LRU of prompt caches, at most `max_bytes` in all (0 keeps nothing)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: list[Entry] = []  # least recently used first

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def fetch(self, skip: Sequence[int], tokens: Sequence[int]) -> tuple[list | None, int]:
        """A cache holding the longest stored prefix of `tokens` under `skip`, and its length.

        The prefix is at most len(tokens) - 1 (mlx-lm needs one token to prefill); (None, 0)
        when nothing is reusable. The caller owns the returned cache.
        """
        skip = tuple(skip)
        best, length = None, 0
        for entry in self.entries:
            n = common_prefix(entry.tokens, tokens) if entry.skip == skip else 0
            if n > length:
                best, length = entry, n
        length = min(length, len(tokens) - 1)
        if best is None or length < 1:
            return None, 0
        self.entries.remove(best)
        if length == len(best.tokens):
            return best.cache, length
        self.entries.append(best)
        if not can_trim_prompt_cache(best.cache):
            return None, 0
        cache = copy.deepcopy(best.cache)
        trim_prompt_cache(cache, len(best.tokens) - length)
        return cache, length

    def store(self, skip: Sequence[int], tokens: Sequence[int], cache: list) -> None:
        """Keep `cache`, which holds exactly `tokens`; drop entries it makes redundant (its
        prefixes, when it can be trimmed to them) and the least recently used beyond the budget."""
        skip, tokens = tuple(skip), list(tokens)
        trimmable = can_trim_prompt_cache(cache)

        def redundant(e: Entry) -> bool:
            return (e.skip == skip and common_prefix(e.tokens, tokens) == len(e.tokens)
                    and (trimmable or len(e.tokens) == len(tokens)))

        self.entries = [e for e in self.entries if not redundant(e)]
        self.entries.append(Entry(skip, tokens, cache))
        while self.entries and self.nbytes > self.max_bytes:
            self.entries.pop(0)

"""Run an mlx-lm model with some of its blocks skipped, without copying any weight.

A skipped block is the identity on the residual stream. `SkipView` presents the base model
with `model.layers` temporarily shortened to the kept blocks (the very same block objects), so
mlx-lm's forward, `make_prompt_cache`, `generate_step` and `stream_generate` work unchanged and
make caches only for the kept blocks.

mlx-lm models build the attention mask from one block's cache: `cache[0]`, or `cache[self.X]`
for an index attribute X such as `fa_idx` / `swa_idx`. Those blocks are protected (no skip set
may contain them) and their indices are remapped into the shortened list while the view runs.

A forward that ties a block's behaviour to its position in the list (`enumerate(self.layers)`,
a per-block list zipped with it, a computed cache index) would give kept blocks the wrong
attention in a shortened list. Such models run through their forward in `arch` (Gemma 3), or
are refused.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import cache

import mlx.core as mx
import mlx.nn as nn

from .arch import arch_forward
from .bundle import check_skip_set
from .errors import PuddingError

_CACHE_INDEX = re.compile(r"cache\[self\.(\w+)\]")
_POSITIONAL = re.compile(
    r"enumerate\(\s*(?:zip\(\s*)?self\.(?:pipeline_)?layers\b"  # a block's loop index
    r"|zip\(\s*self\.(?:pipeline_)?layers\s*,(?!\s*cache\s*\))"  # zipped with a per-block list
    r"|self\.layers\s*\["  # a block picked by index
    r"|cache\[(?!(?:0|-1|self\.\w+)\])[^\]\n]*\]"  # a cache picked by a computed index
)


def layer_owner(model: nn.Module) -> nn.Module:
    """The module whose `layers` attribute is the list of transformer blocks; refuses a model
    whose forward depends on block positions unless `arch` has a forward for it."""
    for owner in (getattr(model, "model", None), model):
        if isinstance(owner, nn.Module) and isinstance(owner.get("layers"), list):
            where = _positional_use(type(owner))
            if where and arch_forward(model) is None:
                raise PuddingError(
                    f"{type(model).__module__}.{type(model).__name__}: "
                    f"{type(owner).__name__}.__call__ ties each block's behaviour to its "
                    f"position in the block list (`{where}`), so skipping blocks would change "
                    "the kept ones; pudding has no forward for this architecture"
                )
            return owner
    raise PuddingError(
        f"{type(model).__module__}.{type(model).__name__} has no `model.layers` list of "
        "blocks; block skipping needs an mlx-lm model built that way"
    )


def num_blocks(model: nn.Module) -> int:
    return len(layer_owner(model).layers)


@cache
def _mask_index_attrs(cls: type) -> tuple[tuple[str, ...], bool]:
    """(attributes X used as `cache[self.X]`, whether `cache[0]` is used) in cls's forward."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return (), True
    return tuple(dict.fromkeys(_CACHE_INDEX.findall(source))), "cache[0]" in source


@cache
def _positional_use(cls: type) -> str | None:
    """Where cls's forward ties a block's behaviour to its position in the list, if it does."""
    try:
        source = inspect.getsource(cls.__call__)
    except (AttributeError, OSError, TypeError):
        return None
    found = _POSITIONAL.search(source)
    return " ".join(found.group().split()) if found else None


def protected_blocks(model: nn.Module) -> set[int]:
    """The blocks whose cache the model's mask code reads; no skip set may contain them."""
    owner = layer_owner(model)
    if arch_forward(model) is not None:  # masks come from any kept block of the right type
        return set()
    attrs, uses_first = _mask_index_attrs(type(owner))
    blocks = {0} if uses_first else set()
    for name in attrs:
        value = getattr(owner, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            blocks.add(value)
    return blocks


def check_skip(model: nn.Module, skip: Iterable[int]) -> tuple[int, ...]:
    """`bundle.check_skip_set` for this model's blocks and protected blocks; returns it sorted."""
    return check_skip_set(skip, num_blocks(model), protected_blocks(model))


class SkipView(nn.Module):
    """The base model running only its kept blocks; shares every array with it.

    Call it like the base model (`view(tokens, cache=cache)`); `view.layers` are the kept
    blocks, and `make_prompt_cache(view)` gives one cache per kept block. The base model is
    only altered for the duration of each call, so don't run two views of one model at once
    from different threads.
    """

    def __init__(self, model: nn.Module, skip: Iterable[int]):
        super().__init__()
        self.base = model
        skip = check_skip(model, skip)
        owner = layer_owner(model)
        kept = tuple(i for i in range(len(owner.layers)) if i not in set(skip))
        # Plain attributes, outside the module tree: its only child is `base`.
        object.__setattr__(self, "skip", skip)
        object.__setattr__(self, "kept", kept)
        object.__setattr__(self, "_owner", owner)
        object.__setattr__(self, "_blocks", [owner.layers[i] for i in self.kept])
        # Models whose forward depends on block positions run the kept blocks through their
        # `arch` forward; the others through mlx-lm's own, over a temporarily shortened list.
        object.__setattr__(self, "arch_forward", arch_forward(model))
        position = {b: j for j, b in enumerate(kept)}
        attrs = _mask_index_attrs(type(owner))[0] if self.arch_forward is None else ()
        object.__setattr__(self, "_indices", {
            name: position[getattr(owner, name)]
            for name in attrs
            if isinstance(getattr(owner, name, None), int)
        })
        if hasattr(model, "make_cache"):
            # Only then: make_prompt_cache honours max_kv_size when a model has no make_cache.
            object.__setattr__(self, "make_cache", self._kept_caches)

    @property
    def layers(self) -> list:
        return self._blocks

    def _kept_caches(self) -> list:
        full = self.base.make_cache()
        if len(full) != len(self._owner.layers):
            raise PuddingError(
                f"{type(self.base).__name__}.make_cache() gave {len(full)} caches for "
                f"{len(self._owner.layers)} blocks; cannot pick the kept blocks' caches"
            )
        return [full[i] for i in self.kept]

    @contextmanager
    def active(self) -> Iterator[None]:
        """Within this context the base model itself runs only the kept blocks (not for a
        model with an `arch_forward`: its own forward would give them the wrong attention)."""
        if self.arch_forward is not None:
            raise PuddingError(f"{type(self.base).__name__} runs its kept blocks through "
                               "pudding_mlx.arch; call the view instead")
        owner = self._owner
        saved_layers = owner.layers
        saved = {name: getattr(owner, name) for name in self._indices}
        owner.layers = self._blocks
        for name, value in self._indices.items():
            setattr(owner, name, value)
        try:
            yield
        finally:
            owner.layers = saved_layers
            for name, value in saved.items():
                setattr(owner, name, value)

    def __call__(self, *args, **kwargs):
        if self.arch_forward is not None:
            return self.arch_forward(self.base, self._blocks, *args, **kwargs)
        with self.active():
            return self.base(*args, **kwargs)


def skip_view(model: nn.Module, skip: Iterable[int]) -> nn.Module:
    """`model` itself when nothing is skipped, else a `SkipView`."""
    skip = list(skip)
    if not skip:
        layer_owner(model)
        return model
    return SkipView(model, skip)


def check_split(model: nn.Module) -> None:
    """Refuse a model whose forward cannot be split after any block (`run_blocks`): one with an
    `arch` forward, no final `norm`, or a mask built from another cache than the first block's."""
    owner = layer_owner(model)
    name = f"{type(model).__module__}.{type(model).__name__}"
    if arch_forward(model) is not None or not isinstance(owner.get("norm"), nn.Module):
        raise PuddingError(f"{name}: its forward cannot be split after a block, which an "
                           "in-model router needs; use an encoder router")
    if protected_blocks(model) - {0}:
        raise PuddingError(f"{name}: its attention mask reads the cache of block(s) "
                           f"{sorted(protected_blocks(model) - {0})}; an in-model router needs "
                           "masks built from the first block's cache")


@contextmanager
def running(model: nn.Module, layers: list, final_norm: bool = True) -> Iterator[nn.Module]:
    """Within this context the model's own forward runs `layers` (blocks, or callables taking
    a block's arguments) in place of its block list, building its mask from the first cache
    of the list (`check_split` refuses models where that does not hold); without
    `final_norm` it returns the hidden states before the final norm. Yields the owner of
    the block list (the forward that takes `input_embeddings`)."""
    check_split(model)
    owner = layer_owner(model)
    saved_layers, saved_norm = owner.layers, owner.norm
    attrs = [a for a in _mask_index_attrs(type(owner))[0]
             if isinstance(getattr(owner, a, None), int)]
    saved = {a: getattr(owner, a) for a in attrs}
    owner.layers = layers
    if not final_norm:
        owner.norm = nn.Identity()
    for a in attrs:
        setattr(owner, a, 0)
    try:
        yield owner
    finally:
        owner.layers, owner.norm = saved_layers, saved_norm
        for a, value in saved.items():
            setattr(owner, a, value)


def run_blocks(model: nn.Module, blocks: Sequence[int], cache: list,
               inputs: mx.array | None = None, hidden: mx.array | None = None) -> mx.array:
    """Hidden states before the final norm after the blocks `blocks` (original indices, in
    order), over token ids `inputs` [B, L] (through the embedding) or over `hidden` [B, L, D],
    the output of the blocks before them; `cache` has one entry per block.

    mlx-lm's own forward runs, over the shortened block list and with its final norm as the
    identity (`running`). The mask comes from the first cache of the list, whose offset every
    block of a prefill shares.
    """
    layers = layer_owner(model).layers
    with running(model, [layers[i] for i in blocks], final_norm=False) as owner:
        return owner(inputs, cache=cache, input_embeddings=hidden)

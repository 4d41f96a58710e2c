"""Timed requests for `pudding bench`: prompts, one request of each kind, interleaved trials,
and pudding's own work around mlx-lm timed alone.

The method follows mlx_lm.benchmark: random prompt tokens (or a real text), EOS disabled,
warm-up, then N trials. The kinds of request being compared run interleaved (dense, routed,
dense, routed, ...) so that a machine getting busier or cooler during the run biases neither
side. mlx-lm's own benchmark script cannot be reused as a function (it is a main() that loads
the model itself), so its loop is restated here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import PuddingError

if TYPE_CHECKING:
    from ..model import PuddingModel, Route


@dataclass
class Trial:
    """One timed request. For "routed", router time is included in ttft_s and total_s."""

    kind: str  # "dense" (pudding, nothing skipped), "routed", or "mlx-lm" (plain mlx_lm)
    prompt_tokens: int
    gen_tokens: int
    router_s: float
    ttft_s: float  # call to first token
    total_s: float  # call to last token
    prompt_tps: float  # as mlx-lm reports it (prefill only)
    peak_memory_gb: float
    cpu_s: float = 0.0  # CPU time of this process during the request (all threads)

    @property
    def decode_tps(self) -> float:
        """Tokens after the first, per second of decoding."""
        return (self.gen_tokens - 1) / (self.total_s - self.ttft_s)


def make_prompt(tokenizer, length: int, seed: int, text: str | None = None) -> list[int]:
    """`length` token ids: uniform random ids like mlx_lm.benchmark, or `text` repeated."""
    import mlx.core as mx

    if text is None:
        mx.random.seed(seed)
        return mx.random.randint(0, tokenizer.vocab_size, (length,)).tolist()
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if not ids:
        raise PuddingError("--prompt-file: the file has no tokens")
    return (ids * (length // len(ids) + 1))[:length]


def run_request(pm: PuddingModel, kind: str, tokens: list[int], text: str, max_tokens: int,
                route_mode: str = "router", skip: Sequence[int] | None = None,
                tolerance: float | None = None) -> Trial:
    """Time one request of `kind`; routed requests route `text` first (timed)."""
    import mlx.core as mx
    from mlx_lm.generate import stream_generate as lm_stream_generate

    mx.reset_peak_memory()
    cpu = time.process_time()
    tic = time.perf_counter()
    router_s = 0.0
    if kind == "mlx-lm":
        stream = lm_stream_generate(pm.model, pm.tokenizer, tokens, max_tokens=max_tokens)
    else:
        route = (pm.route(text, "dense") if kind == "dense"
                 else pm.route(text, route_mode, skip, tolerance, tokens=tokens))
        router_s = route.seconds
        stream = pm.stream_generate(tokens, max_tokens=max_tokens, route=route)
    response = next(stream)
    ttft = time.perf_counter() - tic
    for response in stream:  # noqa: B007 (the last response is used below)
        pass
    total = time.perf_counter() - tic
    cpu = time.process_time() - cpu
    if response.generation_tokens != max_tokens:
        raise PuddingError(f"generation stopped after {response.generation_tokens} of "
                           f"{max_tokens} tokens although EOS is disabled")
    return Trial(kind, len(tokens), max_tokens, router_s, ttft, total, response.prompt_tps,
                 mx.get_peak_memory() / 1e9, cpu)


def measure(request: Callable[[str], Trial], kinds: Sequence[str], trials: int,
            warmup: int, progress: Callable[[], None] = lambda: None) -> list[Trial]:
    """Warm-up, then `trials` rounds; each round runs every kind once, in a rotating order."""
    for _ in range(warmup):
        for kind in kinds:
            request(kind)
            progress()
    out = []
    for t in range(trials):
        for j in range(len(kinds)):
            out.append(request(kinds[(t + j) % len(kinds)]))
            progress()
    return out


def wrapper_overhead(pm: PuddingModel, route: Route, tokens: list[int],
                     repeats: int = 200) -> dict[str, float]:
    """What pudding adds around mlx-lm, timed alone (the model is not run), in seconds:
    per dense request (route bookkeeping, token copy, view), per routed request (building
    the SkipView), and per forward call of a routed request (switching the block list)."""

    def per_call(fn) -> float:
        tic = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - tic) / repeats

    def switch():
        with view.active():
            pass

    view = pm.view(route)
    return {
        "dense_request_s": per_call(lambda: (pm.route("", "dense"), list(tokens), pm.view([]))),
        "routed_view_s": per_call(lambda: pm.view(route)),
        # An `arch` forward runs the kept blocks itself: nothing to switch.
        "switch_per_forward_s": (per_call(switch) if route.skip and view.arch_forward is None
                                 else 0.0),
    }

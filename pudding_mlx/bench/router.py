"""`pudding bench --router-study`: router time with cheaper settings, and the routed speedup
each would give."""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING

from ..errors import PuddingError

if TYPE_CHECKING:
    from ..model import PuddingModel


def router_study(pm: PuddingModel, texts: dict[int, str], trials: int) -> list[dict]:
    """Router time for cheaper settings: shorter inputs, fewer encoder layers, mx.compile.

    `texts` maps prompt lengths to prompts. Timing only (the router's weights are used as
    they are); what each costs in routing quality comes from training routers that way
    (pudding train-router --max-length / --num-layers) and reading their regret.
    """
    import mlx.core as mx
    import numpy as np

    router = pm.router
    net = getattr(router, "net", None)
    if net is None:
        raise PuddingError("--router-study needs the MLX router (--router-backend mlx)")
    layers = net.encoder.encoder.layer
    full = router.max_length

    def timed(text: str, max_length: int, num_layers: int, compiled: bool) -> float:
        forward = mx.compile(net) if compiled else net
        router.max_length = max_length
        net.encoder.encoder.layer = layers[:num_layers]
        try:
            times = []
            for _ in range(trials + 1):  # the first call compiles / warms up
                tic = time.perf_counter()
                enc = router.encode([text], pad_to_max=compiled)
                np.array(forward(mx.array(enc.input_ids), mx.array(enc.attention_mask)))
                times.append(time.perf_counter() - tic)
            return statistics.median(times[1:])
        finally:
            router.max_length = full
            net.encoder.encoder.layer = layers

    n = len(layers)
    options = [(full, n, False), (full, n, True)]
    options += [(length, n, False) for length in (64, 32)]
    options += [(full, k, False) for k in (3, 2, 1)]
    options += [(64, 3, False), (32, 2, False)]
    return [
        {"max_length": length, "num_layers": k, "compiled": c,
         "router_s": {p: timed(text, length, k, c) for p, text in sorted(texts.items())}}
        for length, k, c in dict.fromkeys((min(length, full), min(k, n), c)
                                          for length, k, c in options)
    ]


def project_router(rows: list[dict], ttft: list[dict]) -> None:
    """Add to each router option its share of dense time to first token and the routed
    speedup / ideal it would give (the measured routed time with this router's time instead)."""
    for row in rows:
        row["share_of_dense_ttft"], row["projected_ttft_vs_ideal"] = {}, {}
        for t in ttft:
            p, d, r = t["prompt_tokens"], t["dense"], t["routed"]
            if p not in row["router_s"]:
                continue
            router = row["router_s"][p]
            model = r["ttft_s"]["median"] - r["router_s"]["median"]
            row["share_of_dense_ttft"][p] = router / d["ttft_s"]["median"]
            speedup = d["ttft_s"]["median"] / (model + router)
            row["projected_ttft_vs_ideal"][p] = speedup / t["ideal_prefill"]

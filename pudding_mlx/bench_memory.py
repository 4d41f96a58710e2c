"""`pudding bench --memory`: dense vs routed memory with lazy loading, each in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from .errors import PuddingError


def memory_probe(bundle: str, route_mode: str, skip: list[int] | None, prompts: list[str],
                 max_tokens: int, router_backend: str, budget: float | None = None) -> dict:
    """Load lazily, run one request per prompt, and report memory (run in a fresh process).

    With `budget` (bytes), blocks outside the recently used sets that fit it are evicted
    before each request (see residency.py).
    """
    import resource

    import mlx.core as mx

    from .model import load
    from .residency import Residency

    pm = load(bundle, router_backend=router_backend, verify=False, lazy=True)
    loaded = mx.get_active_memory()
    residency = Residency(pm.model, Path(bundle) / "model", budget) if budget else None
    requests = []
    for prompt in prompts:
        route = pm.route(prompt, route_mode, skip)
        evicted = residency.use(route.skip) if residency else []
        tic = time.perf_counter()
        pm.generate(prompt, max_tokens=max_tokens, route=route)
        requests.append({"skip": route.skip, "evicted": evicted,
                         "seconds": time.perf_counter() - tic,
                         "active_gb": mx.get_active_memory() / 1e9})
    return {"mode": route_mode, "budget_gb": budget and budget / 1e9,
            "sets_used": len({tuple(r["skip"]) for r in requests}), "requests": requests,
            "active_after_load_gb": loaded / 1e9, "active_gb": mx.get_active_memory() / 1e9,
            "peak_gb": mx.get_peak_memory() / 1e9,
            "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def memory_compare(bundle: str, route_mode: str, skip: list[int] | None, prompts: list[str],
                   router_backend: str, budget: float | None = None) -> dict:
    """Dense vs routed (vs routed within `budget` bytes of blocks) memory over the same
    requests, each in its own process (an evaluated block stays resident)."""
    runs = [("dense", "dense", None, None), ("routed", route_mode, skip, None)]
    if budget:
        runs.append(("routed, budget", route_mode, skip, budget))
    out = {}
    for name, mode, s, b in runs:
        args = json.dumps([bundle, mode, s, prompts, 16, router_backend, b])
        code = ("import json, sys; from pudding_mlx.bench_memory import memory_probe; "
                "print(json.dumps(memory_probe(*json.loads(sys.argv[1]))))")
        proc = subprocess.run([sys.executable, "-c", code, args], capture_output=True,
                              text=True, check=False)
        if proc.returncode:
            raise PuddingError(f"memory probe ({name}) failed: {proc.stderr.strip()[-300:]}")
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out

"""`pudding bench --memory`: dense vs routed memory with lazy loading, each in a fresh process.

A block once evaluated stays resident, so every probe loads the bundle anew in a child
process: `python -m pudding_mlx.bench.memory` reads a Probe as JSON on stdin and writes its
report, or {"error": "<one line>"}, as the last line of stdout.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import PuddingError, one_line


@dataclass
class Probe:
    """One child process's work: load `bundle` lazily, run one request per prompt."""

    bundle: str
    route_mode: str
    skip: list[int] | None
    prompts: list[str]
    router_backend: str
    budget: float | None = None  # bytes of blocks kept resident (residency.py); None: all
    max_tokens: int = 16
    tolerance: float | None = None  # of the routed requests (PuddingModel.route)


def memory_probe(probe: Probe) -> dict:
    """Run `probe` in this process and report its memory (meaningful in a fresh process only).

    With a budget, blocks outside the recently used sets that fit it are evicted before each
    request.
    """
    import resource

    import mlx.core as mx

    from ..model import load
    from .residency import Residency

    pm = load(probe.bundle, router_backend=probe.router_backend, verify=False, lazy=True)
    loaded = mx.get_active_memory()
    residency = (Residency(pm.model, Path(probe.bundle) / "model", probe.budget)
                 if probe.budget else None)
    requests = []
    for prompt in probe.prompts:
        route = pm.route(prompt, probe.route_mode, probe.skip,
                         probe.tolerance if probe.route_mode == "router" else None)
        evicted = residency.use(route.skip) if residency else []
        tic = time.perf_counter()
        pm.generate(prompt, max_tokens=probe.max_tokens, route=route)
        requests.append({"skip": route.skip, "evicted": evicted,
                         "seconds": time.perf_counter() - tic,
                         "active_gb": mx.get_active_memory() / 1e9})
    return {"mode": probe.route_mode, "budget_gb": probe.budget and probe.budget / 1e9,
            "sets_used": len({tuple(r["skip"]) for r in requests}), "requests": requests,
            "active_after_load_gb": loaded / 1e9, "active_gb": mx.get_active_memory() / 1e9,
            "peak_gb": mx.get_peak_memory() / 1e9,
            "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def probe_reply(proc: subprocess.CompletedProcess) -> dict:
    """The child's report; its error, or how it ended without one, as a one-line PuddingError."""
    lines = proc.stdout.strip().splitlines()
    try:
        reply = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        reply = None
    if isinstance(reply, dict) and "error" in reply:
        raise PuddingError(reply["error"])
    if proc.returncode or not isinstance(reply, dict):
        last = proc.stderr.strip().splitlines()[-1:]  # e.g. the exception of a crash
        raise PuddingError(": ".join([f"exited with code {proc.returncode}", *last]))
    return reply


def memory_compare(bundle: str, route_mode: str, skip: list[int] | None, prompts: list[str],
                   router_backend: str, budget: float | None = None,
                   tolerance: float | None = None) -> dict:
    """Dense vs routed (vs routed within `budget` bytes of blocks) memory over the same
    requests, each in its own process."""
    runs = [("dense", "dense", None, None), ("routed", route_mode, skip, None)]
    if budget:
        runs.append(("routed, budget", route_mode, skip, budget))
    out = {}
    for name, mode, s, b in runs:
        probe = Probe(bundle, mode, s, prompts, router_backend, b, tolerance=tolerance)
        proc = subprocess.run([sys.executable, "-m", __name__], input=json.dumps(asdict(probe)),
                              capture_output=True, text=True, check=False)
        try:
            out[name] = probe_reply(proc)
        except PuddingError as e:
            raise PuddingError(f"memory probe ({name}) failed: {e}") from None
    return out


def main() -> None:
    """The child: a Probe as JSON on stdin; its report or {"error": ...} on stdout."""
    try:
        reply = memory_probe(Probe(**json.load(sys.stdin)))
    except Exception as e:  # any failure reaches the parent as one line
        print(json.dumps({"error": one_line(e)}))
        sys.exit(1)
    print(json.dumps(reply))


if __name__ == "__main__":
    main()

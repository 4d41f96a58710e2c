"""`pudding bench`: dense vs routed speed, side by side, against the ideal that skipping allows.

The method follows mlx_lm.benchmark: random prompt tokens (or a real text), EOS disabled,
warm-up, then N trials whose medians are reported. The kinds of request being compared run
interleaved (dense, routed, dense, routed, ...) so that a machine getting busier or cooler
during the run biases neither side. mlx-lm's own benchmark script cannot be reused as a
function (it is a main() that loads the model itself), so its loop is restated here.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click

from .errors import PuddingError
from .generate_cli import route_options

KINDS = ("dense", "routed", "mlx-lm")


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


@dataclass
class Settings:
    prompt_lengths: tuple[int, ...] = (128, 256, 512)
    gen_lengths: tuple[int, ...] = (128, 256, 512)
    gen_prompt: int = 128  # prompt length of the generation measurements
    trials: int = 5
    warmup: int = 1
    seed: int = 0
    prompt_file: str | None = None
    compare_mlx_lm: bool = False
    router_study: bool = False


@dataclass
class Result:
    settings: Settings
    machine: dict
    model: dict  # dtype, shape, bytes per parameter
    route: dict  # the routed request's skip set and how it was chosen
    trials: list[Trial] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    router_study: list[dict] = field(default_factory=list)
    memory: dict = field(default_factory=dict)
    overhead: dict = field(default_factory=dict)  # see wrapper_overhead
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["settings"]["prompt_lengths"] = list(self.settings.prompt_lengths)
        d["settings"]["gen_lengths"] = list(self.settings.gen_lengths)
        return d


# --- prompts -------------------------------------------------------------------------------------


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


# --- one request ---------------------------------------------------------------------------------


def run_request(pm, kind: str, tokens: list[int], text: str, max_tokens: int,
                route_mode: str = "router", skip: Sequence[int] | None = None) -> Trial:
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
        route = pm.route(text, "dense") if kind == "dense" else pm.route(text, route_mode, skip)
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


# --- the ideal and the summary -------------------------------------------------------------------


def model_facts(pm) -> dict:
    """Dtype, shape and the bytes per parameter a block actually holds (quantization aware)."""
    from mlx.utils import tree_flatten

    from .flops import Shape

    shape = Shape.from_config(pm.config, str(pm.path / "model" / "config.json"))
    arrays = [v for _, v in tree_flatten(pm.model.layers[0].parameters())]
    floats = [v for v in arrays if v.dtype in _float_dtypes()]
    dtype = min(floats, key=lambda v: v.size).dtype if floats else arrays[0].dtype
    return {
        "dtype": str(dtype).removeprefix("mlx.core."),
        "quantization": pm.config.get("quantization"),
        "shape": asdict(shape),
        "bytes_per_param": sum(v.nbytes for v in arrays) / shape.block_params(),
        "kv_bytes": dtype.size,
        "num_blocks": shape.layers,
    }


def _float_dtypes():
    import mlx.core as mx

    return (mx.float32, mx.float16, mx.bfloat16)


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(trials: list[Trial], facts: dict, skipped: int) -> dict:
    """Medians per kind and measurement point, measured speedups, ideals and their ratio."""
    from .flops import Shape, combined_ideal, decode_ideal, prefill_ideal

    shape = Shape(**facts["shape"])
    groups: dict[tuple[int, int], dict[str, list[Trial]]] = {}
    for t in trials:
        groups.setdefault((t.prompt_tokens, t.gen_tokens), {}).setdefault(t.kind, []).append(t)
    ttft, gen, mlx_lm = [], [], []
    for (p, g), by_kind in sorted(groups.items()):
        med = {k: _kind_stats(v) for k, v in by_kind.items()}
        d, r = med["dense"], med["routed"]
        p_ideal = prefill_ideal(shape, p, skipped)
        row = {"prompt_tokens": p, "gen_tokens": g, **med,
               "ideal_prefill": p_ideal,
               "ttft_speedup": d["ttft_s"]["median"] / r["ttft_s"]["median"],
               "ttft_speedup_best": d["ttft_s"]["min"] / r["ttft_s"]["min"],
               "router_share_of_dense_ttft": r["router_s"]["median"] / d["ttft_s"]["median"]}
        row["ttft_vs_ideal"] = row["ttft_speedup"] / p_ideal
        if g == 1:
            row["ttft_speedup_cpu"] = d["cpu_s"]["median"] / r["cpu_s"]["median"]
            ttft.append(row)
        else:
            context = p + g // 2
            d_ideal = decode_ideal(shape, context, skipped, facts["bytes_per_param"],
                                   facts["kv_bytes"])
            t_pre = d["ttft_s"]["median"]
            t_dec = d["total_s"]["median"] - t_pre
            total_ideal = combined_ideal([t_pre, t_dec], [p_ideal, d_ideal])
            row.update({
                "ideal_decode": d_ideal,
                "decode_speedup": r["decode_tps"]["median"] / d["decode_tps"]["median"],
                "decode_speedup_best": r["decode_tps"]["max"] / d["decode_tps"]["max"],
                "ideal_total": total_ideal,
                "total_speedup": d["total_s"]["median"] / r["total_s"]["median"],
                "total_speedup_best": d["total_s"]["min"] / r["total_s"]["min"],
                "total_speedup_cpu": d["cpu_s"]["median"] / r["cpu_s"]["median"],
            })
            row["decode_vs_ideal"] = row["decode_speedup"] / d_ideal
            row["total_vs_ideal"] = row["total_speedup"] / total_ideal
            gen.append(row)
        if "mlx-lm" in med:
            m = med["mlx-lm"]
            mlx_lm.append({
                "prompt_tokens": p, "gen_tokens": g,
                "ttft_ratio": d["ttft_s"]["median"] / m["ttft_s"]["median"],
                "total_ratio": d["total_s"]["median"] / m["total_s"]["median"],
                "total_ratio_best": d["total_s"]["min"] / m["total_s"]["min"],
                "total_ratio_cpu": d["cpu_s"]["median"] / m["cpu_s"]["median"],
            })
    return {"skipped": skipped, "ttft": ttft, "generation": gen, "pudding_vs_mlx_lm": mlx_lm}


def _kind_stats(trials: list[Trial]) -> dict:
    out = {k: _stats([getattr(t, k) for t in trials])
           for k in ("router_s", "ttft_s", "total_s", "prompt_tps", "peak_memory_gb", "cpu_s")}
    if trials[0].gen_tokens > 1:
        out["decode_tps"] = _stats([t.decode_tps for t in trials])
    return out


# --- router options ------------------------------------------------------------------------------


def router_study(pm, texts: dict[int, str], trials: int) -> list[dict]:
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


def wrapper_overhead(pm, route, tokens: list[int], repeats: int = 200) -> dict:
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
        "switch_per_forward_s": per_call(switch) if route.skip else 0.0,
    }


# --- memory with lazy loading --------------------------------------------------------------------


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
        code = ("import json, sys; from pudding_mlx.bench import memory_probe; "
                "print(json.dumps(memory_probe(*json.loads(sys.argv[1]))))")
        proc = subprocess.run([sys.executable, "-c", code, args], capture_output=True,
                              text=True, check=False)
        if proc.returncode:
            raise PuddingError(f"memory probe ({name}) failed: {proc.stderr.strip()[-300:]}")
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


# --- the whole run -------------------------------------------------------------------------------


def machine_info() -> dict:
    from importlib.metadata import version

    import mlx.core as mx

    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or _cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "mlx": version("mlx"),
        "mlx_lm": version("mlx-lm"),
        "device": str(mx.default_device()),
        "metal": mx.metal.is_available(),
        "openblas_preloaded": "openblas" in os.environ.get("LD_PRELOAD", ""),
    }
    info["device_info"] = mx.device_info()  # on Apple Silicon: the GPU's name and memory
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = os.getloadavg()
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def run_bench(pm, settings: Settings, route_mode: str = "router",
              skip: list[int] | None = None, progress: Callable[[], None] = lambda: None
              ) -> Result:
    """Every measurement of `settings` on a loaded PuddingModel."""
    text_source = Path(settings.prompt_file).read_text() if settings.prompt_file else None
    pm.tokenizer.eos_token_ids = set()  # never stop early, like mlx_lm.benchmark
    kinds = ["dense", "routed"] + (["mlx-lm"] if settings.compare_mlx_lm else [])
    points = [(p, 1) for p in settings.prompt_lengths]
    points += [(settings.gen_prompt, g) for g in settings.gen_lengths]
    facts = model_facts(pm)
    machine = machine_info()
    prompts, routes = {}, {}
    for p in dict.fromkeys(p for p, _ in points):
        tokens = make_prompt(pm.tokenizer, p, settings.seed + p, text_source)
        prompts[p] = (tokens, pm.tokenizer.decode(tokens))
        routes[p] = pm.route(prompts[p][1], route_mode, skip)
    skips = {len(r.skip) for r in routes.values()}
    if skips == {0}:
        raise PuddingError("the routed request skips no block; nothing to compare")
    if len(skips) != 1:
        raise PuddingError(f"the prompts were routed to sets of different sizes {sorted(skips)};"
                           " pass --skip or --static to compare one set")
    trials = []
    for p, g in points:
        tokens, text = prompts[p]

        def request(kind: str, tokens=tokens, text=text, g=g) -> Trial:
            return run_request(pm, kind, tokens, text, g, route_mode, skip)

        trials += measure(request, kinds, settings.trials, settings.warmup, progress)
    route = routes[settings.gen_prompt if settings.gen_lengths else max(routes)]
    result = Result(settings, machine, facts,
                    {"mode": route_mode, "name": route.name, "skip": route.skip,
                     "per_prompt": {f"p{p}": {"name": r.name, "skip": r.skip}
                                    for p, r in routes.items()},
                     "router_backend": pm.router.backend,
                     "router_max_length": pm.router.max_length},
                    trials)
    result.summary = summarise(trials, facts, skips.pop())
    if settings.router_study:
        texts = {p: prompts[p][1] for p in settings.prompt_lengths or prompts}
        result.router_study = router_study(pm, texts, settings.trials)
        project_router(result.router_study, result.summary["ttft"])
    p = min(prompts)
    result.overhead = wrapper_overhead(pm, route, prompts[p][0])
    if hasattr(os, "getloadavg"):
        result.machine["load_average_at_end"] = os.getloadavg()
    return result


# --- the terminal table --------------------------------------------------------------------------


def _spread(s: dict) -> str:
    return f"±{(s['max'] - s['min']) / 2 / s['median'] * 100:.0f}%"


def format_table(result: Result) -> str:
    s, m = result.summary, result.model
    lines = [f"dtype {m['dtype']}, {s['skipped']} of {m['num_blocks']} blocks skipped "
             f"({result.route['name']}: {result.route['skip']}), median of "
             f"{result.settings.trials} trials, ±: half the min-max range; best: from the "
             "fastest trials; cpu: from process CPU time (both less sensitive to other load)"]
    if s["ttft"]:
        lines += ["", "Time to first token (routed includes the router)",
                  f"{'prompt':>7} {'dense s':>14} {'routed s':>14} {'router ms':>10} "
                  f"{'router%':>8} {'speedup':>8} {'best':>6} {'cpu':>6} {'ideal':>6} "
                  f"{'/ideal':>7} {'prompt tok/s d|r':>17}"]
        for row in s["ttft"]:
            d, r = row["dense"], row["routed"]
            lines.append(
                f"{row['prompt_tokens']:>7} {d['ttft_s']['median']:>8.3f} {_spread(d['ttft_s']):>5}"
                f" {r['ttft_s']['median']:>8.3f} {_spread(r['ttft_s']):>5}"
                f" {r['router_s']['median'] * 1e3:>10.1f}"
                f" {row['router_share_of_dense_ttft'] * 100:>7.1f}%"
                f" {row['ttft_speedup']:>7.3f}x {row['ttft_speedup_best']:>5.3f}x"
                f" {row['ttft_speedup_cpu']:>5.3f}x {row['ideal_prefill']:>5.3f}x"
                f" {row['ttft_vs_ideal']:>7.3f}"
                f" {d['prompt_tps']['median']:>8.0f}|{r['prompt_tps']['median']:<8.0f}")
    if s["generation"]:
        lines += ["", f"Prompt of {result.settings.gen_prompt} tokens + generation",
                  f"{'gen':>5} {'dense s':>14} {'routed s':>14} {'speedup':>8} {'best':>6} "
                  f"{'cpu':>6} {'ideal':>6} {'/ideal':>7} {'decode tok/s d|r':>17} "
                  f"{'speedup':>8} {'best':>6} {'ideal':>6} {'/ideal':>7}"]
        for row in s["generation"]:
            d, r = row["dense"], row["routed"]
            lines.append(
                f"{row['gen_tokens']:>5} {d['total_s']['median']:>8.3f} {_spread(d['total_s']):>5}"
                f" {r['total_s']['median']:>8.3f} {_spread(r['total_s']):>5}"
                f" {row['total_speedup']:>7.3f}x {row['total_speedup_best']:>5.3f}x"
                f" {row['total_speedup_cpu']:>5.3f}x {row['ideal_total']:>5.3f}x"
                f" {row['total_vs_ideal']:>7.3f}"
                f" {d['decode_tps']['median']:>8.2f}|{r['decode_tps']['median']:<8.2f}"
                f" {row['decode_speedup']:>7.3f}x {row['decode_speedup_best']:>5.3f}x"
                f" {row['ideal_decode']:>5.3f}x"
                f" {row['decode_vs_ideal']:>7.3f}")
    rows = s["ttft"] + s["generation"]
    lines += ["", "Peak memory (GB, dense | routed): " + ", ".join(
        f"p{r['prompt_tokens']}+g{r['gen_tokens']} {r['dense']['peak_memory_gb']['median']:.3f}"
        f"|{r['routed']['peak_memory_gb']['median']:.3f}" for r in rows)]
    if s["pudding_vs_mlx_lm"]:
        lines += ["", "pudding dense time / plain mlx-lm time (1.00 = no overhead)"]
        lines += [f"  p{r['prompt_tokens']}+g{r['gen_tokens']}: first token "
                  f"{r['ttft_ratio']:.3f}, total {r['total_ratio']:.3f} (best "
                  f"{r['total_ratio_best']:.3f}, cpu {r['total_ratio_cpu']:.3f})"
                  for r in s["pudding_vs_mlx_lm"]]
    if result.overhead:
        o = result.overhead
        lines += ["", f"pudding's own work, timed alone: {o['dense_request_s'] * 1e6:.0f} us per "
                  f"dense request, {o['routed_view_s'] * 1e6:.0f} us per routed request, "
                  f"{o['switch_per_forward_s'] * 1e6:.1f} us per routed forward call"]
    if result.router_study:
        lines += ["", "Router options: per prompt length, router ms, its share of dense time to "
                  "first token, and the routed speedup / ideal it would give"]
        for r in result.router_study:
            cells = [f"p{p} {v * 1e3:6.1f} ms {r['share_of_dense_ttft'].get(p, 0) * 100:4.1f}% "
                     f"{r['projected_ttft_vs_ideal'].get(p, 0):5.3f}"
                     for p, v in r["router_s"].items()]
            lines.append(f"  max_length {r['max_length']:>4}, {r['num_layers']} layers"
                         f"{', mx.compile' if r['compiled'] else '':<12}: " + " | ".join(cells))
    if result.memory:
        mem = result.memory
        lines += ["", "Memory with lazy loading over the same requests (GB; blocks never used "
                  "are never read)"]
        lines += [f"  {k:<15} active {v['active_gb']:.3f}  peak {v['peak_gb']:.3f}  max RSS "
                  f"{v['max_rss_gb']:.3f}  ({len(v['requests'])} requests, {v['sets_used']} "
                  f"sets, {sum(len(r['evicted']) for r in v['requests'])} block evictions)"
                  for k, v in mem.items()]
    return "\n".join(lines)


# --- the command ---------------------------------------------------------------------------------


def _lengths(ctx, param, value: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected numbers like 128,256, got {value!r}") from None
    if any(v < 1 for v in out):
        raise click.BadParameter(f"lengths must be positive, got {value!r}")
    return out


@click.command()
@click.option("--bundle", "-b", required=True, type=click.Path(), help="PuDDing bundle folder.")
@click.option("--prompt-lengths", default="128,256,512", show_default=True, callback=_lengths,
              help="Prompt lengths of the time-to-first-token measurements ('' for none).")
@click.option("--gen-lengths", default="128,256,512", show_default=True, callback=_lengths,
              help="Generated tokens of the prefill+generation measurements ('' for none).")
@click.option("--gen-prompt", default=128, show_default=True, type=click.IntRange(1),
              help="Prompt length of the prefill+generation measurements.")
@click.option("--trials", "-n", default=5, show_default=True, type=click.IntRange(1))
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(0))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--prompt-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Real text (repeated to length) instead of random tokens.")
@click.option("--compare-mlx-lm", is_flag=True,
              help="Also time plain mlx_lm.stream_generate on the same model.")
@click.option("--router-study", is_flag=True,
              help="Time the router with shorter inputs, fewer layers and mx.compile.")
@click.option("--memory", is_flag=True,
              help="Peak memory dense vs routed with lazy loading (fresh processes).")
@click.option("--memory-requests", default=4, show_default=True, type=click.IntRange(1),
              help="Requests (different random prompts) of the memory runs.")
@click.option("--memory-budget", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="GB", help="Also run the memory requests keeping only the blocks of "
              "recently used sets that fit in GB (blocks only; implies --memory).")
@click.option("--output", "-o", type=click.Path(file_okay=False), default=None,
              help="Write bench.json and bench.png into this folder.")
@click.option("--note", multiple=True, help="A note stored in bench.json (repeatable).")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the bundle files.")
@route_options
def bench(bundle, prompt_lengths, gen_lengths, gen_prompt, trials, warmup, seed, prompt_file,
          compare_mlx_lm, router_study, memory, memory_requests, memory_budget, output, note,
          no_verify, route_mode, skip, router_backend):
    """Dense vs routed speed, side by side, against the ideal speedup of the skipped blocks.

    The routed set comes from the router (or --static / --skip); --dense is meaningless here.
    """
    from tqdm import tqdm

    from .model import load

    if route_mode == "dense" and skip is None:
        raise PuddingError("--dense: pudding bench always runs dense; choose the routed set "
                           "with the router (default), --static or --skip")
    if not prompt_lengths and not gen_lengths:
        raise PuddingError("nothing to measure: --prompt-lengths and --gen-lengths are empty")
    settings = Settings(prompt_lengths, gen_lengths, gen_prompt, trials, warmup, seed,
                        prompt_file, compare_mlx_lm, router_study)
    pm = load(bundle, router_backend=router_backend, verify=not no_verify)
    kinds = 3 if compare_mlx_lm else 2
    total = (len(prompt_lengths) + len(gen_lengths)) * kinds * (trials + warmup)
    with tqdm(total=total, desc="bench", unit="request") as bar:
        result = run_bench(pm, settings, route_mode, skip, lambda: bar.update())
    result.notes = list(note)
    if memory or memory_budget:
        prompts = [pm.tokenizer.decode(make_prompt(pm.tokenizer, 128, seed + i))
                   for i in range(memory_requests)]
        result.memory = memory_compare(bundle, route_mode, skip, prompts, router_backend,
                                       memory_budget and memory_budget * 1e9)
    click.echo(format_table(result))
    if output:
        from .bench_plot import plot

        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(result.to_dict(), indent=1) + "\n")
        plot(result.to_dict(), out / "bench.png")
        click.echo(f"Wrote {out / 'bench.json'} and {out / 'bench.png'}")

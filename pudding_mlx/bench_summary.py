"""The figures of `pudding bench` from its trials: medians per kind and measurement point,
measured speedups, and their ratio to the ideal of the FLOP/byte model (flops.py)."""

from __future__ import annotations

import statistics
from dataclasses import asdict
from typing import TYPE_CHECKING

from .bench_timing import Trial
from .flops import Shape, combined_ideal, decode_ideal, prefill_ideal

if TYPE_CHECKING:
    from .model import PuddingModel


def model_facts(pm: PuddingModel) -> dict:
    """Dtype, shape and the bytes per parameter a block actually holds (quantization aware)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    shape = Shape.from_config(pm.config, str(pm.path / "model" / "config.json"))
    arrays = [v for _, v in tree_flatten(pm.model.layers[0].parameters())]
    floats = [v for v in arrays if v.dtype in (mx.float32, mx.float16, mx.bfloat16)]
    dtype = min(floats, key=lambda v: v.size).dtype if floats else arrays[0].dtype
    return {
        "dtype": str(dtype).removeprefix("mlx.core."),
        "quantization": pm.config.get("quantization"),
        "shape": asdict(shape),
        "bytes_per_param": sum(v.nbytes for v in arrays) / shape.block_params(),
        "kv_bytes": dtype.size,
        "num_blocks": shape.layers,
    }


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _kind_stats(trials: list[Trial]) -> dict:
    out = {k: _stats([getattr(t, k) for t in trials])
           for k in ("router_s", "ttft_s", "total_s", "prompt_tps", "peak_memory_gb", "cpu_s")}
    if trials[0].gen_tokens > 1:
        out["decode_tps"] = _stats([t.decode_tps for t in trials])
    return out


def summarise(trials: list[Trial], facts: dict, skipped: int) -> dict:
    """Medians per kind and measurement point, measured speedups, ideals and their ratio."""
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

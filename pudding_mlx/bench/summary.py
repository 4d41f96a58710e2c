"""The figures of `pudding bench` from its trials: medians per kind and measurement point,
measured speedups, and their ratio to the ideal of the FLOP/byte model (flops.py)."""

from __future__ import annotations

import statistics
from dataclasses import asdict
from typing import TYPE_CHECKING

from ..errors import PuddingError
from .flops import DecodeBytes, Shape, combined_ideal, decode_ideal, prefill_ideal
from .timing import Trial

if TYPE_CHECKING:
    from ..model import PuddingModel


def _nbytes(module) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def decode_bytes(model, shape: Shape) -> DecodeBytes:
    """The bytes one decoded token reads, from the loaded arrays: each block's (quantised
    weights with their scales and biases), the final norm and LM head (the embedding matrix
    when tied), one embedding row, and the KV cache at the activations' dtype."""
    from ..masking import layer_owner

    owner = layer_owner(model)
    blocks = tuple(_nbytes(b) for b in owner.layers)
    embed = getattr(owner, "embed_tokens", None)
    if embed is None:
        raise PuddingError(f"{type(model).__name__}: no `embed_tokens` module; cannot count "
                           "the bytes a decoded token reads")
    embedding = _nbytes(embed)
    rest = _nbytes(model) - sum(blocks) - embedding  # final norm, and lm_head when untied
    tied = "lm_head" not in model
    kv_bytes = _activation_dtype(owner.layers[0]).size
    return DecodeBytes(blocks, rest + embedding / shape.vocab + tied * embedding,
                       shape.kv_values() * kv_bytes)


def _activation_dtype(block):
    """The float dtype of a block's smallest array (a norm weight, or quantisation scales)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    arrays = [v for _, v in tree_flatten(block.parameters())]
    floats = [v for v in arrays if v.dtype in (mx.float32, mx.float16, mx.bfloat16)]
    return min(floats, key=lambda v: v.size).dtype if floats else arrays[0].dtype


def model_facts(pm: PuddingModel) -> dict:
    """Dtype, quantisation, shape, and the bytes a decoded token reads (measured)."""
    shape = Shape.from_config(pm.config, str(pm.path / "model" / "config.json"))
    weights = decode_bytes(pm.model, shape)
    dtype = _activation_dtype(pm.model.layers[0])
    return {
        "dtype": str(dtype).removeprefix("mlx.core."),
        "quantization": pm.config.get("quantization"),
        "shape": asdict(shape),
        "decode_bytes": asdict(weights),
        # the blocks' mean bytes per parameter, scales and biases included
        "bytes_per_param": sum(weights.blocks) / (shape.block_params() * shape.layers),
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


def summarise(trials: list[Trial], facts: dict, skip: list[int]) -> dict:
    """Medians per kind and measurement point, measured speedups, ideals and their ratio, for
    the routed requests skipping the blocks `skip`."""
    shape = Shape(**facts["shape"])
    weights = DecodeBytes(**{**facts["decode_bytes"],
                             "blocks": tuple(facts["decode_bytes"]["blocks"])})
    skipped = len(skip)
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
            d_ideal = decode_ideal(weights, context, skip)
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

"""The terminal table of `pudding bench` (plot.py draws the figure)."""

from __future__ import annotations

from .result import Result


def _spread(s: dict) -> str:
    return f"±{(s['max'] - s['min']) / 2 / s['median'] * 100:.0f}%"


def format_table(result: Result) -> str:
    """Time to first token, generation, memory, mlx-lm comparison and router options."""
    s, m = result.summary, result.model
    q = m.get("quantization")
    weights = f", {q['bits']}-bit weights (groups of {q['group_size']})" if q else ""
    lines = [f"dtype {m['dtype']}{weights}, {s['skipped']} of {m['num_blocks']} blocks skipped "
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

"""How much depth a model can lose: KL to dense and top-1 agreement, on held-out chat prompts,
of the first k blocks of a greedy fidelity search (k = 1, 2, 4, 8 and 10/20/30% of the blocks),
with each set's prefill and decode speedup measured against dense side by side, and the
bundle's routed rows at several tolerances with their mean skip.

`measure` runs `pudding fidelity` (its cache makes a rerun free) and one `pudding bench`
comparison per set on one bundle, and writes NAME.json; `table` reads several and writes the
cross-model table (scaling.md) and plot (scaling.png).

    python benchmarks/depth_redundancy.py measure --bundle B --search work/search/fidelity.json \
        --name qwen2.5-0.5b --out examples/results/scaling
    python benchmarks/depth_redundancy.py table examples/results/scaling/*.json \
        --out examples/results/scaling
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

FRACTIONS = (0.1, 0.2, 0.3)
SIZES = (1, 2, 4, 8)
TOLERANCES = ("routed@0.1", "routed@0.25", "routed@0.5", "routed@1")


def search_phases(search: dict) -> list[dict]:
    """The phases of a fidelity search's chat candidate (block removed, loss), in order."""
    runs = [c for c in search["candidates"] if c["loss"] == "fidelity"]
    if len(runs) != 1:
        raise click.ClickException("expected one fidelity candidate in the search file")
    return runs[0]["trajectory"]


def set_sizes(num_blocks: int, available: int) -> dict[int, list[str]]:
    """k -> why it is measured ("k=4", "20%"), for the fixed sizes and the fractions of the
    depth (rounded to the nearest block), up to the search's length."""
    sizes: dict[int, list[str]] = {}
    for k in SIZES:
        sizes.setdefault(k, []).append(f"k={k}")
    for f in FRACTIONS:
        sizes.setdefault(max(1, round(f * num_blocks)), []).append(f"{f:.0%}")
    return {k: why for k, why in sorted(sizes.items()) if k <= available}


def interval(d: dict | None) -> dict | None:
    """A paired-bootstrap figure (`PairedDiff` as a dict) as mean and interval."""
    return None if d is None else {"mean": d["diff"], "lo": d["low"], "hi": d["high"]}


def speed(pm, skip: list[int], prompt: int, gen: int, trials: int) -> dict:
    """Prefill (time to first token at `prompt` tokens) and decode speedups of `skip` over
    dense, from interleaved trials, with the ideal of the skipped blocks beside each."""
    from pudding_mlx.bench.command import run_bench
    from pudding_mlx.bench.result import Settings

    s = run_bench(pm, Settings(prompt_lengths=(prompt,), gen_lengths=(gen,), gen_prompt=prompt,
                               trials=trials, warmup=1), "router", skip).summary
    t, g = s["ttft"][0], s["generation"][0]
    return {"prefill": t["ttft_speedup"], "prefill_ideal": t["ideal_prefill"],
            "decode": g["decode_speedup"], "decode_ideal": g["ideal_decode"],
            "decode_range": [g["routed"]["decode_tps"]["min"] / g["dense"]["decode_tps"]["max"],
                             g["routed"]["decode_tps"]["max"] / g["dense"]["decode_tps"]["min"]]}


@click.group()
def cli():
    pass


@cli.command()
@click.option("--bundle", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--search", "search_file", required=True, type=click.Path(exists=True))
@click.option("--name", required=True, help="Model label, also the output file's name.")
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--limit", type=int, default=None, help="Held-out prompts (default: all).")
@click.option("--max-tokens", type=int, default=32, show_default=True)
@click.option("--prompt", "prompt_tokens", type=int, default=128, show_default=True)
@click.option("--gen", type=int, default=64, show_default=True)
@click.option("--trials", type=int, default=3, show_default=True)
def measure(bundle, search_file, name, out, limit, max_tokens, prompt_tokens, gen, trials):
    """Quality and speed of one model's greedy sets (and routed rows) on one bundle."""
    from mlx.utils import tree_flatten

    import pudding_mlx
    from pudding_mlx.fidelity.pareto import pareto_points
    from pudding_mlx.fidelity.run import FidelitySettings, run_fidelity

    search = json.loads(Path(search_file).read_text())
    phases = search_phases(search)
    order = [step["block"] for step in phases]
    pm = pudding_mlx.load(bundle, router_backend="mlx")
    num_blocks = pm.manifest.num_blocks
    sizes = set_sizes(num_blocks, len(order))
    sets = {f"greedy-k{k}": sorted(order[:k]) for k in sizes}
    fid = run_fidelity(FidelitySettings(
        bundle=bundle, output=str(Path(out) / f"{name}-fidelity"), limit=limit,
        max_tokens=max_tokens, extra_sets=sets, routed=TOLERANCES, resamples=2000,
        command=f"benchmarks/depth_redundancy.py measure --name {name}"))
    summary = fid["summary"]
    rows = []
    for k, why in sizes.items():
        row = f"greedy-k{k}"
        click.echo(f"{name}: timing {row} {sets[row]}")
        rows.append({"k": k, "why": why, "skip": sets[row], "search_kl": phases[k - 1]["loss"],
                     "kl": interval(summary[row]["kl"]),
                     "agreement": interval(summary[row]["agreement"]),
                     "speed": speed(pm, sets[row], prompt_tokens, gen, trials)})
    # each routed row against the static curve at its mean skip (paired, as `pudding pareto`)
    points = {p["row"]: p["metrics"]["kl"] for p in pareto_points(fid, None, {})["points"]}
    routed = [{"row": row, "mean_skipped": fid["mean_skipped"][row],
               "kl": interval(summary[row]["kl"]),
               "kl_vs_static": interval(points[row].get("vs_static")),
               "agreement": interval(summary[row]["agreement"]),
               "routes": fid["route_counts_by_row"][row]} for row in fid["routed"]]
    params = sum(v.size for _, v in tree_flatten(pm.model.parameters()))
    result = {"name": name, "base_model": pm.manifest.base_model, "num_blocks": num_blocks,
              "params": int(params), "dtype": pm.manifest.extra.get("mlx", {}).get("dtype"),
              "order": order, "search_settings": search["settings"],
              "heldout_prompts": fid["n"], "max_tokens": max_tokens,
              "mean_tokens": fid["mean_tokens"],
              "speed_settings": {"prompt": prompt_tokens, "gen": gen, "trials": trials},
              "greedy": rows, "routed": routed}
    path = Path(out) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    click.echo(f"wrote {path}")


def _ci(d: dict, digits: int = 3) -> str:
    return f"{d['mean']:.{digits}f} [{d['lo']:.{digits}f}, {d['hi']:.{digits}f}]"


def markdown(results: list[dict]) -> str:
    lines = ["| model | blocks | k | share | KL to dense (nats/token) [95% CI] | top-1 agreement "
             "| prefill speedup (ideal) | decode speedup (ideal) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for g in r["greedy"]:
            s = g["speed"]
            lines.append(
                f"| {r['name']} ({r['params'] / 1e6:.0f}M) | {r['num_blocks']} | {g['k']} "
                f"({', '.join(g['why'])}) | {g['k'] / r['num_blocks']:.0%} | {_ci(g['kl'])} | "
                f"{_ci(g['agreement'])} | {s['prefill']:.3f} ({s['prefill_ideal']:.3f}) | "
                f"{s['decode']:.3f} ({s['decode_ideal']:.3f}) |")
    lines += ["", "Routed rows (the bundle's router at a tolerance), and their KL minus the "
              "static curve's at the same mean skip (paired over prompts, as `pudding pareto`: "
              "the best fixed set of each size, linear between sizes):", "",
              "| model | row | mean skip | KL routed [95% CI] | minus static curve [95% CI] "
              "| top-1 routed |", "|---|---|---|---|---|---|"]
    for r in results:
        for row in r["routed"]:
            vs = row["kl_vs_static"]
            lines.append(f"| {r['name']} | {row['row']} | {row['mean_skipped']:.2f} | "
                         f"{_ci(row['kl'])} | {'-' if vs is None else _ci(vs)} | "
                         f"{_ci(row['agreement'])} |")
    return "\n".join(lines) + "\n"


def plot(path: Path, results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in results:
        share = [g["k"] / r["num_blocks"] for g in r["greedy"]]
        kl = [g["kl"]["mean"] for g in r["greedy"]]
        err = np.array([[g["kl"]["mean"] - g["kl"]["lo"], g["kl"]["hi"] - g["kl"]["mean"]]
                        for g in r["greedy"]]).T
        label = f"{r['name']} ({r['params'] / 1e6:.0f}M, {r['num_blocks']} blocks)"
        line = a.errorbar(share, kl, yerr=err, marker="o", capsize=3, label=label)
        color = line[0].get_color()
        b.plot([g["speed"]["decode_ideal"] for g in r["greedy"]], kl, marker="o", color=color,
               label=label)
        b.scatter([g["speed"]["decode"] for g in r["greedy"]], kl, marker="x", color=color)
    a.set_xlabel("share of blocks skipped (greedy fidelity search)")
    a.set_ylabel("KL to dense, held-out prompts (nats/token)")
    a.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    b.set_xlabel("decode speedup over dense: ideal (line), measured (x)")
    b.set_ylabel("KL to dense (nats/token)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False))
def table(files, out):
    """The cross-model table and plot from several `measure` outputs (smallest model first)."""
    results = sorted((json.loads(Path(f).read_text()) for f in files), key=lambda r: r["params"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.md").write_text(markdown(results))
    plot(out / "scaling.png", results)
    click.echo(markdown(results))


if __name__ == "__main__":
    cli()

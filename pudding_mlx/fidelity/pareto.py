"""`pudding pareto`: the speed/quality trade-off of a bundle's sets and routing policies.

It joins one `pudding fidelity` run (KL to dense on held-out prompts) and one `pudding eval`
run (six-task accuracy) of the same bundle, and optionally `pudding bench --skip` runs (decode
speedup at a number of blocks skipped). Each row is a point, mean blocks skipped against mean
KL and accuracy, in one of four series: static sets (dense and every candidate), fixed-k
routing (routed:kN), quality-aware routing (routed@X) and the bundle's default routing.

A routed point is compared with the static curve at its own mean skip: for each number of
blocks skipped, the static set best on that metric (chosen on the same prompts or questions,
which favours static), linearly interpolated between neighbouring sizes, with a paired
bootstrap interval over prompts (KL) or questions (accuracy, tasks weighted equally).
"""

from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click
import numpy as np

from ..errors import PuddingError
from ..evaluation.stats import paired_bootstrap
from ..files import read_json, write_report

SERIES = ("static", "fixed-k", "tolerance", "default")


@dataclass
class Column:
    """One metric of every row: per-item values in groups (eval: one per task; fidelity: one),
    and each row's mean blocks skipped (the mean over groups of the group means)."""

    metric: str
    lower_is_better: bool
    values: dict[str, list[np.ndarray]]
    skipped: dict[str, float]

    def mean(self, row: str) -> float:
        return float(np.mean([v.mean() for v in self.values[row]]))


@dataclass
class Point:
    row: str
    series: str
    metrics: dict[str, dict] = field(default_factory=dict)  # metric -> its figures
    decode_speedup: float | None = None  # at the fidelity run's mean skip


def series_of(row: str) -> str:
    if row.startswith("routed:k"):
        return "fixed-k"
    if row.startswith("routed@"):
        return "tolerance"
    return "default" if row == "routed" else "static"


def fidelity_column(results: dict) -> Column:
    """KL to dense per prompt, from a `pudding fidelity` results.json."""
    prompts = results["prompts"]
    values = {row: [np.array([p[row]["kl"] for p in prompts], dtype=np.float64)]
              for row in results["summary"]}
    return Column("kl", True, values, dict(results["mean_skipped"]))


def eval_row(method: str) -> str | None:
    """The fidelity row naming an eval method, or None for the methods left out (hindsight
    picks and duplicates of a static row)."""
    if method in ("dense", "routed") or method.startswith(("routed@", "routed:k")):
        return method
    if method == "pudding":
        return "routed"
    if method.startswith("static:") and method not in ("static:best", "static:task-best"):
        return method[len("static:"):]
    return None


def eval_column(results: dict) -> Column:
    """0/1 correct per question in each of the six tasks, from a `pudding eval` results.json."""
    tasks = results["averages"]["six"]["tasks"]
    values: dict[str, list[np.ndarray]] = {}
    skipped: dict[str, float] = {}
    for method in results["methods"]:
        row = eval_row(method)
        if row is None:
            continue
        per_task = [results["tasks"][t] for t in tasks]
        values[row] = [np.array([q["correct"][method] for q in t["questions"]], dtype=np.float64)
                       for t in per_task]
        skipped[row] = float(np.mean([t["results"][method]["mean_skipped"] for t in per_task]))
    return Column("accuracy", False, values, skipped)


def static_curve(col: Column) -> list[tuple[int, str]]:
    """(blocks skipped, row) of the best static row at each size, by size."""
    best: dict[int, str] = {}
    sign = 1 if col.lower_is_better else -1
    for row in col.values:
        if series_of(row) != "static":
            continue
        k = round(col.skipped[row])
        if k not in best or sign * col.mean(row) < sign * col.mean(best[k]):
            best[k] = row
    return sorted(best.items())


def reference(col: Column, curve: list[tuple[int, str]], s: float) -> list[np.ndarray] | None:
    """The static curve's per-item values at mean skip s (linear between the two sizes around
    it), or None outside the sizes it covers."""
    sizes = [k for k, _ in curve]
    if not curve or s < sizes[0] or s > sizes[-1]:
        return None
    hi = min(bisect.bisect_left(sizes, s), len(sizes) - 1)
    lo = hi if sizes[hi] == s else hi - 1
    w = 0.0 if hi == lo else (s - sizes[lo]) / (sizes[hi] - sizes[lo])
    return [(1 - w) * a + w * b
            for a, b in zip(col.values[curve[lo][1]], col.values[curve[hi][1]], strict=True)]


def speedup_at(bench: dict[int, float], s: float) -> float | None:
    """Decode speedup at mean skip s from speedups measured at whole sizes: time per token is
    affine in the blocks run, so the mean time of a routed mix is the time at its mean size;
    interpolate time, not speed. None outside the measured sizes (dense, 0, is always known)."""
    times = sorted({0: 1.0, **{k: 1.0 / v for k, v in bench.items()}}.items())
    sizes = [k for k, _ in times]
    if s > sizes[-1]:
        return None
    t = float(np.interp(s, sizes, [t for _, t in times]))
    return 1.0 / t


def read_bench(folder: str | Path) -> tuple[int, float]:
    """(blocks skipped, median decode speedup of the longest generation) of a bench run."""
    path = Path(folder) / "bench.json"
    if not path.is_file():
        raise PuddingError(f"--bench: {path} not found (a `pudding bench -o` folder)")
    summary = read_json(path)["summary"]
    rows = [g for g in summary["generation"] if g.get("decode_speedup") is not None]
    if not rows:
        raise PuddingError(f"--bench: {path} has no generation rows (run with --gen-lengths)")
    return int(summary["skipped"]), float(max(rows, key=lambda g: g["gen_tokens"])
                                          ["decode_speedup"])


def pareto_points(fidelity: dict | None, evaluation: dict | None, bench: dict[int, float],
                  resamples: int = 2000, seed: int = 0) -> dict:
    """Every row of the runs as a point with its figures and, for routed rows, the paired
    difference to the static curve at the same mean skip."""
    cols = [c for c in (fidelity_column(fidelity) if fidelity else None,
                        eval_column(evaluation) if evaluation else None) if c is not None]
    if not cols:
        raise PuddingError("pareto: give a fidelity run, an eval run, or both")
    _check_same_sets(fidelity, evaluation)
    num_blocks = (fidelity or evaluation)["num_blocks"]
    points: dict[str, Point] = {}
    curves = {}
    for col in cols:
        curve = static_curve(col)
        curves[col.metric] = [{"skipped": k, "row": r, "mean": col.mean(r)} for k, r in curve]
        for row, groups in col.values.items():
            point = points.setdefault(row, Point(row, series_of(row)))
            s = col.skipped[row]
            mean = paired_bootstrap([(g, np.zeros_like(g)) for g in groups], resamples, seed)
            figures = {"skipped": s, "fraction": s / num_blocks, **_interval(mean)}
            ref = reference(col, curve, s) if point.series != "static" else None
            if ref is not None:
                figures["vs_static"] = asdict(paired_bootstrap(
                    list(zip(groups, ref, strict=True)), resamples, seed))
            point.metrics[col.metric] = figures
    for point in points.values():
        s = point.metrics.get("kl", point.metrics.get("accuracy"))["skipped"]
        point.decode_speedup = speedup_at(bench, s) if bench else None
    return {
        "num_blocks": num_blocks,
        "fidelity": _source(fidelity), "eval": _source(evaluation),
        "bench": {str(k): v for k, v in sorted(bench.items())},
        "static_curves": curves,
        "points": [asdict(p) for p in sorted(points.values(), key=_order)],
        "notes": [
            "static curve: per number of blocks skipped, the static row best on the metric on "
            "these same prompts/questions (hindsight, which favours static), linear between sizes",
            "vs_static: row minus that curve at the row's mean skip; paired 95% bootstrap",
            "decode_speedup: measured by pudding bench at whole sizes; at a routed mix's mean "
            "size by interpolating time per token (affine in the blocks run)",
        ],
    }


def _interval(d) -> dict:
    return {"mean": d.diff, "low": d.low, "high": d.high, "n": d.n}


def _order(p: Point) -> tuple:
    s = next(iter(p.metrics.values()))["skipped"]
    return SERIES.index(p.series), s, p.row


def _source(results: dict | None) -> dict | None:
    if results is None:
        return None
    return {"command": results.get("command"), "bundle": results.get("bundle"),
            "n": results.get("n", results.get("limit"))}


def _check_same_sets(fidelity: dict | None, evaluation: dict | None) -> None:
    if not (fidelity and evaluation):
        return
    a, b = fidelity["sets"], evaluation["sets"]
    if bad := sorted(n for n in set(a) & set(b) if sorted(a[n]) != sorted(b[n])):
        raise PuddingError(f"the fidelity and eval runs name different sets {bad}: not the "
                           "same bundle")


def markdown(result: dict) -> str:
    has_kl = result["fidelity"] is not None
    has_acc = result["eval"] is not None
    head = ["row", "series", "skipped (of {})".format(result["num_blocks"])]
    head += ["KL to dense", "KL vs static curve"] if has_kl else []
    head += ["accuracy (6 tasks)", "acc vs static curve"] if has_acc else []
    head += ["decode speedup"] if result["bench"] else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in result["points"]:
        m = p["metrics"]
        cells = [p["row"], p["series"], f"{next(iter(m.values()))['skipped']:.2f}"]
        if has_kl:
            cells += _cells(m.get("kl"), 1.0, 3)
        if has_acc:
            cells += _cells(m.get("accuracy"), 100.0, 2)
        if result["bench"]:
            cells.append("" if p["decode_speedup"] is None else f"{p['decode_speedup']:.3f}x")
        lines.append("| " + " | ".join(cells) + " |")
    notes = "\n".join(f"- {n}" for n in result["notes"])
    return ("# Speed/quality trade-off (`pudding pareto`)\n\n" + "\n".join(lines) + "\n\n"
            + notes + "\n")


def _cells(fig: dict | None, scale: float, digits: int) -> list[str]:
    if fig is None:
        return ["", ""]

    def ci(d, sign=""):
        return (f"{d['mean' if 'mean' in d else 'diff'] * scale:{sign}.{digits}f} "
                f"[{d['low'] * scale:{sign}.{digits}f}, {d['high'] * scale:{sign}.{digits}f}]")

    vs = fig.get("vs_static")
    return [ci(fig), "" if vs is None else ci(vs, "+")]


def plot(path: str | Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in ("kl", "accuracy") if result["fidelity" if m == "kl" else "eval"]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.5), squeeze=False)
    style = {"static": ("o", "0.6"), "fixed-k": ("s", "tab:blue"),
             "tolerance": ("^", "tab:red"), "default": ("*", "black")}
    for ax, metric in zip(axes[0], metrics, strict=True):
        scale = 100.0 if metric == "accuracy" else 1.0
        curve = result["static_curves"][metric]
        ax.plot([c["skipped"] / result["num_blocks"] for c in curve],
                [c["mean"] * scale for c in curve], "-", color="0.6", label="static curve")
        for series in SERIES:
            pts = [(p["row"], p["metrics"][metric]) for p in result["points"]
                   if p["series"] == series and metric in p["metrics"]]
            if not pts:
                continue
            marker, color = style[series]
            x = [f["fraction"] for _, f in pts]
            y = [f["mean"] * scale for _, f in pts]
            err = [[(f["mean"] - f["low"]) * scale for _, f in pts],
                   [(f["high"] - f["mean"]) * scale for _, f in pts]]
            ax.errorbar(x, y, yerr=err, fmt=marker, color=color, label=series, capsize=2)
            if series != "static":
                for (row, _), xi, yi in zip(pts, x, y, strict=True):
                    ax.annotate(row.removeprefix("routed") or "default", (xi, yi), fontsize=7,
                                xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(f"mean fraction of blocks skipped (of {result['num_blocks']})")
        ax.set_ylabel("mean KL to dense (nats/token)" if metric == "kl"
                      else "six-task accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@click.command("pareto")
@click.option("--fidelity", "fidelity_dir", type=click.Path(exists=True, file_okay=False),
              help="A `pudding fidelity -o` folder (KL to dense).")
@click.option("--eval", "eval_dir", type=click.Path(exists=True, file_okay=False),
              help="A `pudding eval -o` folder of the same bundle (six-task accuracy).")
@click.option("--bench", "bench_dirs", multiple=True, type=click.Path(file_okay=False),
              help="`pudding bench --skip SET -o` folders, one per size (decode speedup).")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False),
              help="Folder for pareto.json, pareto.md and pareto.png.")
@click.option("--resamples", type=int, default=2000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def pareto(fidelity_dir, eval_dir, bench_dirs, output, resamples, seed):
    """Mean blocks skipped against KL to dense and accuracy, for static sets, fixed-k and
    quality-aware routing, each routed row against the static curve at its mean skip."""
    runs = []
    for folder, name in ((fidelity_dir, "--fidelity"), (eval_dir, "--eval")):
        path = Path(folder) / "results.json" if folder else None
        if path is not None and not path.is_file():
            raise PuddingError(f"{name}: {path} not found")
        runs.append(read_json(path) if path else None)
    bench = dict(read_bench(b) for b in bench_dirs)
    result = pareto_points(*runs, bench, resamples, seed)
    write_report(output, "pareto", result, markdown(result),
                 {"pareto.png": lambda p: plot(p, result)})
    click.echo(markdown(result))

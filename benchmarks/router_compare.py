"""Two routers on the same prompts: paired differences of their routed rows.

Reads the results.json of two `pudding fidelity` runs over the same prompts (same file, split,
limit and continuation length; for instance one bundle with the in-model router and one with
the MiniLM router over the same candidates) and, for each routed row both ran, prints the mean
blocks skipped by each router and A minus B of the per-prompt KL to dense and top-1 agreement
with 95% paired bootstrap intervals over prompts (`pudding_mlx.evaluation.stats.paired_bootstrap`).

    python benchmarks/router_compare.py IN_MODEL/results.json MINILM/results.json \
        --names in-model,minilm -o examples/results/in-model-router/fidelity-compare.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from pudding_mlx.evaluation.stats import paired_bootstrap

SAME = ("prompts_file", "split", "limit", "max_tokens", "system_prompt", "candidates")


def compare(a: dict, b: dict, resamples: int = 2000, seed: int = 0) -> list[dict]:
    """One row per routed row in both results: mean skips, KL and agreement, and A - B."""
    for key in SAME:
        if a.get(key) != b.get(key):
            raise SystemExit(f"the runs differ in {key}: {a.get(key)!r} vs {b.get(key)!r}")
    if [p["id"] for p in a["prompts"]] != [p["id"] for p in b["prompts"]]:
        raise SystemExit("the runs measured different prompts")
    sizes = {"dense": 0, **{name: len(s) for name, s in a["sets"].items()}}
    out = []
    for row in a["routed"]:
        if row not in b["routed"]:
            continue
        r = {"row": row, "policy": a["routed"][row], "n": len(a["prompts"])}
        for side, res in (("a", a), ("b", b)):
            r[f"skip_{side}"] = float(np.mean([sizes[p["routes"][row]] for p in res["prompts"]]))
            for metric in ("kl", "agreement"):
                r[f"{metric}_{side}"] = float(np.mean([p[row][metric] for p in res["prompts"]]))
        r["same_choice"] = float(np.mean([pa["routes"][row] == pb["routes"][row]
                                          for pa, pb in zip(a["prompts"], b["prompts"],
                                                            strict=True)]))
        for metric in ("kl", "agreement"):
            d = paired_bootstrap([([p[row][metric] for p in a["prompts"]],
                                   [p[row][metric] for p in b["prompts"]])], resamples, seed)
            r[f"{metric}_diff"] = {"diff": d.diff, "low": d.low, "high": d.high}
        out.append(r)
    return out


def markdown(rows: list[dict], names: tuple[str, str]) -> str:
    a, b = names
    lines = [f"| row | skip {a} | skip {b} | same set | KL {a} | KL {b} | KL {a} - {b} [95%] | "
             f"top-1 {a} | top-1 {b} | top-1 {a} - {b} [95%] |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        k, g = r["kl_diff"], r["agreement_diff"]
        lines.append(
            f"| {r['row']} | {r['skip_a']:.2f} | {r['skip_b']:.2f} | {r['same_choice']:.0%} | "
            f"{r['kl_a']:.4f} | {r['kl_b']:.4f} | {k['diff']:+.4f} [{k['low']:+.4f}, "
            f"{k['high']:+.4f}] | {r['agreement_a']:.3f} | {r['agreement_b']:.3f} | "
            f"{g['diff']:+.3f} [{g['low']:+.3f}, {g['high']:+.3f}] |")
    n = rows[0]["n"] if rows else 0
    lines.append(f"\n{n} prompts; KL to dense in nats/token and top-1 agreement with dense, "
                 "teacher-forced on dense's greedy continuation; skip = mean blocks skipped; "
                 "intervals: paired bootstrap over prompts.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--names", default="A,B", help="Labels of the two runs, comma-separated.")
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("-o", "--output", type=Path, help="Also write the table (and .json) here.")
    args = ap.parse_args()
    names = tuple(args.names.split(","))
    rows = compare(json.loads(args.a.read_text()), json.loads(args.b.read_text()),
                   args.resamples)
    text = markdown(rows, names)
    print(text)
    if args.output:
        args.output.write_text(text)
        args.output.with_suffix(".json").write_text(json.dumps(
            {"a": str(args.a), "b": str(args.b), "names": names, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

"""Another router on a finished `pudding eval`: its routed accuracy on the very same questions.

A `pudding eval` results.json keeps, per question, whether each static set answered it
correctly. A bundle over the same candidates with another router (for instance the in-model
one) routes the same seeded questions; its routed accuracy is then read off those per-set
results, with no rescoring, and paired with the eval's own methods (its `pudding` row: the
router it was run with, and `static:best`) by bootstrap over questions.

    python benchmarks/reroute_eval.py examples/results/eval/paper/k6/results.json BUNDLE \
        -o examples/results/in-model-router/eval-k6
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import pudding_mlx
from pudding_mlx.evaluation.examples import eval_examples
from pudding_mlx.evaluation.routes import route_questions, router_scores
from pudding_mlx.evaluation.scoring import ScoreCache
from pudding_mlx.evaluation.stats import paired_bootstrap
from pudding_mlx.routing import Policy


def reroute(results: dict, pm, cache_dir: Path, data_dir: str | None = None) -> dict:
    """Per task: the eval's per-question correctness of the bundle's routed choice. A task
    whose questions no longer match the eval's (their ids changed since) is left out, said."""
    names = [c.name for c in pm.candidates]
    if sorted(names) != sorted(results["candidates"]):
        raise SystemExit(f"the bundle's candidates {names} differ from the eval's "
                         f"{results['candidates']}")
    cache = ScoreCache(cache_dir, {"bundle": str(pm.path)})
    out = {}
    for task, t in results["tasks"].items():
        _, examples = eval_examples(task, data_dir, results["limit"], results["seed"])
        by_qid = {q["qid"]: q for q in t["questions"]}
        if [e.qid for e in examples] != [q["qid"] for q in t["questions"]]:
            print(f"{task}: left out (its question ids differ from the eval's)")
            continue
        picks = route_questions(pm, router_scores(pm, cache, task, examples), Policy())
        correct = [by_qid[q]["correct"][f"static:{picks[q]}" if picks[q] else "dense"]
                   for q in by_qid]
        out[task] = {"correct": correct, "picks": picks}
    return out


def summary(results: dict, routed: dict, against: tuple[str, ...], resamples: int) -> dict:
    """Routed accuracy per task and on the averages, and routed minus each of `against`."""
    def column(task: str, method: str) -> np.ndarray:
        if method == "rerouted":
            return np.asarray(routed[task]["correct"], dtype=np.float64)
        return np.array([q["correct"][method] for q in results["tasks"][task]["questions"]],
                        dtype=np.float64)

    tasks = list(routed)
    groups = {"Avg": tasks,
              "Avg above chance": [t for t in tasks if results["tasks"][t]["dense_above_chance"]]}
    rows = {}
    for label, members in {**{t: [t] for t in tasks}, **groups}.items():
        row = {"rerouted": float(np.mean([column(t, "rerouted").mean() for t in members]))}
        for method in against:
            row[method] = float(np.mean([column(t, method).mean() for t in members]))
            d = paired_bootstrap([(column(t, "rerouted"), column(t, method)) for t in members],
                                 resamples)
            row[f"minus {method}"] = {"diff": d.diff, "low": d.low, "high": d.high}
        rows[label] = row
    return rows


def markdown(rows: dict, against: tuple[str, ...], name: str) -> str:
    head = f"| | {name} | " + " | ".join(against) + " | " + " | ".join(
        f"{name} - {m} [95%]" for m in against) + " |"
    lines = [head, "|---" * (2 + 2 * len(against)) + "|"]
    for label, r in rows.items():
        cells = [f"{100 * r['rerouted']:.2f}"] + [f"{100 * r[m]:.2f}" for m in against]
        cells += [f"{100 * r[f'minus {m}']['diff']:+.2f} [{100 * r[f'minus {m}']['low']:+.2f}, "
                  f"{100 * r[f'minus {m}']['high']:+.2f}]" for m in against]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="A `pudding eval` results.json.")
    ap.add_argument("bundle", type=Path, help="A bundle over the same candidates.")
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--name", default="rerouted", help="The new router's label.")
    ap.add_argument("--against", default="pudding,static:best")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--resamples", type=int, default=2000)
    args = ap.parse_args()
    results = json.loads(args.results.read_text())
    pm = pudding_mlx.load(args.bundle)
    routed = reroute(results, pm, args.output / "cache", args.data_dir)
    against = tuple(args.against.split(","))
    rows = summary(results, routed, against, args.resamples)
    text = markdown(rows, against, args.name)
    print(text)
    args.output.mkdir(parents=True, exist_ok=True)
    left_out = sorted(set(results["tasks"]) - set(routed))
    (args.output / "results.md").write_text(
        f"Rerouted `{args.results}` with `{args.bundle}`; accuracy in %, paired intervals "
        f"over the same questions ({args.resamples} bootstrap resamples). Averages over "
        f"{', '.join(routed)}" + (f" ({', '.join(left_out)} left out: question ids differ)"
                                 if left_out else "") + ".\n\n" + text)
    picks = {t: {n: list(r["picks"].values()).count(n) for n in set(r["picks"].values())}
             for t, r in routed.items()}
    (args.output / "results.json").write_text(json.dumps(
        {"results": str(args.results), "bundle": str(args.bundle), "rows": rows,
         "picks": picks}, indent=1) + "\n")


if __name__ == "__main__":
    main()

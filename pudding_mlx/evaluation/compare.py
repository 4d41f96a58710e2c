"""`pudding eval-compare`: two or more `pudding eval` runs on the same questions, side by side.

One run is the reference (e.g. the float32 bundle); each other run (the same bundle quantised,
or scored by another backend) is compared with it per task and method: both scores, the
paired difference other minus reference with a 95% bootstrap interval over questions
(`stats.paired_bootstrap`), and on how many questions the two runs agree about right or
wrong; the same for the six-task average and the tasks where the reference's dense is above
chance. `pudding eval` picks its questions by --limit and --seed, so runs with the same
settings score the same questions; other runs are refused.
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from ..errors import PuddingError
from ..files import read_json, write_atomic, write_json
from .report import LABELS
from .stats import paired_bootstrap


def read_run(folder: str | Path) -> dict:
    """A `pudding eval` output folder's results.json."""
    path = Path(folder) / "results.json"
    if not path.is_file():
        raise PuddingError(f"{path}: missing (not a `pudding eval` output folder)")
    return read_json(path)


def _correct(task: dict, qids: list[str], method: str) -> np.ndarray:
    by_qid = {q["qid"]: q["correct"][method] for q in task["questions"]}
    return np.array([by_qid[q] for q in qids], dtype=np.float64)


def compare_runs(ref: dict, other: dict, where: str = "", resamples: int = 2000,
                 seed: int = 0) -> dict:
    """Per task and method, and over the averages: reference and other score, other minus
    reference (paired, with its interval), questions scored alike."""
    tasks = [t for t in ref["tasks"] if t in other["tasks"]]
    methods = [m for m in ref["methods"] if m in other["methods"]]
    if not tasks or not methods:
        raise PuddingError(f"{where}: no task and method in common with the reference")
    columns: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    per_task = {}
    for t in tasks:
        qids = [q["qid"] for q in ref["tasks"][t]["questions"]]
        if sorted(qids) != sorted(q["qid"] for q in other["tasks"][t]["questions"]):
            raise PuddingError(f"{where}: {t}: other questions than the reference's (run both "
                               "with the same --limit, --seed and data)")
        per_task[t] = {}
        for m in methods:
            a = _correct(ref["tasks"][t], qids, m)
            b = _correct(other["tasks"][t], qids, m)
            columns.setdefault(m, {})[t] = (b, a)
            per_task[t][m] = {"reference": float(a.mean()), "other": float(b.mean()),
                              "diff": paired_bootstrap([(b, a)], resamples, seed).to_dict(),
                              "alike": int((a == b).sum()), "n": len(qids)}
    averages = {}
    groups = {"six": ref["averages"].get("six", {}).get("tasks", []),
              "above_chance": ref["averages"].get("above_chance", {}).get("tasks", [])}
    for key, names in groups.items():
        names = [t for t in names if t in tasks]
        if not names:
            continue
        averages[key] = {"tasks": names}
        for m in methods:
            pairs = [columns[m][t] for t in names]
            averages[key][m] = {
                "reference": float(np.mean([a.mean() for _, a in pairs])),
                "other": float(np.mean([b.mean() for b, _ in pairs])),
                "diff": paired_bootstrap(pairs, resamples, seed).to_dict()}
    return {"methods": methods, "tasks": per_task, "averages": averages}


def _run_info(folder: str | Path, run: dict) -> dict:
    return {"folder": str(folder), "bundle": run.get("bundle"), "backend": run.get("backend"),
            "limit": run.get("limit"), "seed": run.get("seed"), "command": run.get("command")}


def compare_folders(reference: str | Path, others: list[str | Path], resamples: int = 2000,
                    seed: int = 0) -> dict:
    ref = read_run(reference)
    out = {"reference": _run_info(reference, ref), "resamples": resamples, "others": []}
    for folder in others:
        run = read_run(folder)
        out["others"].append({**_run_info(folder, run),
                              **compare_runs(ref, run, str(folder), resamples, seed)})
    return out


def _cell(d: dict) -> str:
    p = d["diff"]
    return (f"{100 * d['reference']:.2f} → {100 * d['other']:.2f}: "
            f"{100 * p['diff']:+.2f} [{100 * p['low']:+.2f}, {100 * p['high']:+.2f}]")


def markdown(comparison: dict) -> str:
    ref = comparison["reference"]
    lines = ["# Paired accuracy differences against a reference run (points)", "",
             f"Reference: `{ref['folder']}` (bundle `{ref['bundle']}`, backend {ref['backend']},"
             f" limit {ref['limit']}, seed {ref['seed']}).", "",
             "Each cell: reference score → other score: other minus reference, with a 95% "
             f"bootstrap interval over the same questions ({comparison['resamples']} "
             "resamples; averages resample each task independently)."]
    for o in comparison["others"]:
        tasks = list(o["tasks"])
        avgs = o["averages"]
        avg_cols = [(k, f"Avg ({len(avgs[k]['tasks'])} of 6)" if k == "six" else
                     "Avg above chance ("
                     + ", ".join(LABELS.get(t, t) for t in avgs[k]["tasks"]) + ")")
                    for k in ("six", "above_chance") if k in avgs]
        head = ["Method", *(LABELS.get(t, t) for t in tasks), *(label for _, label in avg_cols)]
        lines += ["", f"## `{o['folder']}` (bundle `{o['bundle']}`, backend {o['backend']})", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m in o["methods"]:
            cells = [m, *(_cell(o["tasks"][t][m]) for t in tasks),
                     *(_cell(avgs[k][m]) for k, _ in avg_cols)]
            lines.append("| " + " | ".join(cells) + " |")
        alike = {m: sum(o["tasks"][t][m]["alike"] for t in tasks) for m in o["methods"]}
        n = sum(o["tasks"][t][o["methods"][0]]["n"] for t in tasks)
        lines += ["", "Questions scored alike (both right or both wrong), of "
                  f"{n}: " + ", ".join(f"{m} {k}" for m, k in alike.items()) + "."]
    return "\n".join(lines) + "\n"


@click.command("eval-compare")
@click.argument("reference", type=click.Path(file_okay=False))
@click.argument("others", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--output", "-o", type=click.Path(file_okay=False), default=None,
              help="Write compare.md and compare.json into this folder.")
@click.option("--resamples", type=int, default=2000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def eval_compare(reference, others, output, resamples, seed):
    """Paired accuracy differences of `pudding eval` outputs OTHERS against REFERENCE (the same
    questions: e.g. a quantised bundle against its float32 bundle)."""
    comparison = compare_folders(reference, list(others), resamples, seed)
    text = markdown(comparison)
    click.echo(text)
    if output:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "compare.json", comparison)
        write_atomic(out / "compare.md", text)
        click.echo(f"Wrote {out / 'compare.md'} and compare.json")

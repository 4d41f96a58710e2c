"""`pudding eval` outputs: results.json, results.md (paper-like table) and skip_heatmap.png."""

from __future__ import annotations

from pathlib import Path

from ..files import write_report

LABELS = {"arc_challenge": "ARC-C", "arc_easy": "ARC-E", "boolq": "BoolQ",
          "hellaswag": "HellaSwag", "piqa": "PIQA", "winogrande": "WinoGrande",
          "openbookqa": "OBQA"}


def write_all(folder: str | Path, results: dict) -> None:
    heatmap = any(t["skip_frequency"] for t in results["tasks"].values())
    write_report(folder, "results", results, markdown(results),
                 {"skip_heatmap.png": lambda p: skip_heatmap(p, results)} if heatmap else None)


def _row_label(m: str, results: dict) -> str:
    if m == "static:best" and results.get("static_best"):
        return f"static:best ({results['static_best']['name']})"
    if m == f"static:{results['static']}":
        return f"{m} (bundle static)"
    return m


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f}"


def _ci(p: dict) -> str:
    return f"{100 * p['diff']:+.2f} [{100 * p['low']:+.2f}, {100 * p['high']:+.2f}]"


def markdown(results: dict) -> str:
    tasks = list(results["tasks"])
    avgs = results["averages"]
    avg_cols = []
    if "six" in avgs:
        n = len(avgs["six"]["tasks"])
        avg_cols.append(("six", "Avg" if n == 6 else f"Avg ({n} of 6)"))
    if "above_chance" in avgs:
        names = ", ".join(LABELS.get(t, t) for t in avgs["above_chance"]["tasks"])
        avg_cols.append(("above_chance", f"Avg above chance ({names})"))
    base = results.get("baseline")
    head = ["Method", *(f"{LABELS.get(t, t)} ({results['tasks'][t]['metric']})" for t in tasks),
            *(label for _, label in avg_cols)]
    if base and "six" in avgs:
        head.append(f"Δ Avg vs {base}")
    lines = [_header(results), "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for m in results["methods"]:
        cells = [_row_label(m, results)]
        cells += [_pct(results["tasks"][t]["results"][m]["score"]) for t in tasks]
        cells += [_pct(avgs[k]["results"][m]) for k, _ in avg_cols]
        if base and "six" in avgs:
            cells.append(f"{100 * (avgs['six']['results'][m] - avgs['six']['results'][base]):+.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "n (questions): " + ", ".join(
        f"{LABELS.get(t, t)} {results['tasks'][t]['n']}" for t in tasks) + "; chance: " + ", ".join(
        f"{LABELS.get(t, t)} {_pct(results['tasks'][t]['chance'])}" for t in tasks)]
    if "pudding" in results["methods"]:
        lines += ["", _pairs_table(results, tasks, avg_cols)]
    lines += ["", _notes(results)]
    return "\n".join(lines) + "\n"


def _header(results: dict) -> str:
    k = sorted({len(s) for n, s in results["sets"].items() if n in results["candidates"]})
    limit = f", at most {results['limit']} questions per task" if results["limit"] else ""
    return (f"# Zero-shot accuracy (%): {results['base_model']}, {results['num_blocks']} blocks, "
            f"candidates skip k = {', '.join(map(str, k))}\n\n"
            f"Backend: {results['backend']}{limit}. Command: `{results['command']}`")


def _pairs_table(results: dict, tasks: list[str], avg_cols) -> str:
    others = [m for m in results["methods"] if m != "pudding"]
    head = ["pudding minus", *(LABELS.get(t, t) for t in tasks), *(lab for _, lab in avg_cols)]
    lines = [f"Paired difference in points, pudding minus each method, with a 95% bootstrap "
             f"interval over questions ({results['resamples']} resamples; averages resample "
             "each task independently):", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for m in others:
        cells = [_row_label(m, results)]
        cells += [_ci(results["tasks"][t]["pairs"][m]) for t in tasks]
        cells += [_ci(results["averages"][k]["pairs"][m]) for k, _ in avg_cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _notes(results: dict) -> str:
    notes = ["Notes:",
             "- lm-evaluation-harness zero-shot protocol: target delimiter \" \", acc = argmax "
             "of the summed log-likelihood, acc_norm = argmax of it divided by the choice's "
             "length in characters; WinoGrande partial scoring.",
             "- Splits: " + ", ".join(f"{LABELS.get(t, t)} {d['split']}"
                                      for t, d in results["tasks"].items()) + ".",
             "- pudding: one router pick per question from the question alone (WinoGrande: the "
             "sentence with the blank); oracle: per question the candidate ranking the gold "
             "answer best; random: a seeded uniform candidate per question.",
             "- Avg is over ARC-C, ARC-E, BoolQ, HellaSwag, PIQA, WinoGrande; 'above chance' "
             "keeps the tasks where dense beats chance by more than 1.96 binomial standard "
             "errors."]
    if results.get("router_target") == "fidelity":
        tol = results.get("tolerance")
        notes.append("- The router predicts each set's KL to dense (target 'fidelity'); "
                     "pudding picks within " + (f"tolerance {tol:g}" if tol is not None
                                                else "the bundle's default tolerance") + ".")
    if any(m.startswith("routed") for m in results["methods"]):
        notes.append("- routed@X: per question, the set skipping the most blocks among those "
                     "the router predicts within X nats/token of KL to dense (else dense); "
                     "routed:kN: the router's best prediction among the sets of N blocks. "
                     "results.json gives each method's mean_skipped blocks per task.")
    best = results.get("static_best")
    if best:
        notes.append(f"- static:best = {best['name']}: the candidate with the highest "
                     f"{best['criterion']} "
                     f"({', '.join(f'{t} {n}' for t, n in best['slice'].items())} examples, "
                     f"seed {best['seed']}).")
    return "\n".join(notes)


def skip_heatmap(path: str | Path, results: dict) -> None:
    """How often pudding's route skips each block, per task (fraction of questions)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = [t for t, d in results["tasks"].items() if d["skip_frequency"]]
    grid = np.array([results["tasks"][t]["skip_frequency"] for t in tasks])
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * grid.shape[1] + 2), 0.5 * len(tasks) + 1.5))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(grid.shape[1]))
    ax.set_xticklabels([str(i) for i in range(grid.shape[1])], fontsize=7)
    ax.set_yticks(range(len(tasks)))
    ax.set_yticklabels([LABELS.get(t, t) for t in tasks])
    ax.set_xlabel("block")
    ax.set_title("Fraction of questions whose routed set skips each block "
                 f"({results['base_model']})", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

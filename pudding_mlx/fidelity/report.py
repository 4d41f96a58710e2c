"""`pudding fidelity` outputs: results.json, results.md and fidelity.png."""

from __future__ import annotations

from pathlib import Path

from ..files import write_report


def write_all(folder: str | Path, results: dict) -> None:
    write_report(folder, "results", results, markdown(results),
                 {"fidelity.png": lambda p: plot(p, results)})


def _label(row: str, results: dict) -> str:
    if row == results["static"]:
        return f"{row} (bundle static)"
    if row == "routed":
        return "routed (PuDDing)"
    return row


def _routed_rows(results: dict) -> dict[str, dict[str, int]]:
    """Routed row -> how often it picked each set (results before routed@X rows: one row)."""
    return results.get("route_counts_by_row", {"routed": results["route_counts"]})


def _skips(row: str, results: dict) -> str:
    counts = _routed_rows(results).get(row)
    if counts is not None:
        n = results["n"]
        picks = sorted(counts.items(), key=lambda kv: -kv[1])
        mean = results.get("mean_skipped", {}).get(row)
        text = f"mean {mean:.2f} blocks; " if mean is not None else ""
        return text + "per prompt: " + ", ".join(f"{name} {100 * c / n:.0f}%"
                                                 for name, c in picks)
    return ",".join(map(str, results["sets"][row])) or "none"


def _ci(d: dict, scale: float = 1.0, digits: int = 3, sign: str = "") -> str:
    f = f"{{:{sign}.{digits}f}}"
    return (f"{f.format(scale * d['diff'])} [{f.format(scale * d['low'])}, "
            f"{f.format(scale * d['high'])}]")


def _model(results: dict) -> str:
    """The base model's name (a local path's last part)."""
    m = results["base_model"]
    return Path(m).name if m.startswith("/") else m


def markdown(results: dict) -> str:
    sources = ", ".join(f"{s} {n}" for s, n in results["sources"].items())
    lines = [
        f"# Fidelity to dense on generated text: {_model(results)}, "
        f"{results['num_blocks']} blocks",
        "",
        f"{results['n']} prompts ({results['prompts_file']}, split {results['split']}: "
        f"{sources}); dense greedy continuation of up to {results['max_tokens']} tokens "
        f"(mean {results['mean_tokens']:.1f}), chat template applied. "
        f"Command: `{results['command']}`",
        "",
        "| set | skips | KL(dense ‖ set), nats/token | top-1 agreement, % | "
        "PPL of the dense text | tokens to first divergence | whole text reproduced, % |",
        "|---|---|---|---|---|---|---|",
    ]
    for row, s in results["summary"].items():
        lines.append("| " + " | ".join([
            _label(row, results), _skips(row, results), _ci(s["kl"], digits=4),
            _ci(s["agreement"], 100, 1), f"{s['ppl']:.3f}", _ci(s["diverge"], digits=1),
            f"{100 * s['full_match']:.1f}"]) + " |")
    base = results.get("pairs_base", "routed")
    lines += [
        "",
        f"Paired differences, {base} minus each set, with 95% bootstrap intervals over prompts "
        f"({results['resamples']} resamples):",
        "",
        f"| {base} minus | Δ KL, nats/token | Δ agreement, points | Δ NLL, nats/token | "
        "Δ tokens to first divergence |",
        "|---|---|---|---|---|",
    ]
    for row, p in results["pairs"].items():
        lines.append("| " + " | ".join([
            _label(row, results), _ci(p["kl"], digits=4, sign="+"),
            _ci(p["agreement"], 100, 1, "+"), _ci(p["nll"], digits=4, sign="+"),
            _ci(p["diverge"], digits=1, sign="+")]) + " |")
    lines += ["", _notes(results)]
    return "\n".join(lines) + "\n"


def _notes(results: dict) -> str:
    applied = ", ".join(f"{row} as {rule}" for row, rule in results.get("routed", {}).items())
    return "\n".join([
        "Notes:",
        "- Teacher-forced on the dense continuation (prompt + continuation in one forward "
        "without the set's blocks, float32 log-softmax): KL(dense ‖ set) = Σ_v p_dense "
        "(log p_dense − log p_set) per token; agreement = the set's top-1 token equals "
        "dense's; PPL = exp(mean NLL of the dense tokens under the set). Per prompt the token "
        "values are averaged, then prompts are averaged (each prompt weighs the same); PPL is "
        "exp of the mean of the per-prompt mean NLL.",
        "- Free-running: the set decodes greedily from the prompt; tokens to first divergence "
        "= how many tokens it produces before its first token that differs from dense (the "
        "continuation's length when it reproduces all of it, end-of-sequence token included).",
        "- routed: the bundle's router picks one candidate per prompt from the raw prompt "
        "text (`PuddingModel.route`); its row takes that set's values prompt by prompt. "
        "routed@X: the set skipping the most blocks among those the router predicts within "
        "X nats/token of KL to dense (else dense); routed:kN: the router's best prediction "
        "among the sets of N blocks (fidelity routers: the lowest predicted KL). "
        f"This router's target: {results.get('router_target', 'likelihood')}"
        + (f"; rows routed {applied}." if applied else "."),
        "- Intervals: percentile bootstrap over prompts (`eval_stats.paired_bootstrap`), "
        f"seed {results['seed']}.",
    ])


def plot(path: str | Path, results: dict) -> None:
    """Mean KL by continuation position, and the share of prompts still matching dense."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["by_position"] if r != "dense"]
    fig, (ax_kl, ax_match) = plt.subplots(1, 2, figsize=(11, 4))
    for row in rows:
        d = results["by_position"][row]
        style = ({"color": "black", "linestyle": "--", "linewidth": 2} if row == "routed"
                 else {"linestyle": "--"} if row in _routed_rows(results) else {})
        xs = [t + 1 for t, v in enumerate(d["kl"]) if v is not None]
        ax_kl.plot(xs, [v for v in d["kl"] if v is not None], label=_label(row, results),
                   **style)
        ax_match.plot(range(len(d["matching"]) + 1), [100.0, *(100 * v for v in d["matching"])],
                      label=_label(row, results), **style)
    ax_kl.set_xlabel("continuation token")
    ax_kl.set_ylabel("mean KL(dense ‖ set), nats")
    ax_kl.set_yscale("log")
    ax_match.set_xlabel("tokens generated")
    ax_match.set_ylabel("% of prompts, greedy output still = dense")
    ax_match.set_ylim(0, 100)
    ax_match.legend(fontsize=7)
    fig.suptitle(f"Fidelity to dense: {_model(results)}, {results['n']} prompts",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)

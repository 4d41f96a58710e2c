"""bench.png: measured routed speedup vs prompt length and vs generated tokens, ideal as a line."""

from __future__ import annotations

from pathlib import Path


def _errors(rows: list[dict], key: str, invert: bool = False):
    """Median speedup and its range from the dense and routed min/max (worst and best case)."""
    mid, low, high = [], [], []
    for r in rows:
        d, o = r["dense"][key], r["routed"][key]
        if invert:  # a rate: routed / dense
            d, o = o, d
        m = d["median"] / o["median"]
        mid.append(m)
        low.append(m - d["min"] / o["max"])
        high.append(d["max"] / o["min"] - m)
    return mid, [low, high]


def plot(result: dict, path: str | Path) -> None:
    """Write the figure for a bench result (`Result.to_dict()`) to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["summary"]
    panels = [p for p in ("ttft", "generation") if s[p]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        rows = s[panel]
        if panel == "ttft":
            x = [r["prompt_tokens"] for r in rows]
            y, err = _errors(rows, "ttft_s")
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label="measured (router included)")
            ax.plot(x, [r["ttft_speedup_best"] for r in rows], "x", color="C0",
                    label="fastest trials")
            ax.plot(x, [r["ideal_prefill"] for r in rows], "k--", marker="_", ms=16,
                    label="ideal (FLOPs)")
            ax.set_xlabel("prompt tokens")
            ax.set_title("Time to first token")
        else:
            x = [r["gen_tokens"] for r in rows]
            y, err = _errors(rows, "total_s")
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label="measured, whole request")
            ax.plot(x, [r["ideal_total"] for r in rows], "k--", marker="_", ms=16,
                    label="ideal, whole request")
            y, err = _errors(rows, "decode_tps", invert=True)
            ax.errorbar(x, y, yerr=err, marker="s", capsize=3, label="measured, decoding")
            ax.plot(x, [r["ideal_decode"] for r in rows], "k:", marker="_", ms=16,
                    label="ideal, decoding (bytes)")
            ax.set_xlabel(f"generated tokens (prompt {rows[0]['prompt_tokens']})")
            ax.set_title("Prefill + generation")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xticks(x)
        ax.set_ylabel("speedup over dense")
        ax.legend(fontsize=8)
    m = result["model"]
    fig.suptitle(f"{m['dtype']}, {s['skipped']} of {m['num_blocks']} blocks skipped, "
                 f"{result['machine']['device']} ({result['machine']['machine']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""Which ingredient moves routed-minus-best-static (issue 11): one router per row, each row one
change against a baseline, every row scored on the same questions in the same dtype.

Rows (`ROWS`): the baseline is session 2's recipe (candidates from 32 calibration questions per
task, 300 labelled questions per task, the last epoch kept, WinoGrande's router text cut before
the blank at training); each other row changes one of those; `all` changes all four. Routers
share one recipe (`RECIPE`: MiniLM-L6 on the question text, lr 1e-4, 30 warm-up steps, 10
epochs, bf16 autocast where fast) so that only the row's change differs. A row that keeps the
best epoch and one that keeps the last come from the same training run (train-router leaves
both). Two more rows try item 6 of the issue on top of `all` (`choices`, `margin`; pass them in
--rows).

    python benchmarks/router_ablation.py \\
        --old-candidates examples/results/smollm2/candidates.json \\
        --old-labels examples/results/smollm2/labels-paper \\
        --new-candidates examples/results/smollm2-paper/build/search/candidates.json \\
        --new-labels examples/results/smollm2-paper/build/labels \\
        --out examples/results/eval/paper/ablation --limit 500

Every step is reused when done (derived labels, routers, bundles, per-set scores in one shared
eval cache), so an interrupted run continues; `--rows` runs some rows only, and
`--report-only` then gathers rows run by separate commands into one table. Writes
`<out>/<row>/` (a `pudding eval` folder per row), `<out>/routers/<key>/metrics.json` (learning
curves) and `<out>/ablation.md` / `ablation.json`.
"""

from __future__ import annotations

import argparse
import random
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from convert.build import _invoke
from convert.label_store import META, read_labels, read_meta, write_shard
from convert.router_metrics import question_context
from convert.to_bundle import convert
from convert.train_router import LAST, TrainConfig, train
from pudding_mlx.evaluation.run import EvalSettings, run_eval
from pudding_mlx.files import read_json, write_json, write_report
from pudding_mlx.tasks import EVAL_TASKS


@dataclass(frozen=True)
class Row:
    change: str  # what the row changes against the baseline
    candidates: str  # "old" (32 calibration questions per task) or "new" (128)
    per_task: int | None  # labelled questions per task the router trains on (None: all)
    wino: str  # WinoGrande router text at training: "before-blank" (old) or "sentence"
    select: str  # "last" or "best" epoch
    inputs: str = "context"  # the router reads the question, or it and its choices
    target: str = "likelihood"

    @property
    def router_key(self) -> str:
        extra = "".join(f"-{v}" for v, d in ((self.inputs, "context"),
                                             (self.target, "likelihood")) if v != d)
        return f"{self.candidates}-{self.per_task or 'all'}-{self.wino}{extra}"


ROWS = {
    "baseline": Row("none (session 2's recipe)", "old", 300, "before-blank", "last"),
    "calib-128": Row("32 -> 128 calibration questions", "new", 300, "before-blank", "last"),
    "all-labels": Row("300 -> all labels", "old", None, "before-blank", "last"),
    "best-epoch": Row("last -> best epoch", "old", 300, "before-blank", "best"),
    "wino-fix": Row("WinoGrande input fix", "old", 300, "sentence", "last"),
    "all": Row("all four", "new", None, "sentence", "best"),
    # issue 11 item 6, tried on top of `all`: the router also reads the answer choices (which
    # set ranks the gold answer first depends on its competitors), or regresses the margin
    # (gold minus the distractors, closer to accuracy; it overfit 1,200 questions in session 2)
    "choices": Row("all four + router reads the choices", "new", None, "sentence", "best",
                   inputs="choices"),
    "margin": Row("all four + margin target", "new", None, "sentence", "best",
                  target="margin"),
}
DEFAULT_ROWS = ("baseline", "calib-128", "all-labels", "best-epoch", "wino-fix", "all")
RECIPE = TrainConfig(lr=1e-4, warmup_steps=30, epochs=10, batch_size=32, select="best",
                     dtype="auto")
SEED = 42


def derive_labels(source: Path, out: Path, per_task: int | None, wino: str) -> Path:
    """A copy of a label folder with a seeded sample of `per_task` questions per task and, for
    wino == "before-blank", WinoGrande's router text as the pre-fix labels wrote it (the common
    prefix of its rows' prompts: the sentence before the blank)."""
    spec = {"source": read_meta(source).get("settings"), "per_task": per_task, "wino": wino,
            "seed": SEED}
    if (out / META).is_file() and read_meta(out).get("derived") == spec:
        return out
    t = read_labels(source)
    keep = set()
    for task in sorted(set(t.task)):
        qids = sorted({q for k, q in zip(t.task, t.qid, strict=True) if k == task})
        n = len(qids) if per_task is None else min(per_task, len(qids))
        keep |= {(task, q) for q in random.Random(SEED).sample(qids, n)}
    rows = [i for i, k in enumerate(zip(t.task, t.qid, strict=True)) if k in keep]
    context = list(t.context)
    if wino == "before-blank":
        texts: dict[str, list[str]] = {}
        for i in rows:
            if t.task[i] == "winogrande":
                texts.setdefault(t.qid[i], []).append(t.text[i])
        for i in rows:
            if t.task[i] == "winogrande":
                context[i] = question_context(texts[t.qid[i]])
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    write_shard(out, 0, {
        "task": [t.task[i] for i in rows], "qid": [t.qid[i] for i in rows],
        "choice": [int(t.choice[i]) for i in rows], "gold": [int(t.gold[i]) for i in rows],
        "text": [t.text[i] for i in rows], "context": [context[i] for i in rows],
        "loglik": t.loglik[rows].tolist()})
    write_json(out / META, {**t.meta, "num_shards": 1, "complete": True, "derived": spec,
                            "questions": len(keep), "rows": len(rows)})
    return out


def router_dir(trained: Path, select: str) -> Path:
    """The kept epoch's router, or the last epoch's (the same folder when they coincide)."""
    last = trained / LAST
    return last if select == "last" and last.is_dir() else trained / "router"


def run_row(name: str, row: Row, args) -> tuple[dict, dict]:
    """The row's eval results and its router's training metrics."""
    cands = args.old_candidates if row.candidates == "old" else args.new_candidates
    labels = args.old_labels if row.candidates == "old" else args.new_labels
    work = Path(args.work)
    derived = derive_labels(Path(labels), work / "labels" / row.router_key, row.per_task,
                            row.wino)
    trained = Path(args.out) / "routers" / row.router_key
    metrics = train(derived, trained, replace(RECIPE, inputs=row.inputs, target=row.target),
                    device=args.device)  # a copy: train() fills in its config
    bundle = work / "bundles" / f"{row.router_key}-{row.select}"
    router = router_dir(trained, row.select)
    source = {"candidates": str(cands), "router": str(router),
              "router_metrics": metrics["settings"]}
    made = bundle.with_name(bundle.name + ".json")  # beside it: a bundle lists all its files
    if not (bundle / "pudding.json").is_file() or not made.is_file() or read_json(made) != source:
        shutil.rmtree(bundle, ignore_errors=True)
        _invoke(convert, ["--model", args.model, "--candidates", cands, "--router", router,
                          "--out", bundle, "--dtype", "float32", "--no-coreml"])
        write_json(made, source)
    out = Path(args.out) / name
    results = run_eval(EvalSettings(
        bundle=str(bundle), output=str(out), tasks=EVAL_TASKS, limit=args.limit,
        backend="torch", torch_model=args.model, device=args.device, dtype=args.dtype,
        baseline="static:best", best_slice=128, cache=str(Path(args.out) / "cache"),
        command=f"python benchmarks/router_ablation.py --rows {name} (see ../README.md)"))
    return results, metrics


def table(results: dict[str, dict], metrics: dict[str, dict]) -> tuple[str, dict]:
    def cell(p: dict) -> str:
        return f"{100 * p['diff']:+.2f} [{100 * p['low']:+.2f}, {100 * p['high']:+.2f}]"

    lines = ["| row | change | routed | static:best | static:task-best | oracle:task "
             "| routed - static:best | routed - static:task-best | epoch kept |",
             "|---|---|---|---|---|---|---|---|---|"]
    summary = {}
    for avg in ("six", "above_chance"):
        lines.append(f"| **{avg.replace('_', ' ')}** | | | | | | | | |")
        for name, r in results.items():
            a = r["averages"][avg]
            s, p = a["results"], a["pairs"]
            m = metrics[name]
            epoch = m["selected_epoch"] if ROWS[name].select == "best" else len(m["history"])
            lines.append(
                f"| {name} | {ROWS[name].change} | {100 * s['pudding']:.2f} "
                f"| {100 * s['static:best']:.2f} | {100 * s['static:task-best']:.2f} "
                f"| {100 * s['oracle:task']:.2f} | {cell(p['static:best'])} "
                f"| {cell(p['static:task-best'])} | {epoch} of {len(m['history'])} |")
            summary.setdefault(name, {"row": asdict(ROWS[name])})[avg] = {
                "results": s, "minus_static_best": p["static:best"],
                "minus_static_task_best": p["static:task-best"], "epoch": epoch}
    return "\n".join(lines) + "\n", summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old-candidates")
    ap.add_argument("--old-labels")
    ap.add_argument("--new-candidates")
    ap.add_argument("--new-labels")
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default=str(Path.home() / ".cache/pudding-mlx/ablation"),
                    help="derived labels and bundles (large, regenerable)")
    ap.add_argument("--model", default=None, help="[default: the packaged SmolLM2 GGUF]")
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"of {', '.join(ROWS)}")
    ap.add_argument("--limit", type=int, default=500, help="questions per task")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="bfloat16", help="torch scoring dtype, every row")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite ablation.md/json from those of --rows already evaluated "
                         "(rows run by separate commands), running nothing")
    args = ap.parse_args()
    inputs = ("old_candidates", "old_labels", "new_candidates", "new_labels")
    if not args.report_only and (missing := [a for a in inputs if not getattr(args, a)]):
        ap.error("running rows needs " + ", ".join("--" + a.replace("_", "-") for a in missing))
    if args.model is None:
        from convert.assets import default_model

        args.model = str(default_model())
    names = [r.strip() for r in args.rows.split(",") if r.strip()]
    if bad := [n for n in names if n not in ROWS]:
        ap.error(f"unknown rows {bad}; expected {', '.join(ROWS)}")
    out = Path(args.out)
    if args.report_only:
        runs = {n: (read_json(out / n / "results.json"),
                    read_json(out / "routers" / ROWS[n].router_key / "metrics.json"))
                for n in names if (out / n / "results.json").is_file()}
    else:
        runs = {n: run_row(n, ROWS[n], args) for n in names}
    md, summary = table({n: r for n, (r, _) in runs.items()},
                        {n: m for n, (_, m) in runs.items()})
    write_report(out, "ablation", summary, md)
    print(md)


if __name__ == "__main__":
    main()

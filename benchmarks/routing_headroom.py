"""How much accuracy is there for a router to gain over the best single candidate set, measured
on labelled training questions with cross-fitting (issue 11: the experiment behind a tie).

The per-question oracle (the best set for each question, chosen knowing its answer) is far
above every set, but on two- to five-way choices much of that is luck. A router can only use
what is recognisable from the question text and holds on new questions, so this script
chooses a set per *group* of questions on one half of the labelled questions and scores that
choice on the other half (and the other way round):
- one set: the best set over all questions (static:best with plenty of data);
- task: the best set per task (what a router that only recognises the task can do);
- clusters: the best set per k-means cluster of the router's own view of the question
  (MiniLM-L6 mean-pooled embeddings of the text the router reads), for several cluster
  counts: finer than tasks, still learnable from the text.
A grouping that gains nothing on the held-out half leaves a router nothing to learn at that
grain. Accuracy here is the method's (the gold answer has the highest mean answer-token
log-likelihood, the label's `correct`), averaged with equal weight per task; intervals are
paired bootstrap intervals against the one-set choice.

    python benchmarks/routing_headroom.py examples/results/smollm2/labels-paper \\
        --out examples/results/eval/paper/headroom-32q
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from convert.label_store import read_labels
from convert.router_metrics import group_questions, split_questions
from pudding_mlx.evaluation.stats import paired_bootstrap
from pudding_mlx.files import write_report


def embed(texts: list[str], max_length: int = 64, batch: int = 64) -> np.ndarray:
    """MiniLM-L6 mean-pooled, L2-normalised embeddings (the router's backbone, untrained)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModel, AutoTokenizer

    from convert.assets import minilm_path
    from convert.router_model import pool

    tok = AutoTokenizer.from_pretrained(minilm_path())
    model = AutoModel.from_pretrained(minilm_path(), add_pooling_layer=False).eval()
    out = []
    with torch.inference_mode():
        for i in tqdm(range(0, len(texts), batch), desc="embed"):
            enc = tok(texts[i:i + batch], truncation=True, max_length=max_length,
                      padding=True, return_tensors="pt")
            h = pool(model(**enc).last_hidden_state, enc["attention_mask"], "mean")
            out.append(torch.nn.functional.normalize(h, dim=-1).numpy())
    return np.concatenate(out)


def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 50) -> np.ndarray:
    """Cluster index per row (Lloyd's algorithm from k distinct random rows)."""
    rng = np.random.default_rng(seed)
    centres = x[rng.choice(len(x), k, replace=False)]
    for _ in range(iters):
        # nearest centre by |x|^2 - 2 x.c + |c|^2, without the rows x centres x dims array
        assign = ((centres ** 2).sum(1)[None] - 2 * x @ centres.T).argmin(1)
        new = np.stack([x[assign == c].mean(0) if (assign == c).any() else centres[c]
                        for c in range(k)])
        if np.allclose(new, centres):
            break
        centres = new
    return assign


def crossfit(correct: np.ndarray, groups: np.ndarray, fold: np.ndarray) -> np.ndarray:
    """Per question: 1 if the set chosen for its group on the other half answers it. A group
    with no question in the other half takes that half's best set overall."""
    out = np.zeros(len(correct))
    for f in (0, 1):
        train, test = fold != f, fold == f
        overall = int(correct[train].mean(0).argmax())
        for g in np.unique(groups[test]):
            members = train & (groups == g)
            chosen = int(correct[members].mean(0).argmax()) if members.any() else overall
            sel = test & (groups == g)
            out[sel] = correct[sel, chosen]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("labels", help="a complete `pudding label` folder (likelihood)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--clusters", default="8,32,128,512")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t = read_labels(args.labels)
    q = group_questions(t.task, t.qid, t.choice, t.gold, t.loglik, t.context, args.labels)
    tasks, names = q.tasks, t.candidate_names
    correct = q.correct.astype(float)
    fold = split_questions(q.keys, 0.5, args.seed).astype(int)  # a seeded half per task
    groupings = {"one set": np.zeros(len(tasks), dtype=int),
                 "task": np.unique(tasks, return_inverse=True)[1]}
    x = embed(q.contexts)
    for k in (int(v) for v in args.clusters.split(",")):
        groupings[f"{k} clusters"] = kmeans(x, k, args.seed)
    task_names = sorted(set(tasks))

    def by_task(v: np.ndarray) -> float:
        return float(np.mean([v[tasks == s].mean() for s in task_names]))

    acc = {name: crossfit(correct, g, fold) for name, g in groupings.items()}
    base = acc["one set"]
    rows = {}
    for name, v in acc.items():
        pair = paired_bootstrap([(v[tasks == s], base[tasks == s]) for s in task_names])
        rows[name] = {"accuracy": by_task(v), "minus_one_set": pair.to_dict(),
                      "per_task": {s: float(v[tasks == s].mean()) for s in task_names}}
    oracle = correct.max(1)
    per_set = {n: by_task(correct[:, c]) for c, n in enumerate(names)}
    doc = {"labels": str(args.labels), "questions": int(len(tasks)),
           "per_task_questions": {s: int((tasks == s).sum()) for s in task_names},
           "seed": args.seed, "groupings": rows, "per_set_in_sample": per_set,
           "oracle_per_question_in_sample": by_task(oracle)}

    counts = ", ".join(f"{s} {(tasks == s).sum()}" for s in task_names)
    lines = [f"{len(tasks)} labelled questions ({counts}); accuracy in points, tasks weighted "
             "equally; each group's set chosen on the other half of the questions.", "",
             "| set chosen per | accuracy | minus one set [95% CI] |", "|---|---|---|"]
    for name, r in rows.items():
        p = r["minus_one_set"]
        lines.append(f"| {name} | {100 * r['accuracy']:.2f} | {100 * p['diff']:+.2f} "
                     f"[{100 * p['low']:+.2f}, {100 * p['high']:+.2f}] |")
    lines += ["", f"In sample: best single set {100 * max(per_set.values()):.2f} "
              f"({max(per_set, key=per_set.get)}), per-question oracle "
              f"{100 * doc['oracle_per_question_in_sample']:.2f}.", "",
              "| task | " + " | ".join(rows) + " |", "|---" * (len(rows) + 1) + "|"]
    for s in task_names:
        lines.append(f"| {s} | " + " | ".join(f"{100 * r['per_task'][s]:.2f}"
                                               for r in rows.values()) + " |")
    md = "\n".join(lines) + "\n"
    write_report(Path(args.out), "headroom", doc, md)
    print(md)


if __name__ == "__main__":
    main()

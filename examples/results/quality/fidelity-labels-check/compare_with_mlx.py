"""Torch fidelity labels (argv[1]) vs a `pudding fidelity` output folder (argv[2]) of the bundle
converted from the same checkpoint, with a continuation length >= the labels':
teacher-forced KL at a position depends only on the tokens before it, so the mean of the
first n per-token MLX values equals the label with N = n."""
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from convert.label_store import read_fidelity_labels

t = read_fidelity_labels(sys.argv[1])
cache = Path(sys.argv[2]) / "cache" / "fidelity"
conts = json.loads((cache / "continuations.json").read_text())["values"]
keys = {"dense": "dense"}
for c in t.meta["candidates"]:
    if c["skip"]:
        keys[c["name"]] = "skip-" + "-".join(map(str, c["skip"]))
sets = {n: json.loads((cache / f"{k}.json").read_text())["values"] for n, k in keys.items()}
same_cont, dkl, dag = 0, [], []
for r, text in enumerate(t.text):
    key = hashlib.sha1(text.encode()).hexdigest()[:16]
    n = len(t.continuation[r])
    same_cont += t.continuation[r] == conts[key][:n]
    for c, name in enumerate(t.candidate_names):
        m = sets[name][key]
        dkl.append(abs(t.kl[r, c] - np.mean(m["kl"][:n])))
        dag.append(abs(t.agreement[r, c] - np.mean(m["agree"][:n])))
print(f"{len(t)} prompts; continuations equal to MLX's first tokens: {same_cont}/{len(t)}")
print(f"max |KL torch - KL mlx| {max(dkl):.2e} nats/token; max |agreement diff| {max(dag):.3f}")
for name, kl, agree in zip(t.candidate_names, t.kl.mean(0), t.agreement.mean(0), strict=True):
    print(f"{name}: mean KL {kl:.4f} nats/token, agreement {agree:.3f}")
print("stats:", t.meta["stats"])

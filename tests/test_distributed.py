"""Data-parallel runs on CPU: two processes under torchrun (gloo) write the same output as one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np


def _pudding(args: list[str], nproc: int = 0) -> subprocess.CompletedProcess:
    """`pudding ARGS` as one plain process (nproc 0) or under torchrun. One thread per process
    in both: float rounding in the BLAS depends on the thread count (about 1e-6 here)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [sys.executable, *(launch if nproc else []), "-m", "pudding_mlx.cli", *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_labels_two_processes_equal_one(tmp_path):
    from helpers import tiny_llama
    from test_labels import CANDIDATES, write_tiny_data

    from convert.label_store import read_labels, shard_path

    tiny_llama(tmp_path / "llama", num_layers=6)
    write_tiny_data(tmp_path / "data")
    (tmp_path / "candidates.json").write_text(json.dumps({"candidates": CANDIDATES}))
    args = ["label", "--candidates", str(tmp_path / "candidates.json"),
            "--model", str(tmp_path / "llama"), "--tasks", "arc_easy,piqa,winogrande",
            "--data-dir", str(tmp_path / "data"), "--dtype", "float32", "--shard-size", "3",
            "--batch-size", "2", "--device", "cpu"]
    _pudding([*args, "--out", str(tmp_path / "one")])
    _pudding([*args, "--out", str(tmp_path / "two")], nproc=2)
    single = json.loads((tmp_path / "one" / "meta.json").read_text())
    two = json.loads((tmp_path / "two" / "meta.json").read_text())
    assert two["stats"]["processes"] == 2 and two["complete"]
    assert two["settings"] == single["settings"]
    assert two["stats"]["block_evals"] == single["stats"]["block_evals"]
    # per-task counts summed over the ranks: each task's questions once
    assert {t: c["items"] for t, c in two["stats"]["per_task"].items()} == {
        t: c["items"] for t, c in single["stats"]["per_task"].items()} == {
        "arc_easy": 5, "piqa": 3, "winogrande": 2}
    a, b = read_labels(tmp_path / "one"), read_labels(tmp_path / "two")
    assert a.qid == b.qid and a.text == b.text
    np.testing.assert_array_equal(a.loglik, b.loglik)
    for i in range(single["num_shards"]):  # the shard files themselves are identical
        assert shard_path(tmp_path / "one", i).read_bytes() == \
            shard_path(tmp_path / "two", i).read_bytes()

"""`pudding label` on a tiny random LLaMA: values against a plain HF forward per candidate,
prefix-sharing cost, shards and resuming."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

# Candidates over 6 blocks. Walking them as a trie runs 13 blocks per packed row instead of
# 4 + 4 + 4 + 5 = 17 (blocks 0; {A,B}: 3,4,5 / 2,4,5; {C,D}: 1, then 3,4,5 / 2,5).
CANDIDATES = [{"name": "A", "skip": [1, 2]}, {"name": "B", "skip": [1, 3]},
              {"name": "C", "skip": [3, 4]}, {"name": "D", "skip": [2]}]


def write_tiny_data(root):
    """A few rows per task in the shared/data layout (jsonl instead of arrow)."""
    rows = {
        "arc_easy": [{"id": f"arc{i}", "question": q, "answerKey": k,
                      "choices": {"text": c, "label": ["A", "B", "C"]}}
                     for i, (q, c, k) in enumerate([
                         ("Which gas do plants need?", ["oxygen", "carbon dioxide", "water"], "B"),
                         ("How do you boil an egg?", ["in water", "in the sky", "in a glass"], "A"),
                         ("Is the sky blue?", ["yes", "no", "today"], "A"),
                         ("What is the capital of France?", ["Paris", "paris", "France"], "A"),
                         ("How are you today?", ["fine", "thank you", "hello"], "A"),
                     ])],
        "piqa": [{"goal": g, "sol1": a, "sol2": b, "label": y} for g, a, b, y in [
            ("Boil an egg", "put it in boiling water", "put it in the sky", 0),
            ("Fill the glass", "pour water into it", "empty it", 0),
            ("Say hello", "wave your hand", "say hello, how are you", 1),
        ]],
        "winogrande": [{"sentence": s, "option1": a, "option2": b, "answer": y} for s, a, b, y in [
            ("She poured the water into the glass because the _ was empty.", "water", "glass",
             "2"),
            ("The egg was in the water because _ was boiling.", "egg", "water", "2"),
        ]],
    }
    for task, task_rows in rows.items():
        (root / task).mkdir(parents=True)
        (root / task / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in task_rows))
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from helpers import tiny_llama

    root = tmp_path_factory.mktemp("labels")
    model, tok = tiny_llama(root / "llama", num_layers=6)
    write_tiny_data(root / "data")
    (root / "candidates.json").write_text(json.dumps({"candidates": CANDIDATES,
                                                      "settings": {}}))
    return root, model, tok


def _config(root, **kw):
    from convert.labels import LabelConfig, candidate_table

    return LabelConfig(model=str(root / "llama"), tasks=["arc_easy", "piqa", "winogrande"],
                       candidates=candidate_table(root / "candidates.json"),
                       data_dir=str(root / "data"), dtype="float32", shard_size=3,
                       batch_size=2, **kw)


def reference_loglik(model, tok, context: str, continuation: str, skip) -> float:
    """Mean log-prob of the continuation's tokens, from a plain HF forward with the skipped
    blocks removed from the layer list."""
    import torch
    from helpers import torch_logits

    from pudding_mlx.tasks import encode_requests

    (ctx, cont), = encode_requests(tok, [(context, continuation)])
    logp = torch.log_softmax(torch_logits(model, ctx + cont, skip).double(), -1)
    n = len(ctx)
    return float(np.mean([logp[n - 1 + t, tok_id].item() for t, tok_id in enumerate(cont)]))


def test_labels_match_hf_forward(setup, tmp_path):
    from convert.label_store import read_labels
    from convert.labels import label_examples, make_labels

    root, model, tok = setup
    meta = make_labels(tmp_path / "out", _config(root), device="cpu")
    t = read_labels(tmp_path / "out")
    assert meta["num_questions"] == 10 and len(t) == 5 * 3 + 3 * 2 + 2 * 2
    assert meta["num_shards"] == 4 and meta["complete"]
    assert t.candidate_names == ["A", "B", "C", "D"]
    assert t.task[:3] == ["arc_easy"] * 3 and t.choice[:3].tolist() == [0, 1, 2]
    requests = [r for ex in label_examples(_config(root)) for r in ex.prompt]
    for r, (context, continuation) in enumerate(requests):
        assert t.text[r] == context + continuation
        want = [reference_loglik(model, tok, context, continuation, c["skip"])
                for c in CANDIDATES]
        np.testing.assert_allclose(t.loglik[r], want, rtol=0, atol=2e-5, err_msg=t.text[r])
    # gold: ARC answerKey B -> 1 for "Which gas"; winogrande "2" -> 1
    gas = [r for r in range(len(t)) if "Which gas" in t.text[r]]
    assert {int(t.gold[r]) for r in gas} == {1}
    wino = [r for r in range(len(t)) if t.task[r] == "winogrande"]
    assert {int(t.gold[r]) for r in wino} == {1}
    stats = meta["stats"]
    assert stats["block_evals"] * 17 == stats["naive_block_evals"] * 13


def test_without_prefix_sharing_same_values(setup, tmp_path):
    from convert.label_store import read_labels
    from convert.labels import make_labels

    root, _, _ = setup
    cfg = _config(root, max_examples_per_task=2)
    shared = make_labels(tmp_path / "a", cfg, device="cpu")
    naive = make_labels(tmp_path / "b", _config(root, max_examples_per_task=2), device="cpu",
                        share_prefix=False)
    assert naive["stats"]["block_evals"] == naive["stats"]["naive_block_evals"]
    assert shared["stats"]["block_evals"] < naive["stats"]["block_evals"]
    np.testing.assert_allclose(read_labels(tmp_path / "a").loglik,
                               read_labels(tmp_path / "b").loglik, atol=1e-5)
    # a seeded sample: 2 of each task, the same again with the same seed, others with another
    t = read_labels(tmp_path / "a")
    assert sorted(set(zip(t.task, t.qid, strict=True))) == sorted(
        set(zip(read_labels(tmp_path / "b").task, read_labels(tmp_path / "b").qid, strict=True)))
    assert len(set(t.qid)) == 6


def test_resume_rewrites_only_missing_shards(setup, tmp_path):
    from convert.label_store import META, read_labels, shard_path
    from convert.labels import make_labels
    from pudding_mlx.errors import PuddingError

    root, _, _ = setup
    out = tmp_path / "out"
    make_labels(out, _config(root), device="cpu")
    full = read_labels(out)
    # an interrupted run: shard 2 never written, meta not complete
    shard_path(out, 2).unlink()
    meta = json.loads((out / META).read_text())
    (out / META).write_text(json.dumps({**meta, "complete": False}))
    with pytest.raises(PuddingError, match="incomplete"):
        read_labels(out)
    before = {i: shard_path(out, i).stat().st_mtime_ns for i in (0, 1, 3)}
    again = make_labels(out, _config(root), device="cpu")
    assert {i: shard_path(out, i).stat().st_mtime_ns for i in (0, 1, 3)} == before
    # shard 2 = 2 PIQA questions (one packed row each) + 1 WinoGrande (one row per option)
    assert again["stats"]["block_evals"] == 13 * 4
    resumed = read_labels(out)
    np.testing.assert_array_equal(resumed.loglik, full.loglik)
    assert resumed.qid == full.qid
    with pytest.raises(PuddingError, match="other settings.*seed"):
        make_labels(out, _config(root, seed=7), device="cpu")


def test_interrupted_run_keeps_its_record(setup, tmp_path, monkeypatch):
    """A run killed after its first shard leaves a partial record of that shard's cost; the
    resumed run appends its own, and together they count every shard once."""
    import convert.labels as labels
    from convert.label_store import META

    root, _, _ = setup
    out = tmp_path / "out"
    real, calls = labels.write_shard, []

    def write_then_stop(*args, **kw):
        if calls:
            raise KeyboardInterrupt
        calls.append(args[1])
        real(*args, **kw)

    monkeypatch.setattr(labels, "write_shard", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        labels.make_labels(out, _config(root), device="cpu")
    (run,) = json.loads((out / META).read_text())["runs"]
    assert run["partial"] and run["shards_run"] == 1 and calls == [0]
    assert run["block_evals"] == 13 * 3  # shard 0: the three ARC questions, one row each
    assert run["seconds"] >= 0 and run["cpu_seconds"] >= 0  # a tiny model: may round to 0
    monkeypatch.setattr(labels, "write_shard", real)
    meta = labels.make_labels(out, _config(root), device="cpu")
    assert meta["complete"] and len(meta["runs"]) == 2 and meta["runs"][0] == run
    assert meta["runs"][1] == meta["stats"] and "partial" not in meta["stats"]
    assert meta["stats"]["shards_run"] == meta["num_shards"] - 1
    # per-task time: the first run labelled three ARC questions; the two runs, every question
    assert run["per_task"].keys() == {"arc_easy"} and run["per_task"]["arc_easy"]["items"] == 3
    questions = Counter(ex.task for ex in labels.label_examples(_config(root)))
    assert {t: sum(r["per_task"].get(t, {}).get("items", 0) for r in meta["runs"])
            for t in questions} == questions
    assert sum(c["seconds"] for c in meta["stats"]["per_task"].values()) <= (
        meta["stats"]["seconds"] + 0.1)


@pytest.mark.slow
def test_smollm2_labels_match_hf_forward(tmp_path):
    """Two ARC-Easy questions on the real SmolLM2-135M (fp32), dense and a 3-block skip set."""
    from convert.assets import default_model, load_causal_lm
    from convert.label_store import read_labels
    from convert.labels import LabelConfig, make_labels

    cands = [{"name": "dense", "skip": []}, {"name": "s3", "skip": [5, 10, 20]},
             {"name": "s2", "skip": [5, 12]}]
    cfg = LabelConfig(model=default_model(), candidates=cands, tasks=["arc_easy"],
                      max_examples_per_task=2, dtype="float32")
    meta = make_labels(tmp_path / "out", cfg, device="cpu")
    assert meta["stats"]["block_evals"] < meta["stats"]["naive_block_evals"]
    t = read_labels(tmp_path / "out")
    model, tok = load_causal_lm(default_model())
    for r in range(len(t)):
        want = [reference_loglik(model, tok, t.context[r], t.text[r][len(t.context[r]):],
                                 c["skip"]) for c in cands]
        np.testing.assert_allclose(t.loglik[r], want, atol=1e-4, err_msg=t.text[r])


def test_appending_candidates_equals_labelling_all(setup, tmp_path):
    from convert.label_store import read_labels
    from convert.labels import candidate_table, make_labels
    from pudding_mlx.errors import PuddingError

    root, _, _ = setup
    out = tmp_path / "out"
    cfg = _config(root)
    cfg.candidates = candidate_table(root / "candidates.json")[:2]
    first = make_labels(out, cfg, device="cpu")
    assert read_labels(out).loglik.shape[1] == 2
    meta = make_labels(out, _config(root), device="cpu")  # appends C and D to every shard
    assert meta["stats"]["candidates"] == 4 and len(meta["runs"]) == 2
    assert meta["runs"][0] == first["stats"]
    whole = make_labels(tmp_path / "whole", _config(root), device="cpu")
    np.testing.assert_allclose(read_labels(out).loglik, read_labels(tmp_path / "whole").loglik,
                               atol=1e-6)
    assert (first["stats"]["block_evals"] + meta["stats"]["block_evals"]
            > whole["stats"]["block_evals"])  # appended sets share no prefix with the first
    cfg = _config(root)
    cfg.candidates = cfg.candidates[1:]
    with pytest.raises(PuddingError, match="appended"):
        make_labels(out, cfg, device="cpu")


def test_stale_temp_files_are_removed(tmp_path):
    import os
    import subprocess
    import sys

    from pudding_mlx.files import remove_stale_temps

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = tmp_path / f".shard-00003.parquet.{done.stdout.strip()}.tmp"
    live = tmp_path / f".meta.json.{os.getpid()}.tmp"  # a writer that still runs
    for f in (dead, live):
        f.write_text("partial")
    assert remove_stale_temps(tmp_path) == [dead]
    assert live.exists() and not dead.exists()


def test_task_limits_cap_single_tasks(setup):
    from convert.labels import label_examples, parse_task_limits
    from pudding_mlx.errors import PuddingError

    root, _, _ = setup
    limits = parse_task_limits(["arc_easy=2", "piqa=0"])
    assert limits == {"arc_easy": 2, "piqa": 0}
    got = label_examples(_config(root, task_limits=limits))
    assert [sum(e.task == t for e in got) for t in ("arc_easy", "piqa", "winogrande")] == [2, 0, 2]
    with pytest.raises(PuddingError, match="TASK=N"):
        parse_task_limits(["piqa"])

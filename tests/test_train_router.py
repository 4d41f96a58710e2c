"""Router targets, split, metrics and training (resume, determinism) on tiny label tables."""

from __future__ import annotations

import numpy as np
import pytest

from convert.label_store import write_shard
from convert.router_metrics import (
    baseline_metrics,
    decision_metrics,
    group_questions,
    question_context,
    split_questions,
)
from pudding_mlx.files import write_json

# Three questions, two candidates. Rows: (task, qid, choice, gold, text, loglik per candidate).
ROWS = [
    ("arc_easy", "q1", 0, 1, "Question: Which gas?\nAnswer: oxygen", [-2.0, -1.0]),
    ("arc_easy", "q1", 1, 1, "Question: Which gas?\nAnswer: carbon dioxide", [-1.5, -3.0]),
    ("arc_easy", "q1", 2, 1, "Question: Which gas?\nAnswer: carbon monoxide", [-2.5, -0.5]),
    ("piqa", "q1", 0, 0, "Question: Boil an egg?\nAnswer: in water", [-1.0, -2.0]),
    ("piqa", "q1", 1, 0, "Question: Boil an egg?\nAnswer: in the fridge", [-4.0, -1.0]),
    ("piqa", "q2", 1, 1, "Question: Open a jar?\nAnswer: twist", [-0.5, -0.25]),
    ("piqa", "q2", 0, 1, "Question: Open a jar?\nAnswer: push", [-1.0, -0.75]),
]


def _questions(rows=ROWS):
    task, qid, choice, gold, text, ll = zip(*rows, strict=True)
    context = [t[: t.index("Answer:") + 7] for t in text]
    return group_questions(list(task), list(qid), np.array(choice), np.array(gold),
                           np.array(ll, dtype=np.float32), context)


def test_targets_by_hand():
    q = _questions()
    assert q.keys == [("arc_easy", "q1"), ("piqa", "q1"), ("piqa", "q2")]
    np.testing.assert_allclose(q.targets("likelihood"), [[-1.5, -3.0], [-1.0, -2.0],
                                                          [-0.5, -0.25]])
    # correct minus the mean of the distractors, per candidate
    np.testing.assert_allclose(q.targets("margin"), [[-1.5 - (-2.25), -3.0 - (-0.75)],
                                                     [-1.0 + 4.0, -2.0 + 1.0],
                                                     [-0.5 + 1.0, -0.25 + 0.75]])
    np.testing.assert_array_equal(q.correct, [[True, False], [True, False], [True, True]])
    assert q.row_question.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert q.contexts == ["Question: Which gas?\nAnswer:", "Question: Boil an egg?\nAnswer:",
                          "Question: Open a jar?\nAnswer:"]


def test_question_context_cuts_at_a_word():
    assert question_context(["Q: x\nAnswer: 1990", "Q: x\nAnswer: 1995"]) == "Q: x\nAnswer:"
    assert question_context(["Q: x\nAnswer:", "Q: x\nAnswer:"]) == "Q: x\nAnswer:"
    wino = ["The trophy did not fit because the trophy", "The trophy did not fit because the tree"]
    assert question_context(wino) == "The trophy did not fit because the"
    assert question_context(["only one"]) == "only one"


def test_malformed_question_is_an_error():
    from pudding_mlx.errors import PuddingError

    with pytest.raises(PuddingError, match="q1"):
        _questions(ROWS[:1] + ROWS[2:])  # arc_easy q1 lost choice 1


def test_decision_metrics_by_hand():
    q = _questions()
    # likelihood target: oracle = [0, 0, 1]; choose candidate 1 for every question
    m = decision_metrics(q, "likelihood", np.array([0, 1, 2]), np.array([1, 1, 1]))
    assert m["top1"] == pytest.approx(1 / 3)
    assert m["regret"] == pytest.approx((1.5 + 1.0 + 0.0) / 3)
    assert m["loglik_regret"] == pytest.approx(m["regret"])
    assert m["acc"] == pytest.approx(1 / 3)
    # question 0 routed twice (candidates 0 and 1) counts once, its two decisions averaged
    m = decision_metrics(q, "margin", np.array([0, 0, 2]), np.array([0, 1, 0]))
    assert m["top1"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["regret"] == pytest.approx((0.5 * (0.75 + 2.25) + 0.0) / 2)
    assert m["loglik_regret"] == pytest.approx((0.5 * 1.5 + 0.25) / 2)
    base = baseline_metrics(q, "likelihood", np.array([0, 1]), np.array([2]))
    assert base["best_fixed"]["candidate"] == 0  # train means: [-1.25, -2.5]
    assert base["best_fixed"]["regret"] == pytest.approx(0.25)
    assert base["random"]["regret"] == pytest.approx(0.125)
    assert base["random"]["top1"] == pytest.approx(0.5)
    assert base["oracle"]["regret"] == 0.0


def test_split_has_no_question_in_both_sides():
    keys = [(t, f"q{i}") for t in ("arc_easy", "piqa", "hellaswag") for i in range(37)]
    is_eval = split_questions(keys, 0.2, seed=42)
    train = {k for k, e in zip(keys, is_eval, strict=True) if not e}
    evals = {k for k, e in zip(keys, is_eval, strict=True) if e}
    assert not train & evals and len(train) + len(evals) == len(keys)
    for t in ("arc_easy", "piqa", "hellaswag"):  # each task split 80/20
        assert sum(1 for k in evals if k[0] == t) == round(37 * 0.2)
    np.testing.assert_array_equal(is_eval, split_questions(keys, 0.2, seed=42))
    assert not np.array_equal(is_eval, split_questions(keys, 0.2, seed=1))


# -- training on a tiny BERT --

WORDS = ["water", "plants", "gas", "sky", "blue", "egg", "glass", "empty", "paris", "france",
         "boil", "fine", "hello", "today", "carbon", "dioxide", "minutes", "capital", "true"]


def write_labels(folder, num_questions=30, num_candidates=3, seed=0, shard_size=8):
    """A random label table in the `pudding label` layout."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    rows = []
    for i in range(num_questions):
        task = ("arc_easy", "piqa")[i % 2]
        question = " ".join(rng.choice(WORDS, 5))
        gold = int(rng.integers(2))
        for c in range(2):
            context = f"Question: {question}?\nAnswer:"
            rows.append({"task": task, "qid": f"{task}:{i}", "choice": c, "gold": gold,
                         "text": f"{context} {rng.choice(WORDS)}", "context": context,
                         "loglik": (rng.normal(-2, 1, num_candidates)).tolist()})
    shards = [rows[i : i + 2 * shard_size] for i in range(0, len(rows), 2 * shard_size)]
    for s, chunk in enumerate(shards):
        write_shard(folder, s, {k: [r[k] for r in chunk] for k in chunk[0]})
    write_json(folder / "meta.json", {
        "candidates": [{"name": f"c{i}", "skip": [i + 1]} for i in range(num_candidates)],
        "num_shards": len(shards), "complete": True,
    })
    return folder


def test_question_labelled_twice_is_read_once(tmp_path):
    """A training split's exact duplicate (same qid) is labelled twice; grouping needs it once."""
    import pyarrow.parquet as pq

    from convert.label_store import read_labels, shard_path

    folder = write_labels(tmp_path / "labels", num_questions=12, shard_size=4)
    clean = read_labels(folder)
    last = shard_path(folder, 2)
    dup = pq.read_table(shard_path(folder, 0)).slice(2, 2).to_pydict()  # question 1 again
    dup["loglik"] = [[0.0] * 3, [0.0] * 3]  # a second run's numbers: the first rows are kept
    rows = pq.read_table(last).to_pydict()
    write_shard(folder, 2, {k: rows[k] + dup[k] for k in rows})
    t = read_labels(folder)
    assert (t.task, t.qid, t.choice.tolist()) == (clean.task, clean.qid, clean.choice.tolist())
    np.testing.assert_array_equal(t.loglik, clean.loglik)
    q = group_questions(t.task, t.qid, t.choice, t.gold, t.loglik, t.context)
    assert len(q.keys) == 12


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    import torch
    from helpers import tiny_wordpiece_tokenizer
    from transformers import BertConfig, BertModel

    path = tmp_path_factory.mktemp("encoder")
    tok = tiny_wordpiece_tokenizer()
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=64,
                         max_position_embeddings=128)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _weights(path):
    from safetensors.numpy import load_file

    return load_file(str(path / "router" / "model.safetensors"))


def test_resume_equals_uninterrupted(tmp_path, tiny_encoder):
    from convert.train_router import TrainConfig, train

    labels = write_labels(tmp_path / "labels")
    cfg = {"backbone": tiny_encoder, "epochs": 3, "batch_size": 4, "lr": 1e-3,
           "warmup_steps": 3, "max_length": 24, "head_init": "random"}
    full = train(labels, tmp_path / "full", TrainConfig(**cfg), device="cpu")
    assert train(labels, tmp_path / "part", TrainConfig(**cfg), device="cpu",
                 stop_after_epoch=1) is None
    ckpt = tmp_path / "part" / "checkpoint"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "best.model.safetensors", "epoch-1.model.safetensors", "epoch-1.optimizer.safetensors",
        "state.json"]
    resumed = train(labels, tmp_path / "part", TrainConfig(**cfg), device="cpu")
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    untimed = [{k: v for k, v in h.items() if k != "seconds"} for h in full["history"]]
    assert untimed == [{k: v for k, v in h.items() if k != "seconds"}
                       for h in resumed["history"]]
    assert all(h["seconds"] >= 0 for h in full["history"] + resumed["history"])
    assert full["eval_mse"] == resumed["eval_mse"]
    assert not ckpt.exists()
    # training moved the weights away from the backbone
    init = train(labels, tmp_path / "zero", TrainConfig(**{**cfg, "epochs": 1, "lr": 0.0}),
                 device="cpu")
    assert not np.array_equal(_weights(tmp_path / "zero")["head.weight"], a["head.weight"])
    assert init["settings"]["lr"] == 0.0


def test_best_epoch_is_kept(tmp_path, tiny_encoder, monkeypatch):
    """A held-out curve with a known minimum (MSE 9, 0.25, 1, 4): epoch 2 is kept, with the
    weights it had after epoch 2; --select last keeps epoch 4."""
    from safetensors.numpy import load_file

    import convert.train_router as tr
    from convert.label_store import read_labels
    from convert.router_metrics import group_questions, split_questions

    labels = write_labels(tmp_path / "labels")
    t = read_labels(labels)
    q = group_questions(t.task, t.qid, t.choice, t.gold, t.loglik, t.context)
    is_eval = split_questions(q.keys, 0.2, 42)
    y_eval = q.targets("likelihood")[is_eval]  # one item per question (--inputs context)
    real = tr.predict

    def run(out, stop=None, **kw):
        offsets = iter([3.0, 0.5, 1.0, 2.0])  # held-out predictions = targets + offset

        def predict(router, ids, pad_id, device, batch_size=64, desc="predict"):
            if desc == "eval":
                return (y_eval + next(offsets)).astype(np.float32)
            return real(router, ids, pad_id, device, batch_size, desc)

        monkeypatch.setattr(tr, "predict", predict)
        cfg = tr.TrainConfig(backbone=tiny_encoder, epochs=4, batch_size=4, lr=1e-3,
                             warmup_steps=3, max_length=24, head_init="random", **kw)
        return tr.train(labels, out, cfg, device="cpu", stop_after_epoch=stop)

    best = run(tmp_path / "best")
    assert [h["eval_mse"] for h in best["history"]] == pytest.approx([9, 0.25, 1, 4], rel=1e-5)
    assert best["selected_epoch"] == 2
    assert run(tmp_path / "two", stop=2) is None
    after_two = load_file(str(tmp_path / "two" / "checkpoint" / "epoch-2.model.safetensors"))
    kept = _weights(tmp_path / "best")
    assert kept.keys() == after_two.keys()
    for k in kept:
        np.testing.assert_array_equal(kept[k], after_two[k], err_msg=k)
    last = run(tmp_path / "last", select="last")
    assert last["selected_epoch"] == 4
    assert not np.array_equal(_weights(tmp_path / "last")["head.weight"], kept["head.weight"])
    # the best run also leaves its last epoch's router (same seed: the --select last router)
    beside = load_file(str(tmp_path / "best" / tr.LAST / "model.safetensors"))
    for k, v in _weights(tmp_path / "last").items():
        np.testing.assert_array_equal(beside[k], v, err_msg=k)
    assert not (tmp_path / "last" / tr.LAST).exists()


def test_untrained_router_predicts_train_mean(tmp_path, tiny_encoder):
    """lr 0 with the mean head init: every prediction is the mean train target (over rows, or
    over questions with --inputs context), so eval MSE, the router's choice and its metrics
    can be computed by hand from the table."""
    import json

    from convert.label_store import read_labels
    from convert.train_router import TrainConfig, train

    labels = write_labels(tmp_path / "labels", num_questions=20, seed=3)
    t = read_labels(labels)
    q = _questions([(a, b, c, d, e, f.tolist()) for a, b, c, d, e, f in zip(
        t.task, t.qid, t.choice, t.gold, t.text, t.loglik, strict=True)])
    is_eval = split_questions(q.keys, 0.2, 42)
    for target, inputs in (("likelihood", "rows"), ("margin", "rows"), ("margin", "context"),
                           ("likelihood", "choices")):
        cfg = TrainConfig(backbone=tiny_encoder, epochs=1, lr=0.0, max_length=24, target=target,
                          inputs=inputs)
        m = train(labels, tmp_path / f"{target}-{inputs}", cfg, device="cpu")
        y = q.targets(target)
        if inputs == "rows":
            mean = y[q.row_question][~is_eval[q.row_question]].mean(0)
        else:
            mean = y[~is_eval].mean(0)
        rows_eval = q.row_question[is_eval[q.row_question]]
        assert m["eval_mse"] == pytest.approx(np.mean((y[rows_eval] - mean) ** 2), rel=1e-5)
        assert m["eval_mse_context"] == pytest.approx(np.mean((y[is_eval] - mean) ** 2),
                                                      rel=1e-5)
        assert m["questions"] == {"train": 16, "eval": 4}
        best = int(np.argmax(y[~is_eval].mean(0)))  # best fixed: by the mean over questions
        assert m["best_fixed"]["candidate"] == f"c{best}"
        chosen = int(np.argmax(mean))
        want = decision_metrics(q, target, np.flatnonzero(is_eval), np.full(4, chosen))
        assert m["router_context"] == pytest.approx(want)
        assert m["router_rows"] == pytest.approx(want)
        config = json.loads((tmp_path / f"{target}-{inputs}/router/router_config.json")
                            .read_text())
        assert config["inputs"] == ("choices" if inputs == "choices" else "context")


def test_cli_writes_router_and_metrics(tmp_path, tiny_encoder):
    import json

    import torch
    from click.testing import CliRunner

    from convert.router_model import Router
    from convert.train_router import train_router

    labels = write_labels(tmp_path / "labels", num_questions=10)
    out = tmp_path / "out"
    args = [str(labels), "--out", str(out), "--backbone", tiny_encoder, "--epochs", "1",
            "--num-layers", "1", "--max-length", "24", "--pooling", "cls", "--target", "margin"]
    r = CliRunner().invoke(train_router, args)
    assert r.exit_code == 0, r.output
    assert "best fixed" in r.output and "oracle" in r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["target"] == "margin" and m["candidates"] == ["c0", "c1", "c2"]
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "router"]
    router = Router.load(out / "router")
    assert len(router.encoder.encoder.layer) == 1
    assert router.config.outputs == ["c0", "c1", "c2"] and router.config.pooling == "cls"
    with torch.no_grad():
        assert router(torch.tensor([[2, 5, 3]]), torch.ones(1, 3, dtype=torch.long)).shape == (1, 3)
    # a rerun with the same settings reuses the result; other settings need --overwrite
    assert CliRunner().invoke(train_router, args).exit_code == 0
    r = CliRunner().invoke(train_router, [*args[:-2], "--target", "likelihood"])
    assert r.exit_code != 0 and "--overwrite" in str(r.exception)


# -- fidelity routers --


def test_tolerance_choice_by_hand():
    from convert.router_metrics import tolerance_choice

    sizes = np.array([2, 4, 4, 6, 0])
    pred = np.array([
        [0.1, 0.3, 0.2, 0.9, 0.0],  # tol 0.5: sizes 4 within, tie on size -> lower pred (2)
        [0.1, 0.3, 0.3, 0.4, 0.0],  # size 6 within
        [0.6, 0.7, 0.7, 0.8, 0.6],  # nothing within -> the dense candidate (4)
        [0.1, 0.5, 0.5, 0.9, 0.0],  # equal size and prediction -> the first; == tol is within
    ])
    assert tolerance_choice(pred, sizes, 0.5).tolist() == [2, 3, 4, 1]
    assert tolerance_choice(pred, sizes, 0.05).tolist() == [4, 4, 4, 4]
    # no dense candidate: -1, skip nothing
    assert tolerance_choice(pred[:, :4], sizes[:4], 0.05).tolist() == [-1, -1, -1, -1]


def test_fidelity_metrics_by_hand():
    from convert.router_metrics import fidelity_metrics, hull_kl

    names, sizes = ["a2", "b2", "c4"], np.array([2, 2, 4])
    kl_train = np.array([[0.2, 0.4, 1.0], [0.2, 0.4, 1.0]])  # a2 is the best static k = 2
    kl = np.array([[0.1, 0.5, 0.8], [0.3, 0.1, 1.2]])
    agree = np.array([[0.9, 0.5, 0.4], [0.7, 0.95, 0.2]])
    pred = np.array([[0.15, 0.2, 0.25], [0.2, 0.05, 0.4]])
    m = fidelity_metrics(kl, agree, pred, sizes, names, kl_train, tolerances=(0.1, 0.3))
    assert m["static"] == [{"size": 0, "candidate": "dense", "kl": 0.0},
                           {"size": 2, "candidate": "a2", "kl": pytest.approx(0.2)},
                           {"size": 4, "candidate": "c4", "kl": pytest.approx(1.0)}]
    # tolerance 0.1: prompt 0 -> dense, prompt 1 -> b2 (pred 0.05)
    t = m["tolerance"][0]
    assert t["router"] == pytest.approx({"mean_skip": 1.0, "kl": 0.05, "agreement": 0.975,
                                         "dense": 0.5, "within": 1.0})
    # static at mean size 1: half way between dense (0) and a2 (0.2)
    assert t["static_kl"] == pytest.approx(0.1)
    # oracle at 0.1: prompt 0 -> a2 (0.1), prompt 1 -> b2 (0.1)
    assert t["oracle"]["mean_skip"] == 2.0 and t["oracle"]["kl"] == pytest.approx(0.1)
    # tolerance 0.3: prompt 0 -> c4 (true KL 0.8, not within), prompt 1 -> b2 (c4 predicted
    # 0.4 is out; 0.1, within)
    t = m["tolerance"][1]
    assert t["router"] == pytest.approx({"mean_skip": 3.0, "kl": 0.45, "agreement": 0.675,
                                         "dense": 0.0, "within": 0.5})
    # static at mean size 3: half way between a2 (0.2) and c4 (1.0)
    assert t["static_kl"] == pytest.approx(0.6)
    k2, k4 = m["fixed_k"]
    assert k2["best_fixed"] == "a2" and k2["best_fixed_kl"] == pytest.approx(0.2)
    # router among k = 2: a2 for prompt 0 (0.15 < 0.2), b2 for prompt 1: both the oracle's
    assert k2["router"]["kl"] == pytest.approx(0.1) and k2["top1"] == 1.0
    assert k4["router"]["kl"] == pytest.approx(1.0) and k4["candidates"] == 1
    # the hull skips a point above the segment between its neighbours
    curve = [{"size": 0, "kl": 0.0}, {"size": 2, "kl": 1.5}, {"size": 4, "kl": 2.0}]
    assert hull_kl(curve, 2) == pytest.approx(1.0) and hull_kl(curve, 5) is None


def write_fidelity_labels(folder, num_prompts=20, sizes=(0, 2, 2, 4), seed=0):
    """A random fidelity label table in the `pudding label --target fidelity` layout."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    rows = {"id": [], "source": [], "split": [], "text": [], "continuation": [], "kl": [],
            "agreement": []}
    for i in range(num_prompts):
        kl = [0.0 if k == 0 else float(rng.gamma(2.0, 0.1 * k)) for k in sizes]
        for key, v in (("id", f"p{i}"), ("source", ("nq", "arc")[i % 2]), ("split", "train"),
                       ("text", " ".join(rng.choice(WORDS, 6))), ("continuation", [1, 2, 3]),
                       ("kl", kl), ("agreement", [float(np.exp(-x)) for x in kl])):
            rows[key].append(v)
    write_shard(folder, 0, rows, target="fidelity")
    write_json(folder / "meta.json", {
        "target": "fidelity", "num_shards": 1, "complete": True,
        "candidates": [{"name": f"c{i}", "skip": list(range(1, k + 1))}
                       for i, k in enumerate(sizes)]})
    return folder


def test_fidelity_router_trains_and_writes_target(tmp_path, tiny_encoder):
    """lr 0 with the mean head init: every prediction is the mean train KL, so eval MSE and the
    decisions follow from the table by hand; router_config.json says target fidelity."""
    import json

    from click.testing import CliRunner

    from convert.label_store import read_fidelity_labels
    from convert.router_metrics import tolerance_choice
    from convert.train_router import TrainConfig, train, train_router
    from pudding_mlx.errors import PuddingError

    labels = write_fidelity_labels(tmp_path / "labels")
    t = read_fidelity_labels(labels)
    is_eval = split_questions(list(zip(t.source, t.id, strict=True)), 0.2, 42)
    m = train(labels, tmp_path / "out", TrainConfig(backbone=tiny_encoder, epochs=1, lr=0.0,
                                                    max_length=24, target=None), device="cpu")
    assert m["target"] == "fidelity" and m["prompts"] == {"train": 16, "eval": 4}
    cfg = json.loads((tmp_path / "out" / "router" / "router_config.json").read_text())
    assert cfg["target"] == "fidelity" and cfg["outputs"] == ["c0", "c1", "c2", "c3"]
    mean = t.kl[~is_eval].mean(0)
    assert m["eval_mse"] == pytest.approx(np.mean((t.kl[is_eval] - mean) ** 2), rel=1e-5)
    sizes = t.candidate_sizes
    for row in m["tolerance"]:
        chosen = tolerance_choice(mean[None], sizes, row["tolerance"])[0]
        kl = t.kl[is_eval, chosen].mean() if chosen >= 0 else 0.0
        assert row["router"]["kl"] == pytest.approx(kl, rel=1e-5)
        assert row["router"]["mean_skip"] == (sizes[chosen] if chosen >= 0 else 0)
    # the CLI prints the tolerance table; a likelihood target does not fit fidelity labels
    r = CliRunner().invoke(train_router, [str(labels), "--out", str(tmp_path / "cli"),
                                          "--backbone", tiny_encoder, "--epochs", "1",
                                          "--max-length", "24"])
    assert r.exit_code == 0, r.output
    assert "target fidelity" in r.output and "static KL" in r.output
    with pytest.raises(PuddingError, match="holds fidelity labels"):
        train(labels, tmp_path / "x", TrainConfig(backbone=tiny_encoder, target="likelihood"))
    with pytest.raises(PuddingError, match="holds likelihood labels"):
        train(write_labels(tmp_path / "ll"), tmp_path / "y",
              TrainConfig(backbone=tiny_encoder, target="fidelity"))


def test_fidelity_router_goes_into_the_bundle(tmp_path, tiny_encoder):
    """A fidelity router, with a dense candidate among its outputs, converts into a bundle whose
    manifest says target fidelity; an unknown target is refused."""
    import json

    from helpers import tiny_llama

    import pudding_mlx
    from convert.to_bundle import ConvertSettings, read_router_config, write_bundle
    from convert.to_mlx import MLXSettings
    from convert.train_router import TrainConfig, train
    from pudding_mlx.bundle import Candidate
    from pudding_mlx.errors import PuddingError

    labels = write_fidelity_labels(tmp_path / "labels")
    train(labels, tmp_path / "out", TrainConfig(backbone=tiny_encoder, epochs=1, max_length=24,
                                                target=None), device="cpu")
    meta = json.loads((labels / "meta.json").read_text())
    (tmp_path / "candidates.json").write_text(json.dumps({"candidates": meta["candidates"]}))
    tiny_llama(tmp_path / "llm", num_layers=6)
    m = write_bundle(str(tmp_path / "llm"), tmp_path / "candidates.json",
                     tmp_path / "out" / "router", tmp_path / "bundle",
                     ConvertSettings(mlx=MLXSettings("float32"), coreml=False))
    assert m.router.target == "fidelity" and m.candidates[0].skip == []
    pm = pudding_mlx.load(tmp_path / "bundle", router_backend="mlx")
    assert pm.manifest.router.target == "fidelity"
    path = tmp_path / "out" / "router" / "router_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "target": "accuracy"}))
    with pytest.raises(PuddingError, match="target 'accuracy' unknown"):
        read_router_config(path.parent, [Candidate(c["name"], c["skip"])
                                         for c in meta["candidates"]])


def test_bfloat16_training_keeps_float32_weights_and_head(tmp_path, tiny_encoder):
    """--dtype bfloat16: the encoder computes in bf16 (its scores move by bf16 rounding, not
    more), the head and the saved weights stay float32, and training still lowers the train
    MSE like the float32 run."""
    import torch

    from convert.router_model import Router
    from convert.train_router import TrainConfig, train

    labels = write_labels(tmp_path / "labels", num_questions=20, seed=3)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        cfg = TrainConfig(backbone=tiny_encoder, epochs=3, batch_size=4, lr=1e-3, warmup_steps=2,
                          max_length=24, head_init="random", dtype=dtype)
        runs[dtype] = train(labels, tmp_path / dtype, cfg, device="cpu")
        assert runs[dtype]["settings"]["dtype"] == dtype
        assert {v.dtype.name for v in _weights(tmp_path / dtype).values()} == {"float32"}
    for m in runs.values():
        assert m["history"][-1]["train_mse"] < m["history"][0]["train_mse"]

    router = Router.load(tmp_path / "float32" / "router").eval()
    ids = torch.randint(5, 40, (3, 12))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        full = router(ids, mask)
        router.autocast = torch.bfloat16
        low = router(ids, mask)
    assert low.dtype == torch.float32
    gap = (low - full).abs().max().item()
    assert 0 < gap < 0.05 * full.abs().max().item() + 1e-2

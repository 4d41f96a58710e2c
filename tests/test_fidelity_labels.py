"""`pudding label --target fidelity` (torch) against `pudding fidelity`'s MLX code path on the
same tiny bundle, against KL computed by hand in numpy from plain HF forwards with the blocks
removed, and on known distributions; shards, resuming and appending candidates."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import chat_ids, run_cli, tiny_bundle, torch_greedy, torch_logits

import pudding_mlx
from convert.label_store import read_fidelity_labels, read_labels, shard_path
from convert.labels import FidelityLabelConfig, make_labels
from pudding_mlx.errors import PuddingError

PROMPTS = [
    "Question: Which gas do plants absorb from the air?",
    "How do you boil an egg?",
    "hello, how are you today?",
    "She poured the water into the glass because",
    "Is it true that the sky is blue?",
    "What is the capital of France?",
    "Say hello.",
]
# dense first; "copy" skips what "early" skips
CANDIDATES = [{"name": "dense", "skip": []}, {"name": "early", "skip": [1, 2]},
              {"name": "middle", "skip": [2, 3]}, {"name": "late", "skip": [3, 4]},
              {"name": "copy", "skip": [1, 2]}]
N = 12


@pytest.fixture(scope="module")
def built(tmp_path_factory, one_torch_thread):
    root = tmp_path_factory.mktemp("fidelity-labels")
    b = tiny_bundle(root / "bundle")
    # the last two prompts are held out: labels take the train split only
    (root / "prompts.jsonl").write_text("".join(
        json.dumps({"id": f"p{i}", "source": "test", "text": t,
                    "split": "heldout" if i >= 5 else "train"}) + "\n"
        for i, t in enumerate(PROMPTS)))
    (root / "candidates.json").write_text(json.dumps({"candidates": CANDIDATES,
                                                      "settings": {}}))
    return root, b


def config(root, **kw) -> FidelityLabelConfig:
    kw = {"candidates": CANDIDATES, "max_tokens": N, "batch_size": 2, "shard_size": 2, **kw}
    return FidelityLabelConfig(model=str(root / "bundle" / "model"),
                               prompts=str(root / "prompts.jsonl"), dtype="float32", **kw)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def hand_kl(hf, ids: list[int], cont: list[int], skip: list[int]) -> tuple[float, float]:
    """Mean KL(dense || set) and top-1 agreement over the continuation, in numpy from two plain
    HF forwards (one with the blocks removed)."""
    span = slice(len(ids) - 1, len(ids) + len(cont) - 1)
    d = log_softmax(torch_logits(hf, ids + cont, []).double().numpy()[span])
    s = log_softmax(torch_logits(hf, ids + cont, skip).double().numpy()[span])
    kl = (np.exp(d) * (d - s)).sum(-1)
    return float(kl.mean()), float((d.argmax(-1) == s.argmax(-1)).mean())


def test_labels_equal_pudding_fidelity_and_hand_kl(built, tmp_path):
    import pudding_mlx.fidelity.run as fidelity
    from pudding_mlx.evaluation.scoring import ScoreCache
    from pudding_mlx.prompts import read_prompts, select

    root, b = built
    meta = make_labels(tmp_path / "labels", config(root), device="cpu")
    assert meta["target"] == "fidelity" and meta["num_prompts"] == 5 and meta["num_shards"] == 3
    t = read_fidelity_labels(tmp_path / "labels")
    assert t.id == [f"p{i}" for i in range(5)] and set(t.split) == {"train"}
    assert t.text == PROMPTS[:5] and t.candidate_names == [c["name"] for c in CANDIDATES]

    # `pudding fidelity`'s MLX code path on the converted bundle
    pm = pudding_mlx.load(b.path, router_backend="mlx")
    prompts = select(read_prompts(root / "prompts.jsonl"), "train")
    skips = {c["name"]: c["skip"] for c in CANDIDATES}
    conts, values = fidelity.measure_all(pm, ScoreCache(tmp_path / "cache", {"test": 1}),
                                         prompts, skips, N, None)
    for r, p in enumerate(prompts):
        ids = chat_ids(b.tokenizer, p.text)
        assert t.continuation[r] == conts[p.key]
        assert t.continuation[r] == torch_greedy(b.model, ids, [], N, b.tokenizer.eos_token_id)
        for c, cand in enumerate(CANDIDATES):
            mlx = values[cand["name"]][p.key].summary()
            assert t.kl[r, c] == pytest.approx(mlx["kl"], rel=1e-3, abs=2e-4)
            assert t.agreement[r, c] == pytest.approx(mlx["agreement"], abs=1e-6)
            kl, agree = hand_kl(b.model, ids, t.continuation[r], cand["skip"])
            assert t.kl[r, c] == pytest.approx(kl, rel=1e-4, abs=1e-5)
            assert t.agreement[r, c] == pytest.approx(agree, abs=1e-6)
    # identical sets: dense's own label is exactly 0 (agreement 1); a repeated set repeats
    np.testing.assert_array_equal(t.kl[:, 0], 0.0)
    np.testing.assert_array_equal(t.agreement[:, 0], 1.0)
    np.testing.assert_array_equal(t.kl[:, 4], t.kl[:, 1])
    assert (t.kl[:, 1:] > 1e-3).all()  # real perturbations
    # dense walks with the candidates: every distinct block prefix runs once
    stats = meta["stats"]
    assert stats["block_evals"] < stats["naive_block_evals"]
    with pytest.raises(PuddingError, match="holds fidelity labels"):
        read_labels(tmp_path / "labels")


def test_kl_on_a_known_distribution():
    from convert.scoring import kl_to_reference

    p = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.6, 0.3], [0.2, 0.3, 0.5]]))
    q = torch.log(torch.tensor([[0.25, 0.5, 0.25], [0.2, 0.5, 0.3], [0.2, 0.3, 0.5]]))
    kl, agree = kl_to_reference(p, q)
    expected = [0.5 * np.log(2) + 0.25 * np.log(0.5), 0.1 * np.log(0.5) + 0.6 * np.log(0.6 / 0.5),
                0.0]
    np.testing.assert_allclose(kl.numpy(), expected, atol=1e-6)
    assert agree.tolist() == [0.0, 1.0, 1.0]


def test_an_identity_block_costs_nothing(built, tmp_path):
    """A block whose attention and MLP write nothing (output projections zeroed) is the
    identity on the residual stream: skipping it gives KL 0 and agreement 1 exactly, while
    skipping it with another block costs what skipping that block alone costs."""
    root, b = built
    hf = b.model
    layer = hf.model.layers[2]
    saved = [layer.self_attn.o_proj.weight.clone(), layer.mlp.down_proj.weight.clone()]
    folder = tmp_path / "model"
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    try:
        hf.save_pretrained(folder)
    finally:
        with torch.no_grad():
            layer.self_attn.o_proj.weight.copy_(saved[0])
            layer.mlp.down_proj.weight.copy_(saved[1])
    b.tokenizer.save_pretrained(folder)
    cands = [{"name": "two", "skip": [2]}, {"name": "four", "skip": [4]},
             {"name": "two-four", "skip": [2, 4]}]
    cfg = config(root, candidates=cands, limit=3)
    cfg.model = str(folder)
    make_labels(tmp_path / "labels", cfg, device="cpu")
    t = read_fidelity_labels(tmp_path / "labels")
    np.testing.assert_array_equal(t.kl[:, 0], 0.0)
    np.testing.assert_array_equal(t.agreement[:, 0], 1.0)
    assert (t.kl[:, 1] > 1e-3).all()
    np.testing.assert_allclose(t.kl[:, 2], t.kl[:, 1], rtol=1e-5, atol=1e-6)


def test_resume_and_append_candidates(built, tmp_path, monkeypatch):
    import convert.fidelity as torch_fidelity

    root, _ = built
    out = tmp_path / "out"
    full_meta = make_labels(out, config(root), device="cpu")
    full = read_fidelity_labels(out)
    # an interrupted run: shard 1 never written, meta not complete
    shard_path(out, 1).unlink()
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "complete": False}))
    with pytest.raises(PuddingError, match="incomplete"):
        read_fidelity_labels(out)
    before = {i: shard_path(out, i).stat().st_mtime_ns for i in (0, 2)}
    again = make_labels(out, config(root), device="cpu")
    assert {i: shard_path(out, i).stat().st_mtime_ns for i in (0, 2)} == before
    assert again["stats"]["shards_run"] == 1
    assert again["stats"]["block_evals"] < full_meta["stats"]["block_evals"]
    resumed = read_fidelity_labels(out)
    np.testing.assert_array_equal(resumed.kl, full.kl)
    assert resumed.continuation == full.continuation and resumed.id == full.id
    with pytest.raises(PuddingError, match="other settings.*max_tokens"):
        make_labels(out, config(root, max_tokens=4), device="cpu")

    # appending candidates reads dense's continuations back instead of generating them again
    part = tmp_path / "part"
    make_labels(part, config(root, candidates=CANDIDATES[:2]), device="cpu")
    assert read_fidelity_labels(part).kl.shape == (5, 2)

    def fail(*args, **kwargs):
        raise AssertionError("generated again")

    monkeypatch.setattr(torch_fidelity, "greedy_continuation", fail)
    make_labels(part, config(root), device="cpu")
    appended = read_fidelity_labels(part)
    np.testing.assert_allclose(appended.kl, full.kl, atol=1e-6)
    np.testing.assert_array_equal(appended.agreement, full.agreement)


def test_cli(built, tmp_path, monkeypatch, capsys):
    root, _ = built
    args = ["label", "--target", "fidelity", "--candidates", str(root / "candidates.json"),
            "--model", str(root / "bundle" / "model"), "--prompts", str(root / "prompts.jsonl"),
            "--out", str(tmp_path / "out"), "--max-tokens", "4", "--limit", "2",
            "--device", "cpu"]
    code, out, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    assert "2 prompts, 5 candidates" in out
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["target"] == "fidelity" and meta["settings"]["max_tokens"] == 4
    assert meta["settings"]["dtype"] == "float32"  # fidelity's default, whatever the CPU
    assert all(len(c) <= 4 for c in read_fidelity_labels(tmp_path / "out").continuation)
    code, _, err = run_cli([*args, "--tasks", "piqa"], monkeypatch, capsys)
    assert code != 0 and "--tasks: not an option of --target fidelity" in err
    code, _, err = run_cli(["label", "--candidates", str(root / "candidates.json"),
                            "--out", str(tmp_path / "x"), "--max-tokens", "4"],
                           monkeypatch, capsys)
    assert code != 0 and "--max-tokens: not an option of --target likelihood" in err

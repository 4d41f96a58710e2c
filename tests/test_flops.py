"""bench/flops.py against a hand count and against the parameters of real mlx-lm models."""

import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes

from pudding_mlx.bench.flops import (
    DecodeBytes,
    Shape,
    combined_ideal,
    decode_flops_ideal,
    decode_ideal,
    prefill_ideal,
)
from pudding_mlx.errors import PuddingError

TINY = {"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 3, "num_attention_heads": 2,
        "num_key_value_heads": 1, "intermediate_size": 16, "vocab_size": 10,
        "tie_word_embeddings": True}

SMOLLM2 = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
           "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True,
           "rms_norm_eps": 1e-5, "rope_theta": 100000.0}

GEMMA3_270M = {"model_type": "gemma3_text", "hidden_size": 640, "num_hidden_layers": 18,
               "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
               "intermediate_size": 2048, "vocab_size": 262144, "sliding_window": 512,
               "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6, "tie_word_embeddings": True}


def test_hand_count_tiny():
    s = Shape.from_config(TINY)
    # q 8x8, k 8x4, v 8x4, o 8x8 = 192; gate/up/down 3 x 8x16 = 384; two norms of 8.
    assert s.attention_params() == 192
    assert s.mlp_params() == 384
    assert s.block_params() == 592
    # 2 x 576 multiply-adds + q.k and p.v: 2 heads x 4 dims x 2 x 2 FLOPs per attended position.
    assert s.block_flops(context=5) == 1152 + 32 * 5
    assert s.head_flops() == 160
    # Prompt of 4: contexts 1+2+3+4 = 10 -> a block costs 4 x 1152 + 32 x 10 = 4928.
    assert s.prefill_flops(4) == 3 * 4928 + 160
    assert prefill_ideal(s, 4, 1) == pytest.approx((3 * 4928 + 160) / (2 * 4928 + 160))
    # fp32 weights, fp16 KV at context 5: block 592 x 4 + 2 x (1 x 4) x 5 x 2 = 2448 bytes;
    # outside the blocks: embedding row 8 + final norm 8 + head 10 x 8 = 96 params x 4.
    weights = DecodeBytes.from_shape(s, 4, 2)
    assert weights.total(5) == 3 * 2448 + 384
    assert weights.total(5, [1]) == 2 * 2448 + 384
    assert decode_ideal(weights, 5, [1]) == pytest.approx((3 * 2448 + 384) / (2 * 2448 + 384))
    assert decode_flops_ideal(s, 5, 1) == pytest.approx((3 * 1312 + 160) / (2 * 1312 + 160))


def test_ideal_limits():
    s = Shape.from_config(SMOLLM2)
    assert prefill_ideal(s, 512, 0) == 1.0
    # The LM head and the embeddings are not skipped: the ideal stays below 30 / 24.
    weights = DecodeBytes.from_shape(s, 4, 4)
    for ideal in (prefill_ideal(s, 128, 6), decode_ideal(weights, 200, range(6))):
        assert 1.1 < ideal < 30 / 24
    # Longer prompts: the blocks' share grows (attention is quadratic), so the ideal grows.
    assert prefill_ideal(s, 128, 6) < prefill_ideal(s, 512, 6) < 30 / 24
    assert combined_ideal([1.0, 3.0], [1.2, 1.2]) == pytest.approx(1.2)
    assert combined_ideal([1.0, 1.0], [1.0, 2.0]) == pytest.approx(2 / 1.5)


def _count(model) -> tuple[list[int], int, int]:
    """(parameters per block, embedding parameters, everything else) of an mlx-lm model."""
    blocks = [sum(v.size for _, v in tree_flatten(b.parameters())) for b in model.layers]
    embed = model.model.embed_tokens.weight.size
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    return blocks, embed, total - sum(blocks) - embed


@pytest.mark.parametrize("config", [
    SMOLLM2,
    {**TINY, "attention_bias": True, "mlp_bias": True, "tie_word_embeddings": False},
    {**TINY, "model_type": "qwen2", "rms_norm_eps": 1e-6},
    {**TINY, "model_type": "mistral", "tie_word_embeddings": False},
    GEMMA3_270M,
], ids=["smollm2", "llama-bias-untied", "qwen2", "mistral", "gemma3-270m"])
def test_params_match_mlx_lm(config):
    config = {"rms_norm_eps": 1e-5, **config}
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))  # lazily initialised: nothing allocated
    if config["model_type"] == "gemma3_text":
        model.sanitize({})  # ties the LM head, as loading weights without one does
    s = Shape.from_config(config)
    blocks, embed, rest = _count(model)
    assert blocks == [s.block_params()] * s.layers
    assert embed == s.embedding_params()
    assert rest == s.head_params() + (0 if s.tied else s.vocab * s.hidden)


def test_missing_key():
    with pytest.raises(PuddingError, match="config.json: missing 'vocab_size'"):
        Shape.from_config({k: v for k, v in TINY.items() if k != "vocab_size"})

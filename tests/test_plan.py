"""`pudding plan`'s arithmetic on a tiny config, against counts worked out by hand."""

from dataclasses import replace

import pytest
from click.testing import CliRunner

from convert.plan import (
    GB,
    TASKS,
    Device,
    get_device,
    model_params,
    phase_block_evals,
    plan,
    plan_build,
    search_trials,
)
from convert.profiles import PROFILES
from pudding_mlx.bench.flops import Shape

# 4 blocks, hidden 8, 2 heads of 4 (1 KV head), MLP 16, vocabulary 32, tied embeddings
TINY = {"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 4, "intermediate_size": 16,
        "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 32,
        "tie_word_embeddings": True}
# only FLOPs cost time: 1 GFLOP/s, nothing else charged
FLOPS_ONLY = Device("test", "cpu", 64 * GB, {"float32": 1e9, "bfloat16": 1e9}, 1e30, 0.0, 1e30,
                    "float32", 0.0, 0.0)


def test_counts_by_hand():
    shape = Shape.from_config(TINY)
    # attention 8 x (8 + 4 + 4) + 8 x 8 = 192; MLP 3 x 8 x 16 = 384; two norms 16
    assert shape.block_params() == 192 + 384 + 16
    assert model_params(shape) == 4 * 592 + 32 * 8 + 8
    # 2 x (192 + 384) weights, plus q.k and the weighted v: 4 x 2 heads x 4 x context
    assert shape.block_flops(10) == 1152 + 32 * 10
    assert search_trials(4, 2) == [2, 1]  # blocks 1 and 2, then the one left
    # phase 1: a pass to the last trial (2 blocks), then 2 + 1 blocks after the trials
    assert phase_block_evals(2, True) == 5
    assert phase_block_evals(1, False) == pytest.approx(2 * 0.75)


def test_plan_counts():
    profile = replace(PROFILES["quick"], tasks=("arc_easy",), k=2, samples=8,
                      max_examples_per_task=10, dtype="float32", router="in-model")
    p = plan_build(TINY, profile, FLOPS_ONLY, "float32")
    t = TASKS["arc_easy"]
    search, labels, router, convert = p.steps
    evals = 8 * t.rows * (5 + 1.5)  # 8 questions, one packed row each
    assert search.work.block_flops == pytest.approx(evals * t.row_tokens
                                                    * (1152 + 32 * t.row_tokens / 2))
    # every trial scores every answer token: 2 trials, then 1
    assert search.work.head_tokens == pytest.approx(3 * 8 * t.answer_tokens)
    assert search.seconds == pytest.approx(
        (search.work.block_flops + search.work.head_tokens * 2 * 32 * 8) / 1e9)
    # one candidate skipping 2 of 4 blocks, 10 questions, the trie sharing 0.75
    assert labels.work.block_flops == pytest.approx(
        10 * 0.75 * 2 * t.row_tokens * (1152 + 32 * t.row_tokens / 2))
    assert labels.work.head_tokens == pytest.approx(10 * t.answer_tokens)
    assert router.work.train_steps == 0  # the in-model router fits in closed form
    # float32 MLX weights and the head: one output per candidate, plus its config
    assert p.bundle_bytes == pytest.approx(4 * (4 * 592 + 32 * 8 + 8) + 1 * 8 * 4 + 0.1e6)
    assert all(s.advice == "" for s in p.steps)


def test_too_big_says_what_to_change():
    big = {**TINY, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
           "tie_word_embeddings": False}
    device = get_device("m3pro-36")
    p = plan_build(big, replace(PROFILES["quick"], dtype="float16"), device, "float32")
    steps = {s.name: s for s in p.steps}
    assert "--torch-dtype bfloat16" in steps["search"].advice
    assert "--until router" in steps["convert"].advice
    p = plan_build(big, replace(PROFILES["quick"], dtype="float16"), device, "float16")
    assert steps["router"].advice == "" and p.steps[0].advice == ""


def test_command(tmp_path):
    (tmp_path / "config.json").write_text(__import__("json").dumps(TINY))
    result = CliRunner().invoke(plan, [str(tmp_path), "--profile", "paper", "--device", "h100"])
    assert result.exit_code == 0, result.output
    for step in ("search", "labels", "router", "convert", "bundle"):
        assert step in result.output

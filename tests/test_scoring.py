"""answer_logprobs against log-probs computed by hand from plain HF forwards."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_gemma3, tiny_llama, torch_logits

from convert.scoring import BlockRunner, answer_logprobs, dtype_check
from convert.skip import skipped
from pudding_mlx.errors import PuddingError
from pudding_mlx.tasks import encode_requests

REQUESTS = [
    ("Question: Which gas do plants absorb from the air?\nAnswer:", " carbon dioxide"),
    ("Question: Which gas do plants absorb from the air?\nAnswer:", " water"),
    ("Question: Which gas do plants absorb from the air?\nAnswer:", " the sky is blue"),
    ("She poured the water into the glass because", " the glass was empty."),
    ("hello, how are you today? I am", " fine"),
    ("The capital of France is Paris. Is it true?", " yes"),
    ("The capital of France is Paris. Is it true?", " no"),
]


def reference(model, tok, context, continuation, skip=()):
    """Mean and sum of the continuation's log-probs from one plain forward of the sequence."""
    ctx = tok.encode(context, add_special_tokens=False)
    cont = tok.encode(continuation, add_special_tokens=False)
    logp = torch.log_softmax(torch_logits(model, ctx + cont, skip).double(), -1)
    lps = [logp[len(ctx) - 1 + t, cont[t]].item() for t in range(len(cont))]
    return sum(lps) / len(lps), sum(lps)


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def tiny(request, tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp(request.param), num_layers=5,
                      model_type=request.param)


@pytest.mark.parametrize("skip", [(), (1, 3)])
def test_answer_logprobs_match_hand_computed(tiny, skip):
    model, tok = tiny
    ref = [reference(model, tok, c, a, skip) for c, a in REQUESTS]
    mean = answer_logprobs(model, tok, REQUESTS, skip=skip, batch_size=2)
    total = answer_logprobs(model, tok, REQUESTS, skip=skip, batch_size=3, reduce="sum")
    assert mean == pytest.approx([r[0] for r in ref], abs=1e-5)
    assert total == pytest.approx([r[1] for r in ref], abs=1e-4)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """Sliding window 3 (every context is longer), full attention in blocks 2 and 5."""
    return tiny_gemma3(tmp_path_factory.mktemp("gemma3"), window=3, pattern=3)


@pytest.mark.parametrize("skip", [(), (2,), (0, 4), (1, 5)], ids=str)
def test_gemma3_answer_logprobs_match_hand_computed(gemma, skip):
    """Each block keeps its own mask and RoPE, also when the context is packed once for
    several continuations (the window is counted in positions, not packed columns)."""
    model, tok = gemma
    assert all(len(tok.encode(c, add_special_tokens=False)) > 3 for c, _ in REQUESTS)
    ref = [reference(model, tok, c, a, skip) for c, a in REQUESTS]
    for batch_size in (1, 3):
        total = answer_logprobs(model, tok, REQUESTS, skip=skip, batch_size=batch_size,
                                reduce="sum")
        assert total == pytest.approx([r[1] for r in ref], abs=1e-4)
    if skip:  # the comparison can tell sets apart
        dense = answer_logprobs(model, tok, REQUESTS, reduce="sum")
        assert max(abs(a - b) for a, b in zip(dense, total, strict=True)) > 1e-2


def test_gemma3_one_mask_for_every_block_would_be_wrong(gemma):
    """The test above can tell a runner that ignores the sliding window apart."""
    model, tok = gemma
    runner = BlockRunner(model)
    runner.sliding_window = None
    runner.types = ["full_attention"] * runner.num_blocks
    ref = [reference(model, tok, c, a)[1] for c, a in REQUESTS]
    batch = runner.prepare(encode_requests(tok, REQUESTS))[0]
    with torch.no_grad():
        got = runner.head(runner.run(runner.embed(batch), batch, range(6)), batch)
    assert max(abs(got[j] - ref[i]) for j, i in enumerate(batch.requests)) > 1e-2


def test_unsupported_architectures_are_refused(tiny, monkeypatch):
    """Scores that BlockRunner's forward would get wrong are refused in one line: other model
    types, sliding-window layers (outside Gemma 3), and (Mistral) rows longer than the
    window."""
    model, tok = tiny
    with monkeypatch.context() as m:
        m.setattr(model.config, "model_type", "gemma2")
        with pytest.raises(PuddingError, match=r"\(model_type 'gemma2'\): block-by-block"):
            answer_logprobs(model, tok, REQUESTS[:1])
    config = model.config
    if config.model_type == "qwen2":
        saved = list(config.layer_types)
        config.layer_types = ["full_attention", "sliding_attention"] + saved[2:]
        try:
            with pytest.raises(PuddingError, match="sliding-window layers"):
                BlockRunner(model)
        finally:
            config.layer_types = saved
    if config.model_type == "mistral":
        saved, config.sliding_window = config.sliding_window, 8
        try:
            with pytest.raises(PuddingError, match=r"longer than the model's sliding window \(8\)"):
                answer_logprobs(model, tok, REQUESTS[:1])
        finally:
            config.sliding_window = saved


def test_trailing_space_moves_to_continuation(tiny):
    model, tok = tiny
    a = answer_logprobs(model, tok, [("She poured the water into ", "the glass")])
    b = answer_logprobs(model, tok, [("She poured the water into", " the glass")])
    assert a == b


def test_skip_context_manager_restores(tiny):
    model, tok = tiny
    layers = list(model.model.layers)
    with skipped(model, [1, 2]):
        assert len(model.model.layers) == len(layers) - 2
    assert list(model.model.layers) == layers


def test_dtype_check_counts_changes(tiny):
    model, tok = tiny
    from pudding_mlx.tasks import TASKS

    exs = [TASKS["piqa"].example({"goal": c, "sol1": a, "sol2": " x", "label": 0})
           for c, a in REQUESTS]
    same = dtype_check(model, tok, exs, torch.float32)
    assert same.changed == 0 and same.max_abs_diff == 0.0 and same.examples == len(exs)
    low = dtype_check(model, tok, exs, torch.bfloat16)
    assert 0 < low.max_abs_diff < 1.0


@pytest.mark.slow
def test_bf16_changes_few_decisions_on_smollm2():
    """Measured: 1 of these 64 decisions changes (a near-tie in fp32), max |dl| 0.31."""
    from convert import assets
    from pudding_mlx.data import calibration_examples

    model, tok = assets.load_causal_lm(assets.default_model(), dtype=torch.float32)
    exs = [e for t in ("arc_easy", "piqa", "winogrande", "hellaswag")
           for e in calibration_examples(t, 16, seed=1)]
    check = dtype_check(model, tok, exs, torch.bfloat16)
    assert check.changed <= 2, check
    assert all(g < 0.1 for g in check.changed_gaps), check  # only near-ties flip


def test_load_causal_lm_folder_and_errors(tiny, tmp_path):
    from convert.assets import load_causal_lm
    from pudding_mlx.errors import PuddingError

    model, tok = tiny
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, ltok = load_causal_lm(tmp_path / "m", dtype=torch.float32)
    ids = torch.tensor([ltok.encode("hello, how are you", add_special_tokens=False)])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PuddingError, match="empty"):
        load_causal_lm(tmp_path / "empty")


@pytest.mark.slow
def test_gguf_loads_and_saves_as_plain_hf(tmp_path):
    from convert import assets

    model, tok = assets.load_causal_lm(assets.smollm2_gguf())
    assert len(model.model.layers) == 30 and model.hf_quantizer is None
    model.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").exists()

"""Quantised bundles: `pudding convert -q` on a tiny LLaMA, skipping blocks of a quantised model
(against HF torch running the same weights dequantised, blocks removed), KV caches, no weight
copies, and the bench's decode ideal from the quantised bytes (against a hand count)."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import (
    CORPUS,
    check_incremental_decoding,
    dequantised_torch,
    run_cli,
    tiny_bundle,
    tiny_gemma3,
    tiny_llama,
    tiny_router,
    torch_greedy,
    torch_logits,
    torch_route,
)
from mlx.utils import tree_flatten

import pudding_mlx
from convert.to_mlx import MLXSettings, convert_llm_to_mlx
from pudding_mlx.bench.flops import DecodeBytes, decode_ideal
from pudding_mlx.bench.summary import model_facts
from pudding_mlx.cli import cli
from pudding_mlx.masking import skip_view
from pudding_mlx.model import load_lm

SETS = {"early": [1, 2], "middle": [3], "late": [2, 4, 5]}
SKIPS = [[], [3], [2, 4], [1, 3, 5], [1, 2, 3, 4]]
PROMPTS = ["Which gas do plants absorb from the air?", "hello, how are you today?",
           "She poured the water into the glass because the glass was empty."]
# tiny_llama: hidden 64, MLP 128, 4 query and 2 KV heads of 16: q, o 64x64, k, v 32x64,
# gate, up, down 64x128 -> 36,864 weights per block; two RMSNorm weights of 64.
BLOCK_WEIGHTS = 2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    model, tok = tiny_llama(root / "hf", num_layers=6, rope_theta=50000.0)
    router, rtok = tiny_router(root / "router", list(SETS), max_length=32)
    candidates = [{"name": n, "skip": s, "task": "tiny", "loss": "likelihood", "k": len(s)}
                  for n, s in SETS.items()]
    (root / "candidates.json").write_text(json.dumps({"candidates": candidates}))
    return root, model, tok, router, rtok


@pytest.fixture(scope="module", params=[8, 4], ids=["q8", "q4"])
def quant(request, inputs):
    """(bits, bundle path, loaded PuddingModel, HF torch model with its dequantised weights)."""
    root = inputs[0]
    bits = request.param
    out = root / f"bundle-q{bits}"
    # random tiny weights lose too much at 4 bits for the built-in q4 bound: override it
    lossy = ["--max-kl", "1"] if bits == 4 else []
    result = CliRunner().invoke(cli, [
        "convert", "--model", str(root / "hf"), "--candidates", str(root / "candidates.json"),
        "--router", str(root / "router"), "--out", str(out), "--dtype", "float32",
        "--no-coreml", "-q", "--q-bits", str(bits), *lossy])
    assert result.exit_code == 0, (result.output, result.exception)
    pm = pudding_mlx.load(out, router_backend="mlx")
    return bits, out, pm, dequantised_torch(root / "hf", pm.model)


def test_convert_writes_a_quantised_bundle(quant):
    bits, out, pm, _ = quant
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["quantization"]["bits"] == bits
    assert config["quantization"]["group_size"] == 64
    parity = pm.manifest.extra["parity"]
    assert parity["kind"] == f"q{bits}" and parity["passed"]
    assert [r["skip"] for r in parity["results"]] == [[], SETS["early"]]
    for block in pm.model.layers:
        assert isinstance(block.self_attn.q_proj, nn.QuantizedLinear)
        assert isinstance(block.mlp.down_proj, nn.QuantizedLinear)
        assert block.self_attn.q_proj.bits == bits
    assert isinstance(pm.model.model.embed_tokens, nn.QuantizedEmbedding)


@pytest.mark.parametrize("skip", SKIPS, ids=str)
def test_skipped_logits_equal_dequantised_torch(inputs, quant, skip):
    """The quantised model without `skip` = HF torch on the dequantised weights, the same
    blocks removed from its layer list (fp32 both)."""
    _, float_model, tok, _, _ = inputs
    _, _, pm, ref_model = quant
    ids = tok(CORPUS[0] + " " + CORPUS[3])["input_ids"]
    got = np.array(pm.view(skip)(mx.array([ids]))[0])
    ref = torch_logits(ref_model, ids, skip).numpy()
    assert np.abs(got - ref).max() <= 1e-3
    # the comparison can tell quantised from float weights, and one set from another
    assert np.abs(got - torch_logits(float_model, ids, skip).numpy()).max() > 1e-2
    other = [3] if skip != [3] else [2, 4]
    assert np.abs(got - torch_logits(ref_model, ids, other).numpy()).max() > 1e-2


@pytest.mark.parametrize("skip", [[2, 4], [1, 3, 5]], ids=str)
def test_incremental_decoding_matches_full_forward(inputs, quant, skip):
    """KV caches of the kept quantised blocks: prefill then one token at a time = one forward."""
    tok = inputs[2]
    pm = quant[2]
    ids = tok(CORPUS[1])["input_ids"]
    view = pm.view(skip)
    cache = check_incremental_decoding(view, ids)
    assert len(cache) == 6 - len(skip)


def test_routed_generation_equals_dequantised_torch_greedy(inputs, quant):
    """The router's pick, then greedy decoding with caches = torch greedy (one full forward per
    token) on the dequantised weights without that set."""
    _, _, _, router, rtok = inputs
    _, _, pm, ref_model = quant
    picked = set()
    for prompt in PROMPTS:
        route = pm.route(prompt)
        assert route.name == torch_route(router, rtok, prompt).name
        picked.add(route.name)
        ids = pm.encode(prompt)
        tokens = [r.token for r in pm.stream_generate(ids, max_tokens=6, route=route)]
        assert tokens == torch_greedy(ref_model, ids, route.skip, len(tokens)), prompt
    assert picked - {"dense"}


def test_view_shares_the_quantised_arrays(quant):
    pm = quant[2]
    before = {k: id(v) for k, v in tree_flatten(pm.model.parameters())}
    view = pm.view([2, 4])
    for j, i in enumerate(view.kept):
        assert view.layers[j] is pm.model.layers[i]
        mine = tree_flatten(view.layers[j].parameters())
        base = tree_flatten(pm.model.layers[i].parameters())
        assert [k for k, _ in mine] == [k for k, _ in base]
        assert any(k.endswith("scales") for k, _ in mine)
        assert all(a is b for (_, a), (_, b) in zip(mine, base, strict=True))
    assert {id(v) for _, v in tree_flatten(view.parameters())} == set(before.values())
    pm.generate("hello", max_tokens=2, skip=[2, 4])
    assert {k: id(v) for k, v in tree_flatten(pm.model.parameters())} == before


def _hand_count(bits: int, vocab: int) -> DecodeBytes:
    """Bytes per decoded token of tiny_llama quantised to `bits` in groups of 64, fp32 scales
    and biases: bits/8 per weight plus 2 x 4 bytes per 64 weights."""
    per_weight = bits / 8 + 8 / 64
    block = BLOCK_WEIGHTS * per_weight + 2 * 64 * 4
    embedding = vocab * 64 * per_weight
    # final norm + the tied embedding as LM head + one embedding row
    outside = 64 * 4 + embedding + embedding / vocab
    kv = 2 * 2 * 16 * 4  # keys and values of 2 heads x 16 per position, fp32
    return DecodeBytes((block,) * 6, outside, kv)


def test_bench_ideal_uses_the_quantised_bytes(quant, tmp_path, monkeypatch):
    bits, out, pm, _ = quant
    want = _hand_count(bits, pm.config["vocab_size"])
    facts = model_facts(pm)
    assert facts["decode_bytes"] == want.__dict__
    assert facts["bytes_per_param"] == pytest.approx(want.blocks[0] / (BLOCK_WEIGHTS + 128))
    monkeypatch.setenv("PUDDING_OPENBLAS", "0")
    CliRunner().invoke(cli, ["bench", "-b", str(out), "--prompt-lengths", "", "--gen-lengths",
                             "6", "--gen-prompt", "8", "--trials", "1", "--warmup", "0",
                             "--static", "-o", str(tmp_path)], catch_exceptions=False)
    res = json.loads((tmp_path / "bench.json").read_text())
    (row,) = res["summary"]["generation"]
    context = 8 + 6 // 2
    b, o, kv = want.blocks[0], want.outside, want.kv_per_position * context
    assert row["ideal_decode"] == pytest.approx((6 * (b + kv) + o) / (4 * (b + kv) + o))
    assert row["ideal_decode"] == pytest.approx(decode_ideal(want, context, SETS["early"]))


def test_eval_dequantized_scores_the_same_model(quant, tmp_path):
    """`pudding eval --dequantize` gives every answer the log-likelihood the quantised model
    gives it (to float rounding), under a cache fingerprint of its own."""
    from test_evaluate import write_data

    from pudding_mlx.evaluation.run import EvalSettings, run_eval

    out = quant[1]
    data = write_data(tmp_path / "data", n=6)
    for dequantize in (False, True):
        run_eval(EvalSettings(bundle=str(out), output=str(tmp_path / str(dequantize)),
                              tasks=("arc_easy", "piqa"), methods="dense,static",
                              data_dir=str(data), resamples=50, dequantize=dequantize))
    files = sorted((tmp_path / "False" / "cache").rglob("*.json"))
    assert len(files) == 4  # two tasks x (dense, the static set)
    for f in files:
        a = json.loads(f.read_text())
        b = json.loads((tmp_path / "True" / f.relative_to(tmp_path / "False")).read_text())
        assert b["fingerprint"] == {**a["fingerprint"], "dequantized": True}
        assert a["values"].keys() == b["values"].keys()
        for qid, (logprobs, counts) in a["values"].items():
            assert b["values"][qid][1] == counts
            assert np.abs(np.subtract(b["values"][qid][0], logprobs)).max() <= 1e-3
    res = json.loads((tmp_path / "True" / "results.json").read_text())
    assert res["backend"] == "mlx, quantised weights dequantised to float at load"


@pytest.fixture(scope="module")
def gemma_q8(tmp_path_factory):
    """A tiny Gemma 3 (sliding window 4, every third block global) converted to 8 bits, and HF
    torch on its dequantised weights."""
    root = tmp_path_factory.mktemp("gemma-q8")
    hf, tok = tiny_gemma3(root / "hf", window=4, pattern=3)
    convert_llm_to_mlx(root / "hf", root / "q8", MLXSettings("float32", True, 8))
    model, _, _ = load_lm(root / "q8")
    return model, tok, dequantised_torch(root / "hf", model), hf


@pytest.mark.parametrize("skip", [[2], [1, 5], [0, 2, 4], [0, 1, 3, 4]], ids=str)
def test_quantised_gemma3_skips_keep_block_types(gemma_q8, skip):
    """Global and sliding blocks removed from a quantised Gemma 3 = HF torch built from the kept
    blocks (their dequantised weights and their own attention types), prompt > 4 windows."""
    from test_gemma3 import reference

    model, tok, ref_model, float_model = gemma_q8
    ids = tok(CORPUS[0] + " " + CORPUS[3])["input_ids"]
    assert len(ids) > 16
    got = np.array(skip_view(model, skip)(mx.array([ids]))[0])
    assert isinstance(model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert np.abs(got - reference(ref_model, ids, skip)).max() <= 1e-3
    assert np.abs(got - reference(float_model, ids, skip)).max() > 1e-2


def test_dequantize_refuses_a_float_bundle(tmp_path, monkeypatch, capsys):
    tb = tiny_bundle(tmp_path / "b")
    code, _, err = run_cli(["eval", str(tb.path), "-o", str(tmp_path / "e"), "--dequantize"],
                           monkeypatch, capsys)
    assert code == 2 and "--dequantize:" in err and "is not quantised" in err


@pytest.mark.slow
def test_smollm2_q8_passes_and_q4_is_refused(tmp_path):
    """The real SmolLM2 (shipped as Q4_1): 8 bits pass the gate, 4 bits again are refused by it
    (mean KL about 0.64 nats against the float model) unless --max-kl accepts them."""
    from convert.assets import smollm2_gguf
    from convert.to_bundle import ConvertSettings, MLXSettings, write_bundle
    from pudding_mlx.errors import PuddingError

    gguf = smollm2_gguf()
    tiny_router(tmp_path / "router", ["a"], max_length=32)
    (tmp_path / "candidates.json").write_text(json.dumps({"candidates": [
        {"name": "a", "skip": [6, 18, 19, 25], "task": "arc_easy", "loss": "likelihood",
         "k": 4}]}))
    args = (str(gguf), tmp_path / "candidates.json", tmp_path / "router")
    m = write_bundle(*args, tmp_path / "q8",
                     ConvertSettings(MLXSettings("float32", True, 8), coreml=False))
    assert [r["skip"] for r in m.extra["parity"]["results"]] == [[], [6, 18, 19, 25]]
    assert all(r["mean_kl"] < 0.01 for r in m.extra["parity"]["results"])
    q4 = ConvertSettings(MLXSettings("float32", True, 4), coreml=False)
    with pytest.raises(PuddingError, match="mean KL 0.6"):
        write_bundle(*args, tmp_path / "q4", q4)
    assert not (tmp_path / "q4").exists()
    q4.max_kl = 1.0
    m = write_bundle(*args, tmp_path / "q4", q4)
    assert all(0.3 < r["mean_kl"] < 1.0 for r in m.extra["parity"]["results"])

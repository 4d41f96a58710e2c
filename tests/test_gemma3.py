"""Gemma 3 (mlx-lm's gemma3_text) with blocks skipped keeps every kept block's attention type.

mlx-lm's forward picks a block's mask by its loop index, so it cannot simply run a shorter
block list; pudding runs it through `pudding_mlx.arch`. HF torch picks the mask and RoPE by
index too (`config.layer_types[i]`), so the reference is a model built with the kept blocks'
types. Types of the tiny model: sliding, sliding, full, sliding, sliding, full (window 4).
"""

from __future__ import annotations

import copy
import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from helpers import CORPUS, tiny_gemma3, tiny_llama, tiny_router
from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

from pudding_mlx import arch
from pudding_mlx.errors import PuddingError
from pudding_mlx.masking import SkipView, check_skip, num_blocks, protected_blocks, skip_view
from pudding_mlx.model import load_lm, rope_theta_fix

WINDOW = 4
SKIPS = [[], [2], [0], [3], [1, 5], [2, 5], [0, 1, 3, 4], [0, 2, 4]]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma3")
    hf, tok = tiny_gemma3(folder, window=WINDOW, pattern=3)
    model, _, _ = load_lm(folder)
    return hf, tok, model


@pytest.fixture(scope="module")
def ids(pair):
    ids = pair[1](CORPUS[0] + " " + CORPUS[3])["input_ids"]
    assert len(ids) > 4 * WINDOW
    return ids


def reference(hf, ids: list[int], skip: list[int]) -> np.ndarray:
    """HF logits of a model built with only the kept blocks (their weights and types)."""
    from transformers import Gemma3ForCausalLM

    kept = [i for i in range(hf.config.num_hidden_layers) if i not in skip]
    config = copy.deepcopy(hf.config)
    config.num_hidden_layers = len(kept)
    config.layer_types = [hf.config.layer_types[i] for i in kept]
    short = Gemma3ForCausalLM(config).float().eval()
    state = {k: v for k, v in hf.state_dict().items() if not k.startswith("model.layers.")}
    for j, i in enumerate(kept):
        state |= {f"model.layers.{j}.{k}": v for k, v in hf.model.layers[i].state_dict().items()}
    short.load_state_dict(state)
    with torch.no_grad():
        return short(torch.tensor([ids]), use_cache=False).logits[0].numpy()


def test_types_and_protection(pair):
    _, _, model = pair
    assert [b.self_attn.is_sliding for b in model.layers] == [True, True, False] * 2
    # Masks come from any kept block of the right type: nothing is protected.
    assert protected_blocks(model) == set()
    assert check_skip(model, [0, 2]) == (0, 2)


def test_arch_forward_over_all_blocks_is_mlx_lm_s(pair, ids):
    """pudding's copy of the forward equals mlx-lm's own (which runs the dense route), also
    with caches: a change of gemma3_text in a newer mlx-lm shows up here."""
    _, _, model = pair
    view = SkipView(model, [])
    assert np.array_equal(np.array(view(mx.array([ids]))), np.array(model(mx.array([ids]))))
    a, b = make_prompt_cache(view), make_prompt_cache(model)
    for chunk in (ids[:7], ids[7:12], ids[12:13]):
        assert np.array_equal(np.array(view(mx.array([chunk]), cache=a)),
                              np.array(model(mx.array([chunk]), cache=b)))


@pytest.mark.parametrize("skip", SKIPS, ids=str)
def test_skipped_logits_match_torch(pair, ids, skip):
    hf, _, model = pair
    ref = reference(hf, ids, skip)
    out = np.array(skip_view(model, skip)(mx.array([ids])))[0]
    assert np.abs(out - ref).max() <= 1e-3
    if skip:  # the comparison can tell sets apart
        assert np.abs(out - reference(hf, ids, [])).max() > 1e-2


@pytest.mark.parametrize("skip", [[2], [0], [1, 5]], ids=str)
def test_mlx_lm_forward_over_a_shorter_list_would_be_wrong(pair, ids, skip):
    """What the plain SkipView did: blocks typed by their new position. The tests above can
    tell it apart."""
    hf, _, model = pair
    owner = model.model
    layers = owner.layers
    owner.layers = [layers[i] for i in range(6) if i not in skip]
    try:
        naive = np.array(model(mx.array([ids])))[0]
    finally:
        owner.layers = layers
    assert np.abs(naive - reference(hf, ids, skip)).max() > 1e-2


def test_torch_skip_keeps_layer_types(pair, ids):
    """convert.skip.skipped (the parity gate's torch side) shortens config.layer_types too."""
    from convert.skip import skipped

    hf, _, _ = pair
    types = list(hf.config.layer_types)
    for skip in ([2], [0, 4]):
        with torch.no_grad(), skipped(hf, skip):
            got = hf(torch.tensor([ids]), use_cache=False).logits[0].numpy()
        assert np.abs(got - reference(hf, ids, skip)).max() <= 1e-5
    assert hf.config.layer_types == types and len(hf.model.layers) == 6


@pytest.mark.parametrize("skip", [[2], [0, 4], [1, 5], [2, 5]], ids=str)
def test_incremental_decoding_matches_full_forward(pair, ids, skip):
    _, _, model = pair
    view = skip_view(model, skip)
    full = np.array(view(mx.array([ids])))[0]
    cache = make_prompt_cache(view)
    kept = [i for i in range(6) if i not in skip]
    assert [type(c) for c in cache] == [KVCache if i % 3 == 2 else RotatingKVCache for i in kept]
    assert {c.max_size for c in cache if isinstance(c, RotatingKVCache)} <= {WINDOW}
    # A prefill longer than the window, a chunk after the sliding caches wrapped, then tokens.
    steps = [np.array(view(mx.array([ids[:7]]), cache=cache))[0]]
    steps.append(np.array(view(mx.array([ids[7:12]]), cache=cache))[0])
    for t in ids[12:]:
        steps.append(np.array(view(mx.array([[t]]), cache=cache))[0])
    assert np.abs(np.concatenate(steps) - full).max() <= 1e-4
    assert all(c.offset == len(ids) for c in cache)


def test_view_runs_without_touching_the_model(pair, ids):
    _, _, model = pair
    layers = model.model.layers
    view = SkipView(model, [1, 5])
    assert view.arch_forward is arch.gemma3_text
    assert [id(b) for b in view.layers] == [id(layers[i]) for i in (0, 2, 3, 4)]
    with pytest.raises(PuddingError, match="call the view"), view.active():
        pass
    view(mx.array([ids[:3]]), cache=make_prompt_cache(view))
    assert model.model.layers is layers and len(layers) == 6


def test_unregistered_gemma3_is_refused(pair, monkeypatch):
    """Without its arch forward, gemma3_text's index-based forward is detected and refused."""
    _, _, model = pair
    monkeypatch.setattr(arch, "FORWARDS", {})
    where = r"position in the block list \(`cache\[self.sliding_window_pattern - 1\]`\)"
    with pytest.raises(PuddingError, match=where):
        SkipView(model, [2])
    with pytest.raises(PuddingError, match="gemma3_text.Model: Gemma3Model.__call__"):
        num_blocks(model)


class _IndexedBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = [nn.Linear(4, 4) for _ in range(3)]

    def __call__(self, x, cache=None):
        for i, layer in enumerate(self.layers):
            x = layer(x) * (i + 1)
        return x


class _Indexed(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = _IndexedBlocks()

    def __call__(self, x, cache=None):
        return self.model(x, cache)


def test_fake_positional_model_is_refused():
    model = _Indexed()
    for call in (lambda: SkipView(model, [1]), lambda: skip_view(model, []),
                 lambda: protected_blocks(model)):
        with pytest.raises(PuddingError) as e:
            call()
        assert "\n" not in str(e.value)
        assert "_IndexedBlocks.__call__ ties each block's behaviour to its position" in str(e.value)
        assert "`enumerate(self.layers`" in str(e.value)


def _convert_inputs(root, names: list[str]):
    tiny_router(root / "router", names, max_length=32)
    sets = {"a": [2], "b": [0, 4], "c": [1, 5]}
    (root / "candidates.json").write_text(json.dumps({"candidates": [
        {"name": n, "skip": sets[n], "task": "arc_easy", "loss": "likelihood",
         "k": len(sets[n])} for n in names]}))


def test_convert_and_load_a_gemma3_bundle(pair, ids, tmp_path):
    """`pudding convert` of the tiny Gemma 3: the parity gate passes on a set that skips a
    full-attention block, no block is protected, and routed logits are torch's."""
    import pudding_mlx
    from convert.to_bundle import ConvertSettings, MLXSettings, write_bundle
    from convert.to_mlx import PROMPTS, parity_prompts

    hf, tok, _ = pair
    hf.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    _convert_inputs(tmp_path, ["a", "b", "c"])
    out = tmp_path / "bundle"
    m = write_bundle(str(tmp_path / "hf"), tmp_path / "candidates.json", tmp_path / "router",
                     out, ConvertSettings(MLXSettings("float32"), coreml=False))
    assert m.protected == []
    results = m.extra["parity"]["results"]
    # The gate adds a prompt longer than the window to the four short ones.
    prompts = parity_prompts(hf, tok)
    assert len(prompts) == 5 and len(tok.encode(prompts[-1])) >= WINDOW + 64
    assert parity_prompts(tiny_llama(tmp_path / "llama")[0], tok) == PROMPTS
    assert [r["skip"] for r in results] == [[], [2]]
    assert all(r["max_abs_logprob"] <= 1e-3 for r in results)
    pm = pudding_mlx.load(out, router_backend="mlx")
    for skip in ([0, 4], [1, 5]):
        got = np.array(pm.view(skip)(mx.array([ids])))[0]
        assert np.abs(got - reference(hf, ids, skip)).max() <= 1e-3
    # Greedy generation through mlx-lm's loop (rotating caches past the window) is torch's.
    route = pm.route("", skip=[1, 5])
    got = [r.token for r in pm.stream_generate(ids, max_tokens=6, route=route)]
    want = list(ids)
    for _ in range(6):
        want.append(int(reference(hf, want, [1, 5])[-1].argmax()))
    assert got == want[len(ids):]
    # `pudding serve` cannot batch this forward block by block: it decodes one request at a
    # time, and two requests sent together each get the greedy text of the same set alone
    from concurrent.futures import ThreadPoolExecutor

    from test_serve import request, serving

    text = "The capital of France is"
    want = [r.token for r in pm.stream_generate(pm.encode(text, chat_template=False),
                                                max_tokens=6, route=route)]
    body = {"model": "bundle:static", "prompt": text, "max_tokens": 6, "temperature": 0}
    pm.manifest.static.skip = [1, 5]  # the static model name serves this set
    with serving(pm, api_key=None) as (url, engine):
        assert engine.decode_concurrency == 1
        with ThreadPoolExecutor(2) as pool:
            replies = list(pool.map(lambda _: request(url, "POST", "/v1/completions", body,
                                                      key=None), range(2)))
    for status, _, data in replies:
        assert status == 200, data
        # (the streaming detokenizer drops the leading space a sentencepiece word carries)
        assert data["choices"][0]["text"].strip() == pm.tokenizer.decode(want).strip()
        assert data["usage"]["completion_tokens"] == len(want)


def test_convert_refuses_a_position_dependent_architecture(tmp_path):
    """Cohere 2 in mlx-lm picks each block's mask by loop index: refused after the MLX
    conversion, with one line, and no bundle is written."""
    from convert.to_bundle import ConvertSettings, MLXSettings, write_bundle

    tiny_llama(tmp_path / "hf", model_type="cohere2")
    _convert_inputs(tmp_path, ["a", "b"])
    out = tmp_path / "bundle"
    with pytest.raises(PuddingError) as e:
        write_bundle(str(tmp_path / "hf"), tmp_path / "candidates.json", tmp_path / "router",
                     out, ConvertSettings(MLXSettings("float32"), coreml=False))
    assert "CohereModel.__call__ ties each block's behaviour to its position" in str(e.value)
    assert "\n" not in str(e.value) and not out.exists()


def test_rope_bases_come_from_rope_parameters(ids, tmp_path):
    """transformers 5 nests Gemma 3's two RoPE bases by attention type; mlx-lm would silently
    use its defaults (1e6, 1e4) without the config fix."""
    from mlx_lm import load as lm_load

    hf, _ = tiny_gemma3(tmp_path, window=WINDOW, rope_thetas=(5e3, 100.0))
    model, _, config = load_lm(tmp_path)
    assert rope_theta_fix(config) == {"rope_theta": 5e3, "rope_local_base_freq": 100.0}
    for skip in ([], [2]):
        out = np.array(skip_view(model, skip)(mx.array([ids])))[0]
        assert np.abs(out - reference(hf, ids, skip)).max() <= 1e-3
    unfixed, _ = lm_load(str(tmp_path))
    assert np.abs(np.array(unfixed(mx.array([ids])))[0] - reference(hf, ids, [])).max() > 1e-2


def test_parity_gate_follows_mlx_lm_s_rounded_embedding_scale(ids, tmp_path):
    """Hidden size 40: mlx-lm scales the embeddings by sqrt(40) rounded to bf16 (6.3125, not
    6.3246). The gate's torch reference rounds it the same way (and says so), and passes the
    float32 bounds; MLX is 1e-3 from it and further from the unrounded model, which is left as
    it was."""
    from convert.to_mlx import check_parity, embed_scale_as_mlx_lm, torch_logits

    hf, tok = tiny_gemma3(tmp_path, window=WINDOW, hidden=40)
    model, mlx_tok, _ = load_lm(tmp_path)
    report = check_parity(hf, tok, model, mlx_tok, [[], [2], [0, 4]], "float32")
    assert report.passed, report.failures
    assert report.reference == ("HF torch float32, embedding scale rounded to bfloat16 as "
                                "mlx-lm does (6.32456 -> 6.3125)")
    for skip in ([], [2]):
        with embed_scale_as_mlx_lm(hf):
            rounded = torch_logits(hf, ids, skip)
        plain = torch_logits(hf, ids, skip)
        out = np.array(skip_view(model, skip)(mx.array([ids])))[0]
        assert np.abs(out - rounded).max() <= 1e-3 < np.abs(out - plain).max()
    assert float(hf.model.embed_tokens.embed_scale) == pytest.approx(40**0.5)

"""`pudding convert` end to end: tiny torch LLaMA + tiny router -> bundle -> MLX, against torch."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import mlx_logits, tiny_llama, tiny_router, torch_greedy, torch_logits, torch_route

from pudding_mlx.bundle import hash_tree, read_manifest, verify_files
from pudding_mlx.cli import cli
from pudding_mlx.errors import PuddingError

CANDIDATES = [
    {"name": "arc_easy-likelihood-k2", "skip": [2, 4], "task": "arc_easy", "loss": "likelihood",
     "k": 2, "trajectory": [{"block": 4, "loss": 1.0, "seconds": 0.1, "block_evals": 6}]},
    {"name": "piqa-margin-k1", "skip": [3], "task": "piqa", "loss": "margin", "k": 1,
     "trajectory": []},
    {"name": "boolq-likelihood-k3", "skip": [1, 3, 5], "task": "boolq", "loss": "likelihood",
     "k": 3, "trajectory": []},
]
NAMES = [c["name"] for c in CANDIDATES]
PROMPTS = ["Which gas do plants absorb from the air?", "hello, how are you today?",
           "She poured the water into the glass because the glass was empty."]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    model, tok = tiny_llama(root / "hf", num_layers=6, rope_theta=50000.0)
    router, rtok = tiny_router(root / "router", NAMES, max_length=32)
    (root / "candidates.json").write_text(
        json.dumps({"candidates": CANDIDATES, "settings": {"tasks": ["arc_easy"]}}))
    return root, model, tok, router, rtok


def run_convert(root, out, *extra):
    args = ["convert", "--model", str(root / "hf"), "--candidates", str(root / "candidates.json"),
            "--router", str(root / "router"), "--out", str(out), "--dtype", "float32", *extra]
    return CliRunner().invoke(cli, args, catch_exceptions=True)


@pytest.fixture(scope="module")
def bundle(inputs):
    root = inputs[0]
    out = root / "bundle"
    result = run_convert(root, out, "--static", "piqa-margin-k1")
    assert result.exit_code == 0, (result.output, result.exception)
    assert "parity skip [3]" in result.output
    return out


def test_bundle_manifest_and_files(inputs, bundle):
    m = read_manifest(bundle)
    verify_files(bundle, m)
    assert m.num_blocks == 6
    assert [c.name for c in m.candidates] == NAMES
    assert [c.skip for c in m.candidates] == [c["skip"] for c in CANDIDATES]
    assert (m.candidates[1].task, m.candidates[1].loss, m.candidates[1].k) == ("piqa", "margin", 1)
    assert m.static.name == "piqa-margin-k1" and m.static.skip == [3]
    assert m.protected == [0]
    assert m.router.outputs == NAMES and m.router.max_length == 32
    parity = m.extra["parity"]
    assert parity["passed"] and [r["skip"] for r in parity["results"]] == [[], [3]]
    assert m.extra["router"]["coreml"]["max_abs_diff"] <= m.extra["router"]["coreml"]["tolerance"]
    assert m.extra["search_settings"] == {"tasks": ["arc_easy"]}
    for rel in ("model/config.json", "router/model.safetensors", "router/tokenizer_config.json",
                "router.mlpackage/Manifest.json"):
        assert rel in m.files
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".bundle.")]


def test_bundle_model_matches_torch(inputs, bundle):
    """Plain mlx_lm.load of bundle/model, blocks removed by hand, against HF torch."""
    from mlx_lm import load

    _, model, tok, _, _ = inputs
    mlx_model, _ = load(str(bundle / "model"))
    ids = tok.encode("Question: How do you boil an egg?\nAnswer: put it in boiling water")
    for skip in [[], *[c["skip"] for c in CANDIDATES]]:
        got = mlx_logits(mlx_model, ids, skip)
        assert np.abs(got - torch_logits(model, ids, skip).numpy()).max() <= 1e-3, skip


def test_routed_generate_matches_torch(inputs, bundle):
    """pudding_mlx.load: the router picks what the torch router picks, and greedy decoding
    with that set skipped gives torch's tokens."""
    import pudding_mlx

    _, model, tok, router, rtok = inputs
    pm = pudding_mlx.load(bundle, router_backend="mlx")
    for prompt in PROMPTS:
        route = pm.route(prompt)
        want = torch_route(router, rtok, prompt).index
        assert route.name == NAMES[want]
        assert route.skip == CANDIDATES[want]["skip"]
        ids = pm.encode(prompt)
        tokens = [r.token for r in pm.stream_generate(ids, max_tokens=6, route=route)]
        assert tokens == torch_greedy(model, ids, route.skip, len(tokens)), prompt


def test_failed_conversion_keeps_old_bundle(inputs, bundle, tmp_path):
    """A conversion that fails its checks leaves the existing bundle as it was."""
    root = inputs[0]
    before = hash_tree(bundle)
    bad = json.loads((root / "candidates.json").read_text())
    bad["candidates"][0]["skip"] = [0, 2]  # block 0 builds the attention mask
    work = tmp_path / "in"
    shutil.copytree(root / "hf", work / "hf")
    shutil.copytree(root / "router", work / "router")
    (work / "candidates.json").write_text(json.dumps(bad))
    result = run_convert(work, bundle, "--no-coreml")
    assert isinstance(result.exception, PuddingError)
    assert "protected" in str(result.exception)
    assert hash_tree(bundle) == before
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".bundle.")]


def test_reconvert_replaces_bundle(inputs, tmp_path):
    root = inputs[0]
    out = tmp_path / "b"
    assert run_convert(root, out, "--no-coreml").exit_code == 0
    (out / "stale.txt").write_text("from an older bundle")
    result = run_convert(root, out, "--no-coreml", "--static", "boolq-likelihood-k3")
    assert result.exit_code == 0, result.exception
    assert not (out / "stale.txt").exists()
    assert read_manifest(out).static.skip == [1, 3, 5]
    assert not (out / "router.mlpackage").exists()
    verify_files(out, read_manifest(out))


@pytest.mark.parametrize("case, match", [
    ("router_names", "must name the candidates"),
    ("out_of_range", "out of range"),
    ("static_unknown", "neither a candidate name nor a file"),
    ("not_a_bundle", "not empty and not a bundle"),
    ("unwritable", "not writable"),
    ("no_space", "GB free"),
])
def test_bad_inputs_fail_early(inputs, tmp_path, monkeypatch, case, match):
    import pudding_mlx.files
    from convert.to_bundle import ConvertSettings, write_bundle

    root = inputs[0]
    cands, router_dir, out = root / "candidates.json", root / "router", tmp_path / "out"
    settings = ConvertSettings()
    if case == "router_names":
        d = json.loads(cands.read_text())
        d["candidates"][0]["name"] = "renamed"
        cands = tmp_path / "c.json"
        cands.write_text(json.dumps(d))
    elif case == "out_of_range":
        d = json.loads(cands.read_text())
        d["candidates"][1]["skip"] = [6]
        cands = tmp_path / "c.json"
        cands.write_text(json.dumps(d))
    elif case == "static_unknown":
        settings.static = "nope"
    elif case == "not_a_bundle":
        out.mkdir()
        (out / "precious.txt").write_text("keep me")
    elif case == "unwritable":
        out = Path("/proc/pudding-test/out")
    elif case == "no_space":
        monkeypatch.setattr(pudding_mlx.files.shutil, "disk_usage",
                            lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(PuddingError, match=match):
        write_bundle(str(root / "hf"), cands, router_dir, out, settings)
    if case == "not_a_bundle":
        assert (out / "precious.txt").read_text() == "keep me"
    if case == "no_space":
        assert not out.exists()


def test_static_from_file(inputs, tmp_path):
    from convert.to_bundle import resolve_static
    from pudding_mlx.bundle import read_candidates

    root = inputs[0]
    cands, _ = read_candidates(root / "candidates.json")
    (tmp_path / "sleb.json").write_text(json.dumps({"skip": [5, 2], "task": "sleb"}))
    s = resolve_static(str(tmp_path / "sleb.json"), cands)
    assert (s.name, s.skip, s.task, s.k) == ("static", [2, 5], "sleb", 2)
    (tmp_path / "list.json").write_text("[4]")
    assert resolve_static(str(tmp_path / "list.json"), cands).skip == [4]
    assert resolve_static(None, cands).name == NAMES[0]


@pytest.mark.slow
def test_convert_smollm2_float32(tmp_path):
    """The real SmolLM2 GGUF at float32 with a tiny router; the parity gate must pass."""
    from convert.assets import smollm2_gguf
    from convert.to_bundle import ConvertSettings, MLXSettings, write_bundle

    gguf = smollm2_gguf()
    names = ["a", "b"]
    tiny_router(tmp_path / "router", names, max_length=32)
    (tmp_path / "candidates.json").write_text(json.dumps({"candidates": [
        {"name": "a", "skip": [5, 10, 15, 20, 25], "task": "arc_easy", "loss": "margin", "k": 5},
        {"name": "b", "skip": [27, 28], "task": "piqa", "loss": "likelihood", "k": 2},
    ]}))
    out = tmp_path / "bundle"
    m = write_bundle(str(gguf), tmp_path / "candidates.json", tmp_path / "router", out,
                     ConvertSettings(MLXSettings("float32")))
    assert m.num_blocks == 30 and m.protected == [0]
    assert json.loads((out / "model" / "config.json").read_text())["rope_theta"] == 100000.0
    results = m.extra["parity"]["results"]
    assert [r["skip"] for r in results] == [[], [5, 10, 15, 20, 25]]
    assert all(r["max_abs_logprob"] <= 1e-3 for r in results)
    verify_files(out, m)
    print(json.dumps(m.extra["parity"], indent=1))


def test_candidates_in_another_order_than_router_outputs(inputs, tmp_path):
    """Labels may list candidates in another order than candidates.json: the manifest keeps
    the router's order, so routes still name the set the torch router picks."""
    import pudding_mlx

    root, _, _, router, rtok = inputs
    work = tmp_path / "in"
    shutil.copytree(root / "hf", work / "hf")
    shutil.copytree(root / "router", work / "router")
    d = json.loads((root / "candidates.json").read_text())
    d["candidates"].reverse()
    (work / "candidates.json").write_text(json.dumps(d))
    result = run_convert(work, tmp_path / "b", "--no-coreml")
    assert result.exit_code == 0, result.output
    pm = pudding_mlx.load(tmp_path / "b", router_backend="mlx")
    for prompt in PROMPTS:
        assert pm.route(prompt).name == torch_route(router, rtok, prompt).name

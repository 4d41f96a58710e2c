"""More broken bundles than tests/test_bundle.py covers: extra files, truncated weights, a router
tokenizer from another model, an architecture without `model.layers`, candidate sets on the
blocks the attention mask is built from, unusable configs. Each is one line naming the file,
exit code 2, no traceback; `--debug` raises instead."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import assert_one_line
from helpers import run_cli as run

import pudding_mlx
from pudding_mlx.bundle import MANIFEST, read_manifest, verify_files, write_manifest
from pudding_mlx.cli import main
from pudding_mlx.errors import BundleError


@pytest.fixture
def bundle(shared_tiny_bundle, tmp_path):
    return Path(shutil.copytree(shared_tiny_bundle.path, tmp_path / "b"))




def generate(bundle, monkeypatch, capsys, *extra):
    """(exit code, stderr) of `pudding generate` on the bundle."""
    code, out, err = run(["generate", "-b", str(bundle), "-p", "hi", "-m", "2", *extra],
                         monkeypatch, capsys)
    assert "Traceback" not in out
    return code, err


def rehash(path: Path) -> None:
    """Re-hash every file into the manifest: only the content is wrong, not the hashes."""
    write_manifest(path, read_manifest(path))


def edit_json(path: Path, change) -> None:
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))


def truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# -- extra files ------------------------------------------------------------------------------


@pytest.mark.parametrize("rel", ["notes.txt", "router/vocab.txt", "model/sub/shard.safetensors",
                                 "model/model-00002-of-00002.safetensors"])
def test_unlisted_extra_file(bundle, rel, monkeypatch, capsys):
    (bundle / rel).parent.mkdir(parents=True, exist_ok=True)
    (bundle / rel).write_bytes(b"extra")
    assert_one_line(*generate(bundle, monkeypatch, capsys), f"{rel}: not listed in {MANIFEST}")


def test_listed_extra_weight_shard_is_refused(bundle, monkeypatch, capsys):
    """A second weight file mlx-lm would merge in (listed, hashes fine): strict loading refuses
    tensors the architecture does not have."""
    import mlx.core as mx

    mx.save_safetensors(str(bundle / "model/model-extra.safetensors"),
                        {"model.layers.9.mlp.up_proj.weight": mx.zeros((4, 4))})
    rehash(bundle)
    assert_one_line(*generate(bundle, monkeypatch, capsys), f"{bundle}/model: mlx-lm cannot load")


def test_finder_metadata_is_ignored(bundle, monkeypatch, capsys):
    """macOS Finder drops .DS_Store into folders it shows; that must not break a bundle."""
    (bundle / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (bundle / "model/.DS_Store").write_bytes(b"\0\0\0\1Bud1")
    verify_files(bundle, read_manifest(bundle))
    code, err = generate(bundle, monkeypatch, capsys)
    assert code == 0, err


# -- truncated weights (an interrupted download or copy) --------------------------------------


@pytest.mark.parametrize("rel", ["model/model.safetensors", "router/model.safetensors"])
@pytest.mark.parametrize("keep", [0.5, 0.004, 0.0])
def test_truncated_safetensors_without_hash_check(bundle, rel, keep, monkeypatch, capsys):
    """With --no-verify the sha256 check is off; the header check still names the file."""
    truncate(bundle / rel, keep)
    assert_one_line(*generate(bundle, monkeypatch, capsys, "--no-verify"),
                    f"{bundle / rel}: truncated safetensors file")


@pytest.mark.parametrize("rel", ["model/model.safetensors", "router/model.safetensors"])
def test_truncated_safetensors_with_matching_hash(bundle, rel, monkeypatch, capsys):
    """Truncated before the manifest was written (hashes match): still refused by name."""
    truncate(bundle / rel, 0.5)
    rehash(bundle)
    assert_one_line(*generate(bundle, monkeypatch, capsys),
                    f"{bundle / rel}: truncated safetensors file")


def test_truncated_safetensors_is_caught_by_hash(bundle, monkeypatch, capsys):
    truncate(bundle / "router/model.safetensors", 0.5)
    assert_one_line(*generate(bundle, monkeypatch, capsys),
                    "router/model.safetensors: sha256 mismatch")


def test_safetensors_header_garbage(bundle, monkeypatch, capsys):
    path = bundle / "router/model.safetensors"
    path.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}" + b"\0" * 64)
    rehash(bundle)
    assert_one_line(*generate(bundle, monkeypatch, capsys), f"{path}: not a safetensors file")


def test_truncated_tokenizer_json(bundle, monkeypatch, capsys):
    truncate(bundle / "model/tokenizer.json", 0.5)
    rehash(bundle)
    assert_one_line(*generate(bundle, monkeypatch, capsys), f"{bundle}/model",
                    "tokenizer.json")


# -- the router's tokenizer belongs to another model ------------------------------------------


def test_router_tokenizer_from_the_llm(bundle, monkeypatch, capsys):
    """The LLM's 320-token BPE tokenizer in router/: ids beyond the router's embedding table."""
    from transformers import AutoTokenizer

    router_tok = AutoTokenizer.from_pretrained(bundle / "router")
    llm_tok = AutoTokenizer.from_pretrained(bundle / "model")
    assert len(llm_tok) > len(router_tok)  # the premise of the check
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(bundle / "model" / name, bundle / "router" / name)
    rehash(bundle)
    assert_one_line(*generate(bundle, monkeypatch, capsys), f"{bundle}/router",
                    "tokenizer and weights do not belong together")


def test_router_config_without_fields(bundle, monkeypatch, capsys):
    edit_json(bundle / "router/config.json", lambda d: d.pop("hidden_size"))
    rehash(bundle)
    assert_one_line(*generate(bundle, monkeypatch, capsys),
                    f"{bundle}/router/config.json: not a usable BERT config", "hidden_size")


def test_router_inputs_come_from_its_config(bundle, monkeypatch, capsys):
    """router_config.json says what the router reads per question (eval gives it that); an
    unknown value is refused, an old config without the key reads the question alone."""
    from pudding_mlx.model import load

    config = bundle / "router/router_config.json"
    edit_json(config, lambda d: d.pop("inputs", None))
    rehash(bundle)
    assert load(bundle, lazy=True).router.inputs == "context"
    edit_json(config, lambda d: d.update(inputs="choices"))
    rehash(bundle)
    assert load(bundle, lazy=True).router.inputs == "choices"
    edit_json(config, lambda d: d.update(inputs="answers"))
    rehash(bundle)
    assert_one_line(*generate(bundle, monkeypatch, capsys), f"{config}: inputs 'answers'")


# -- model folders mlx-lm (or the mask code) cannot use ---------------------------------------


def test_architecture_without_layers_list(bundle, monkeypatch, capsys):
    """A GPT-2 mlx-lm folder: its blocks live in `model.h`, so no set can be skipped."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import gpt2

    config = {"model_type": "gpt2", "n_ctx": 64, "n_embd": 32, "n_head": 4, "n_layer": 6,
              "n_positions": 64, "layer_norm_epsilon": 1e-5, "vocab_size": 320}
    model = gpt2.Model(gpt2.ModelArgs(**config))
    mx.save_safetensors(str(bundle / "model/model.safetensors"),
                        dict(tree_flatten(model.parameters())))
    (bundle / "model/config.json").write_text(json.dumps(config))
    rehash(bundle)
    assert_one_line(*generate(bundle, monkeypatch, capsys),
                    f"{bundle}/model/config.json: model_type 'gpt2'", "no `model.layers` list")


def test_architecture_with_position_dependent_blocks(bundle, monkeypatch, capsys):
    """A Cohere 2 mlx-lm folder: its forward picks each block's mask by loop index, which a
    skipped block would shift, and pudding has no forward of its own for it."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import cohere2

    config = {"model_type": "cohere2", "hidden_size": 32, "head_dim": 8, "num_hidden_layers": 6,
              "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 320, "sliding_window": 8, "sliding_window_pattern": 3}
    model = cohere2.Model(cohere2.ModelArgs(**config))
    mx.save_safetensors(str(bundle / "model/model.safetensors"),
                        dict(tree_flatten(model.parameters())))
    (bundle / "model/config.json").write_text(json.dumps(config))
    rehash(bundle)
    assert_one_line(*generate(bundle, monkeypatch, capsys),
                    f"{bundle}/model/config.json: model_type 'cohere2'",
                    "position in the block list (`cache[j - 1]`)")
    with pytest.raises(BundleError, match="CohereModel.__call__ ties each block's behaviour"):
        pudding_mlx.load(bundle)


@pytest.mark.parametrize("model_type, phrase", [
    ("cache", "mlx-lm cannot load this model"),  # a module of mlx_lm.models without a Model
    ("no_such_arch", "not supported"),
    ("llama.os", "invalid model_type"),
    ("../../evil", "invalid model_type"),
])
def test_unusable_model_type(bundle, model_type, phrase, monkeypatch, capsys):
    edit_json(bundle / "model/config.json", lambda d: d.update(model_type=model_type))
    rehash(bundle)
    assert_one_line(*generate(bundle, monkeypatch, capsys), f"{bundle}/model", phrase)


@pytest.mark.parametrize("change", [lambda d: d.pop("hidden_size"),
                                    lambda d: d.update(hidden_size="big"),
                                    lambda d: d.update(num_attention_heads=0)])
def test_model_config_with_bad_fields(bundle, change, monkeypatch, capsys):
    edit_json(bundle / "model/config.json", change)
    rehash(bundle)
    assert_one_line(*generate(bundle, monkeypatch, capsys), f"{bundle}/model")


@pytest.mark.parametrize("key", ["chat_template_type", "tool_parser_type"])
def test_tokenizer_config_names_unknown_module(bundle, key, monkeypatch, capsys):
    edit_json(bundle / "model/tokenizer_config.json", lambda d: d.update({key: "nope"}))
    rehash(bundle)
    assert_one_line(*generate(bundle, monkeypatch, capsys), f"{bundle}/model", "nope")


# -- candidate sets on the blocks the mask code reads -----------------------------------------


def test_static_set_skips_mask_block_of_old_manifest(bundle, monkeypatch, capsys):
    """A manifest without `protected` (hand-written or older): the model itself says block 0
    builds llama's attention mask, so a static set skipping it is refused at load."""
    def change(d):
        d["protected"] = []
        d["static"]["skip"] = [0, 3]

    edit_json(bundle / MANIFEST, change)
    assert_one_line(*generate(bundle, monkeypatch, capsys), f"{bundle}/pudding.json",
                    "candidate 'static' skips protected block(s) [0]")


def sliding_llama(bundle: Path) -> None:
    """Blocks 0 and 3 sliding-window, the rest full attention: mlx-lm's llama builds the full
    mask from block 1's cache (fa_idx) and the windowed one from block 0's (swa_idx)."""
    types = ["sliding_attention", "full_attention", "full_attention", "sliding_attention",
             "full_attention", "full_attention"]
    edit_json(bundle / "model/config.json",
              lambda d: d.update(layer_types=types, sliding_window=8))


def test_candidate_skips_full_attention_mask_block(bundle, monkeypatch, capsys):
    sliding_llama(bundle)
    rehash(bundle)  # the manifest still protects only block 0; 'early' skips [1, 2]
    assert_one_line(*generate(bundle, monkeypatch, capsys),
                    "candidate 'early' skips protected block(s) [1]")
    with pytest.raises(BundleError, match=r"skips protected block\(s\) \[1\]"):
        pudding_mlx.load(bundle)


def test_mask_blocks_of_sliding_model_are_protected(bundle, monkeypatch, capsys):
    """With sets that avoid blocks 0 and 1 the bundle loads; --skip on them is refused, and
    skipping a later block (indices remapped) generates."""
    sliding_llama(bundle)
    sets = {"early": [2, 3], "middle": [3, 4], "late": [4, 5]}

    def change(d):
        d["protected"] = [0, 1]
        for c in d["candidates"]:
            c["skip"] = sets[c["name"]]
        d["static"]["skip"] = [2, 3]

    edit_json(bundle / MANIFEST, change)
    rehash(bundle)
    code, out, err = run(["generate", "-b", str(bundle), "-p", "hello " * 20, "-m", "3"],
                         monkeypatch, capsys)
    assert code == 0, err
    for skip, phrase in (("1,4", "protected block(s) [1]"), ("0", "protected block(s) [0]")):
        assert_one_line(*generate(bundle, monkeypatch, capsys, "--skip", skip), phrase)


def test_debug_flag_raises_with_traceback(bundle, monkeypatch, capsys):
    truncate(bundle / "model/model.safetensors", 0.5)
    monkeypatch.setenv("PUDDING_OPENBLAS", "0")
    with pytest.raises(BundleError, match="truncated safetensors file"):
        main(["--debug", "generate", "-b", str(bundle), "--no-verify"])


def test_multi_line_library_error_prints_one_line(monkeypatch, capsys, tmp_path):
    """Library errors quoted in a PuddingError may span lines; the CLI still prints one."""
    import click

    from pudding_mlx import cli as cli_module
    from pudding_mlx.errors import PuddingError

    @click.command("boom")
    def boom():
        raise PuddingError("x.safetensors: cannot load (Missing parameters:\n  a.weight\n  b)")

    monkeypatch.setitem(cli_module.COMMANDS, "boom", "tests_bad_bundles_boom:boom")
    monkeypatch.setitem(__import__("sys").modules, "tests_bad_bundles_boom",
                        type("M", (), {"boom": boom}))
    code, out, err = run(["boom"], monkeypatch, capsys)
    assert code == 2 and err == "error: x.safetensors: cannot load (Missing parameters: " \
                                "a.weight b)\n"

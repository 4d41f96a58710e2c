"""`pudding demo --bundle`: the route the torch router picks, the routed answer HF torch decodes
under that route, router time and both speeds for every prompt."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner
from helpers import chat_ids, tiny_bundle, torch_greedy, torch_route

import pudding_mlx
from convert.demo import PROMPTS, cache_folder, run_prompt
from pudding_mlx.cli import cli


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return tiny_bundle(tmp_path_factory.mktemp("demo") / "b")


def test_demo_shows_route_router_time_and_both_speeds(built):
    result = CliRunner().invoke(cli, ["demo", "--bundle", str(built.path), "--max-tokens", "6"])
    assert result.exit_code == 0, (result.output, result.exception)
    out = result.output
    blocks = [m.group(1) for m in re.finditer(r"^Route: (\S+) \(skips blocks ([\d,]*) of 6; "
                                              r"router (\d+\.\d) ms(, prompt truncated for "
                                              r"the router)?\)$", out, re.M)]
    assert blocks == [torch_route(built.router, built.router_tokenizer, p).name
                      for _, p in PROMPTS]
    for name, match in zip(blocks, re.finditer(r"skips blocks ([\d,]*) of", out), strict=True):
        assert match.group(1) == ",".join(map(str, built.manifest.candidate(name).skip))
    speeds = re.findall(r"^speed over (\d+) tokens: routed (\d+\.\d) tokens/s, dense "
                        r"(\d+\.\d) tokens/s \((\d+\.\d\d)x\)$", out, re.M)
    assert len(speeds) == len(PROMPTS)
    assert all(1 <= int(n) <= 6 and float(r) > 0 and float(d) > 0 for n, r, d, _ in speeds)
    for kind, prompt in PROMPTS:
        assert f"] {kind}\n> {prompt}\n" in out


def test_routed_answer_and_dense_run_of_the_same_length(built):
    pm = pudding_mlx.load(built.path, router_backend="mlx")
    _, prompt = PROMPTS[0]
    r = run_prompt(pm, prompt, 6)
    assert r["route"].name == torch_route(built.router, built.router_tokenizer, prompt).name
    eos = built.tokenizer.eos_token_id
    ref = torch_greedy(built.model, chat_ids(built.tokenizer, prompt), r["route"].skip, 6, eos)
    ref = [t for t in ref if t != eos]
    # (mlx-lm's streaming detokenizer drops a leading space)
    assert r["text"] == built.tokenizer.decode(ref).strip()
    # the dense run never stops at end-of-sequence: it decodes as many tokens as the routed one
    assert r["dense_tokens"] == r["tokens"] >= len(ref)


def test_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("PUDDING_CACHE", str(tmp_path / "c"))
    assert cache_folder() == tmp_path / "c"
    monkeypatch.delenv("PUDDING_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_folder() == tmp_path / "x" / "pudding-mlx"


def test_rebuild_and_bundle_exclude_each_other(built):
    result = CliRunner().invoke(cli, ["demo", "--bundle", str(built.path), "--rebuild"])
    assert result.exit_code != 0
    assert "--rebuild" in str(result.exception)


def test_a_cached_likelihood_bundle_is_built_again_with_the_demo_profile(built, monkeypatch,
                                                                         tmp_path):
    """A demo bundle cached by an older pudding (likelihood router) is replaced by a build of
    the demo profile; a cached fidelity bundle is used as it is."""
    import shutil

    from convert import build, demo
    from convert.profiles import PROFILES

    monkeypatch.setenv("PUDDING_CACHE", str(tmp_path))
    shutil.copytree(built.path, tmp_path / "demo" / "bundle")
    (tmp_path / "demo" / "work").mkdir()
    calls = []

    def fake_build(model, bundle, work, profile):
        calls.append(profile)
        assert not (tmp_path / "demo" / "bundle").exists()  # the old one was removed first
        assert not work.exists()

    monkeypatch.setattr(build, "run_build", fake_build)
    assert demo.demo_bundle(rebuild=False) == tmp_path / "demo" / "bundle"
    assert calls == [PROFILES["demo"]] and PROFILES["demo"].target == "fidelity"

    manifest = tmp_path / "demo" / "bundle" / "pudding.json"
    shutil.copytree(built.path, manifest.parent)
    doc = json.loads(manifest.read_text())
    doc["router"]["target"] = "fidelity"
    manifest.write_text(json.dumps(doc))
    assert demo.demo_bundle(rebuild=False) == manifest.parent
    assert len(calls) == 1

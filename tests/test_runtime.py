"""A loaded tiny bundle routes like the torch router and generates like HF torch under the mask."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import CORPUS, chat_ids, tiny_bundle, torch_greedy, torch_route
from mlx.utils import tree_flatten

import pudding_mlx
from pudding_mlx.chat import Conversation
from pudding_mlx.cli import cli
from pudding_mlx.errors import PuddingError
from pudding_mlx.model import Route

QUESTION = "Question: How do you boil an egg?"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return tiny_bundle(tmp_path_factory.mktemp("bundle") / "b")


@pytest.fixture(scope="module")
def pm(built):
    return pudding_mlx.load(built.path, router_backend="mlx")


def test_route_follows_the_torch_router(built, pm):
    for prompt in [*CORPUS, QUESTION]:
        want = torch_route(built.router, built.router_tokenizer, prompt)
        r = pm.route(prompt)
        assert r.index == want.index and r.reason == "router"
        assert r.name == built.manifest.router.outputs[want.index] == want.name
        assert r.skip == sorted(built.manifest.candidate(r.name).skip)
        assert np.abs(r.scores - want.scores).max() <= 1e-4
        assert r.seconds > 0
    assert pm.route(" ".join(CORPUS)).truncated
    assert not pm.route(QUESTION).truncated


def test_route_overrides(built, pm):
    assert pm.route(QUESTION, mode="dense") == Route(None, "dense", [], reason="dense")
    static = pm.route(QUESTION, mode="static")
    assert static.skip == built.manifest.static.skip and static.reason == "static"
    assert pm.route(QUESTION, skip=[5, 3]).skip == [3, 5]
    empty = pm.route("  \n\t")
    assert empty.skip == built.manifest.static.skip and empty.reason == "empty prompt"
    with pytest.raises(PuddingError, match="protected"):
        pm.route(QUESTION, skip=[0])
    with pytest.raises(PuddingError, match="out of range"):
        pm.route(QUESTION, skip=[6])


def test_encode_applies_the_chat_template(built, pm):
    assert pm.encode(QUESTION) == chat_ids(built.tokenizer, QUESTION)
    assert pm.encode(QUESTION, chat_template=False) == built.tokenizer(QUESTION)["input_ids"]


@pytest.mark.parametrize("mode", ["router", "dense", "static"])
def test_generate_matches_torch_greedy(built, pm, mode):
    route = pm.route(QUESTION, mode)
    tokens = [r.token for r in pm.stream_generate(QUESTION, max_tokens=8, mode=mode)]
    ref = torch_greedy(built.model, chat_ids(built.tokenizer, QUESTION), route.skip, 8,
                       built.tokenizer.eos_token_id)
    assert tokens == ref
    text = pm.generate(QUESTION, max_tokens=8, mode=mode)
    # (mlx-lm's streaming detokenizer drops a leading space)
    eos = built.tokenizer.eos_token_id
    assert text.strip() == built.tokenizer.decode([t for t in ref if t != eos]).strip()


def test_load_and_route_copy_no_weights(pm):
    before = [(k, id(v)) for k, v in tree_flatten(pm.model.parameters())]
    route = pm.route(QUESTION)
    view = pm.view(route)
    kept = [i for i in range(6) if i not in route.skip]
    for j, i in enumerate(kept):
        assert view.layers[j] is pm.model.layers[i]
        for (_, a), (_, b) in zip(tree_flatten(view.layers[j].parameters()),
                                  tree_flatten(pm.model.layers[i].parameters()), strict=True):
            assert a is b
    assert len(pm.make_cache(route)) == len(kept)
    pm.generate(QUESTION, max_tokens=2, route=route)
    assert [(k, id(v)) for k, v in tree_flatten(pm.model.parameters())] == before
    assert {id(v) for _, v in tree_flatten(view.parameters())} == {i for _, i in before}


def _fixed_routes(pm, monkeypatch, names: dict[str, str]):
    """Make pm.route pick the set named for each query (the conversation logic is under test)."""
    def route(prompt, mode="router", skip=None, tolerance=None, k=None, tokens=None):
        c = pm.manifest.candidate(names[prompt])
        return Route(0, c.name, sorted(c.skip))
    monkeypatch.setattr(pm, "route", route)


def test_chat_routes_once_by_default(built, pm, monkeypatch):
    _fixed_routes(pm, monkeypatch, {"hi": "early", QUESTION: "late"})
    conv = Conversation(pm)
    first = [r.token for r in conv.ask("hi", max_tokens=4)]
    assert conv.route.name == "early"
    list(conv.ask(QUESTION, max_tokens=4))
    assert conv.route.name == "early" and conv.reprefilled == 0
    assert conv.cache[0].offset == len(conv.tokens)
    assert len(conv.cache) == 6 - len(conv.route.skip)
    assert conv.tokens[: len(chat_ids(built.tokenizer, "hi")) + len(first)] == (
        chat_ids(built.tokenizer, "hi") + first)


def test_chat_route_each_turn_reprefills_under_the_new_set(built, pm, monkeypatch):
    _fixed_routes(pm, monkeypatch, {"hi": "early", QUESTION: "late"})
    conv = Conversation(pm, route_each_turn=True)
    list(conv.ask("hi", max_tokens=4))
    history = list(conv.tokens)
    second = [r.token for r in conv.ask(QUESTION, max_tokens=6)]
    assert conv.route.name == "late" and conv.reprefilled == len(history)
    assert len(conv.cache) == 6 - len(conv.route.skip)
    prompt = history + chat_ids(built.tokenizer, QUESTION)
    assert conv.cache[0].offset == len(prompt) + len(second) == len(conv.tokens)
    late = built.manifest.candidate("late").skip
    assert second == torch_greedy(built.model, prompt, late, 6, built.tokenizer.eos_token_id)


def test_generate_cli_end_to_end(built):
    result = CliRunner().invoke(cli, ["generate", "--bundle", str(built.path), "--prompt",
                                      QUESTION, "--max-tokens", "5", "--router-backend", "mlx"])
    assert result.exit_code == 0, result.output
    name = torch_route(built.router, built.router_tokenizer, QUESTION).name
    assert f"Route: {name} (skips blocks" in result.output
    assert "tokens-per-sec" in result.output and "Peak memory:" in result.output


def test_generate_cli_overrides_and_stdin(built):
    runner = CliRunner()
    r = runner.invoke(cli, ["generate", "-b", str(built.path), "-p", "-", "-m", "3",
                            "--skip", "2,4"], input=b"\xff\xfe caf\xc3\xa9 \xc3")
    assert r.exit_code == 0, r.output
    assert "Route: skip:2,4 (skips blocks 2,4 of 6; skip)" in r.output
    r = runner.invoke(cli, ["generate", "-b", str(built.path), "-p", "   ", "-m", "3"])
    assert r.exit_code == 0 and "(skips blocks 1,2 of 6; empty prompt)" in r.output
    r = runner.invoke(cli, ["generate", "-b", str(built.path), "-p", "", "-m", "3",
                            "--ignore-chat-template"])
    assert isinstance(r.exception, PuddingError) and "prompt is empty" in str(r.exception)
    r = runner.invoke(cli, ["generate", "-b", str(built.path), "--dense", "--static"])
    assert isinstance(r.exception, PuddingError) and "exclude each other" in str(r.exception)


def test_chat_cli(built):
    r = CliRunner().invoke(cli, ["chat", "-b", str(built.path), "-m", "3", "--route-each-turn"],
                           input="hello there\n\n   \nh\n" + QUESTION + "\nr\nhi\nq\n")
    assert r.exit_code == 0, r.output
    assert r.output.count("tokens/s") == 3
    assert "Commands:" in r.output and "[new conversation]" in r.output


def test_info_cli(built):
    r = CliRunner().invoke(cli, ["info", str(built.path), "--verify"])
    assert r.exit_code == 0, r.output
    for text in ("6 blocks", "middle", "2,3", "static", "model/", "router/", "All 11 files"):
        assert text in r.output


def test_pudding_console_script(built):
    exe = Path(sys.executable).with_name("pudding")
    if not exe.exists():
        pytest.skip("pudding console script not installed")
    out = subprocess.run([str(exe), "generate", "-b", str(built.path), "-p", "hi", "-m", "2",
                          "--static"], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PUDDING_OPENBLAS="0"))
    assert out.returncode == 0, out.stderr
    assert "Route: static (skips blocks 1,2 of 6; static)" in out.stdout


def test_runtime_runs_without_torch(built):
    """Load, route and generate with torch made unimportable (as on a Mac without it)."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import pudding_mlx\n"
        "from pudding_mlx import chat, generate, info\n"
        f"pm = pudding_mlx.load({str(built.path)!r}, router_backend='mlx')\n"
        "r = pm.route('How do you boil an egg?')\n"
        "print(r.name, len(pm.generate('hi', max_tokens=3, route=r)) > 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    name = torch_route(built.router, built.router_tokenizer, "How do you boil an egg?").name
    assert out.stdout.split() == [name, "True"]

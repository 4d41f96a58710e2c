"""Odd prompts: empty, whitespace only, longer than the router's max length or the model's
context, invalid UTF-8 on stdin, control characters. Generation never crashes; the LLM sees
the whole prompt (token counts checked against the HF tokenizer), the router its first
max_length tokens (checked against the torch router), and the CLI says so once."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import chat_ids, torch_greedy, torch_route
from helpers import run_cli as run

import pudding_mlx
from pudding_mlx.chat import Conversation

CONTROL = "be\x00ep\x07 \x1b[31mred\x1b[0m\r\x08\x7f\x0c tab\tend\u200b\u202e"
INVALID_UTF8 = b"\xff\xfe caf\xc3 \xe2\x82 ok \xed\xa0\x80 \xf0\x9f\x98\x80 \xc3\xa9t\xc3\xa9"


@pytest.fixture(scope="module")
def tiny(shared_tiny_bundle):
    return shared_tiny_bundle


@pytest.fixture(scope="module")
def pm(tiny):
    return pudding_mlx.load(tiny.path)


def prompt_tokens(out: str) -> int:
    line = next(ln for ln in out.splitlines() if ln.startswith("Prompt: "))
    return int(line.split()[1])


def cut_for_router(tiny, text: str) -> bool:
    """Whether the router reads only the first part of `text` (its first max_length tokens)."""
    return len(tiny.router_tokenizer(text)["input_ids"]) > tiny.manifest.router.max_length


def generate(tiny, prompt, monkeypatch, capsys, *extra, stdin=None):
    return run(["generate", "-b", str(tiny.path), "-p", prompt, "-m", "3", *extra],
               monkeypatch, capsys, stdin)


@pytest.mark.parametrize("prompt", ["", " ", "  \n\t  \r\n", "\u3000\u00a0"])
def test_empty_and_whitespace_prompts_get_the_static_set(tiny, prompt, monkeypatch, capsys):
    code, out, err = generate(tiny, prompt, monkeypatch, capsys)
    assert code == 0, err
    static = ",".join(map(str, tiny.manifest.static.skip))
    assert f"Route: static (skips blocks {static} of 6; empty prompt)" in out
    assert prompt_tokens(out) == len(chat_ids(tiny.tokenizer, prompt))


def test_empty_prompt_without_chat_template_is_one_line(tiny, monkeypatch, capsys):
    code, out, err = generate(tiny, "", monkeypatch, capsys, "--ignore-chat-template")
    assert code == 2 and err == "error: the prompt is empty (and no chat template is applied)\n"


def test_prompt_longer_than_the_router_max_length(tiny, pm, monkeypatch, capsys):
    text = " ".join(["The capital of France is Paris, and the sky is blue today."] * 4)
    assert cut_for_router(tiny, text)  # premise: the router must truncate this prompt
    code, out, err = generate(tiny, text, monkeypatch, capsys)
    assert code == 0, err
    assert (out + err).count("truncated") == 1
    name = torch_route(tiny.router, tiny.router_tokenizer, text).name
    assert f"Route: {name} (" in out and "prompt truncated for the router" in out
    ids = chat_ids(tiny.tokenizer, text)
    assert prompt_tokens(out) == len(ids) > 2 * tiny.manifest.router.max_length
    # The LLM continues the whole prompt, not the router's cut of it.
    route = pm.route(text)
    assert route.truncated and route.name == name
    got = [r.token for r in pm.stream_generate(text, max_tokens=4, route=route)]
    assert got == torch_greedy(tiny.model, ids, route.skip, len(got))


def test_short_prompt_is_not_called_truncated(tiny, monkeypatch, capsys):
    code, out, err = generate(tiny, "hello, how are you?", monkeypatch, capsys)
    assert code == 0 and "truncated" not in out + err
    assert not cut_for_router(tiny, "hello, how are you?")
    name = torch_route(tiny.router, tiny.router_tokenizer, "hello, how are you?").name
    assert f"Route: {name} (" in out


def test_prompt_longer_than_the_model_context(tiny, monkeypatch, capsys):
    """The tiny model's context is 512 positions: a 600-token prompt still generates, with one
    note on stderr."""
    text = "hello " * 120
    code, out, err = generate(tiny, text, monkeypatch, capsys)
    assert code == 0, err
    n = len(chat_ids(tiny.tokenizer, text))
    assert prompt_tokens(out) == n > 512
    assert err.count("note:") == 1 and "context of 512 tokens" in err
    assert out.count("truncated") == 1


def test_invalid_utf8_on_stdin(tiny, monkeypatch, capsys):
    code, out, err = generate(tiny, "-", monkeypatch, capsys, stdin=INVALID_UTF8)
    assert code == 0, err
    text = INVALID_UTF8.decode("utf-8", errors="replace")
    assert "\ufffd" in text and prompt_tokens(out) == len(chat_ids(tiny.tokenizer, text))


@pytest.mark.parametrize("prompt", [CONTROL, "\x00", "\x00\x01\x02\x03", "a\udcffb\ud800c"])
def test_control_characters_and_lone_surrogates(tiny, prompt, monkeypatch, capsys):
    """Lone surrogates are what Python makes of undecodable argv bytes; they become U+FFFD."""
    code, out, err = generate(tiny, prompt, monkeypatch, capsys)
    assert code == 0, err
    clean = "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in prompt)
    assert prompt_tokens(out) == len(chat_ids(tiny.tokenizer, clean))


def test_control_characters_route_like_torch(tiny, pm):
    want = torch_route(tiny.router, tiny.router_tokenizer, CONTROL)
    assert pm.route(CONTROL).name == want.name
    np.testing.assert_allclose(pm.router.scores(CONTROL), want.scores, atol=1e-4)


def test_chat_survives_odd_lines(tiny, monkeypatch, capsys):
    lines = [b"\xff\xfe hi \xc3\x28", b"", b"   ", CONTROL.encode(), b"\x00\x07",
             b"word " * 80, b"q"]
    code, out, err = run(["chat", "-b", str(tiny.path), "-m", "2"], monkeypatch, capsys,
                         stdin=b"\n".join(lines) + b"\n")
    assert code == 0, err
    # One answer per line that is not empty/whitespace, before 'q'.
    assert out.count("[Route: ") == 4
    assert "Traceback" not in out + err


def test_chat_eof_without_newline(tiny, monkeypatch, capsys):
    code, out, err = run(["chat", "-b", str(tiny.path), "-m", "2"], monkeypatch, capsys,
                         stdin=b"hello \xff")
    assert code == 0, err
    assert out.count("[Route: ") == 1


def test_api_odd_prompts(pm, tiny):
    for prompt in ("", "   ", "\x00", "a\udcffb", "hello " * 120):
        route = pm.route(prompt)
        text = pm.generate(prompt, max_tokens=2, route=route)
        assert isinstance(text, str)
    assert pm.route("").reason == pm.route(" \t").reason == "empty prompt"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny bundle whose tokenizer has no chat template, like a base model's."""
    from helpers import tiny_bundle

    from pudding_mlx.bundle import write_manifest
    from pudding_mlx.files import read_json

    built = tiny_bundle(tmp_path_factory.mktemp("base") / "bundle")
    folder = built.path / "model"
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = read_json(folder / "tokenizer_config.json")
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    write_manifest(built.path, built.manifest)
    assert not pudding_mlx.load(built.path).has_chat_template
    return built


def test_generate_without_chat_template_says_so_once(base, monkeypatch, capsys):
    prompt = "The capital of France is"
    code, out, err = generate(base, prompt, monkeypatch, capsys, "--dense")
    assert code == 0, err
    assert err.count("no chat template") == 1 and "plain text" in err
    ids = base.tokenizer.encode(prompt)
    assert prompt_tokens(out) == len(ids)  # the plain text, with the special tokens HF adds
    code, out, err = generate(base, prompt, monkeypatch, capsys, "--ignore-chat-template")
    assert code == 0 and "chat template" not in err


def test_chat_without_chat_template_feeds_plain_text(base, monkeypatch, capsys):
    code, out, err = run(["chat", "-b", str(base.path), "-m", "2", "--dense"], monkeypatch,
                         capsys, stdin=b"hello there\nhow are you?\nq\n")
    assert code == 0, err
    assert out.count("no chat template") == 1 and out.count("[Route: ") == 2
    # The second turn follows the first reply on a new line, without a BOS; torch agrees.
    conv = Conversation(pudding_mlx.load(base.path), mode="dense")
    tok, eos = base.tokenizer, base.tokenizer.eos_token_id
    first = [r.token for r in conv.ask("hello there", max_tokens=3)]
    second = [r.token for r in conv.ask("how are you?", max_tokens=3)]
    history = tok.encode("hello there") + first
    turn = tok.encode("\nhow are you?", add_special_tokens=False)
    assert first == torch_greedy(base.model, tok.encode("hello there"), [], 3, eos)
    assert conv.tokens == history + turn + second
    assert second == torch_greedy(base.model, history + turn, [], 3, eos)

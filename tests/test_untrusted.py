"""Untrusted files: nothing is unpickled, no custom code runs, a bundle cannot reach outside
its folder.

Two kinds of check: a scan of the source (no pickle-based loader, no eval/exec, no
trust_remote_code=True, every torch.load with weights_only=True) and hostile bundles loaded
under a Python audit hook that records every file opened and every module imported."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

import pudding_mlx
from pudding_mlx.bundle import MANIFEST, read_manifest, write_manifest
from pudding_mlx.errors import BundleError

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pudding_mlx", "convert", "router_coreml")
SOURCES = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "marshal", "shelve",
                  "cloudpickle"}


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(func) -> str:
    """'torch.load' for torch.load(...), 'eval' for eval(...), '' otherwise."""
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
        return ".".join(reversed(parts))
    return ""


def _keyword(call, name):
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_sources_exist():
    assert len(SOURCES) > 20 and ROOT / "pudding_mlx" / "model.py" in SOURCES


def scan(path: Path) -> list[str]:
    """Every unpickling loader, eval/exec, or trust_remote_code not False in a source file."""
    tree = ast.parse(path.read_text(), str(path))
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            problems += [a.name for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif (isinstance(node, ast.ImportFrom) and node.module
              and node.module.split(".")[0] in UNSAFE_MODULES):
            problems.append(node.module)
    for call in _calls(tree):
        name = _name(call.func)
        where = f"line {call.lineno}: {name}"
        if name in ("eval", "exec", "compile", "__import__"):
            problems.append(where)
        if name.endswith("torch.load") or name == "load" and _keyword(call, "weights_only"):
            w = _keyword(call, "weights_only")
            if not (isinstance(w, ast.Constant) and w.value is True):
                problems.append(f"{where} without weights_only=True")
        if name.endswith(("np.load", "numpy.load")):
            a = _keyword(call, "allow_pickle")
            if a is not None and not (isinstance(a, ast.Constant) and a.value is False):
                problems.append(f"{where} with allow_pickle")
        if name.endswith(("read_pickle", "yaml.load", "yaml.unsafe_load")):
            problems.append(where)
        trust = _keyword(call, "trust_remote_code")
        if isinstance(trust, ast.Constant) and trust.value is not False:
            problems.append(f"{where} with trust_remote_code={trust.value!r}")
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            pos = args.posonlyargs + args.args
            pairs = list(zip(pos[len(pos) - len(args.defaults):], args.defaults, strict=True))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True)
                      if d is not None]
            for arg, default in pairs:
                if arg.arg == "trust_remote_code" and not (
                        isinstance(default, ast.Constant) and default.value is False):
                    problems.append(f"{node.name}(): trust_remote_code defaults to "
                                    f"{ast.unparse(default)}")
    return problems


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_unpickling_or_code_execution_in_source(path):
    assert not scan(path)


def test_the_scan_catches_what_it_should(tmp_path):
    """The scan above on a file with every forbidden pattern reports each one."""
    bad = ("import pickle\nfrom joblib import load\nimport torch\ntorch.load('x')\n"
           "torch.load('x', weights_only=False)\neval('1')\nf(trust_remote_code=True)\n"
           "def g(trust_remote_code=True): pass\nimport numpy as np\n"
           "np.load('x', allow_pickle=True)\n")
    (tmp_path / "bad.py").write_text(bad)
    text = " | ".join(scan(tmp_path / "bad.py"))
    for what in ("pickle", "joblib", "line 4: torch.load without", "line 5: torch.load", "eval",
                 "trust_remote_code=True", "g(): trust_remote_code", "allow_pickle"):
        assert what in text, (what, text)


# Per command, the options (or arguments) naming a model, tokenizer or bundle someone else may
# have written: where custom code would come in.
MODEL_SOURCES = {
    "generate": ["--bundle"], "chat": ["--bundle"], "info": ["bundle"], "bench": ["--bundle"],
    "serve": ["--bundle"], "fidelity": ["bundle", "--prompts"],
    "eval": ["bundle", "--torch-model"], "eval-compare": [], "pareto": [], "demo": ["--bundle"],
    "search": ["--model"], "sleb": ["--model"], "label": ["--model"],
    "train-router": ["--backbone"],
    "convert": ["--model", "--router"], "build": ["--model", "--backbone"],
    "plan": ["config"],  # config.json only, read as JSON
}


def test_no_command_can_turn_on_remote_code():
    """Every command's real options (not the stand-in for a command whose import failed): the
    ones that read a model are where MODEL_SOURCES says, and none turns on custom code (there
    is no such option at all: loaders get trust_remote_code=False, see the scan above)."""
    import importlib

    import click

    from pudding_mlx.cli import COMMANDS, cli
    from pudding_mlx.plugins import COMMANDS as PLUGIN_COMMANDS
    from pudding_mlx.plugins import plugins

    targets = {**{n: ep.value for n, ep in plugins(PLUGIN_COMMANDS).items()}, **COMMANDS}
    assert set(MODEL_SOURCES) == set(targets)
    ctx = click.Context(cli)
    assert set(cli.list_commands(ctx)) == set(targets)
    options = {}
    for name, target in targets.items():
        module, attr = target.split(":")
        cmd = cli.get_command(ctx, name)
        assert cmd is getattr(importlib.import_module(module), attr), name
        options[name] = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
        unknown = set(MODEL_SOURCES[name]) - options[name]
        assert not unknown, f"pudding {name} has no {', '.join(sorted(unknown))}"
    # by word: `--decode-concurrency` (mlx_lm.server's name) holds "code" but no such word
    remote = [(name, o) for name, opts in options.items() for o in sorted(opts)
              if {"remote", "trust", "custom", "code"} & set(re.split(r"[-_]+", o.lower()))]
    assert remote == []


def test_loader_defaults_are_safe():
    import inspect

    from convert.assets import load_causal_lm
    from convert.router_model import Router

    for f in (load_causal_lm, Router.from_backbone):
        assert inspect.signature(f).parameters["trust_remote_code"].default is False


# -- hostile bundles ------------------------------------------------------------------------


class Audit:
    """Records files opened (symlinks resolved) and modules imported while `recording` is on.

    Sees Python-level opens only (mlx and tokenizers read natively); an audit hook cannot be
    removed, so one serves the whole module."""

    def __init__(self):
        self.recording, self.opened, self.imported = False, [], []
        sys.addaudithook(self)

    def __call__(self, event, args):
        if not self.recording:
            return
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            self.opened.append(os.path.realpath(os.fsdecode(args[0])))
        elif event == "import":
            self.imported.append(args[0])

    def run(self, f, *args, **kwargs):
        self.opened, self.imported, self.recording = [], [], True
        try:
            return f(*args, **kwargs)
        finally:
            self.recording = False


@pytest.fixture(scope="module")
def audit(shared_tiny_bundle):
    pudding_mlx.load(shared_tiny_bundle.path)  # imports done before recording starts
    return Audit()


@pytest.fixture
def bundle(shared_tiny_bundle, tmp_path):
    return Path(shutil.copytree(shared_tiny_bundle.path, tmp_path / "b"))


@pytest.fixture
def outside(tmp_path):
    """Files beside the bundle that nothing may read."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "secret.txt").write_text("secret")
    return d


@pytest.fixture(autouse=True)
def no_prompt(monkeypatch):
    """transformers asks 'run the custom code? [y/N]' when trust_remote_code is left None."""
    def refuse(*a, **k):
        raise AssertionError("an interactive prompt was shown")

    monkeypatch.setattr("builtins.input", refuse)


def assert_stays_inside(audit: Audit, bundle: Path, tmp_path: Path) -> None:
    bundle = bundle.resolve()
    for path in map(Path, audit.opened):
        if path.is_relative_to(tmp_path.resolve()):
            assert path.is_relative_to(bundle), f"opened {path} outside the bundle"


def edit_manifest(bundle: Path, change) -> None:
    d = json.loads((bundle / MANIFEST).read_text())
    change(d)
    (bundle / MANIFEST).write_text(json.dumps(d))


def test_loading_reads_only_the_bundle(audit, bundle, outside, tmp_path):
    """Manifest strings that look like paths (base model, backbone, extra) are never opened."""
    def change(d):
        d["base_model"] = str(outside / "secret.txt")
        d["router"]["backbone"] = str(outside)
        d["extra"] = {"model": str(outside / "secret.txt"), "module": "os.system"}

    edit_manifest(bundle, change)
    pm = audit.run(pudding_mlx.load, bundle)
    assert pm.manifest.base_model.endswith("secret.txt")
    assert any(p.startswith(str(bundle.resolve())) for p in audit.opened)
    assert_stays_inside(audit, bundle, tmp_path)


@pytest.mark.parametrize("rel", ["../outside/secret.txt", "/etc/hostname", "model/../../x",
                                 "router/../../outside/secret.txt", "\\evil"])
def test_manifest_paths_cannot_leave_the_bundle(audit, bundle, outside, rel, tmp_path):
    edit_manifest(bundle, lambda d: d["files"].update({rel: "0" * 64}))
    with pytest.raises(BundleError, match="leaves the bundle folder"):
        audit.run(pudding_mlx.load, bundle)
    assert_stays_inside(audit, bundle, tmp_path)


def test_symlinked_file_to_outside_is_refused(audit, bundle, outside, tmp_path):
    target = outside / "model.safetensors"
    shutil.move(bundle / "router/model.safetensors", target)
    os.symlink(target, bundle / "router/model.safetensors")
    write_manifest(bundle, read_manifest(bundle))  # hashes the link target: listed and "valid"
    with pytest.raises(BundleError, match="router/model.safetensors: resolves outside"):
        audit.run(pudding_mlx.load, bundle)
    assert_stays_inside(audit, bundle, tmp_path)


def test_symlinked_folder_to_outside_is_refused(audit, bundle, outside, tmp_path):
    shutil.move(bundle / "model", outside / "model")
    os.symlink(outside / "model", bundle / "model", target_is_directory=True)
    for verify in (True, False):
        with pytest.raises(BundleError, match="resolves outside the bundle"):
            audit.run(pudding_mlx.load, bundle, verify=verify)
        assert_stays_inside(audit, bundle, tmp_path)


def test_unknown_manifest_keys_are_refused(bundle):
    """The manifest is data: a key the schema does not know (a class or a module to use) is an
    error, not something to look up."""
    for change in (lambda d: d["router"].update({"class": "os.system"}),
                   lambda d: d["static"].update({"loader": "evil:main"})):
        edit_manifest(bundle, change)
        with pytest.raises(BundleError, match="malformed field"):
            pudding_mlx.load(bundle)


EVIL = """import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import BertConfig as EvilConfig, PreTrainedTokenizerFast as EvilTokenizer
Model = ModelArgs = EvilConfig
"""


def plant(bundle: Path, folder: str, config: str, marker: Path, key: str) -> None:
    (bundle / folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
    path = bundle / folder / config
    d = json.loads(path.read_text())
    if key == "auto_map":
        d["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilConfig",
                         "AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
    else:
        d[key] = "evil.py"
    path.write_text(json.dumps(d))
    write_manifest(bundle, read_manifest(bundle))  # the custom code is listed and hashed


@pytest.mark.parametrize("folder, config, key", [
    ("model", "config.json", "auto_map"),
    ("model", "tokenizer_config.json", "auto_map"),
    ("model", "config.json", "model_file"),  # mlx-lm's own custom-architecture hook
    ("router", "config.json", "auto_map"),
    ("router", "tokenizer_config.json", "auto_map"),
])
def test_custom_code_in_a_bundle_never_runs(audit, bundle, tmp_path, folder, config, key):
    marker = tmp_path / "ran"
    plant(bundle, folder, config, marker, key)
    try:
        audit.run(pudding_mlx.load, bundle)
    except BundleError as e:
        assert key == "model_file" and "trust_remote_code" in str(e)
    assert not marker.exists()
    assert not [m for m in audit.imported if "evil" in m or m == "custom_model"]
    assert_stays_inside(audit, bundle, tmp_path)


def test_router_load_for_conversion_ignores_custom_code(bundle, tmp_path):
    """The torch side reading a router folder (pudding convert) ignores auto_map too."""
    from convert.router_model import Router

    marker = tmp_path / "ran"
    plant(bundle, "router", "config.json", marker, "auto_map")
    router = Router.load(bundle / "router")
    assert type(router.encoder).__name__ == "BertModel"
    assert not marker.exists()

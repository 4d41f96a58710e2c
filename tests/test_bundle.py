"""A broken bundle gives one line naming the problem, exit code 2, no traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_cli as run
from helpers import tiny_bundle

import pudding_mlx
from pudding_mlx.bundle import MANIFEST, write_manifest
from pudding_mlx.errors import BundleError


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return tiny_bundle(tmp_path_factory.mktemp("good") / "b")


@pytest.fixture
def bundle(good, tmp_path):
    """A fresh copy of the good bundle to break."""
    return Path(shutil.copytree(good.path, tmp_path / "b"))


def edit_manifest(path: Path, change) -> None:
    d = json.loads((path / MANIFEST).read_text())
    change(d)
    (path / MANIFEST).write_text(json.dumps(d))




def set_skip(d, skip):
    d["candidates"][1]["skip"] = skip


def rehash_with(path: Path, change) -> None:
    """Change a bundle file and re-hash everything, so only the content is wrong."""
    change(path)
    m = pudding_mlx.bundle.read_manifest(path)
    write_manifest(path, m)


def _router_outputs(path: Path) -> None:
    rc = json.loads((path / "router/router_config.json").read_text())
    rc["outputs"], rc["num_outputs"] = rc["outputs"][:2], 2
    (path / "router/router_config.json").write_text(json.dumps(rc))


def _unprotect(d):
    d["protected"] = []
    d["candidates"][0]["skip"] = [0, 1]


def _wrong_block_count(d):
    d["num_blocks"] = 8


BROKEN = {
    "index out of range": (lambda p: edit_manifest(p, lambda d: set_skip(d, [2, 6])),
                           "skips block(s) [6] out of range 0..5"),
    "negative index": (lambda p: edit_manifest(p, lambda d: set_skip(d, [-1])),
                       "out of range"),
    "router output count": (
        lambda p: edit_manifest(p, lambda d: d["router"]["outputs"].pop()),
        "router has 2 outputs but there are 3 candidates"),
    "router weights vs manifest": (lambda p: rehash_with(p, _router_outputs),
                                   "differ from the manifest's router outputs"),
    "missing file": (lambda p: (p / "router/tokenizer.json").unlink(), "tokenizer.json: missing"),
    "missing model folder": (lambda p: shutil.rmtree(p / "model"), "model/"),
    "hash mismatch": (lambda p: (p / "model/model.safetensors").open("ab").write(b"\0"),
                      "model.safetensors: sha256 mismatch"),
    "unlisted file": (lambda p: (p / "model/extra.bin").write_bytes(b"x"),
                      "extra.bin: not listed"),
    "newer format version": (lambda p: edit_manifest(p, lambda d: d.update(format_version=99)),
                             "format version 99 is newer"),
    "protected block skipped": (lambda p: edit_manifest(p, _unprotect),
                                "candidate 'early' skips protected block(s) [0]"),
    "block count": (lambda p: edit_manifest(p, _wrong_block_count),
                    "model has 6 blocks but the manifest says 8"),
    "missing field": (lambda p: edit_manifest(p, lambda d: d.pop("static")),
                      "missing field 'static'"),
    "not json": (lambda p: (p / MANIFEST).write_text("{"), "not valid JSON"),
    "no manifest": (lambda p: (p / MANIFEST).unlink(), "pudding.json: missing"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_bundle_is_one_line_exit_2(bundle, case, monkeypatch, capsys):
    breakit, message = BROKEN[case]
    breakit(bundle)
    code, out, err = run(["generate", "--bundle", str(bundle), "--prompt", "hi", "-m", "2"],
                         monkeypatch, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert message in err
    assert "Traceback" not in err + out
    with pytest.raises(BundleError):
        pudding_mlx.load(bundle)


def test_good_bundle_loads_and_protected_defaults(good, monkeypatch, capsys):
    code, out, err = run(["info", str(good.path)], monkeypatch, capsys)
    assert code == 0 and "protected [0]" in out and not err


def test_bad_override_is_one_line(good, monkeypatch, capsys):
    for skip, message in (("0,3", "protected block(s) [0]"), ("9", "out of range 0..5"),
                          ("a,b", "--skip takes block numbers")):
        code, _, err = run(["generate", "-b", str(good.path), "--skip", skip], monkeypatch,
                           capsys)
        assert code == 2 and message in err and err.count("\n") == 1


def test_no_traceback_from_the_console_script(bundle):
    exe = Path(sys.executable).with_name("pudding")
    if not exe.exists():
        pytest.skip("pudding console script not installed")
    (bundle / "model/config.json").open("a").write(" ")
    out = subprocess.run([str(exe), "generate", "-b", str(bundle)], capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, PUDDING_OPENBLAS="0"))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"error: {bundle.resolve()}/model/config.json: sha256 mismatch (corrupted or modified)"
    ]

"""Unwritable output folders and full disks: a one-line error before the work starts where it
can be checked, and no corrupted output when the disk fills up during a write.

Tests run as root, where chmod does not stop writes; a read-only folder is simulated by making
tempfile's probes fail inside it (what `pudding_mlx.files`'s checks use), a full disk by
shutil.disk_usage or a write that stops half-way with ENOSPC."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from helpers import assert_one_line
from helpers import run_cli as run

from pudding_mlx.bundle import hash_tree, read_manifest, verify_files
from pudding_mlx.errors import PuddingError

NAMES = ["early", "middle", "late"]
SETS = {"early": [1, 2], "middle": [2, 3], "late": [3, 4]}


def read_only(monkeypatch, root: Path) -> None:
    """Creating files or folders directly inside `root` (or below) fails with EROFS."""
    real = {"mkdtemp": tempfile.mkdtemp, "mkstemp": tempfile.mkstemp}

    def refuse(kind):
        def f(*args, dir=None, **kwargs):
            if dir is not None and Path(dir).absolute().is_relative_to(root):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
            return real[kind](*args, dir=dir, **kwargs)
        return f

    for kind in real:
        monkeypatch.setattr(tempfile, kind, refuse(kind))


def no_model_loading(monkeypatch) -> None:
    """Fail the test if a model is loaded: the check must come before the work."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr("convert.assets.load_causal_lm", refuse)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from helpers import tiny_llama, tiny_router

    root = tmp_path_factory.mktemp("disk")
    tiny_llama(root / "hf", num_layers=6)
    tiny_router(root / "router", NAMES, max_length=32)
    (root / "candidates.json").write_text(json.dumps(
        {"candidates": [{"name": n, "skip": s} for n, s in SETS.items()], "settings": {}}))
    return root


@pytest.fixture
def old_bundle(shared_tiny_bundle, tmp_path):
    """An existing bundle at the output path, which a failed conversion must leave alone."""
    out = tmp_path / "ro" / "bundle"
    shutil.copytree(shared_tiny_bundle.path, out)
    return out, hash_tree(out)


def convert_args(inputs, out):
    return ["convert", "--model", str(inputs / "hf"), "--candidates",
            str(inputs / "candidates.json"), "--router", str(inputs / "router"),
            "--out", str(out), "--dtype", "float32", "--no-coreml"]


def test_convert_to_read_only_folder_fails_before_loading(inputs, old_bundle, monkeypatch,
                                                          capsys):
    out, before = old_bundle
    read_only(monkeypatch, out.parent)
    no_model_loading(monkeypatch)
    code, _, err = run(convert_args(inputs, out), monkeypatch, capsys)
    assert_one_line(code, err, f"{out}: output folder is not writable",
                    "Read-only file system", after_progress=True)
    assert hash_tree(out) == before and leftovers(out.parent) == []


def test_convert_without_enough_space_writes_nothing(inputs, old_bundle, monkeypatch, capsys):
    import pudding_mlx.files

    out, before = old_bundle
    monkeypatch.setattr(pudding_mlx.files.shutil, "disk_usage",
                        lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 10**5, 10**5))
    code, _, err = run(convert_args(inputs, out), monkeypatch, capsys)
    assert_one_line(code, err, f"{out}: needs about", "GB free, only 0.00 GB left",
                    after_progress=True)
    assert hash_tree(out) == before and leftovers(out.parent) == []
    verify_files(out, read_manifest(out))


def test_disk_full_during_conversion_keeps_the_old_bundle(inputs, old_bundle, monkeypatch,
                                                          capsys):
    """The disk fills up while the manifest is written (the last file): the half-written
    temporary bundle goes, the old one stays."""
    import convert.to_bundle

    out, before = old_bundle

    def full_disk(folder, manifest):
        (Path(folder) / "pudding.json").write_text('{"format_version": 1, "base_')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(folder) / "pudding.json"))

    monkeypatch.setattr(convert.to_bundle, "write_manifest", full_disk)
    code, _, err = run(convert_args(inputs, out), monkeypatch, capsys)
    assert_one_line(code, err, f"{out}: writing failed (No space left on device",
                    "the old one is untouched", after_progress=True)
    assert hash_tree(out) == before and leftovers(out.parent) == []
    verify_files(out, read_manifest(out))


def test_disk_full_during_first_conversion_leaves_nothing(inputs, tmp_path, monkeypatch,
                                                          capsys):
    import convert.to_bundle

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "router/model.safetensors")

    monkeypatch.setattr(convert.to_bundle.shutil, "copytree", full_disk)
    out = tmp_path / "new" / "bundle"
    code, _, err = run(convert_args(inputs, out), monkeypatch, capsys)
    assert_one_line(code, err, "No space left on device", "nothing was written",
                    after_progress=True)
    assert not out.exists() and leftovers(out.parent) == []


@pytest.mark.parametrize("command", ["search", "label", "train-router"])
def test_read_only_output_fails_before_the_model_loads(inputs, tmp_path, command, monkeypatch,
                                                       capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    read_only(monkeypatch, ro)
    no_model_loading(monkeypatch)
    args = {
        "search": ["search", "--model", str(inputs / "hf"), "--tasks", "arc_easy",
                   "--out", str(ro / "candidates.json")],
        "label": ["label", "--candidates", str(inputs / "candidates.json"), "--model",
                  str(inputs / "hf"), "--out", str(ro / "labels")],
        "train-router": ["train-router", str(inputs), "--out", str(ro / "router-run")],
    }[command]
    code, _, err = run(args, monkeypatch, capsys)
    assert_one_line(code, err, f"{ro}/", "cannot write here (Read-only file system)",
                    after_progress=True)
    assert not [p for p in ro.rglob("*") if p.is_file()]


def stop_half_way(monkeypatch, target, attr):
    """`target.attr(obj, path, ...)` writes half of what it would, then fails with ENOSPC."""
    real = getattr(target, attr)

    def write(*args, **kwargs):
        real(*args, **kwargs)
        path = Path(next(a for a in args if isinstance(a, (str, Path)) and "tmp" in str(a)))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(target, attr, write)


def test_search_result_survives_a_full_disk(tmp_path, monkeypatch):
    """candidates.json is replaced only by a complete file."""
    from pudding_mlx.files import write_json

    out = tmp_path / "candidates.json"
    write_json(out, {"candidates": [{"name": "a"}], "complete": False})
    before = out.read_bytes()
    stop_half_way(monkeypatch, Path, "write_text")
    with pytest.raises(OSError, match="No space left"):
        write_json(out, {"candidates": [{"name": "a"}, {"name": "b"}], "complete": True})
    assert out.read_bytes() == before and json.loads(before)["complete"] is False


def test_label_shards_survive_a_full_disk(tmp_path, monkeypatch):
    """A shard is there whole or not at all; the resume rewrites only what is missing."""
    import pyarrow.parquet as pq

    from convert.label_store import shard_path, write_shard

    rows = {"task": ["t"], "qid": ["q"], "choice": [0], "gold": [0], "text": ["x"],
            "context": ["c"], "loglik": [[-1.0, -2.0]]}
    write_shard(tmp_path, 0, rows)
    stop_half_way(monkeypatch, pq, "write_table")
    with pytest.raises(OSError, match="No space left"):
        write_shard(tmp_path, 1, rows)
    assert not shard_path(tmp_path, 1).exists()
    monkeypatch.undo()
    assert pq.read_table(shard_path(tmp_path, 0)).to_pydict() == rows


def test_cli_reports_disk_errors_in_one_line_and_other_errors_in_full(monkeypatch, capsys):
    import sys

    import click

    from pudding_mlx import cli as cli_module

    def command(err):
        @click.command("disk")
        def disk():
            raise OSError(err, os.strerror(err), "/data/out.json")
        return disk

    for err, one_line in ((errno.ENOSPC, True), (errno.EROFS, True), (errno.EIO, False)):
        module = type("M", (), {"disk": command(err)})
        monkeypatch.setitem(sys.modules, "tests_disk_cmd", module)
        monkeypatch.setitem(cli_module.COMMANDS, "disk", "tests_disk_cmd:disk")
        if one_line:
            code, _, e = run(["disk"], monkeypatch, capsys)
            assert_one_line(code, e, f"/data/out.json: {os.strerror(err)}", after_progress=True)
        else:  # not a disk problem: a bug or a broken device, shown in full
            with pytest.raises(OSError):
                run(["disk"], monkeypatch, capsys)
        with pytest.raises(OSError):
            run(["--debug", "disk"], monkeypatch, capsys)


def test_check_writable_file_messages(tmp_path):
    from pudding_mlx.files import check_writable_file

    assert check_writable_file(tmp_path / "a" / "b.json") == tmp_path / "a" / "b.json"
    assert (tmp_path / "a").is_dir() and not list((tmp_path / "a").iterdir())
    with pytest.raises(PuddingError, match="is a folder"):
        check_writable_file(tmp_path / "a")
    (tmp_path / "file").write_text("x")
    with pytest.raises(PuddingError, match="cannot write here"):
        check_writable_file(tmp_path / "file" / "c.json")

"""Files written whole or not at all, and JSON read with one-line errors.

A file is written to `.NAME.<pid>.tmp` beside it, then renamed over it (`write_atomic`).
A folder is built in a temporary folder beside the destination, then renamed: the
destination appears complete or not at all. An existing folder is swapped out only once
the new one is complete (two renames on one file system; between them, for microseconds, the
path is absent, but never half-written). Temporary folders are named `.NAME.<kind>-<pid>-*`;
what a killed process left behind is removed by the next write to NAME, and an old folder
caught between the two renames is put back first.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import PuddingError


def read_json(path: str | Path, hint: str = "", error: type[PuddingError] = PuddingError) -> Any:
    """The JSON in `path`; a missing, unreadable or invalid file raises `error` in one line
    (`hint` says what to do about it)."""
    tail = f"; {hint}" if hint else ""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"{path}: missing{tail}") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror}){tail}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e}){tail}") from None


def write_atomic(path: str | Path, data: str | bytes | Callable[[Path], None]) -> Path:
    """Write `data` (text, bytes, or a function that writes the file it is given) to `path`
    via a temporary file and os.replace, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if callable(data):
            data(tmp)
        elif isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | Path, doc: Any, indent: int | None = 1) -> Path:
    return write_atomic(path, json.dumps(doc, indent=indent) + "\n")


def write_report(folder: str | Path, stem: str, doc: Any, markdown: str,
                 plots: dict[str, Callable[[Path], None]] | None = None) -> Path:
    """`stem`.json and `stem`.md in `folder` (made if missing), then each plot file by its
    drawing function; without matplotlib a plot is left out with one line on stderr."""
    import click

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / f"{stem}.json", doc)
    write_atomic(folder / f"{stem}.md", markdown)
    for name, draw in (plots or {}).items():
        try:
            draw(folder / name)
        except ImportError:
            click.echo(f"matplotlib is not installed: no {name} (pip install "
                       "'pudding-mlx[plots]')", err=True)
    return folder


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete the `write_atomic` temporary files of writers that no longer run (killed)."""
    removed = []
    for tmp in folder.glob(".*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _existing_ancestor(path: Path) -> Path:
    for p in (path, *path.parents):
        if p.exists():
            return p
    return Path("/")


def check_writable(dest: str | Path) -> Path:
    """The folder `dest` can be created or replaced; returns its absolute path.

    Creates the parent folder if needed and probes it with a temporary folder (os.access
    alone says yes to root on read-only file systems).
    """
    dest = Path(dest).absolute()
    if dest.exists() and not dest.is_dir():
        raise PuddingError(f"{dest}: exists and is not a folder")
    base = _existing_ancestor(dest.parent)
    if not base.is_dir():
        raise PuddingError(f"{dest}: cannot create it, {base} is not a folder")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=_prefix(dest, "probe"), dir=dest.parent))
    except OSError as e:
        raise PuddingError(f"{dest}: output folder is not writable ({e.strerror})") from None
    return dest


def check_writable_file(path: str | Path) -> Path:
    """A file can be written at `path` (its folder is created if needed); returns it absolute."""
    path = Path(path).absolute()
    if path.is_dir():
        raise PuddingError(f"{path}: is a folder, expected a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.probe-", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PuddingError(f"{path}: cannot write here ({e.strerror})") from None
    return path


def check_free_space(dest: str | Path, needed: int) -> None:
    """At least `needed` bytes are free on the file system that will hold `dest`."""
    base = _existing_ancestor(Path(dest).absolute().parent)
    free = shutil.disk_usage(base).free
    if free < needed:
        raise PuddingError(
            f"{dest}: needs about {needed / 1e9:.2f} GB free, "
            f"only {free / 1e9:.2f} GB left on {base}"
        )


def _prefix(dest: Path, kind: str) -> str:
    return f".{dest.name}.{kind}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(dest: str | Path) -> list[Path]:
    """Remove the temporary siblings of `dest` whose process is gone (killed mid-write);
    an old folder that a kill left between the two renames of `replace_folder` is restored
    to `dest` when `dest` is missing. Returns what was removed."""
    dest = Path(dest).absolute()
    pattern = re.compile(rf"\.{re.escape(dest.name)}\.(tmp|old|hf|probe)-(\d+)-.*")
    removed = []
    for p in sorted(dest.parent.glob(f".{dest.name}.*")) if dest.parent.is_dir() else []:
        m = pattern.fullmatch(p.name)
        if not m or _alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and (p / "x").is_dir() and not dest.exists():
            os.rename(p / "x", dest)
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def scratch_folder(dest: str | Path, tag: str) -> tempfile.TemporaryDirectory:
    """A temporary folder on the same file system as `dest` (removed when closed)."""
    dest = Path(dest).absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=_prefix(dest, tag), dir=dest.parent)


def replace_folder(new: Path, dest: Path) -> None:
    """Move the complete folder `new` to `dest`, replacing what was there only now."""
    if not dest.exists():
        os.rename(new, dest)
        return
    old = Path(tempfile.mkdtemp(prefix=_prefix(dest, "old"), dir=dest.parent))
    os.rename(dest, old / "x")
    try:
        os.rename(new, dest)
    except OSError:
        os.rename(old / "x", dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_folder(dest: str | Path, needed: int = 0) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it becomes `dest`, on error it is deleted.

    Checks that `dest` is writable and that `needed` bytes are free before anything is written.
    """
    dest = check_writable(dest)
    clean_stale(dest)
    check_free_space(dest, needed)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(dest, "tmp"), dir=dest.parent))
    try:
        yield tmp
        replace_folder(tmp, dest)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise
        state = "the old one is untouched" if dest.exists() else "nothing was written"
        raise PuddingError(f"{dest}: writing failed ({e.strerror}: {e.filename}); "
                           f"{state}") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

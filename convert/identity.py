"""What a build step's inputs and outputs are, by content: the same on any machine and after a
reinstall, so a cached or shipped result is reused exactly when what made it is unchanged."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path


def hash_files(files: Iterable[Path], root: Path) -> str:
    """sha256 over the relative names and contents of `files`."""
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(str(f.relative_to(root)).encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def content_identity(path: Path) -> str:
    """A file or folder by its files' relative names and contents: the same on any machine and
    after a reinstall (modification times and install paths change; a resumed build must not
    discard hours of work for that)."""
    root = path.parent if path.is_file() else path
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return hash_files(files, root)


def source_identity(source: str) -> dict:
    """Identity of a model or backbone: a local file or folder by content, a hub id by name."""
    path = Path(source)
    if not path.exists():
        return {"id": source}
    return {"name": path.name, "files": content_identity(path)}

"""Resuming a run: the settings an earlier output was made with, against this run's."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pudding_mlx.errors import PuddingError
from pudding_mlx.files import read_json


def changed_settings(old: dict, new: dict, ignore: Iterable[str] = ()) -> list[str]:
    """The keys whose values differ between two settings dicts (either may lack a key)."""
    return sorted(k for k in (set(old) | set(new)) - set(ignore) if old.get(k) != new.get(k))


def read_run(path: str | Path, settings: dict, ignore: Iterable[str] = ()) -> dict:
    """The JSON result in `path`, which must have been made with `settings` (the keys in
    `ignore` may differ)."""
    path = Path(path)
    old = read_json(path, "pass --restart to start over")
    if changed := changed_settings(old.get("settings") or {}, settings, ignore):
        raise PuddingError(f"{path} was made with other settings ({', '.join(changed)}); "
                           "pass --restart to start over or choose another --out")
    return old

"""Resuming a run: the settings an earlier output was made with, against this run's."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from pudding_mlx.errors import PuddingError


def changed_settings(old: dict, new: dict, ignore: Iterable[str] = ()) -> list[str]:
    """The keys whose values differ between two settings dicts (either may lack a key)."""
    return sorted(k for k in (set(old) | set(new)) - set(ignore) if old.get(k) != new.get(k))


def read_run(path: str | Path, settings: dict, ignore: Iterable[str] = ()) -> dict:
    """The JSON result in `path`, which must have been made with `settings` (the keys in
    `ignore` may differ)."""
    path = Path(path)
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PuddingError(f"{path}: unreadable ({e}); pass --restart to start over") from e
    if changed := changed_settings(old.get("settings") or {}, settings, ignore):
        raise PuddingError(f"{path} was made with other settings ({', '.join(changed)}); "
                           "pass --restart to start over or choose another --out")
    return old

"""Named skip sets of `pudding eval` and `pudding fidelity`: NAME=3,7,9 options, candidates
files, the bundle's own sets, and the key their scores are cached under."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..bundle import read_candidates
from ..errors import PuddingError


def set_key(skip: Sequence[int]) -> str:
    """File-name key of a skip set (scores are cached per set, whatever its name)."""
    return "skip-" + "-".join(map(str, sorted(skip))) if skip else "dense"


def parse_set(value: str) -> tuple[str, list[int]]:
    """--extra-set "name=3,7,9" -> ("name", [3, 7, 9])."""
    name, sep, blocks = value.partition("=")
    try:
        skip = sorted(int(b) for b in blocks.split(",") if b.strip())
    except ValueError:
        skip = None
    if not sep or not name or skip is None or name in ("best", "*"):
        raise PuddingError(f"--extra-set {value!r}: expected NAME=3,7,9 (NAME not 'best')")
    return name, skip


def read_sets_file(path: str | Path) -> dict[str, list[int]]:
    """Named skip sets from a candidates file (`bundle.read_candidates`: `pudding search`'s
    output, a JSON list, or one set such as the SLEB baseline's)."""
    return {c.name: c.skip for c in read_candidates(path)[0]}


def named_sets(pm, extra: dict[str, list[int]]) -> dict[str, list[int]]:
    """Every fixed set by name: the candidates (router order), the bundle's static set, extras."""
    sets = {c.name: sorted(c.skip) for c in pm.candidates}
    static = pm.manifest.static
    if sets.get(static.name, sorted(static.skip)) != sorted(static.skip):
        raise PuddingError(f"{pm.path}: static set {static.name!r} differs from the candidate "
                           "of the same name")
    sets[static.name] = sorted(static.skip)
    for name, skip in extra.items():
        if name in sets and sets[name] != skip:
            raise PuddingError(f"extra set {name!r} clashes with a bundle set of that name")
        sets[name] = skip
    return sets

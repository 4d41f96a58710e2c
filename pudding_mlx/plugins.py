"""Commands and backends that other installed packages add to `pudding` (the torch side adds
search, labels, training, conversion and the torch eval backend), found through entry points so
that this package never imports them."""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

COMMANDS = "pudding.commands"  # name -> a click.Command
EVAL_BACKENDS = "pudding.eval_backends"  # name -> a scorer class (see evaluation.scoring.MLXScorer)


def plugins(group: str) -> dict[str, EntryPoint]:
    """The entry points registered under `group`, by name (not loaded)."""
    return {ep.name: ep for ep in entry_points(group=group)}

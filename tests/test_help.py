"""Every `pudding` command loads from the module the command table names and its --help
lists each option it declares (a moved or renamed module shows up here, not at a user's)."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from pudding_mlx.cli import COMMANDS, cli
from pudding_mlx.plugins import COMMANDS as PLUGIN_COMMANDS
from pudding_mlx.plugins import plugins

NAMES = [*COMMANDS, *(n for n in plugins(PLUGIN_COMMANDS) if n not in COMMANDS)]


def test_the_group_lists_every_command():
    result = CliRunner().invoke(cli, ["--help"], terminal_width=80)
    assert result.exit_code == 0
    listed = result.output.split("Commands:")[1].split()
    assert all(name in listed for name in NAMES) and len(NAMES) == 17


@pytest.mark.parametrize("name", NAMES)
def test_help_renders_and_names_every_option(name):
    command = cli.get_command(click.Context(cli), name)
    assert not (command.help or "").startswith("(unavailable")
    result = CliRunner().invoke(cli, [name, "--help"], terminal_width=80)
    assert result.exit_code == 0, result.output
    options = [p.opts[0] for p in command.params if isinstance(p, click.Option)]
    assert options and all(o in result.output for o in options)

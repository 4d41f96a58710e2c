"""The `pudding` command: one click group; each subcommand lives in its own module.

Subcommands are imported only when run, so `pudding generate` never imports torch and
`pudding --help` stays fast. The torch side's subcommands (search, label, ...) are entry points
of the group `pudding.commands` (`plugins.py`): this package never imports them.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys

import click

from .errors import PuddingError, one_line
from .plugins import COMMANDS as PLUGIN_COMMANDS
from .plugins import plugins

# name -> "module:attribute" of a click.Command
COMMANDS = {
    "generate": "pudding_mlx.generate:generate",
    "chat": "pudding_mlx.chat:chat",
    "info": "pudding_mlx.info:info",
    "bench": "pudding_mlx.bench.command:bench",
    "eval": "pudding_mlx.evaluation.command:evaluate",
    "eval-compare": "pudding_mlx.evaluation.compare:eval_compare",
    "serve": "pudding_mlx.serve.command:serve",
    "fidelity": "pudding_mlx.fidelity.command:fidelity",
    "pareto": "pudding_mlx.fidelity.pareto:pareto",
}
# the extra that brings a command's packages, where it is not train/coreml
EXTRAS = {"serve": "serve"}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*COMMANDS, *(n for n in plugins(PLUGIN_COMMANDS) if n not in COMMANDS)]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        plugin = plugins(PLUGIN_COMMANDS).get(name)
        if target is None and plugin is None:
            return None
        try:
            if target is None:
                return plugin.load()
            module, attr = target.split(":")
            return getattr(importlib.import_module(module), attr)
        except ImportError as e:
            return _missing(name, e)


def _missing(name: str, error: ImportError) -> click.Command:
    @click.command(name, context_settings={"ignore_unknown_options": True})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def stub(args):
        raise PuddingError(
            f"`pudding {name}` needs a package that is not installed ({error}); "
            "install the extra it belongs to, e.g. "
            f"pip install 'pudding-mlx[{EXTRAS.get(name, 'train,coreml')}]'"
        )

    stub.help = f"(unavailable: {error})"
    return stub


@click.group(cls=LazyGroup)
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(package_name="pudding-mlx")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Prompt-routed dynamic depth pruning (PuDDing) on MLX."""
    ctx.obj = {"debug": debug}


DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)

OPENBLAS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
)


def _reexec_with_openblas(argv: list[str]) -> None:
    """MLX's Linux CPU wheel bundles a slow BLAS; the system OpenBLAS is ~50x faster with the
    same numerics. LD_PRELOAD only acts at process start, hence the re-exec (PUDDING_OPENBLAS=0
    turns it off)."""
    if sys.platform != "linux" or os.environ.get("PUDDING_OPENBLAS") == "0":
        return
    lib = next((p for p in OPENBLAS if os.path.exists(p)), None)
    preload = os.environ.get("LD_PRELOAD", "")
    if lib is None or lib in preload:
        return
    env = dict(os.environ, LD_PRELOAD=":".join(filter(None, [lib, preload])))
    os.execve(sys.executable, [sys.executable, "-m", "pudding_mlx.cli", *argv], env)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    _reexec_with_openblas(argv)
    debug = "--debug" in argv
    try:
        cli.main(args=argv, prog_name="pudding", standalone_mode=False)
    except PuddingError as e:
        if debug:
            raise
        click.echo("error: " + one_line(e), err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except OSError as e:
        # The machine, not the code: a full disk, a read-only or forbidden folder.
        if debug or e.errno not in DISK_ERRNOS:
            raise
        click.echo(f"error: {e.filename or 'output'}: {e.strerror}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()

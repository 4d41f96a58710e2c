"""Which mlx-lm architectures pudding would refuse, by the check `convert` and `load` run.

For every module of the installed mlx_lm.models, the classes that hold a `self.layers` block
list are checked with pudding_mlx.masking's source scan (the one `layer_owner` applies): a
forward that ties a block's behaviour to its position in the list is refused unless
`pudding_mlx.arch` has a forward for it. Prints a Markdown list (the README's).

    python benchmarks/architectures.py
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import mlx.nn as nn
import mlx_lm
import mlx_lm.models

from pudding_mlx.arch import FORWARDS
from pudding_mlx.masking import _positional_use


def block_list_classes(module) -> list[type]:
    """Classes defined in `module` whose __init__ sets `self.layers` to a list of blocks."""
    out = []
    for _, cls in inspect.getmembers(module, inspect.isclass):
        if cls.__module__ != module.__name__ or not issubclass(cls, nn.Module):
            continue
        try:
            init = inspect.getsource(cls.__init__)
        except (OSError, TypeError):
            continue
        if "self.layers = [" in init.replace("\n", " ").replace("  ", " "):
            out.append(cls)
    return out


def main() -> None:
    refused, own, failed = [], [], []
    for info in pkgutil.iter_modules(mlx_lm.models.__path__):
        name = info.name
        try:
            module = importlib.import_module(f"mlx_lm.models.{name}")
        except (Exception, SystemExit) as e:  # an optional dependency missing (olmo exits)
            failed.append(f"{name} ({type(e).__name__})")
            continue
        for cls in block_list_classes(module):
            where = _positional_use(cls)
            if where is None:
                continue
            (own if name in FORWARDS else refused).append(f"`{name}` (`{where}`)")
            break
    print(f"mlx-lm {mlx_lm.__version__}: {len(refused)} refused, {len(own)} run through "
          f"pudding_mlx/arch.py\n")
    print("Refused: " + ", ".join(refused) + ".\n")
    print("Own forward: " + ", ".join(own) + ".")
    if failed:
        print("\nNot imported: " + ", ".join(failed) + ".")


if __name__ == "__main__":
    main()

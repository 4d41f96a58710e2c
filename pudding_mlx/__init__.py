"""pudding-mlx: prompt-routed dynamic depth pruning on MLX."""

from .errors import BundleError, PuddingError

__version__ = "0.1.0"


def load(path, **kwargs):
    """Load a PuDDing bundle; see `pudding_mlx.model.load`."""
    from .model import load as _load

    return _load(path, **kwargs)


__all__ = ["BundleError", "PuddingError", "load", "__version__"]

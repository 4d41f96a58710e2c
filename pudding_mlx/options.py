"""What the MLX commands share: the click options that pick a route, a router backend and the
bundle check, and the line that reports a route."""

from __future__ import annotations

import functools

import click

from .errors import PuddingError
from .routing import check_tolerance

BACKENDS = ("auto", "mlx", "coreml")
NO_TEMPLATE = "note: the tokenizer has no chat template (a base model); "
TOLERANCE_HELP = ("Fidelity routers: skip the most blocks among the sets whose predicted "
                  "KL to dense is at most X nats/token (dense when none is) [default: the "
                  "bundle's].")


def parse_skip(text: str) -> list[int]:
    """'3,7,9' -> [3, 7, 9]; '' -> [] (dense)."""
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise PuddingError(f"--skip takes block numbers like 3,7,9, got {text!r}") from None


def router_backend_option(help: str | None = None):
    """--router-backend auto|mlx|coreml; the command receives `router_backend`."""
    return click.option("--router-backend", type=click.Choice(BACKENDS), default="auto",
                        show_default=True, help=help)


def no_verify_option(help: str = "Skip the sha256 check of the bundle files."):
    """--no-verify; the command receives `no_verify`."""
    return click.option("--no-verify", is_flag=True, help=help)


def route_options(f):
    """The routing overrides every command takes: --dense, --static, --skip, --tolerance,
    --router-backend.

    The command receives `route_mode` ("router" | "dense" | "static"), `skip`
    (list[int] | None) and `tolerance` (float | None) instead of the raw flags, ready for
    PuddingModel.route.
    """

    @click.option("--dense", is_flag=True, help="Skip no block (ignore the router).")
    @click.option("--static", "static_", is_flag=True, help="Use the bundle's static set.")
    @click.option("--skip", "skip_text", default=None, metavar="3,7,9",
                  help="Skip exactly these blocks (0-based).")
    @click.option("--tolerance", type=float, default=None, metavar="X", help=TOLERANCE_HELP)
    @router_backend_option("auto: Core ML on macOS when router.mlpackage exists, else MLX.")
    @functools.wraps(f)
    def wrapper(*args, dense: bool, static_: bool, skip_text: str | None,
                tolerance: float | None, **kwargs):
        if dense + static_ + (skip_text is not None) > 1:
            raise PuddingError("--dense, --static and --skip exclude each other")
        if tolerance is not None and dense + static_ + (skip_text is not None):
            raise PuddingError("--tolerance picks among the router's sets; it cannot go with "
                               "--dense, --static or --skip")
        mode = "dense" if dense else "static" if static_ else "router"
        skip = parse_skip(skip_text) if skip_text is not None else None
        if tolerance is not None:
            check_tolerance(tolerance)
        return f(*args, route_mode=mode, skip=skip, tolerance=tolerance, **kwargs)

    return wrapper


def describe_route(route, num_blocks: int) -> str:
    """The "Route: ..." line of generate, chat and demo."""
    blocks = ",".join(map(str, route.skip)) or "none"
    text = f"Route: {route.name} (skips blocks {blocks} of {num_blocks}"
    if route.reason in ("router", "none within tolerance"):
        text += f"; router {route.seconds * 1e3:.1f} ms"
        if route.truncated:
            text += ", prompt truncated for the router"
        if route.predicted is not None:
            text += f"; predicted KL to dense {route.predicted:.4f} nats/token"
        if route.tolerance is not None:
            text += (f", tolerance {route.tolerance:g}" if route.index is not None
                     else f"; no set predicted within tolerance {route.tolerance:g}")
        elif route.k is not None:
            text += f", best of the {route.k}-block sets"
    else:
        text += f"; {route.reason}"
    return text + ")"

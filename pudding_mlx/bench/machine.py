"""The machine a measurement ran on: platform, CPU, versions, MLX device, load average."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine_info() -> dict:
    """What `pudding bench` records under "machine" (the load average at the start too)."""
    from importlib.metadata import version

    import mlx.core as mx

    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or _cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "mlx": version("mlx"),
        "mlx_lm": version("mlx-lm"),
        "device": str(mx.default_device()),
        "metal": mx.metal.is_available(),
        "openblas_preloaded": "openblas" in os.environ.get("LD_PRELOAD", ""),
    }
    info["device_info"] = mx.device_info()  # on Apple Silicon: the GPU's name and memory
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = os.getloadavg()
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""

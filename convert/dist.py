"""The data-parallel helpers search and labelling share (torch.distributed, gloo on CPU)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def joined(device_name: str) -> Iterator:
    """The torch device this rank uses. Started by torchrun/accelerate (WORLD_SIZE > 1), the body
    runs in the process group, which is left at the end; a group made by the caller is kept."""
    import torch
    import torch.distributed as td

    # Import before the group exists: its functions take `group=group.WORLD` as a default
    # argument, so importing it later (transformers does, when it loads a model) pins the group:
    # destroy_process_group cannot free it, its gloo threads outlive Python, and a rank then
    # sometimes aborts at exit ("terminate called without an active exception").
    import torch.distributed.nn  # noqa: F401

    from .device import resolve_device

    device = resolve_device(device_name)
    own = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not td.is_initialized()
    if own:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        td.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield device
        if own:
            td.barrier()  # ranks leave together, after rank 0 has written its outputs
    finally:
        if own:
            td.destroy_process_group()


class Dist:
    """torch.distributed helpers; a single process when no process group is initialised."""

    def __init__(self):
        import torch.distributed as td

        self.on = td.is_available() and td.is_initialized()
        self.rank = td.get_rank() if self.on else 0
        self.world = td.get_world_size() if self.on else 1

    def gather(self, obj) -> list:
        if not self.on:
            return [obj]
        import torch.distributed as td

        out = [None] * self.world
        td.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        if not self.on:
            return obj
        import torch.distributed as td

        box = [obj]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.on:
            import torch.distributed as td

            td.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of `values` over all ranks."""
        return [sum(v) for v in zip(*self.gather(values), strict=True)]

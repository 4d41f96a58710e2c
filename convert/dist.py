"""The data-parallel helpers search and labelling share (torch.distributed, gloo on CPU)."""

from __future__ import annotations


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

    def sum(self, values: list[int]) -> list[int]:
        """Element-wise sum of `values` over all ranks."""
        return [sum(v) for v in zip(*self.gather(values), strict=True)]

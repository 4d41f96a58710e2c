"""What `pudding bench` measured, as written to bench.json: its settings, the machine and
model, every trial, and the figures derived from them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .timing import Trial


@dataclass
class Settings:
    prompt_lengths: tuple[int, ...] = (128, 256, 512)
    gen_lengths: tuple[int, ...] = (128, 256, 512)
    gen_prompt: int = 128  # prompt length of the generation measurements
    trials: int = 5
    warmup: int = 1
    seed: int = 0
    prompt_file: str | None = None
    compare_mlx_lm: bool = False
    router_study: bool = False


@dataclass
class Result:
    settings: Settings
    machine: dict  # machine.machine_info
    model: dict  # dtype, shape, bytes per parameter (summary.model_facts)
    route: dict  # the routed request's skip set and how it was chosen
    trials: list[Trial] = field(default_factory=list)
    summary: dict = field(default_factory=dict)  # summary.summarise
    router_study: list[dict] = field(default_factory=list)  # router.router_study
    memory: dict = field(default_factory=dict)  # memory.memory_compare
    overhead: dict = field(default_factory=dict)  # timing.wrapper_overhead
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["settings"]["prompt_lengths"] = list(self.settings.prompt_lengths)
        d["settings"]["gen_lengths"] = list(self.settings.gen_lengths)
        return d

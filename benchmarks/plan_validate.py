"""`pudding plan` against the builds recorded on this project's 2-core machine, and the plans
of four larger checkpoints on three devices (examples/results/planner/README.md).

Measured figures: the step records (steps/<step>.json: seconds and cpu_seconds) and phase
records of the builds under examples/results/, and notes where no record was committed. CPU
seconds are compared where recorded (the steps ran with one torch thread, so they are what an
idle machine's wall clock would show); otherwise wall seconds of a shared machine.

    python benchmarks/plan_validate.py            # the validation table
    python benchmarks/plan_validate.py --plans    # and the big-model plans
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import click

from convert.plan import format_plan, get_device, plan_build
from convert.profiles import PROFILES

CONFIGS = Path(__file__).resolve().parent.parent / "examples" / "configs"

# (name, config, profile, threads, source bytes per parameter read, {step: (seconds, kind)})
RECORDS = [
    ("SmolLM2-135M quality (examples/results/quality/build)", "smollm2-135m",
     PROFILES["quality"], 1, 4.0,
     {"search": (4372, "CPU-s"), "labels": (794, "CPU-s"), "router": (139, "CPU-s"),
      "convert": (24, "CPU-s")}),
    ("SmolLM2-135M demo, MiniLM router (examples/results/quality/demo)", "smollm2-135m",
     replace(PROFILES["demo"], router="encoder"), 1, 4.0,
     {"search": (501, "CPU-s"), "labels": (527, "CPU-s"), "router": (72, "CPU-s"),
      "convert": (22, "CPU-s")}),
    ("SmolLM2-135M paper (examples/results/smollm2-paper)", "smollm2-135m",
     PROFILES["paper"], 1, 4.0,
     {"search": (21737, "CPU-s"), "labels": (11500, "wall, 1 thread"),
      "router": (2272, "CPU-s"), "convert": (27, "CPU-s")}),
    ("Gemma 3 270M quick (examples/results/gemma3/build)", "gemma-3-270m", PROFILES["quick"],
     2, 4.0,
     {"search": (628, "wall"), "labels": (259, "wall"), "router": (358, "wall"),
      "convert": (178, "wall")}),
    ("Qwen2.5-Coder-0.5B quick (a past note, shared machine)", "qwen2.5-coder-0.5b",
     PROFILES["quick"], 2, 4.0,
     {"search": (211, "wall"), "labels": (120, "wall"), "router": (13, "wall"),
      "convert": (89, "wall")}),
]

BIG = ["llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "qwen2.5-7b"]


def config(name: str) -> dict:
    return json.loads((CONFIGS / name / "config.json").read_text())


def validation() -> str:
    lines = ["| build | step | measured | predicted | error |", "|---|---|---|---|---|"]
    for name, cfg, profile, threads, source_bytes, measured in RECORDS:
        plan = plan_build(config(cfg), profile, get_device("cpu", threads), "auto",
                          source_bytes, cfg)
        for step in plan.steps:
            seconds, kind = measured[step.name]
            error = step.seconds / seconds - 1
            lines.append(f"| {name} | {step.name} | {seconds:,} s ({kind}) | "
                         f"{step.seconds:,.0f} s | {error:+.0%} |")
    return "\n".join(lines)


def plans() -> str:
    out = []
    for profile in ("quick", "paper"):
        for device, threads in (("cpu", 2), ("m3pro-36", 1), ("m3pro-18", 1), ("h100", 1)):
            for name in BIG:
                p = replace(PROFILES[profile], dtype="float16")  # the bundle is for a Mac
                plan = plan_build(config(name), p, get_device(device, threads), "auto", 2.0,
                                  name)
                out.append(f"### {name}, {profile} profile, {device}\n```\n"
                           f"{format_plan(plan)}\n```")
    return "\n\n".join(out)


@click.command()
@click.option("--plans", "with_plans", is_flag=True, help="Also print the big-model plans.")
def main(with_plans: bool) -> None:
    click.echo(validation())
    if with_plans:
        click.echo()
        click.echo(plans())


if __name__ == "__main__":
    main()

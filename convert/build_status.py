"""Where a `pudding build` work folder stands, without running anything (`pudding build
--status`): each step's state and times, the search's phases per candidate, the label shards
written, the router's epochs."""

from __future__ import annotations

from pathlib import Path

from pudding_mlx.files import read_json

from .label_store import META, shard_path
from .profiles import QUALITY_STEPS
from .train_router import STATE


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _steps(work: Path) -> list[str]:
    lines = ["| step | state | last run: wall s | CPU s |", "|---|---|---|---|"]
    records = [work / "steps" / f"{name}.json" for name in QUALITY_STEPS]  # pipeline order
    records = [path for path in records if path.is_file()]
    for path in records:
        r = read_json(path)
        lines.append(f"| {path.stem} | {r.get('state', '?')} | {_seconds(r.get('seconds'))} "
                     f"| {_seconds(r.get('cpu_seconds'))} |")
    return lines if records else ["No step has started."]


def _search(path: Path) -> list[str]:
    run = read_json(path)
    lines = [f"Search `{path.name}` ({'complete' if run.get('complete') else 'in progress'}, "
             f"{run['settings'].get('samples')} samples; every run's phases):", "",
             "| candidate | blocks, in the order chosen | phases | wall s | CPU s "
             "| block evaluations |", "|---|---|---|---|---|---|"]
    total = [0.0, 0.0, 0]
    for c in run["candidates"]:
        phases = c["trajectory"]
        wall = sum(p["seconds"] for p in phases)
        cpu = sum(p.get("cpu_seconds") or 0.0 for p in phases)
        evals = sum(p["block_evals"] for p in phases)
        total = [total[0] + wall, total[1] + cpu, total[2] + evals]
        lines.append(f"| {c['name']} | {', '.join(str(p['block']) for p in phases)} "
                     f"| {len(phases)} of {c['k']} | {wall:,.0f} | {cpu:,.0f} | {evals:,} |")
    lines.append(f"| total | | | {total[0]:,.0f} | {total[1]:,.0f} | {total[2]:,} |")
    return lines


def _labels(folder: Path) -> list[str]:
    meta = read_json(folder / META)
    n = meta.get("num_shards", 0)
    done = sum(shard_path(folder, i).is_file() for i in range(n))
    what = meta.get("num_questions") or meta.get("num_prompts")
    runs = meta.get("runs", [])
    cost = ""
    if runs:  # an interrupted run's record stops at its last shard ("partial")
        wall = sum(r["seconds"] for r in runs)
        cpu = (f"{sum(r['cpu_seconds'] for r in runs):,.0f} CPU s"
               if all("cpu_seconds" in r for r in runs) else "CPU time not recorded")
        cost = (f" Recorded runs: {len(runs)}, {sum(r['shards_run'] for r in runs)} shards, "
                f"{wall:,.0f} s wall, {cpu}, "
                f"{sum(r['block_evals'] for r in runs):,} block evaluations.")
    lines = [f"Labels: {done} of {n} shards ({what} items in all, "
             f"{'complete' if meta.get('complete') else 'in progress'}).{cost}"]
    per_task: dict[str, list[float]] = {}  # task -> [seconds, items], runs that recorded it
    for r in runs:
        for task, c in r.get("per_task", {}).items():
            acc = per_task.setdefault(task, [0.0, 0])
            acc[0] += c["seconds"]
            acc[1] += c["items"]
    if per_task:
        lines.append("Label time per 1,000 items: " + ", ".join(
            f"{t} {1000 * sec / n / 60:.1f} min" for t, (sec, n) in per_task.items()) + ".")
    return lines


def _router(folder: Path) -> list[str]:
    done = folder / "metrics.json"
    if done.is_file():
        m = read_json(done)
        return [f"Router: trained, epoch {m.get('selected_epoch')} of {len(m['history'])} kept, "
                f"{_seconds(m.get('train_seconds'))} s of training."]
    state = folder / "checkpoint" / STATE
    if state.is_file():
        s = read_json(state)
        return [f"Router: {s['epoch']} epochs done of {s['settings']['epochs']}."]
    return []


def build_status(work: str | Path) -> str:
    work = Path(work)
    lines = _steps(work)
    for name in ("fidelity.json", "candidates.json"):
        if (work / "search" / name).is_file():
            lines += ["", *_search(work / "search" / name)]
            break
    if (work / "labels" / META).is_file():
        lines += ["", *_labels(work / "labels")]
    if (work / "router").is_dir():
        lines += ["", *_router(work / "router")]
    return "\n".join(lines) + "\n"

"""Build products that ship with pudding, so a first `pudding demo` converts a bundle in about a
minute instead of computing one for half an hour.

`demo_products/` is a work folder of the `demo` profile (search, candidates, labels, the
in-model router), kept light: about 0.3 MB. Before a step runs, `adopt` copies its shipped
output into the work folder when the work folder has no record of that step and the shipped
record's inputs equal the step's own: the model and prompts files by content, the profile's
settings and the fingerprints of the steps above, so a changed model, prompts file, setting
or upstream result never reuses a stale product. `run_step` then checks the copy's
fingerprint like any reused output. A step whose computation changes must say so in its
inputs (a new key), which also retires its shipped product; tests/test_shipped.py checks that
the shipped records match today's packaged inputs. `benchmarks/ship_demo_products.py` writes
the folder from a finished demo build.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from pudding_mlx.files import read_json, write_json

from .resume import changed_settings

DEMO_PRODUCTS = Path(__file__).parent / "demo_products"


def adopt(work: Path, shipped: Path, name: str, inputs: dict, output: Path,
          echo: Callable[[str], None]) -> bool:
    """Copy step `name`'s shipped output (`output`, under `work`) and record into `work` when
    the record's inputs equal `inputs`; True if copied."""
    record = shipped / "steps" / f"{name}.json"
    if (work / "steps" / f"{name}.json").exists() or not record.is_file():
        return False  # the work folder's own run (finished or not) comes first
    try:
        rel = output.relative_to(work)
    except ValueError:
        return False  # the bundle itself is never shipped
    rec = read_json(record)
    inputs = json.loads(json.dumps(inputs))
    if rec.get("inputs") != inputs or rec.get("state") != "done":
        differ = ", ".join(changed_settings(rec.get("inputs") or {}, inputs)) or "state"
        echo(f"[{name}] the result shipped with pudding does not apply (inputs differ: "
             f"{differ}); computing it")
        return False
    src, dest = shipped / rel, work / rel
    if src.is_dir():
        shutil.copytree(src, dest, dirs_exist_ok=True)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)
    write_json(work / "steps" / f"{name}.json", rec)
    seconds = rec.get("seconds") or 0
    took = (f", {seconds / 60:.0f} min to compute here" if seconds >= 60
            else f", {seconds:.0f} s to compute here" if seconds else "")
    echo(f"[{name}] using the result shipped with pudding (same inputs{took})")
    return True

"""Copy a finished `pudding build --profile demo` work folder's machine-independent products
into convert/demo_products/ (convert/shipped.py): the search, candidates, labels and router
records with their outputs. Not the router's cached features, nor the bundle.

    python benchmarks/ship_demo_products.py ~/.cache/pudding-mlx/demo/work
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from convert.shipped import DEMO_PRODUCTS
from pudding_mlx.files import read_json

# step -> what it wrote, relative to the work folder
OUTPUTS = {"search": ["search/fidelity.json"], "candidates": ["search/candidates.json"],
           "labels": ["labels"], "router": ["router/router", "router/metrics.json"]}


def ship(work: Path, dest: Path = DEMO_PRODUCTS) -> None:
    for step in OUTPUTS:
        if read_json(work / "steps" / f"{step}.json").get("state") != "done":
            raise SystemExit(f"{work}: step {step} has not finished")
    shutil.rmtree(dest, ignore_errors=True)
    for step, paths in OUTPUTS.items():
        (dest / "steps").mkdir(parents=True, exist_ok=True)
        shutil.copy2(work / "steps" / f"{step}.json", dest / "steps" / f"{step}.json")
        for rel in paths:
            src, out = work / rel, dest / rel
            if src.is_dir():
                shutil.copytree(src, out)
            else:
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, out)
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(f"wrote {dest} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ship(ap.parse_args().work)

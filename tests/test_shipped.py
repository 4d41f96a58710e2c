"""Products shipped with pudding (convert/shipped.py): the demo's match today's packaged
inputs, a build takes a shipped product only when its inputs match, and recomputes a step
(and those below it) when one input changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import tiny_llama
from test_build_quality import write_prompts

from convert.build import make_steps, run_build
from convert.profiles import PROFILES, make_profile
from convert.shipped import DEMO_PRODUCTS
from pudding_mlx.files import read_json

SHIPPED_STEPS = ("search", "candidates", "labels", "router")


def test_shipped_demo_products_match_the_packaged_inputs(tmp_path):
    """Each shipped record's inputs are what the demo profile's step computes today from the
    packaged model and prompts (and the shipped steps above it), and each shipped output still
    has the fingerprint its record names: a change to the prompts, the model, the profile or
    a step's inputs cannot ship a stale product."""
    from convert.assets import default_model

    records = {s: read_json(DEMO_PRODUCTS / "steps" / f"{s}.json") for s in SHIPPED_STEPS}
    factories = make_steps(str(default_model()), tmp_path / "bundle", DEMO_PRODUCTS,
                           PROFILES["demo"], None, lambda name: records[name]["output"])
    for factory in factories[:len(SHIPPED_STEPS)]:
        step = factory()
        assert records[step.name]["state"] == "done"
        assert json.loads(json.dumps(step.inputs)) == records[step.name]["inputs"], step.name
        assert step.fingerprint() == records[step.name]["output"], step.name
    assert PROFILES["demo"].router == "in-model"
    size = sum(p.stat().st_size for p in DEMO_PRODUCTS.rglob("*") if p.is_file())
    assert size < 2e6  # the repository stays light


@pytest.fixture(scope="module")
def shipped_build(tmp_path_factory, one_torch_thread):
    """A tiny quality build with an in-model router, its products shipped to a folder."""
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from ship_demo_products import ship

    root = tmp_path_factory.mktemp("shipped")
    tiny_llama(root / "hf", num_layers=6)
    prompts = write_prompts(root / "prompts.jsonl")
    run_build(str(root / "hf"), root / "bundle", root / "work", profile(prompts))
    ship(root / "work", root / "products")
    return root, prompts


def profile(prompts: Path, **changes):
    settings = {"k": 3, "sizes": [1, 3], "samples": 4, "max_tokens": 4, "prompts": str(prompts),
                "router": "in-model", "dtype": "float32", "device": "cpu", "coreml": False}
    return make_profile("quality", **{**settings, **changes})


def build(root: Path, work: str, prompts: Path, **changes) -> list[str]:
    lines: list[str] = []
    run_build(str(root / "hf"), root / f"bundle-{work}", root / work, profile(prompts, **changes),
              echo=lines.append, shipped=root / "products")
    return lines


def test_matching_products_are_used_and_a_changed_input_recomputes(shipped_build):
    root, prompts = shipped_build
    lines = build(root, "fresh", prompts)
    for step in SHIPPED_STEPS:
        assert any(line.startswith(f"[{step}] using the result shipped") for line in lines)
        assert f"[{step}] running" not in lines
    assert "[convert] running" in lines
    # the same products as the original build
    assert (root / "fresh" / "router" / "router" / "model.safetensors").read_bytes() == (
        root / "work" / "router" / "router" / "model.safetensors").read_bytes()

    # one input changed (the continuation length): the search and the labels do not take the
    # shipped results and say why, and the router below them runs too (the candidates may
    # still match: they depend only on the order the new search removed blocks in)
    lines = build(root, "changed", prompts, max_tokens=5)
    for step in ("search", "labels"):
        assert any(line.startswith(f"[{step}] the result shipped with pudding does not apply "
                                   "(inputs differ: max_tokens)") for line in lines)
    for step in ("search", "labels", "router"):
        assert f"[{step}] running" in lines
        assert not any(line.startswith(f"[{step}] using the result shipped") for line in lines)

"""`pudding build --profile quality` on a tiny LLaMA, a tiny BERT backbone and a tiny prompts file:
nested fidelity candidates plus dense and a task set, labelled by KL to dense, a fidelity
router, and a bundle whose default tolerance follows the router's held-out metrics; the bundle
routes like the torch router read with the tolerance rule; a rerun redoes nothing; new sizes
redo every step below the search."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import tiny_backbone, tiny_llama, torch_route

import pudding_mlx
from convert.build import quality_candidates
from convert.profiles import PROFILES, make_profile
from convert.profiles import QUALITY_STEPS as STEPS
from convert.router_metrics import default_tolerance
from convert.router_model import Router
from pudding_mlx.cli import cli
from pudding_mlx.errors import PuddingError

TRAIN = ["Which gas do plants absorb from the air?", "How do you boil an egg?",
         "What is the capital of France?", "Is the sky blue?", "What fills an empty glass?",
         "How are you today?", "Say hello.", "Name a colour.", "Pour water into a glass.",
         "Give an answer: yes or no?"]
HELDOUT = ["Where is Paris?", "Why is the sky blue?"]


def write_prompts(path: Path) -> Path:
    rows = [{"id": f"t{i}", "source": "test", "split": "train", "text": t}
            for i, t in enumerate(TRAIN)]
    rows += [{"id": f"h{i}", "source": "test", "split": "heldout", "text": t}
             for i, t in enumerate(HELDOUT)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    tiny_llama(root / "hf", num_layers=8)
    tasks = root / "task-candidates.json"
    tasks.write_text(json.dumps({"candidates": [{"name": "arc_easy-likelihood-k2",
                                                 "skip": [2, 5]}]}))
    return root, write_prompts(root / "prompts.jsonl"), tiny_backbone(root / "backbone"), tasks


def build(setup, *extra) -> str:
    root, prompts, backbone, tasks = setup
    args = ["build", "--profile", "quality", "--model", root / "hf", "--out", root / "bundle",
            "--work", root / "work", "--k", "4", "--sizes", "2,4", "--samples", "6",
            "--max-tokens", "6", "--prompts", prompts, "--task-candidates", tasks,
            "--epochs", "2", "--batch-size", "4", "--warmup-steps", "0", "--backbone", backbone,
            "--router-max-length", "32", "--dtype", "float32", "--device", "cpu",
            "--no-coreml", "--threads", "1", *extra]
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def ran(output: str) -> set[str]:
    return {s for s in STEPS if f"[{s}] running" in output}


def mtimes(root: Path) -> dict[str, int]:
    work = root / "work"
    files = {"search": work / "search" / "fidelity.json",
             "candidates": work / "search" / "candidates.json",
             "labels": sorted((work / "labels").glob("*.parquet"))[0],
             "router": work / "router" / "router" / "model.safetensors",
             "convert": root / "bundle" / "pudding.json"}
    return {k: p.stat().st_mtime_ns for k, p in files.items()}


@pytest.fixture(scope="module")
def first(setup):
    out = build(setup)
    return out, mtimes(setup[0])


def test_quality_build_routes_with_the_tolerance_its_metrics_choose(setup, first):
    root = setup[0]
    work = root / "work"
    assert ran(first[0]) == set(STEPS)
    run = json.loads((work / "search" / "fidelity.json").read_text())
    order = [p["block"] for p in run["candidates"][0]["trajectory"]]
    assert len(order) == 4 and 0 not in order and 7 not in order
    # nested: each size is the first phases of the one k = 4 run; then dense, then the task set
    cands = json.loads((work / "search" / "candidates.json").read_text())["candidates"]
    assert [(c["name"], sorted(c["skip"])) for c in cands] == [
        ("chat-fidelity-k2", sorted(order[:2])), ("chat-fidelity-k4", sorted(order)),
        ("dense", []), ("arc_easy-likelihood-k2", [2, 5])]
    meta = json.loads((work / "labels" / "meta.json").read_text())
    assert meta["num_prompts"] == len(TRAIN)

    metrics = json.loads((work / "router" / "metrics.json").read_text())
    tolerance = default_tolerance(metrics, 0.25)
    pm = pudding_mlx.load(root / "bundle", router_backend="mlx")
    assert pm.manifest.router.target == "fidelity"
    assert pm.manifest.router.tolerance == tolerance
    convert = json.loads((work / "steps" / "convert.json").read_text())
    assert convert["inputs"]["tolerance"] == tolerance
    assert all(json.loads((work / "steps" / f"{s}.json").read_text())["cpu_seconds"] >= 0
               for s in STEPS)

    router = Router.load(work / "router" / "router")
    from transformers import AutoTokenizer

    rtok = AutoTokenizer.from_pretrained(work / "router" / "router")
    size = {c.name: len(c.skip) for c in pm.manifest.candidates}
    outputs = pm.manifest.router.outputs
    chosen = set()
    for prompt in [*TRAIN[:3], *HELDOUT]:
        scores = torch_route(router, rtok, prompt).scores
        # the bundle's default, and each prediction as a tolerance (every set in turn qualifies)
        for tol in [None, *(float(s) + 1e-6 for s in scores if s >= 0)]:
            # by hand: the most blocks among the sets predicted within it (dense when none)
            limit = tolerance if tol is None else tol
            ok = [i for i in range(len(outputs)) if scores[i] <= limit]
            want = (max(ok, key=lambda i: (size[outputs[i]], -scores[i])) if ok
                    else outputs.index("dense"))
            route = pm.route(prompt, tolerance=tol)
            assert np.abs(route.scores - scores).max() <= 1e-4
            assert (route.name, route.tolerance) == (outputs[want], limit)
            chosen.add(route.name)
        # any set is within an infinite tolerance: the only 4-block set
        assert pm.route(prompt, tolerance=math.inf).name == "chat-fidelity-k4"
    assert len(chosen) >= 2  # the check sees different choices


def test_quality_profile_settings():
    q = make_profile("quality", sizes=[3], label_limit=0)
    assert (q.target, q.k, q.sizes, q.label_limit, q.torch_dtype) == (
        "fidelity", 8, (3,), None, "float32")
    assert PROFILES["quality"].sizes == (1, 2, 3, 4, 6, 8)
    with pytest.raises(PuddingError, match="between 1 and"):
        make_profile("quality", sizes=[2, 9])
    with pytest.raises(PuddingError, match="tasks: not a setting"):
        make_profile("quality", tasks=["piqa"])
    with pytest.raises(PuddingError, match="kl_target: not a setting"):
        make_profile("quick", kl_target=0.1)


def test_default_tolerance_by_hand():
    rows = [{"tolerance": t, "router": {"kl": kl}}
            for t, kl in [(0.05, 0.02), (0.1, 0.09), (0.25, 0.2), (0.5, 0.31)]]
    assert default_tolerance({"tolerance": rows}, 0.25) == 0.25
    assert default_tolerance({"tolerance": rows}, 0.09) == 0.1
    assert default_tolerance({"tolerance": rows}, 0.01) == 0.05  # none: the smallest


def test_quality_candidates_nest_the_run_and_refuse_an_unfinished_task_search(tmp_path):
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"settings": {"k": 4}, "complete": True, "candidates": [
        {"task": "chat", "loss": "fidelity", "name": "chat-fidelity-k4", "skip": [1, 2, 3, 6],
         "trajectory": [{"block": b} for b in (3, 1, 6, 2)]}]}))
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps([{"name": "piqa-k2", "skip": [4, 5]}]))
    out = tmp_path / "candidates.json"
    quality_candidates(run, (1, 3), str(tasks), out)
    assert [(c["name"], c["skip"]) for c in json.loads(out.read_text())["candidates"]] == [
        ("chat-fidelity-k1", [3]), ("chat-fidelity-k3", [1, 3, 6]), ("dense", []),
        ("piqa-k2", [4, 5])]
    tasks.write_text(json.dumps({"complete": False, "candidates": [{"name": "a", "skip": [1]}]}))
    with pytest.raises(PuddingError, match="not finished"):
        quality_candidates(run, (1,), str(tasks), out)


def test_quality_rerun_redoes_nothing_and_new_sizes_keep_the_search(setup, first):
    root = setup[0]
    again = build(setup)
    assert ran(again) == set()
    assert all(f"[{s}] reused" in again for s in STEPS)
    assert mtimes(root) == first[1]

    fewer = build(setup, "--sizes", "4")
    assert ran(fewer) == {"candidates", "labels", "router", "convert"}
    assert mtimes(root)["search"] == first[1]["search"]
    names = [c.name for c in pudding_mlx.load(root / "bundle").manifest.candidates]
    assert sorted(names) == ["arc_easy-likelihood-k2", "chat-fidelity-k4", "dense"]

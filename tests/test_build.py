"""`pudding build` on a tiny LLaMA, a tiny BERT backbone and a tiny data folder: the bundle loads,
routes like the torch router it was converted from and answers like HF torch with the chosen
blocks removed; a rerun reuses every step; a changed setting reruns exactly the steps below it;
an interrupted step resumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import chat_ids, tiny_backbone, tiny_llama, torch_greedy, torch_route, write_task_data

import pudding_mlx
from convert.build import Step, run_build, run_step
from convert.profiles import PROFILES, make_profile
from convert.router_model import Router
from pudding_mlx.cli import cli
from pudding_mlx.errors import PuddingError

PROMPTS = ["Which gas do plants absorb from the air?", "hello, how are you today?"]

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("build")
    model, tok = tiny_llama(root / "hf", num_layers=6)
    return root, write_task_data(root / "data"), tiny_backbone(root / "backbone"), model, tok


def build(setup, *extra, at: Path | None = None):
    """The build's CLI output; bundle and work folder under `at` [default: the setup's]."""
    root, data, backbone, _, _ = setup
    at = at or root
    # float32 MLX weights (the Linux default, said here for every platform): the routed
    # answers are compared token for token with the fp32 torch model
    args = ["build", "--model", root / "hf", "--out", at / "bundle", "--work", at / "work",
            "--profile", "quick", "--tasks", "arc_easy,piqa", "--losses", "likelihood,margin",
            "--k", "2", "--samples", "4", "--max-examples-per-task", "10", "--epochs", "1",
            "--batch-size", "4", "--warmup-steps", "0", "--backbone", backbone,
            "--router-max-length", "32", "--dtype", "float32", "--torch-dtype", "float32",
            "--device", "cpu", "--data-dir", data, *extra]
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def outputs(root: Path) -> dict[str, Path]:
    work = root / "work"
    return {"search": work / "search" / "candidates.json",
            "labels": sorted((work / "labels").glob("*.parquet"))[0],
            "router": work / "router" / "router" / "model.safetensors",
            "convert": root / "bundle" / "pudding.json"}


def mtimes(root: Path) -> dict[str, int]:
    return {k: p.stat().st_mtime_ns for k, p in outputs(root).items()}


def ran(output: str) -> set[str]:
    return {s for s in ("search", "labels", "router", "convert") if f"[{s}] running" in output}


def reused(output: str) -> set[str]:
    return {s for s in ("search", "labels", "router", "convert") if f"[{s}] reused" in output}


@pytest.fixture(scope="module")
def first(setup):
    out = build(setup)
    return out, mtimes(setup[0])


def test_build_makes_a_bundle_that_routes_and_answers_like_torch(setup, first):
    """The bundle routes like the torch router it was converted from, and its routed answer
    is HF torch's greedy decoding with the chosen blocks removed."""
    root, _, _, model, tok = setup
    assert ran(first[0]) == {"search", "labels", "router", "convert"}
    cands = json.loads((root / "work" / "search" / "candidates.json").read_text())["candidates"]
    assert [c["name"] for c in cands] == ["arc_easy-likelihood-k2", "arc_easy-margin-k2",
                                          "piqa-likelihood-k2", "piqa-margin-k2"]
    pm = pudding_mlx.load(root / "bundle", router_backend="mlx")
    assert pm.manifest.num_blocks == 6
    assert {c.name: c.skip for c in pm.manifest.candidates} == {
        c["name"]: sorted(c["skip"]) for c in cands}
    assert all(len(c["skip"]) == 2 and 0 not in c["skip"] and 5 not in c["skip"] for c in cands)
    router = Router.load(root / "work" / "router" / "router")
    rtok = router_tokenizer(root)
    eos = tok.eos_token_id
    for prompt in PROMPTS:
        want = torch_route(router, rtok, prompt)
        route = pm.route(prompt)
        assert route.name == want.name
        assert np.abs(route.scores - want.scores).max() <= 1e-4
        ids = chat_ids(tok, prompt)
        ref = torch_greedy(model, ids, route.skip, 3, eos)
        assert ref != torch_greedy(model, ids, [], 3, eos)  # the check tells the set from dense
        assert [r.token for r in pm.stream_generate(prompt, max_tokens=3, route=route)] == ref
        # (mlx-lm's streaming detokenizer drops a leading space)
        text = pm.generate(prompt, max_tokens=3, route=route)
        assert text.strip() == tok.decode([t for t in ref if t != eos]).strip()
    steps = {s: json.loads((root / "work" / "steps" / f"{s}.json").read_text())
             for s in ("search", "labels", "router", "convert")}
    assert all(s["state"] == "done" and s["seconds"] >= 0 for s in steps.values())
    assert steps["search"]["inputs"]["k"] == 2
    assert steps["router"]["inputs"]["epochs"] == 1


def router_tokenizer(root: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(root / "work" / "router" / "router")


def test_from_run_builds_on_the_first_phases_of_a_finished_search(setup, first, tmp_path):
    """--from-run -k 1 replaces the search by the first block each candidate of the k = 2
    run removed, then labels, trains and converts as usual; a rerun reuses it."""
    root = setup[0]
    run = json.loads((root / "work" / "search" / "candidates.json").read_text())
    out = build(setup, "--k", "1", "--from-run", root / "work" / "search" / "candidates.json",
                at=tmp_path)
    assert ran(out) == {"search", "labels", "router", "convert"}
    cands = json.loads((tmp_path / "work/search/candidates.json").read_text())["candidates"]
    assert {c["name"]: c["skip"] for c in cands} == {
        c["name"].replace("-k2", "-k1"): [c["trajectory"][0]["block"]] for c in run["candidates"]}
    pm = pudding_mlx.load(tmp_path / "bundle", router_backend="mlx")
    assert sorted(c.name for c in pm.manifest.candidates) == sorted(c["name"] for c in cands)
    again = build(setup, "--k", "1", "--from-run", root / "work/search/candidates.json",
                  at=tmp_path)
    assert reused(again) == {"search", "labels", "router", "convert"}
    unfinished = tmp_path / "unfinished.json"
    unfinished.write_text(json.dumps({**run, "complete": False}))
    with pytest.raises(PuddingError, match="did not finish"):
        run_build(str(root / "hf"), tmp_path / "b2", tmp_path / "w2",
                  make_profile("quick", k=1, from_run=str(unfinished)))


def test_until_stops_after_a_step_and_the_full_build_reuses_it(setup, first, tmp_path):
    """--until labels (the torch steps on a machine without MLX, say) writes no router or
    bundle; the full command with the same --work then runs only the steps left."""
    run = setup[0] / "work" / "search" / "candidates.json"
    part = build(setup, "--k", "1", "--from-run", run, "--until", "labels", at=tmp_path)
    assert ran(part) == {"search", "labels"}
    assert "steps up to labels" in part
    assert not (tmp_path / "work" / "router").exists() and not (tmp_path / "bundle").exists()
    rest = build(setup, "--k", "1", "--from-run", run, at=tmp_path)
    assert reused(rest) == {"search", "labels"} and ran(rest) == {"router", "convert"}
    assert (tmp_path / "bundle" / "pudding.json").is_file()


def test_rerun_reuses_every_step_and_changes_rerun_only_the_steps_below(setup, first):
    root = setup[0]
    again = build(setup)
    assert ran(again) == set() and reused(again) == {"search", "labels", "router", "convert"}
    assert mtimes(root) == first[1]

    # a router setting: search and labels stay, the router and the bundle are redone
    more_epochs = build(setup, "--epochs", "2")
    assert ran(more_epochs) == {"router", "convert"}
    assert reused(more_epochs) == {"search", "labels"}
    now = mtimes(root)
    assert now["search"] == first[1]["search"] and now["labels"] == first[1]["labels"]
    assert now["router"] != first[1]["router"] and now["convert"] != first[1]["convert"]
    assert json.loads((root / "work" / "router" / "metrics.json").read_text())[
        "settings"]["epochs"] == 2

    # a label setting: the search stays, everything below it is redone
    fewer = build(setup, "--epochs", "2", "--max-examples-per-task", "8")
    assert ran(fewer) == {"labels", "router", "convert"} and reused(fewer) == {"search"}
    assert mtimes(root)["search"] == first[1]["search"]
    meta = json.loads((root / "work" / "labels" / "meta.json").read_text())
    assert meta["num_questions"] == 16


def fake_step(tmp_path: Path, inputs: dict, calls: list, fail: bool = False) -> Step:
    out = tmp_path / "out"

    def run():
        calls.append(out.exists())
        out.mkdir(exist_ok=True)
        (out / "part").write_text("x")
        if fail:
            raise RuntimeError("crash")

    return Step("fake", inputs, out, run, lambda: (out / "part").read_text())


def test_an_interrupted_step_resumes_and_changed_inputs_start_over(tmp_path):
    calls: list = []
    with pytest.raises(RuntimeError):
        run_step(tmp_path, fake_step(tmp_path, {"a": 1}, calls, fail=True), echo=print)
    # same inputs: the step's partial output is kept for it to resume from
    assert not run_step(tmp_path, fake_step(tmp_path, {"a": 1}, calls), echo=print).reused
    assert calls == [False, True]
    assert run_step(tmp_path, fake_step(tmp_path, {"a": 1}, calls), echo=print).reused
    # other inputs: the stale output is removed before the step runs again
    assert not run_step(tmp_path, fake_step(tmp_path, {"a": (2, 3)}, calls), echo=print).reused
    assert calls == [False, True, False]
    # a tuple reads back as a list: still the same inputs
    assert run_step(tmp_path, fake_step(tmp_path, {"a": (2, 3)}, calls), echo=print).reused
    # the output changed on disk since it was recorded: rerun
    (tmp_path / "out" / "part").write_text("edited")
    assert not run_step(tmp_path, fake_step(tmp_path, {"a": (2, 3)}, calls), echo=print).reused


def test_a_stopped_step_is_recorded_as_interrupted_or_failed(tmp_path):
    """`--status` must not show a step as running after Ctrl-C or an error."""
    for error, state in ((KeyboardInterrupt, "interrupted"), (RuntimeError, "failed")):
        def run(error=error):
            raise error

        step = Step("fake", {"a": 1}, tmp_path / "out", run, lambda: "")
        with pytest.raises(error):
            run_step(tmp_path, step, echo=print)
        assert json.loads((tmp_path / "steps" / "fake.json").read_text())["state"] == state


def test_profiles():
    paper = PROFILES["paper"]
    assert paper.tasks == ("arc_challenge", "arc_easy", "hellaswag", "piqa", "winogrande")
    assert (paper.losses, paper.samples, paper.k, paper.max_examples_per_task) == (
        ("likelihood", "margin"), 128, 6, None)
    assert (paper.epochs, paper.batch_size, paper.lr) == (10, 32, 1e-5)
    assert paper.label_tasks == (*paper.tasks, "openbookqa")
    assert paper.label_limits == ("piqa=2000", "winogrande=2000")
    quick = make_profile("quick", k=3, tasks=["piqa"], max_examples_per_task=0)
    assert (quick.k, quick.tasks, quick.max_examples_per_task) == (3, ("piqa",), None)
    assert make_profile("quick", epochs=None).epochs == PROFILES["quick"].epochs
    with pytest.raises(PuddingError, match="unknown"):
        make_profile("huge")
    with pytest.raises(PuddingError, match="from_run: not a setting of the quality"):
        make_profile("quality", from_run="candidates.json")


def test_status_of_a_work_folder(tmp_path):
    """`pudding build --status`: step states and times, the search's phases summed per
    candidate, label shards on disk, the router's epochs; nothing is run."""
    from convert.build import build

    work = tmp_path / "work"
    (work / "steps").mkdir(parents=True)
    (work / "steps/search.json").write_text(json.dumps(
        {"state": "done", "seconds": 12.4, "cpu_seconds": 10.2}))
    (work / "steps/labels.json").write_text(json.dumps({"state": "running"}))
    (work / "search").mkdir()
    phase = {"loss": 1.0, "seconds": 100.0, "block_evals": 1000, "cpu_seconds": 90.0}
    (work / "search/candidates.json").write_text(json.dumps({
        "settings": {"samples": 128}, "complete": False, "candidates": [
            {"name": "a-k2", "k": 2, "trajectory": [{**phase, "block": 5},
                                                    {**phase, "block": 3, "seconds": 50.5}]},
            {"name": "b-k2", "k": 2, "trajectory": [{**phase, "block": 7}]}]}))
    (work / "labels").mkdir()
    (work / "labels/meta.json").write_text(json.dumps(
        {"num_shards": 3, "num_questions": 150, "complete": False, "runs": [
            {"seconds": 30.0, "shards_run": 1, "block_evals": 400},  # recorded before CPU time
            {"seconds": 21.5, "cpu_seconds": 20.0, "shards_run": 1, "block_evals": 500,
             "partial": True, "per_task": {"arc_easy": {"items": 50, "seconds": 15.0},
                                           "piqa": {"items": 25, "seconds": 6.5}}}]}))
    for i in (0, 1):
        (work / f"labels/shard-{i:05d}.parquet").write_bytes(b"")
    (work / "router/checkpoint").mkdir(parents=True)
    (work / "router/checkpoint/state.json").write_text(json.dumps(
        {"epoch": 4, "settings": {"epochs": 10}}))

    r = CliRunner().invoke(build, ["--work", str(work), "--status"])
    assert r.exit_code == 0, r.output
    assert "| search | done | 12 | 10 |" in r.output
    assert "| labels | running | - | - |" in r.output
    assert "| a-k2 | 5, 3 | 2 of 2 | 150 | 180 | 2,000 |" in r.output
    assert "| b-k2 | 7 | 1 of 2 | 100 | 90 | 1,000 |" in r.output
    assert "| total | | | 250 | 270 | 3,000 |" in r.output
    assert ("Labels: 2 of 3 shards (150 items in all, in progress). Recorded runs: 2, 2 shards, "
            "52 s wall, CPU time not recorded, 900 block evaluations.") in r.output
    # per 1,000 questions from the runs that recorded it: 15 s / 50 q, 6.5 s / 25 q
    assert "Label time per 1,000 items: arc_easy 5.0 min, piqa 4.3 min." in r.output
    assert "Router: 4 epochs done of 10." in r.output
    meta = json.loads((work / "labels/meta.json").read_text())
    meta["runs"][0]["cpu_seconds"] = 29.4
    (work / "labels/meta.json").write_text(json.dumps(meta))
    r = CliRunner().invoke(build, ["--work", str(work), "--status"])
    assert "52 s wall, 49 CPU s, 900 block evaluations." in r.output
    assert not (tmp_path / "out").exists()
    missing = CliRunner().invoke(build, ["--work", str(work)])
    assert missing.exit_code == 2 and "--out" in missing.output

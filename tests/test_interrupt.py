"""Interrupted search, labelling, training and conversion resume to the outputs of an
uninterrupted run; a conversion never leaves a partial bundle.

An interruption is made at a seeded random point: the n-th call of a function the step runs
(its save of a phase, a shard, an epoch checkpoint, a stage of the conversion), just before
it, just after it, or half-way through writing its file. Ctrl-C is a KeyboardInterrupt raised
there in this process; a kill is SIGKILL of a child process that runs the step. The step is
then rerun here and its output compared with a reference run's.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
SEED = 20261128
KILLS_PER_STEP = 2

ARC = [("Which gas do plants need?", ["oxygen", "carbon dioxide", "water"], "B"),
       ("How do you boil an egg?", ["in water", "in the sky", "in a glass"], "A"),
       ("Is the sky blue?", ["yes", "no", "today"], "A"),
       ("What is the capital of France?", ["Paris", "paris", "France"], "A"),
       ("How are you today?", ["fine", "thank you", "hello"], "A")]
PIQA = [("Boil an egg", "put it in boiling water", "put it in the sky", 0),
        ("Fill the glass", "pour water into it", "empty it", 0),
        ("Say hello", "wave your hand", "say hello, how are you", 1)]
SETS = {"early": [1, 2], "middle": [2, 3], "late": [3, 4]}
WORDS = ["water", "plants", "gas", "sky", "blue", "egg", "glass", "empty", "paris", "france",
         "boil", "fine", "hello", "today", "carbon", "dioxide", "minutes", "capital", "true"]


# -- the four steps, as run here and in the child process --------------------------------------


def run_search(w: dict, out: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from convert.search import run_search as search
    from pudding_mlx.data import calibration_examples

    model = AutoModelForCausalLM.from_pretrained(w["llm"]).float().eval()
    tok = AutoTokenizer.from_pretrained(w["llm"])
    examples = {"arc_easy": calibration_examples("arc_easy", 5, 0, w["data"])}
    search(model, tok, examples, {"model": "tiny", "seed": 0}, out, k=2, progress=False)


def label_config(w: dict):
    from convert.labels import LabelConfig, candidate_table

    return LabelConfig(model=w["llm"], tasks=["arc_easy", "piqa"],
                       candidates=candidate_table(w["candidates"]), data_dir=w["data"],
                       dtype="float32", shard_size=2, batch_size=2)


def run_labels(w: dict, out: str) -> None:
    from convert.labels import make_labels

    make_labels(out, label_config(w), device="cpu")


def train_config(w: dict):
    from convert.train_router import TrainConfig

    return TrainConfig(backbone=w["encoder"], epochs=3, batch_size=4, lr=1e-3, warmup_steps=3,
                       max_length=24, head_init="random")


def run_training(w: dict, out: str) -> None:
    from convert.train_router import train

    train(w["labels"], out, train_config(w), device="cpu")


def run_conversion(w: dict, out: str) -> None:
    from convert.to_bundle import ConvertSettings, write_bundle
    from convert.to_mlx import MLXSettings

    write_bundle(w["llm"], w["candidates"], w["router"], out,
                 ConvertSettings(mlx=MLXSettings("float32"), coreml=False))


STEPS = {"search": run_search, "labels": run_labels, "training": run_training,
         "conversion": run_conversion}

# Where each step can be interrupted: (target "module:attr", calls it makes, moments).
# "partial" writes half of the file the call writes (its first argument naming a temporary
# file), then stops: a kill in the middle of a write.
POINTS = {
    "search": [("convert.search:write_json", 4, ("before", "after")),
               ("pathlib:Path.write_text", 4, ("partial",))],
    "labels": [("convert.labels:write_shard", 4, ("before", "after")),
               ("pyarrow.parquet:write_table", 4, ("partial",)),
               ("convert.labels:write_json", 2, ("before", "after"))],
    "training": [("convert.train_router:_save_checkpoint", 3, ("before", "after")),
                 ("safetensors.torch:save_file", 6, ("partial",)),
                 ("convert.router_model:Router.save", 1, ("before", "after")),
                 ("convert.train_router:write_json", 1, ("after",))],
    "conversion": [("convert.to_mlx:convert_llm_to_mlx", 1, ("after",)),
                   ("convert.to_mlx:check_parity", 1, ("after",)),
                   ("convert.to_bundle:_router_checks", 1, ("before", "after")),
                   ("convert.to_bundle:write_manifest", 1, ("before", "after")),
                   ("pudding_mlx.files:replace_folder", 1, ("before", "after"))],
}


def kill_points(step: str, count: int, rng: random.Random) -> list[tuple[str, int, str]]:
    every = [(t, n, when) for t, calls, whens in POINTS[step]
             for n in range(1, calls + 1) for when in whens]
    return rng.sample(every, count)


def _owner(target: str):
    module, attr = target.split(":")
    owner = importlib.import_module(module)
    *path, name = attr.split(".")
    for p in path:
        owner = getattr(owner, p)
    return owner, name


def arm(target: str, n: int, when: str, stop, setattr_=setattr) -> None:
    """Make the n-th call of `target` call `stop()` at `when`."""
    owner, name = _owner(target)
    real = getattr(owner, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        hit = calls[0] == n
        if hit and when == "before":
            stop()
        result = real(*args, **kwargs)
        if hit and when == "partial":
            path = Path(next(str(a) for a in args
                             if isinstance(a, (str, os.PathLike)) and "tmp" in str(a)))
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
            stop()
        if hit and when == "after":
            stop()
        return result

    setattr_(owner, name, wrapper)


def child_main(specs_json: str) -> None:
    """In the child: import once, then run each spec in a forked process that SIGKILLs itself
    at its point; prints the exit codes as JSON."""
    import torch  # noqa: F401  (imported before forking: each run starts warm)
    import transformers  # noqa: F401

    codes = []
    for spec in json.loads(specs_json):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                import torch

                torch.set_num_threads(spec["threads"])
                arm(spec["target"], spec["n"], spec["when"],
                    lambda: os.kill(os.getpid(), signal.SIGKILL))
                STEPS[spec["step"]](spec["work"], spec["out"])
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            os._exit(code)
        codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    print(json.dumps(codes))


def killed_runs(specs: list[dict]) -> list[int]:
    """Run each spec's step in a child process killed at its point; returns the exit codes."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_interrupt; "
            "test_interrupt.child_main(sys.argv[2])")
    env = dict(os.environ, PUDDING_OPENBLAS="0", TQDM_DISABLE="1")
    done = subprocess.run([sys.executable, "-c", code, str(TESTS), json.dumps(specs)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def ctrl_c_run(step: str, w: dict, out: Path, point, monkeypatch) -> None:
    def stop():
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        arm(*point, stop, setattr_=m.setattr)
        with pytest.raises(KeyboardInterrupt):
            STEPS[step](w, str(out))


# -- inputs and uninterrupted reference outputs ---------------------------------------------------


def write_data(root: Path) -> None:
    arc = [{"id": f"arc{i}", "question": q, "answerKey": k,
            "choices": {"text": c, "label": ["A", "B", "C"]}} for i, (q, c, k) in enumerate(ARC)]
    piqa = [{"goal": g, "sol1": a, "sol2": b, "label": y} for g, a, b, y in PIQA]
    for task, rows in (("arc_easy", arc), ("piqa", piqa)):
        (root / task).mkdir(parents=True)
        (root / task / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_random_labels(folder: Path, seed: int = 0) -> None:
    from convert.label_store import write_shard
    from pudding_mlx.files import write_json

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    rows = []
    for i in range(24):
        task = ("arc_easy", "piqa")[i % 2]
        context = f"Question: {' '.join(rng.choice(WORDS, 5))}?\nAnswer:"
        gold = int(rng.integers(2))
        rows += [{"task": task, "qid": f"{task}:{i}", "choice": c, "gold": gold,
                  "text": f"{context} {rng.choice(WORDS)}", "context": context,
                  "loglik": rng.normal(-2, 1, 3).tolist()} for c in range(2)]
    shards = [rows[i : i + 16] for i in range(0, len(rows), 16)]
    for s, chunk in enumerate(shards):
        write_shard(folder, s, {k: [r[k] for r in chunk] for k in chunk[0]})
    write_json(folder / "meta.json", {"candidates": [{"name": n, "skip": s}
                                                     for n, s in SETS.items()],
                                      "num_shards": len(shards), "complete": True})


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    import torch
    from helpers import tiny_llama, tiny_router, tiny_wordpiece_tokenizer
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("interrupt")
    tiny_llama(root / "llm", num_layers=6)
    tiny_router(root / "router", list(SETS), max_length=32)
    (root / "candidates.json").write_text(json.dumps(
        {"candidates": [{"name": n, "skip": s} for n, s in SETS.items()], "settings": {}}))
    write_data(root / "data")
    write_random_labels(root / "labels")
    tok = tiny_wordpiece_tokenizer()
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=64,
                         max_position_embeddings=64)).save_pretrained(root / "encoder")
    tok.save_pretrained(root / "encoder")
    names = {"llm": "llm", "router": "router", "candidates": "candidates.json", "data": "data",
             "labels": "labels", "encoder": "encoder", "root": ""}
    return {k: str(root / name) for k, name in names.items()}


@pytest.fixture(scope="module")
def reference(work):
    """Each step's output from one uninterrupted run."""
    root = Path(work["root"]) / "reference"
    outs = {"search": root / "candidates.json", "labels": root / "labels",
            "training": root / "training", "conversion": root / "bundle"}
    for step, out in outs.items():
        STEPS[step](work, str(out))
    return outs


# -- what "the same output" means for each step ---------------------------------------------------


def search_result(out: Path) -> dict:
    """candidates.json without its timings and work counters (a resumed run skips work)."""
    d = json.loads(out.read_text())
    for c in d["candidates"]:
        c["trajectory"] = [(p["block"], p["loss"]) for p in c["trajectory"]]
    d.pop("setup_seconds")
    return d


def label_result(out: Path) -> dict:
    from convert.label_store import read_labels

    t = read_labels(out)
    assert not list(out.glob(".*.tmp"))  # a resumed run removes what a killed writer left
    meta = {k: v for k, v in t.meta.items() if k not in ("stats", "runs")}  # run records
    return {"meta": meta, "rows": list(zip(t.task, t.qid, t.choice.tolist(), t.gold.tolist(),
                                           t.text, t.context, strict=True)),
            "loglik": t.loglik.tobytes()}


def training_result(out: Path) -> dict:
    from safetensors.numpy import load_file

    assert not (out / "checkpoint").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    weights = load_file(str(out / "router" / "model.safetensors"))
    return {"weights": {k: v.tobytes() for k, v in weights.items()},
            "history": [{k: v for k, v in h.items() if k != "seconds"}  # wall time differs
                        for h in metrics["history"]],
            "eval_mse": metrics["eval_mse"],
            "router_files": sorted(p.name for p in (out / "router").iterdir())}


def conversion_result(out: Path) -> dict:
    from pudding_mlx.bundle import MANIFEST, hash_tree, read_manifest, verify_files

    verify_files(out, read_manifest(out))
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return {"files": hash_tree(out), "manifest": json.loads((out / MANIFEST).read_text())}


RESULTS = {"search": search_result, "labels": label_result, "training": training_result,
           "conversion": conversion_result}


def prepare(step: str, out: Path, old_bundle) -> None:
    """Conversions replace an existing bundle: interruptions must leave it as it was."""
    if step == "conversion":
        shutil.copytree(old_bundle.path, out)


def check_after_interruption(step: str, out: Path, old_bundle, reference) -> None:
    """What an interrupted conversion leaves: the old bundle intact, or the complete new one."""
    if step != "conversion":
        return
    from pudding_mlx.bundle import hash_tree, read_manifest, verify_files

    verify_files(out, read_manifest(out))
    assert hash_tree(out) in (hash_tree(old_bundle.path), hash_tree(reference[step]))


def _plan(kind: str, per_step: int) -> list:
    rng = random.Random(f"{SEED}-{kind}")
    return [(step, point) for step in STEPS for point in kill_points(step, per_step, rng)]


@pytest.mark.parametrize("step, point", _plan("ctrl-c", 1), ids=lambda x: str(x))
def test_ctrl_c_then_resume_equals_uninterrupted(work, reference, shared_tiny_bundle, tmp_path,
                                                 step, point, monkeypatch):
    out = tmp_path / ("bundle" if step == "conversion" else "out")
    prepare(step, out, shared_tiny_bundle)
    ctrl_c_run(step, work, out, point, monkeypatch)
    check_after_interruption(step, out, shared_tiny_bundle, reference)
    STEPS[step](work, str(out))
    assert RESULTS[step](out) == RESULTS[step](reference[step])


@pytest.fixture(scope="module")
def kills(work, shared_tiny_bundle, tmp_path_factory):
    """Each step run once in a child process and SIGKILLed at its seeded point."""
    import torch

    root = tmp_path_factory.mktemp("killed")
    plan = _plan("kill", KILLS_PER_STEP)
    specs = []
    for i, (step, (target, n, when)) in enumerate(plan):
        out = root / str(i) / ("bundle" if step == "conversion" else "out")
        out.parent.mkdir()
        prepare(step, out, shared_tiny_bundle)
        specs.append({"step": step, "work": work, "out": str(out), "target": target, "n": n,
                      "when": when, "threads": torch.get_num_threads()})
    codes = killed_runs(specs)
    return [(step, Path(spec["out"]), point, code)
            for (step, point), spec, code in zip(plan, specs, codes, strict=True)]


@pytest.mark.parametrize("i", range(len(STEPS) * KILLS_PER_STEP),
                         ids=[f"{step}-{point}" for step, point in _plan("kill", KILLS_PER_STEP)])
def test_kill_then_resume_equals_uninterrupted(kills, work, reference, shared_tiny_bundle, i):
    step, out, point, code = kills[i]
    assert code == -signal.SIGKILL, f"{step} at {point}: exit code {code}, not killed"
    check_after_interruption(step, out, shared_tiny_bundle, reference)
    STEPS[step](work, str(out))
    assert RESULTS[step](out) == RESULTS[step](reference[step])


def test_kill_between_the_two_renames_restores_the_old_bundle(tmp_path):
    """The one moment a replaced folder is absent: the next write puts the old one back
    before it starts (and clears the dead process's temporary folder)."""
    from pudding_mlx.files import atomic_folder, clean_stale

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    dest = tmp_path / "bundle"
    old = tmp_path / f".bundle.old-{pid}-abc"
    (old / "x").mkdir(parents=True)
    (old / "x" / "pudding.json").write_text("old")
    (tmp_path / f".bundle.tmp-{pid}-def").mkdir()
    (tmp_path / f".bundle.tmp-{os.getpid()}-live").mkdir()  # a live process's: kept
    (tmp_path / ".bundle.tmp-zzz").mkdir()  # not ours: kept
    removed = clean_stale(dest)
    assert sorted(p.name for p in removed) == [f".bundle.old-{pid}-abc", f".bundle.tmp-{pid}-def"]
    assert (dest / "pudding.json").read_text() == "old"
    assert {p.name for p in tmp_path.iterdir()} == {
        ".bundle.tmp-zzz", f".bundle.tmp-{os.getpid()}-live", "bundle"}
    with pytest.raises(RuntimeError), atomic_folder(dest) as tmp:
        (tmp / "pudding.json").write_text("new")
        raise RuntimeError("failed check")
    assert (dest / "pudding.json").read_text() == "old"
    with atomic_folder(dest) as tmp:
        (tmp / "pudding.json").write_text("new")
    assert (dest / "pudding.json").read_text() == "new"

"""`pudding eval` against an independent reference: a plain HF torch forward pass with our own
log-softmax and lm-eval's decision rules, written out by hand here."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_bundle, torch_greedy, torch_logits, torch_route

TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq")
WORDS = ("water", "glass", "egg", "plants", "air", "sky", "blue", "fine", "paris", "answer",
         "question", "boil", "carbon", "capital", "france", "true", "empty", "thank", "you")


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _distinct(rng: random.Random, k: int) -> list[str]:
    """k choices of different texts and lengths (no exact ties between choices)."""
    out: list[str] = []
    while len(out) < k:
        c = _text(rng, rng.randint(1, 4))
        if all(c != o and len(c) != len(o) for o in out):
            out.append(c)
    return out


def write_data(root: Path, n: int = 5, seed: int = 0) -> Path:
    """Tiny rows in the hub formats: train (for static:best) and validation splits."""
    rng = random.Random(seed)

    def write(task, split, rows):
        (root / task).mkdir(parents=True, exist_ok=True)
        (root / task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    for split in ("train", "validation"):
        write("arc_easy", split, [
            {"id": f"e-{split}-{i}", "question": _text(rng, 5) + "?",
             "choices": {"text": _distinct(rng, 4), "label": list("ABCD")},
             "answerKey": "ABCD"[i % 4]} for i in range(n)])
        write("arc_challenge", split, [
            {"id": f"c-{split}-{i}", "question": _text(rng, 5) + "?",
             "choices": {"text": _distinct(rng, 3), "label": list("123")},
             "answerKey": "123"[i % 3]} for i in range(n)])
        write("piqa", split, [
            {"goal": _text(rng, 4), **dict(zip(("sol1", "sol2"), _distinct(rng, 2), strict=True)),
             "label": i % 2} for i in range(n)])
        write("winogrande", split, [
            {"sentence": _text(rng, 3) + " _ " + _text(rng, 3) + ".",
             **dict(zip(("option1", "option2"), _distinct(rng, 2), strict=True)),
             "answer": str(1 + i % 2)} for i in range(n)])
    write("boolq", "validation", [
        {"passage": _text(rng, 8), "question": _text(rng, 4), "answer": bool(i % 2)}
        for i in range(n)])
    # 2000 rows go to the calibration holdout; the rest (n) are evaluated.
    write("hellaswag", "validation", [
        {"ind": i, "activity_label": _text(rng, 1), "ctx_a": _text(rng, 4),
         "ctx_b": _text(rng, 2), "ctx": "", "endings": _distinct(rng, 4), "label": str(i % 4)}
        for i in range(2000 + n)])
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tb = tiny_bundle(root / "bundle", static=[3, 4])
    data = write_data(root / "data")
    return tb, data, root


def run(tb, data, out, **kw):
    from pudding_mlx.evaluation.run import EvalSettings, run_eval

    kw.setdefault("methods", "dense,static,static:*,static:best,static:task-best,pudding,"
                             "oracle,oracle:task,random")
    s = EvalSettings(bundle=str(tb.path), output=str(out), tasks=TASKS, data_dir=str(data),
                     best_slice=4, resamples=200, **kw)
    return run_eval(s)


# --- the reference, by hand ----------------------------------------------------------------------


def hand_loglik(model, tok, context: str, continuation: str, skip=(), mean=False) -> float:
    """log p(continuation | context): one plain forward of the concatenated ids (context and
    continuation encoded separately), blocks in `skip` removed, our own log-softmax."""
    import torch

    ctx = tok.encode(context, add_special_tokens=False)
    cont = tok.encode(continuation, add_special_tokens=False)
    logits = torch_logits(model, ctx + cont, skip).double()
    total = 0.0
    for t, token in enumerate(cont):
        row = logits[len(ctx) + t - 1]
        total += float(row[token] - torch.logsumexp(row, dim=0))
    return total / len(cont) if mean else total


def hand_correct(model, tok, e, skip) -> dict[str, int]:
    """acc and acc_norm correctness of one question: argmax of the summed log-lik, and of it
    divided by the choice's length in characters; ties go to the first choice."""
    ll = [hand_loglik(model, tok, c, a, skip) for c, a in e.eval]
    normed = [x / len(choice) for x, choice in zip(ll, e.choices, strict=True)]

    def first_max(v):
        return max(range(len(v)), key=lambda i: (v[i], -i))

    return {"acc": int(first_max(ll) == e.gold), "acc_norm": int(first_max(normed) == e.gold)}


def hand_route(tb, text: str) -> str:
    return torch_route(tb.router, tb.router_tokenizer, text).name


def hand_is_greedy(tb, context: str, continuation: str, skip) -> bool:
    """Whether every continuation token is the argmax (lm-eval's is_greedy), by hand."""
    ctx = tb.tokenizer.encode(context, add_special_tokens=False)
    cont = tb.tokenizer.encode(continuation, add_special_tokens=False)
    return torch_greedy(tb.model, ctx, skip, len(cont)) == cont


def test_command_matches_hand_computed_accuracy(setup, tmp_path):
    """acc, acc_norm and WinoGrande partial scoring for every method, recomputed by hand."""
    from pudding_mlx.data import calibration_examples, load_examples
    from pudding_mlx.tasks import CALIBRATION_TASKS, get_task

    tb, data, _ = setup
    res = run(tb, data, tmp_path / "out")
    model, tok = tb.model, tb.tokenizer
    sets = {c.name: c.skip for c in tb.manifest.candidates}
    names = tb.manifest.router.outputs

    # static:best: the largest mean gold log-lik (method format) on the train slice;
    # static:task-best: the same on each task's own slice (others fall back to static:best)
    per_task = {task: {} for task in CALIBRATION_TASKS}
    for name in names:
        for task in CALIBRATION_TASKS:
            per_task[task][name] = []
            for e in calibration_examples(task, 4, 0, data):
                c, a = e.prompt[e.gold]
                per_task[task][name].append(hand_loglik(model, tok, c, a, sets[name], mean=True))
    means = {n: np.mean([v for t in CALIBRATION_TASKS for v in per_task[t][n]]) for n in names}
    best = max(means, key=means.get)
    assert res["static_best"]["name"] == best
    task_best = {t: max(names, key=lambda n, t=t: np.mean(per_task[t][n])) for t in per_task}

    for task in TASKS:
        t = get_task(task)
        examples = load_examples(task, "validation", data)
        got = res["tasks"][task]
        assert [q["qid"] for q in got["questions"]] == [e.qid for e in examples]
        skips = {"dense": (), **sets, "static": (3, 4)}
        memo = {tuple(skip): [hand_correct(model, tok, e, skip) for e in examples]
                for skip in {tuple(s) for s in skips.values()}}
        both = {name: memo[tuple(skip)] for name, skip in skips.items()}
        dense = got["results"]["dense"]
        assert dense["acc"] == np.mean([c["acc"] for c in both["dense"]])
        if task != "winogrande":
            assert dense["acc_norm"] == np.mean([c["acc_norm"] for c in both["dense"]])
        per_set = {name: [c[t.metric] for c in v] for name, v in both.items()}
        expect = {"dense": per_set["dense"], "static:static": per_set["static"]}
        expect.update({f"static:{n}": per_set[n] for n in names})
        expect["static:best"] = per_set[res["static_best"]["name"]]
        expect["static:task-best"] = per_set[task_best.get(task, best)]
        # oracle:task: the candidate with the most correct answers here (first on ties)
        totals = [sum(per_set[n]) for n in names]
        task_oracle = names[totals.index(max(totals))]
        expect["oracle:task"] = per_set[task_oracle]
        assert got["task_sets"] == {"static:task-best": task_best.get(task, best),
                                    "oracle:task": task_oracle}
        # pudding: the torch router's pick from the question alone
        routed = []
        for e in examples:
            ctx, cont = e.prompt[0]
            text = (ctx[:len(ctx) - len(e.choices[0])] + "_" + cont if task == "winogrande"
                    else ctx)
            routed.append(hand_route(tb, text))
        assert [q["pudding"] for q in got["questions"]] == routed
        expect["pudding"] = [per_set[r][i] for i, r in enumerate(routed)]
        expect["oracle"] = [max(per_set[n][i] for n in names) for i in range(len(examples))]
        expect["random"] = [per_set[q["random"]][i] for i, q in enumerate(got["questions"])]
        for m, correct in expect.items():
            assert [q["correct"][m] for q in got["questions"]] == correct, (task, m)
            assert got["results"][m]["correct"] == sum(correct), (task, m)
            assert got["results"][m]["score"] == sum(correct) / len(examples)
    # the six-task average is the plain mean of the per-task scores
    six = res["averages"]["six"]["results"]["pudding"]
    assert six == pytest.approx(np.mean([res["tasks"][t]["results"]["pudding"]["score"]
                                         for t in TASKS]))


def test_torch_and_mlx_backends_agree(setup, tmp_path):
    """Same tiny model: per-choice log-liks within 1e-3 and identical accuracies."""
    tb, data, _ = setup
    methods = "dense,static:*,pudding,oracle"
    a = run(tb, data, tmp_path / "mlx", methods=methods)
    b = run(tb, data, tmp_path / "torch", methods=methods, backend="torch", dtype="float32",
            device="cpu")
    for task in TASKS:
        for m in a["methods"]:
            diff = a["tasks"][task]["results"][m]["score"] - b["tasks"][task]["results"][m]["score"]
            assert abs(diff) <= 0.005, (task, m)
        for f in (tmp_path / "mlx" / "cache" / task).glob("skip-*.json"):
            x = json.loads(f.read_text())["values"]
            y = json.loads((tmp_path / "torch" / "cache" / task / f.name).read_text())["values"]
            for q in x:
                np.testing.assert_allclose(x[q][0], y[q][0], atol=1e-3)
                assert x[q][1] == y[q][1]


def test_rerun_reuses_cache_and_writes_outputs(setup, tmp_path, monkeypatch):
    import pudding_mlx.evaluation.scoring as eval_scoring

    tb, data, _ = setup
    out = tmp_path / "out"
    first = run(tb, data, out, methods="dense,static:early,pudding")
    assert {p.name for p in out.iterdir()} >= {"results.md", "results.json",
                                               "skip_heatmap.png", "cache"}

    def fail(*args, **kwargs):
        raise AssertionError("scored again despite the cache")

    monkeypatch.setattr(eval_scoring.MLXScorer, "score", fail)
    again = run(tb, data, out, methods="dense,static:early,pudding", limit=3)
    for task in TASKS:
        qids = {q["qid"]: q for q in first["tasks"][task]["questions"]}
        for q in again["tasks"][task]["questions"]:
            assert q["correct"] == qids[q["qid"]]["correct"]
        assert again["tasks"][task]["n"] == 3
    freq = np.array(first["tasks"]["piqa"]["skip_frequency"])
    assert freq.sum() == pytest.approx(2.0)  # every candidate skips two blocks
    # another output folder reading the same --cache: nothing scored again, same answers
    shared = run(tb, data, tmp_path / "other", methods="dense,static:early,pudding",
                 cache=str(out / "cache"))
    assert not (tmp_path / "other" / "cache").exists()
    for task in TASKS:
        assert shared["tasks"][task]["questions"] == first["tasks"][task]["questions"]


def test_hellaswag_evaluation_excludes_holdout(setup):
    from pudding_mlx.data import load_examples
    from pudding_mlx.evaluation.examples import eval_examples

    _, data, _ = setup
    holdout = {e.qid for e in load_examples("hellaswag", "train", data)}
    split, examples = eval_examples("hellaswag", str(data), None, 0)
    assert split == "validation" and len(holdout) == 2000 and len(examples) == 5
    assert not holdout & {e.qid for e in examples}


def test_limit_is_a_seeded_subset_in_data_order(setup):
    from pudding_mlx.evaluation.examples import eval_examples

    _, data, _ = setup
    _, full = eval_examples("piqa", str(data), None, 0)
    _, a = eval_examples("piqa", str(data), 4, 0)
    _, b = eval_examples("piqa", str(data), 4, 0)
    order = [e.qid for e in full]
    assert [e.qid for e in a] == [e.qid for e in b]
    assert [order.index(e.qid) for e in a] == sorted(order.index(e.qid) for e in a)
    _, c = eval_examples("piqa", str(data), 5, 0)  # a larger limit extends a smaller one
    assert {e.qid for e in a} < {e.qid for e in c}


def test_oracle_and_random_from_scores():
    """Brute force over candidates on made-up log-liks."""
    from pudding_mlx.evaluation.methods import Method, task_outcomes
    from pudding_mlx.tasks import Example, get_task

    rng = np.random.default_rng(0)
    sets = {"a": [1], "b": [2], "c": [3]}
    examples, scores = [], {"dense": {}, "skip-1": {}, "skip-2": {}, "skip-3": {}}
    for i in range(40):
        choices = ("x", "yy", "zzz", "w")
        examples.append(Example("hellaswag", f"q{i}", choices, i % 4, (), (), ""))
        for key in scores:
            scores[key][f"q{i}"] = [list(rng.normal(size=4) * 3), [1, 1, 1, 1]]
    out = task_outcomes(get_task("hellaswag"), examples, [Method("oracle"), Method("random")],
                        sets, ["a", "b", "c"], scores, None, {}, seed=7)
    for q, e in enumerate(examples):
        normed = {n: np.array(scores[f"skip-{s[0]}"][e.qid][0]) / [1, 2, 3, 1]
                  for n, s in sets.items()}
        margins = {n: v[e.gold] - np.delete(v, e.gold).max() for n, v in normed.items()}
        assert out["oracle"]["chosen"][q] == max(margins, key=margins.get)
        assert out["oracle"]["correct"][q] == int(max(margins.values()) > 0)
        r = out["random"]["chosen"][q]
        assert out["random"]["correct"][q] == int(np.argmax(normed[r]) == e.gold)
    again = task_outcomes(get_task("hellaswag"), examples, [Method("random")], sets,
                          ["a", "b", "c"], scores, None, {}, seed=7)
    assert again["random"]["chosen"] == out["random"]["chosen"]
    assert len(set(out["random"]["chosen"])) == 3


def test_method_and_set_parsing():
    from pudding_mlx.errors import PuddingError
    from pudding_mlx.evaluation.methods import parse_methods
    from pudding_mlx.evaluation.sets import parse_set

    sets = {"a": [1], "b": [2], "static": [3], "sleb": [4]}
    got = parse_methods("random,pudding,oracle:task,static:*,dense,static:task-best,static",
                        sets, ["a", "b"], "static")
    assert [str(m) for m in got] == [
        "dense", "static:a", "static:b", "static:static", "static:sleb", "static:task-best",
        "pudding", "oracle:task", "random"]
    assert parse_set("sleb=9, 3,7") == ("sleb", [3, 7, 9])
    for bad in ("sleb", "=1,2", "x=1,a", "best=1"):
        with pytest.raises(PuddingError):
            parse_set(bad)
    with pytest.raises(PuddingError, match="unknown method"):
        parse_methods("static:nope", sets, ["a", "b"], "static")
    with pytest.raises(PuddingError, match="unknown method"):
        parse_methods("oracle:nope", sets, ["a", "b"], "static")


def test_sets_file_forms(tmp_path):
    from pudding_mlx.errors import PuddingError
    from pudding_mlx.evaluation.sets import read_sets_file

    one = tmp_path / "sleb.json"  # the SLEB baseline's single set
    one.write_text(json.dumps({"name": "sleb-ppl-k6", "skip": [26, 3, 7], "loss": "perplexity"}))
    assert read_sets_file(one) == {"sleb-ppl-k6": [3, 7, 26]}
    many = tmp_path / "candidates.json"
    many.write_text(json.dumps({"candidates": [{"name": "a", "skip": [2]},
                                               {"name": "b", "skip": [4, 3]}]}))
    assert read_sets_file(many) == {"a": [2], "b": [3, 4]}
    one.write_text(json.dumps({"skip": ["x"]}))
    with pytest.raises(PuddingError, match="skip"):
        read_sets_file(one)


def test_cli_runs_and_reports_bad_input(setup, tmp_path):
    from click.testing import CliRunner

    from pudding_mlx.errors import PuddingError
    from pudding_mlx.evaluation.command import evaluate

    tb, data, _ = setup
    sets_file = tmp_path / "sleb.json"
    sets_file.write_text(json.dumps([{"name": "sleb", "skip": [2, 4]}]))
    args = [str(tb.path), "-o", str(tmp_path / "out"), "--data-dir", str(data), "--tasks",
            "piqa,winogrande", "--methods", "dense,static:sleb,static:mine,pudding",
            "--extra-set", "mine=1,5", "--sets-file", str(sets_file), "--limit", "4"]
    r = CliRunner().invoke(evaluate, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["methods"] == ["dense", "static:sleb", "static:mine", "pudding"]
    assert res["sets"]["mine"] == [1, 5] and res["sets"]["sleb"] == [2, 4]
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| static:mine |" in md and "pudding minus" in md
    with pytest.raises(PuddingError, match="unknown method"):
        CliRunner().invoke(evaluate, [*args[:5], "--methods", "nope"], catch_exceptions=False)


@pytest.mark.slow
def test_smollm2_backends_agree(tmp_path):
    """The real SmolLM2-135M bundle (fp32): MLX and torch accuracies within 0.5 points.

    20 questions per task keep it to a few minutes on a quiet 2-core CPU (40 agreed exactly
    too, but took 36 minutes on a shared one)."""
    from helpers import tiny_router

    from convert.assets import smollm2_gguf
    from convert.to_bundle import ConvertSettings, MLXSettings, write_bundle
    from pudding_mlx.evaluation.run import EvalSettings, run_eval

    tiny_router(tmp_path / "router", ["a"], max_length=32)
    (tmp_path / "candidates.json").write_text(json.dumps({"candidates": [
        {"name": "a", "skip": [5, 11, 17, 20, 23, 26], "task": "piqa", "k": 6}]}))
    write_bundle(str(smollm2_gguf()), tmp_path / "candidates.json", tmp_path / "router",
                 tmp_path / "bundle", ConvertSettings(MLXSettings("float32"), coreml=False))
    res = {}
    for backend in ("mlx", "torch"):
        res[backend] = run_eval(EvalSettings(
            bundle=str(tmp_path / "bundle"), output=str(tmp_path / backend),
            tasks=("arc_easy", "piqa"), methods="dense,static:a", limit=20, backend=backend,
            dtype="float32", device="cpu", resamples=100))
    for task in ("arc_easy", "piqa"):
        for m in ("dense", "static:a"):
            a, b = (res[k]["tasks"][task]["results"][m]["score"] for k in ("mlx", "torch"))
            assert abs(a - b) <= 0.005, (task, m, a, b)
        x = json.loads((tmp_path / "mlx/cache" / task / "dense.json").read_text())["values"]
        y = json.loads((tmp_path / "torch/cache" / task / "dense.json").read_text())["values"]
        for q in x:
            # fp32 in both; long PIQA answers sum ~50 token log-probs (seen: 1e-2 abs, 5e-5 rel)
            np.testing.assert_allclose(x[q][0], y[q][0], rtol=5e-4, atol=2e-3)
    assert res["mlx"]["tasks"]["arc_easy"]["results"]["dense"]["score"] > 0.3  # chance: 0.25


def test_lm_eval_adapter_with_a_stub_harness(setup, monkeypatch):
    """Without lm-eval (CI): stand in its imports, then check the registered model's
    log-likelihoods and greedy flags against the hand computation (router mode: the routed
    set). The lm_eval-marked tests below run the real harness."""
    import importlib.util
    import sys
    import types

    registry = {}
    api_model = types.ModuleType("lm_eval.api.model")
    api_model.LM = type("LM", (), {"__init__": lambda self: None})
    api_registry = types.ModuleType("lm_eval.api.registry")
    api_registry.register_model = lambda name: lambda cls: registry.setdefault(name, cls)
    utils = types.ModuleType("lm_eval.utils")  # rolling windows: not exercised here
    utils.get_rolling_token_windows = utils.make_disjoint_window = None
    for name, mod in {"lm_eval": types.ModuleType("lm_eval"),
                      "lm_eval.api": types.ModuleType("lm_eval.api"),
                      "lm_eval.api.model": api_model,
                      "lm_eval.api.registry": api_registry,
                      "lm_eval.utils": utils}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    # a fresh copy, kept out of sys.modules (where the real harness's import may be)
    spec = importlib.util.find_spec("pudding_mlx.evaluation.lm_eval_adapter")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))

    tb, _, _ = setup
    lm = registry["pudding-mlx"](bundle=str(tb.path))
    sets = {c.name: c.skip for c in tb.manifest.candidates}
    egg = "Question: How do you boil an egg?\nAnswer:"
    ids = tb.tokenizer.encode(egg, add_special_tokens=False)
    # the model's own next token (one: this random model's next ones are stray bytes)
    own = tb.tokenizer.decode(torch_greedy(tb.model, ids, sets[hand_route(tb, egg)], 1))
    reqs = [(egg, " put it in water"), (egg, " fine"), (egg, own),
            ("She poured the water into the glass", " because it was empty.")]
    got = lm.loglikelihood([types.SimpleNamespace(args=r) for r in reqs])
    flags = []
    for (ctx, cont), (ll, is_greedy) in zip(reqs, got, strict=True):
        skip = sets[hand_route(tb, ctx)]
        assert ll == pytest.approx(hand_loglik(tb.model, tb.tokenizer, ctx, cont, skip),
                                   abs=1e-4)
        assert is_greedy == hand_is_greedy(tb, ctx, cont, skip)
        flags.append(is_greedy)
    assert flags == [False, False, True, False]


# --- the real lm-evaluation-harness (`make test-lm-eval`; CI does not install lm-eval) ---------


LM_EVAL_UNTIL = ["\n", "sw"]  # "sw" cuts one row's generation short (the tiny model's "Whswut")


def write_lm_eval_tasks(root: Path, tb, n: int = 5, seed: int = 10) -> tuple[Path, list[dict]]:
    """A local lm-eval task per request type over n rows (tasks as YAML, written as JSON);
    even rows' `next` is the routed model's own greedy token (by torch). The seed gives rows
    routed to both sets, and right and wrong answers, greedy flags and exact matches."""
    rng = random.Random(seed)
    sets = {c.name: c.skip for c in tb.manifest.candidates}
    rows = []
    for i in range(n):
        q = _text(rng, 5) + "?"
        ids = tb.tokenizer.encode(q, add_special_tokens=False)
        own = tb.tokenizer.decode(torch_greedy(tb.model, ids, sets[hand_route(tb, q)], 1))
        rows.append({"q": q, "choices": _distinct(rng, 4), "gold": i % 4, "text": _text(rng, 9),
                     "next": own if i % 2 == 0 else " " + _text(rng, 1)})
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = {"dataset_path": "json", "test_split": "test", "doc_to_text": "{{q}}",
              "dataset_kwargs": {"data_files": {"test": str(data)},
                                 "cache_dir": str(root / "datasets")}}
    tasks = {
        "tiny_mc": {"output_type": "multiple_choice", "doc_to_choice": "choices",
                    "doc_to_target": "gold", "metric_list": [{"metric": "acc"},
                                                             {"metric": "acc_norm"}]},
        "tiny_next": {"output_type": "loglikelihood", "doc_to_target": "{{next}}",
                      "target_delimiter": "", "metric_list": [{"metric": "acc"}]},
        "tiny_text": {"output_type": "loglikelihood_rolling", "doc_to_text": "",
                      "doc_to_target": "{{text}}", "metric_list": [{"metric": "word_perplexity"}]},
        "tiny_gen": {"output_type": "generate_until", "doc_to_target": "{{next}}",
                     "generation_kwargs": {"until": LM_EVAL_UNTIL, "max_gen_toks": 3},
                     "metric_list": [{"metric": "exact_match"}]},
    }
    (root / "tasks").mkdir()
    for name, cfg in tasks.items():
        (root / "tasks" / f"{name}.yaml").write_text(json.dumps({"task": name, **common, **cfg}))
    return root / "tasks", rows


def hand_mc(tb, row, skip) -> tuple[list[float], int, int]:
    """Per-choice log-liks, acc and acc_norm of one tiny_mc row, by hand."""
    ll = [hand_loglik(tb.model, tb.tokenizer, row["q"], " " + c, skip) for c in row["choices"]]
    normed = [x / len(c) for x, c in zip(ll, row["choices"], strict=True)]
    return ll, int(np.argmax(ll) == row["gold"]), int(np.argmax(normed) == row["gold"])


@pytest.fixture(scope="module")
def lm_eval_tasks(setup, tmp_path_factory):
    tb, _, _ = setup
    return write_lm_eval_tasks(tmp_path_factory.mktemp("lm-eval"), tb)


@pytest.mark.lm_eval
def test_real_lm_eval_matches_hand_computation(setup, lm_eval_tasks):
    """simple_evaluate on four local tasks (multiple choice, loglikelihood, rolling,
    generation) in router mode: every response and metric against the hand computation."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import pudding_mlx.evaluation.lm_eval_adapter  # noqa: F401  (registers "pudding-mlx")

    tb, _, _ = setup
    tasks, rows = lm_eval_tasks
    res = simple_evaluate(model="pudding-mlx", model_args=f"bundle={tb.path},mode=router",
                          tasks=["tiny_mc", "tiny_next", "tiny_text", "tiny_gen"],
                          task_manager=TaskManager(include_path=str(tasks)), bootstrap_iters=0)
    samples = {t: sorted(v, key=lambda s: s["doc_id"]) for t, v in res["samples"].items()}
    sets = {c.name: c.skip for c in tb.manifest.candidates}
    tok, eos = tb.tokenizer, tb.tokenizer.eos_token_id
    acc, acc_norm, greedy, lls, words, gen, routes = [], [], [], [], 0, [], set()
    for i, row in enumerate(rows):
        ctx = row["q"]
        routes |= {hand_route(tb, ctx), hand_route(tb, row["text"])}
        skip = sets[hand_route(tb, ctx)]
        ll, a, an = hand_mc(tb, row, skip)
        mc = samples["tiny_mc"][i]
        np.testing.assert_allclose([float(r[0][0]) for r in mc["resps"]], ll, atol=1e-4)
        assert (mc["acc"], mc["acc_norm"]) == (a, an)
        acc.append(a)
        acc_norm.append(an)

        nx = samples["tiny_next"][i]
        assert float(nx["resps"][0][0][0]) == pytest.approx(
            hand_loglik(tb.model, tok, ctx, row["next"], skip), abs=1e-4)
        greedy.append(hand_is_greedy(tb, ctx, row["next"], skip))
        assert nx["acc"] == int(greedy[-1])

        # rolling: log p(text | BOS), routed from the text (one window: far below 512 tokens)
        ids = tok.encode(row["text"], add_special_tokens=False)
        logits = torch_logits(tb.model, [tok.bos_token_id, *ids],
                              sets[hand_route(tb, row["text"])]).double()
        lp = torch.log_softmax(logits, -1)[torch.arange(len(ids)), ids].sum().item()
        assert float(samples["tiny_text"][i]["resps"][0][0]) == pytest.approx(lp, abs=1e-4)
        lls.append(lp)
        words += len(row["text"].split())

        out = torch_greedy(tb.model, tok.encode(ctx), skip, 3)
        out = out[:out.index(eos)] if eos in out else out
        text = re.split("|".join(LM_EVAL_UNTIL), tok.decode(out, skip_special_tokens=True))[0]
        assert samples["tiny_gen"][i]["resps"][0][0] == text
        gen.append(text == row["next"])
    got = res["results"]
    assert got["tiny_mc"]["acc,none"] == pytest.approx(np.mean(acc))
    assert got["tiny_mc"]["acc_norm,none"] == pytest.approx(np.mean(acc_norm))
    assert got["tiny_next"]["acc,none"] == pytest.approx(np.mean(greedy))
    # the rows exercise both routes, both greedy flags and both generation outcomes
    assert len(routes) == len(set(greedy)) == len(set(gen)) == 2
    assert got["tiny_text"]["word_perplexity,none"] == pytest.approx(np.exp(-sum(lls) / words))
    assert got["tiny_gen"]["exact_match,none"] == pytest.approx(np.mean(gen))


@pytest.mark.lm_eval
def test_real_lm_eval_cli_through_the_module(setup, lm_eval_tasks, tmp_path):
    """The command in the adapter's docstring, in static mode: the logged log-likelihoods
    (which tell the modes apart) and the accuracies against the hand computation."""
    import subprocess
    import sys

    tb, _, _ = setup
    tasks, rows = lm_eval_tasks
    cmd = [sys.executable, "-m", "pudding_mlx.evaluation.lm_eval_adapter", "--model", "pudding-mlx",
           "--model_args", f"bundle={tb.path},mode=static", "--tasks", "tiny_mc",
           "--include_path", str(tasks), "--output_path", str(tmp_path), "--log_samples"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    (path,) = tmp_path.rglob("results_*.json")
    got = json.loads(path.read_text())["results"]["tiny_mc"]
    (path,) = tmp_path.rglob("samples_tiny_mc_*.jsonl")
    samples = sorted(map(json.loads, path.read_text().splitlines()), key=lambda s: s["doc_id"])
    hand = [hand_mc(tb, row, tb.manifest.static.skip) for row in rows]
    for s, (ll, _, _) in zip(samples, hand, strict=True):
        np.testing.assert_allclose([float(r[0][0]) for r in s["resps"]], ll, atol=1e-4)
    assert got["acc,none"] == pytest.approx(np.mean([a for _, a, _ in hand]))
    assert got["acc_norm,none"] == pytest.approx(np.mean([an for _, _, an in hand]))


def test_torch_backend_scores_planned_sets_together(setup, monkeypatch):
    """The torch scorer's plan: a task's sets walked together (shared block prefixes once)
    give the same sums as scoring each set alone, with fewer block evaluations."""
    from convert import scoring
    from convert.eval_torch import TorchScorer
    from pudding_mlx.data import load_examples

    tb, data, _ = setup
    questions = [e.eval for e in load_examples("arc_easy", "validation", data)[:6]]
    sets = [[], [3], [3, 4], [5], [1, 2]]
    scorer = TorchScorer(str(tb.path / "model"), "cpu", "float32", batch_size=4)
    evals = []
    real_run = scoring.BlockRunner.run

    def counting_run(self, h, batch, blocks):
        blocks = list(blocks)
        evals[-1] += len(blocks) * batch.rows
        return real_run(self, h, batch, blocks)

    monkeypatch.setattr(scoring.BlockRunner, "run", counting_run)
    evals.append(0)
    alone = [scorer.score(questions, s) for s in sets]
    evals.append(0)
    scorer.plan(sets)
    together = [scorer.score(questions, s) for s in sets]
    for a, b in zip(alone, together, strict=True):
        for (sa, ca), (sb, cb) in zip(a, b, strict=True):
            np.testing.assert_allclose(sa, sb, rtol=0, atol=1e-9)
            assert ca == cb
    assert 0 < evals[1] < evals[0]
    assert not scorer.ready  # every planned set took its share

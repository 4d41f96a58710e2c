"""Quality-aware routing: the tolerance and fixed-k rules against brute-force enumerations, and
every entry point (route, generate, chat, eval, fidelity, demo) on a tiny bundle whose router
predicts KL to dense, checked against the torch router's own outputs; likelihood routers refuse
a tolerance in one line."""

from __future__ import annotations

import itertools
import json
import math
import random
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import chat_ids, run_cli, tiny_bundle, torch_greedy, torch_route

import pudding_mlx
from pudding_mlx.bundle import Manifest, read_manifest, write_manifest
from pudding_mlx.cli import cli
from pudding_mlx.errors import BundleError, PuddingError
from pudding_mlx.routing import Policy, choose, fixed_k, within_tolerance

# --- the rules, against brute force -----------------------------------------------------------


def brute_tolerance(pred, sizes, x):
    """The rule written out: from the largest size down, the first size with a candidate within
    x; there the lowest prediction (NaN last), then the first; none within x: the dense
    candidates the same way, else None."""
    value = [math.inf if math.isnan(p) else p for p in pred]

    def pick(pool):
        for size in sorted(set(sizes), reverse=True):
            group = [i for i in pool if sizes[i] == size]
            if group:
                low = min(value[i] for i in group)
                return next(i for i in group if value[i] == low)
        return None

    within = [i for i in range(len(pred)) if pred[i] <= x]  # NaN is never <= x
    return pick(within) if within else pick([i for i in range(len(pred)) if sizes[i] == 0])


def brute_fixed_k(scores, sizes, k, lower):
    group = [i for i in range(len(scores)) if sizes[i] == k]
    best = (min if lower else max)(scores[i] for i in group)
    return next(i for i in group if scores[i] == best)


def test_tolerance_rule_by_hand():
    sizes = [0, 2, 2, 4, 4, 6]
    pred = [0.01, 0.2, 0.1, 0.5, 0.5, 0.9]
    assert within_tolerance(pred, sizes, 1.0) == 5  # everything within: the largest set
    assert within_tolerance(pred, sizes, 0.9) == 5  # "at most": equal to the tolerance counts
    assert within_tolerance(pred, sizes, 0.6) == 3  # size tie and prediction tie: the first
    assert within_tolerance(pred, sizes, 0.3) == 2  # size tie: the lower prediction
    assert within_tolerance(pred, sizes, 0.05) == 0  # only dense is within
    assert within_tolerance(pred, sizes, 0.0) == 0  # none within: the dense candidate
    assert within_tolerance([0.3, 0.2], [2, 4], 0.1) is None  # no dense candidate: skip nothing
    assert within_tolerance([0.0, 0.0], [1, 2], 0.0) == 1  # tolerance 0 admits a 0 prediction
    assert within_tolerance([math.nan, 0.1], [4, 2], 1.0) == 1  # NaN never qualifies
    assert within_tolerance([0.3, 0.2, 0.1], [0, 0, 3], 0.05) == 1  # two dense: the lower
    assert within_tolerance([0.3], [2], math.inf) == 0


def test_tolerance_and_fixed_k_rules_match_brute_force():
    rng = random.Random(0)
    values = [0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0]  # few values: many ties
    seen = {"dense": 0, "none": 0, "largest": 0, "between": 0}
    for _ in range(3000):
        n = rng.randint(1, 8)
        sizes = [rng.choice([0, 1, 2, 2, 4, 4, 6, 8]) for _ in range(n)]
        pred = [rng.choice(values) if rng.random() > 0.05 else math.nan for _ in range(n)]
        x = rng.choice([0.0, 0.05, 0.2, 0.5, 1.5, math.inf])
        got = within_tolerance(pred, sizes, x)
        assert got == brute_tolerance(pred, sizes, x), (pred, sizes, x)
        key = ("none" if got is None else "dense" if sizes[got] == 0
               else "largest" if sizes[got] == max(sizes) else "between")
        seen[key] += 1
        for k, lower in itertools.product(set(sizes), (True, False)):
            finite = [0.0 if math.isnan(p) else p for p in pred]
            assert fixed_k(finite, sizes, k, lower) == brute_fixed_k(finite, sizes, k, lower)
    assert min(seen.values()) > 50, seen  # every kind of outcome was exercised


def test_choose_by_router_target():
    sizes, scores = [0, 2, 4], [0.1, 0.3, 0.6]
    assert choose(scores, sizes, "likelihood", Policy()) == 2  # the paper's argmax
    assert choose(scores, sizes, "likelihood", Policy(k=2)) == 1
    assert choose(scores, sizes, "fidelity", Policy(0.4)) == 1
    assert choose(scores, sizes, "fidelity", Policy(), default_tolerance=0.7) == 2
    assert choose(scores, sizes, "fidelity", Policy(0.2), default_tolerance=0.7) == 0
    assert choose(scores, sizes, "fidelity", Policy(k=4)) == 2
    with pytest.raises(PuddingError, match="target 'fidelity'.*likelihood score"):
        choose(scores, sizes, "likelihood", Policy(0.5))
    with pytest.raises(PuddingError, match="no default tolerance"):
        choose(scores, sizes, "fidelity", Policy())
    with pytest.raises(PuddingError, match="no candidate skips exactly 3 blocks"):
        choose(scores, sizes, "fidelity", Policy(k=3))


def test_policy_text():
    assert Policy.parse("routed") == Policy()
    assert Policy.parse("routed@0.50") == Policy(0.5) and str(Policy(0.5)) == "routed@0.5"
    assert Policy.parse("routed:k4") == Policy(k=4) and str(Policy(k=4)) == "routed:k4"
    assert Policy.parse("pudding") is None and Policy.parse("routed:4") is None
    for bad in ("routed@-1", "routed@nan", "routed@x"):
        with pytest.raises(PuddingError, match="tolerance"):
            Policy.parse(bad)


# --- a tiny bundle whose router predicts KL to dense -----------------------------------------

SETS = {"dense": [], "a1": [5], "b1": [2], "a2": [1, 2], "b2": [3, 4], "a3": [1, 3, 5],
        "b3": [2, 4, 5]}
# added to the random router head's bias, so predictions grow with size and tolerances bite
OFFSETS = [0.0, 0.5, 0.6, 1.0, 1.1, 1.5, 1.6]
DEFAULT_TOLERANCE = 1.2
TOLERANCES = [0.0, 0.3, 0.6, 1.0, 1.2, 1.45, 1.8, 5.0]
PROMPTS = ["Question: Which gas do plants absorb from the air?", "How do you boil an egg?",
           "hello, how are you today?", "She poured the water into the glass because",
           "Is it true that the sky is blue?", "The capital of France is Paris.", "thank you",
           "water glass egg plants", "0 1 2 3 4 5", "Question: yes no"]


def make_fidelity_router(tb, tolerance: float | None, offsets=OFFSETS) -> None:
    """Turn tiny_bundle's router into a fidelity router (both configs, bias shifted)."""
    with torch.no_grad():
        tb.router.head.bias += torch.tensor(offsets, dtype=torch.float32)
    tb.router.config.target = "fidelity"
    tb.router.save(tb.path / "router", tb.router_tokenizer)
    m = tb.manifest
    m.router.target, m.router.tolerance = "fidelity", tolerance
    write_manifest(tb.path, m)


@pytest.fixture(scope="module")
def fid(tmp_path_factory, one_torch_thread):
    tb = tiny_bundle(tmp_path_factory.mktemp("tolerance") / "b", sets=SETS, static=SETS["a2"])
    make_fidelity_router(tb, DEFAULT_TOLERANCE)
    return tb


@pytest.fixture(scope="module")
def pm(fid):
    return pudding_mlx.load(fid.path, router_backend="mlx")


NAMES, SIZES = list(SETS), [len(s) for s in SETS.values()]


def torch_scores(tb, text: str) -> list[float]:
    return [float(x) for x in torch_route(tb.router, tb.router_tokenizer, text).scores]


def near(scores, x) -> bool:
    """A prediction this close to the tolerance may fall either side in MLX vs torch."""
    return any(abs(s - x) < 1e-4 for s in scores)


def expected(scores, x) -> str:
    i = brute_tolerance(scores, SIZES, x)
    return "dense" if i is None else NAMES[i]


def test_route_applies_the_rule_to_the_routers_outputs(fid, pm):
    sizes_seen = set()
    for text in PROMPTS:
        scores = torch_scores(fid, text)
        for x in TOLERANCES:
            if near(scores, x):
                continue
            r = pm.route(text, tolerance=x)
            assert r.name == expected(scores, x), (text, x, scores)
            assert r.skip == SETS[r.name] and r.tolerance == x
            assert r.predicted == pytest.approx(scores[NAMES.index(r.name)], abs=1e-4)
            sizes_seen.add(len(r.skip))
        if not near(scores, DEFAULT_TOLERANCE):  # no --tolerance: the bundle's default
            assert pm.route(text).name == expected(scores, DEFAULT_TOLERANCE)
        for k in (0, 1, 2, 3):
            r = pm.route(text, k=k)
            assert r.name == NAMES[brute_fixed_k(scores, SIZES, k, lower=True)]
            assert r.k == k and r.tolerance is None
    assert sizes_seen == {0, 1, 2, 3}  # the tolerances reached every size


def test_route_without_a_dense_candidate_and_stub_scores(tmp_path):
    sets = {"a1": [5], "a2": [1, 2], "a3": [1, 3, 5]}
    tb = tiny_bundle(tmp_path / "b", sets=sets)
    make_fidelity_router(tb, None, offsets=[0.0, 0.0, 0.0])
    pm = pudding_mlx.load(tb.path, router_backend="mlx")
    pm.router.forward = lambda enc: np.array([[0.2, 0.5, 0.9]], dtype=np.float32)
    r = pm.route("hello", tolerance=0.1)
    assert (r.name, r.skip, r.index, r.reason) == ("dense", [], None, "none within tolerance")
    assert r.predicted is None and r.tolerance == 0.1
    assert pm.route("hello", tolerance=0.5).name == "a2"
    assert pm.route("hello", tolerance=0.6).name == "a2"
    assert pm.route("hello", tolerance=0.9).name == "a3"
    assert pm.route("hello", k=1).name == "a1"
    with pytest.raises(PuddingError, match="no default tolerance"):
        pm.route("hello")
    from pudding_mlx.options import describe_route

    line = describe_route(pm.route("hello", tolerance=0.1), 6)
    assert line.startswith("Route: dense (skips blocks none of 6; router ")
    assert line.endswith("; no set predicted within tolerance 0.1)")


ROUTE_LINE = re.compile(r"Route: (\S+) \(skips blocks ([\d,]+|none) of 6; router \d+\.\d ms; "
                        r"predicted KL to dense (-?\d+\.\d{4}) nats/token, tolerance 1\.2\)")


def test_generate_and_chat_with_tolerance_show_the_prediction(fid, monkeypatch, capsys):
    text = PROMPTS[0]
    scores = torch_scores(fid, text)
    assert not near(scores, 1.2)
    name = expected(scores, 1.2)
    code, out, err = run_cli(["generate", "--bundle", str(fid.path), "--prompt", text, "-m", "3",
                              "--tolerance", "1.2", "--router-backend", "mlx"],
                             monkeypatch, capsys)
    assert code == 0, err
    m = ROUTE_LINE.search(out)
    assert m and m.group(1) == name, out
    assert float(m.group(3)) == pytest.approx(scores[NAMES.index(name)], abs=2e-4)
    code, out, err = run_cli(["chat", "--bundle", str(fid.path), "-m", "2", "--tolerance", "1.2",
                              "--router-backend", "mlx"], monkeypatch, capsys,
                             stdin=(text + "\nq\n").encode())
    assert code == 0, err
    m = ROUTE_LINE.search(out)
    assert m and m.group(1) == name, out
    code, _, err = run_cli(["generate", "--bundle", str(fid.path), "--skip", "1",
                            "--tolerance", "1"], monkeypatch, capsys)
    assert code == 2 and "cannot go with --dense, --static or --skip" in err


def test_eval_routed_methods_score_as_their_chosen_sets(fid, tmp_path):
    from test_evaluate import write_data

    from pudding_mlx.evaluation.examples import eval_examples
    from pudding_mlx.evaluation.run import EvalSettings, run_eval

    tasks = ("arc_easy", "piqa", "winogrande")
    data = write_data(tmp_path / "data")
    routed = ["routed@0.6", "routed@1.2", "routed@1.8", "routed:k1", "routed:k3"]
    res = run_eval(EvalSettings(bundle=str(fid.path), output=str(tmp_path / "out"), tasks=tasks,
                                methods="dense,static:*,pudding," + ",".join(routed),
                                data_dir=str(data), resamples=50))
    assert res["methods"][-6:] == ["pudding", *routed]
    picks = set()
    for task in tasks:
        _, examples = eval_examples(task, str(data), None, 0)
        got = res["tasks"][task]
        rows = {q["qid"]: q for q in got["questions"]}
        for e in examples:
            scores, q = torch_scores(fid, e.router_text), rows[e.qid]
            for label in ["pudding", *routed]:
                policy = Policy() if label == "pudding" else Policy.parse(label)
                if policy.k is not None:
                    want = NAMES[brute_fixed_k(scores, SIZES, policy.k, lower=True)]
                else:
                    x = DEFAULT_TOLERANCE if policy.tolerance is None else policy.tolerance
                    if near(scores, x):
                        continue
                    want = expected(scores, x)
                assert q[label] == want, (task, e.qid, label, scores)
                direct = "dense" if want == "dense" else f"static:{want}"
                assert q["correct"][label] == q["correct"][direct]
                picks.add((label, want))
        for label in routed:
            skipped = np.mean([len(SETS[rows[e.qid][label]]) for e in examples])
            assert got["results"][label]["mean_skipped"] == pytest.approx(skipped)
    assert len({w for label, w in picks if label.startswith("routed@")}) >= 3
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| routed@1.2 |" in md and "routed:kN: the router's best prediction" in md


def test_fidelity_routed_rows_take_their_chosen_sets_values(fid, tmp_path):
    import pudding_mlx.fidelity.run as fidelity

    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:4]) + "\n")
    res = fidelity.run_fidelity(fidelity.FidelitySettings(
        bundle=str(fid.path), output=str(tmp_path / "o"), prompts=str(path), max_tokens=3,
        routed=("routed", "routed@0.6", "routed:k3"), router_backend="mlx", resamples=50))
    assert list(res["summary"]) == [*SETS, "static", "routed", "routed@0.6", "routed:k3"]
    assert res["routed"] == {"routed": "routed", "routed@0.6": "routed@0.6",
                             "routed:k3": "routed:k3"}
    for text, p in zip(PROMPTS, res["prompts"], strict=False):
        scores = torch_scores(fid, text)
        want = {"routed": expected(scores, DEFAULT_TOLERANCE), "routed@0.6": expected(scores, 0.6),
                "routed:k3": NAMES[brute_fixed_k(scores, SIZES, 3, lower=True)]}
        for row, name in want.items():
            if row.startswith("routed:") or not near(scores, 1.2 if row == "routed" else 0.6):
                assert p["routes"][row] == name, (text, row, scores)
            assert p[row] == p[p["routes"][row]]
        np.testing.assert_allclose(p["router_scores"], scores, atol=1e-4)
    md = (tmp_path / "o" / "results.md").read_text()
    assert "| routed@0.6 | mean " in md


def test_serve_takes_a_tolerance_in_the_request(fid, pm, shared_tiny_bundle):
    pytest.importorskip("fastapi")
    from test_serve import chat, request, serving

    text = PROMPTS[1]
    scores = torch_scores(fid, text)
    assert not near(scores, 0.6) and not near(scores, DEFAULT_TOLERANCE)
    with serving(pm, max_tokens_limit=4) as (url, _):
        for body, x in ((chat(fid.path.name, text, max_tokens=2, tolerance=0.6), 0.6),
                        (chat(fid.path.name, text, max_tokens=2), DEFAULT_TOLERANCE)):
            status, _, reply = request(url, "POST", "/v1/chat/completions", body, key=None)
            assert status == 200, reply
            info = reply["pudding"]
            assert info["set"] == expected(scores, x) and info["tolerance"] == x
            assert info["predicted"] == pytest.approx(scores[NAMES.index(info["set"])], abs=1e-4)
    plain = pudding_mlx.load(shared_tiny_bundle.path, router_backend="mlx")
    with serving(plain, max_tokens_limit=4) as (url, _):
        status, _, reply = request(url, "POST", "/v1/chat/completions",
                                   chat(plain.path.name, text, tolerance=0.6), key=None)
        assert status == 400 and "target 'fidelity'" in reply["error"]["message"]


def test_demo_rows_follow_the_tolerance_and_the_faster_setting(fid, tmp_path):
    from test_fidelity import reference

    from convert.demo import PROMPTS as DEMO_PROMPTS

    path = tmp_path / "demo.json"
    result = CliRunner().invoke(cli, ["demo", "--bundle", str(fid.path), "--max-tokens", "4",
                                      "--trials", "3", "--tolerance", "1.2", "--faster",
                                      "routed@1.8", "--json", str(path)])
    assert result.exit_code == 0, (result.output, result.exception)
    doc, tok, eos = json.loads(path.read_text()), fid.tokenizer, fid.tokenizer.eos_token_id
    assert len(doc["prompts"]) == len(DEMO_PROMPTS)
    for (_, prompt), p in zip(DEMO_PROMPTS, doc["prompts"], strict=True):
        rows = {r["setting"]: r for r in p["rows"]}
        scores = torch_scores(fid, prompt)
        ids = chat_ids(tok, prompt)
        answer = torch_greedy(fid.model, ids, [], 4, eos)
        assert rows["dense"]["answer"] == tok.decode([t for t in answer if t != eos]).strip()
        for setting, x in (("default", 1.2), ("faster", 1.8)):
            row = rows[setting]
            assert row["policy"] == f"routed@{x:g}"
            if not near(scores, x):
                assert row["name"] == expected(scores, x)
            assert row["skip"] == SETS[row["name"]]
            assert row["predicted"] == pytest.approx(scores[NAMES.index(row["name"])], abs=1e-4)
            routed = torch_greedy(fid.model, ids, SETS[row["name"]], 4, eos)
            assert row["answer"] == tok.decode([t for t in routed if t != eos]).strip()
            ref_kl, ref_agree, _ = reference(fid.model, ids, answer, SETS[row["name"]])
            assert row["kl"] == pytest.approx(ref_kl.mean(), abs=2e-3)
            assert row["agreement"] == pytest.approx(ref_agree.mean())
            assert (f"vs dense: KL {row['kl']:.3f} nats/token, top-1 "
                    f"{100 * row['agreement']:.0f}%; prefill ") in result.output


# --- likelihood routers refuse a tolerance; bundle checks --------------------------------------


def test_likelihood_router_refuses_a_tolerance_in_one_line(shared_tiny_bundle, tmp_path,
                                                          monkeypatch, capsys):
    b = str(shared_tiny_bundle.path)
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    for args in (["generate", "--bundle", b, "--tolerance", "0.5"],
                 ["chat", "--bundle", b, "--tolerance", "0.5"],
                 ["bench", "--bundle", b, "--tolerance", "0.5", "--gen-lengths", "",
                  "--prompt-lengths", "4", "--trials", "1"],
                 ["eval", b, "-o", str(tmp_path / "e"), "--tolerance", "0.5",
                  "--methods", "dense,pudding"],
                 ["eval", b, "-o", str(tmp_path / "e"), "--methods", "dense,routed@0.5"],
                 ["fidelity", b, "-o", str(tmp_path / "f"), "--prompts", str(prompts),
                  "--tolerance", "0.5"],
                 ["fidelity", b, "-o", str(tmp_path / "f"), "--prompts", str(prompts),
                  "--routed", "routed@0.5"],
                 ["demo", "--bundle", b, "--tolerance", "0.5"]):
        code, out, err = run_cli([*args, "--router-backend", "mlx"] if args[0] in (
            "generate", "chat", "bench", "fidelity") else args, monkeypatch, capsys,
            stdin=b"hello\nq\n")
        assert code == 2, (args, out, err)
        assert err.startswith("error: a tolerance needs a router that predicts each set's "
                              "degradation (target 'fidelity')"), (args, err)
        assert len(err.strip().splitlines()) == 1
        assert not (tmp_path / "e" / "results.json").exists()


def test_likelihood_router_fixed_k_is_the_argmax_among_that_size(shared_tiny_bundle):
    tb = shared_tiny_bundle
    pm = pudding_mlx.load(tb.path, router_backend="mlx")
    for text in PROMPTS[:3]:
        r = pm.route(text, k=2)
        assert r.name == torch_route(tb.router, tb.router_tokenizer, text).name == pm.route(
            text).name  # every default set skips two blocks
        assert r.predicted is None


def test_manifest_accepts_a_dense_candidate_and_checks_target_and_tolerance(fid, tmp_path,
                                                                            monkeypatch,
                                                                            capsys):
    m = read_manifest(fid.path)
    assert m.candidate("dense").skip == [] and m.router.tolerance == DEFAULT_TOLERANCE
    code, out, _ = run_cli(["info", str(fid.path), "--verify"], monkeypatch, capsys)
    assert code == 0 and "target fidelity (default tolerance 1.2)" in out
    assert re.search(r"^ +0  dense +0  tiny +likelihood +-$", out, re.M)
    d = m.to_dict()
    for change, message in [({"target": "kl"}, "router target must be one of"),
                            ({"target": "likelihood"}, "only a 'fidelity' router takes"),
                            ({"tolerance": -0.5}, "tolerance must be a number >= 0"),
                            ({"tolerance": "0.5"}, "tolerance must be a number >= 0")]:
        bad = json.loads(json.dumps(d))
        bad["router"].update(change)
        with pytest.raises(BundleError, match=message):
            Manifest.from_dict(bad)
    # router_config.json and the manifest must agree on what the router predicts
    bundle = tmp_path / "b"
    tb = tiny_bundle(bundle, sets={"dense": [], "a": [1, 2]})
    tb.manifest.router.target = "fidelity"
    write_manifest(bundle, tb.manifest)
    with pytest.raises(BundleError, match="target 'likelihood' differs from the manifest's "
                                          "'fidelity'"):
        pudding_mlx.load(bundle, router_backend="mlx")


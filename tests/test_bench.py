"""pudding bench: interleaving, the arithmetic of the summary, that the routed request really
runs only the kept blocks, and the command end to end on a tiny bundle."""

import gc
import io
import json
import os
import statistics
import subprocess
import sys

import mlx.core as mx
import pytest
from helpers import tiny_bundle
from mlx.utils import tree_flatten

import pudding_mlx.bench.memory as bench_memory
from pudding_mlx.bench.flops import DecodeBytes, Shape, combined_ideal, decode_ideal, prefill_ideal
from pudding_mlx.bench.memory import memory_compare, probe_reply
from pudding_mlx.bench.residency import Residency
from pudding_mlx.bench.router import project_router, router_study
from pudding_mlx.bench.summary import summarise
from pudding_mlx.bench.timing import Trial, make_prompt, measure, run_request, wrapper_overhead
from pudding_mlx.cli import main
from pudding_mlx.errors import PuddingError
from pudding_mlx.masking import layer_owner
from pudding_mlx.model import load

SETS = {"a": [1, 2], "b": [2, 3], "c": [3, 4]}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return tiny_bundle(tmp_path_factory.mktemp("bench") / "b", sets=SETS)


def test_measure_interleaves_after_warmup():
    seen = []
    out = measure(lambda k: seen.append(k) or k, ["dense", "routed", "mlx-lm"], trials=3,
                  warmup=1)
    assert seen[:3] == ["dense", "routed", "mlx-lm"]
    assert seen[3:] == ["dense", "routed", "mlx-lm", "routed", "mlx-lm", "dense",
                        "mlx-lm", "dense", "routed"]
    assert out == seen[3:]


def _trial(kind, p, g, ttft, total, router=0.0):
    return Trial(kind, p, g, router, ttft, total, p / ttft, 0.1, cpu_s=total / 2)


def test_summary_by_hand():
    shape = Shape(hidden=8, layers=4, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=10)
    weights = DecodeBytes.from_shape(shape, 4.0, 4)
    facts = {"shape": shape.__dict__, "decode_bytes": weights.__dict__}
    trials = [
        # time to first token at 64 tokens: dense medians 2.0 s, routed 1.6 s (router 0.1 s)
        *[_trial("dense", 64, 1, t, t) for t in (2.0, 2.2, 1.9)],
        *[_trial("routed", 64, 1, t, t, 0.1) for t in (1.6, 1.5, 1.7)],
        # 32 prompt + 9 tokens: dense ttft 1 s + 8 tokens in 4 s; routed 0.8 s + 8 in 2 s
        *[_trial("dense", 32, 9, 1.0, 5.0)] * 3,
        *[_trial("routed", 32, 9, 0.8, 2.8, 0.1)] * 3,
        *[_trial("mlx-lm", 32, 9, 1.0, 4.0)] * 3,
    ]
    s = summarise(trials, facts, skip=[1])
    (t,), (g,) = s["ttft"], s["generation"]
    assert t["ttft_speedup"] == pytest.approx(2.0 / 1.6)
    assert t["ttft_speedup_best"] == pytest.approx(1.9 / 1.5)
    assert t["ttft_speedup_cpu"] == pytest.approx(2.0 / 1.6)
    assert t["router_share_of_dense_ttft"] == pytest.approx(0.05)
    assert t["ideal_prefill"] == pytest.approx(prefill_ideal(shape, 64, 1))
    assert t["ttft_vs_ideal"] == pytest.approx(1.25 / prefill_ideal(shape, 64, 1))
    assert t["dense"]["ttft_s"] == {"median": 2.0, "min": 1.9, "max": 2.2}
    assert g["decode_speedup"] == pytest.approx((8 / 2.0) / (8 / 4.0))
    assert g["total_speedup"] == pytest.approx(5.0 / 2.8)
    assert g["total_speedup_cpu"] == pytest.approx(5.0 / 2.8)
    d_ideal = decode_ideal(weights, 32 + 4, [1])
    assert g["ideal_decode"] == pytest.approx(d_ideal)
    assert g["ideal_total"] == pytest.approx(
        combined_ideal([1.0, 4.0], [prefill_ideal(shape, 32, 1), d_ideal]))
    # Router options: the measured router time gives back the measured ratio; none gives 2/1.5.
    rows = [{"router_s": {64: 0.1}}, {"router_s": {64: 0.0}}]
    project_router(rows, s["ttft"])
    assert rows[0]["projected_ttft_vs_ideal"][64] == pytest.approx(t["ttft_vs_ideal"])
    assert rows[1]["projected_ttft_vs_ideal"][64] == pytest.approx(
        2.0 / 1.5 / prefill_ideal(shape, 64, 1))
    assert rows[0]["share_of_dense_ttft"][64] == pytest.approx(0.05)
    (m,) = s["pudding_vs_mlx_lm"]
    assert m["ttft_ratio"] == pytest.approx(1.0)
    assert m["total_ratio"] == pytest.approx(5.0 / 4.0)


def test_routed_request_runs_only_kept_blocks(bundle, monkeypatch):
    pm = load(bundle.path, router_backend="mlx")
    pm.tokenizer.eos_token_ids = set()
    blocks = layer_owner(pm.model).layers
    index = {id(b): i for i, b in enumerate(blocks)}
    calls: list[int] = []
    block_call = type(blocks[0]).__call__

    def counting(self, *args, **kwargs):
        calls.append(index[id(self)])
        return block_call(self, *args, **kwargs)

    monkeypatch.setattr(type(blocks[0]), "__call__", counting)
    tokens = make_prompt(pm.tokenizer, 12, seed=1)
    text = "She poured the water into the glass"
    route = pm.route(text)
    for kind, skipped in (("dense", []), ("mlx-lm", []), ("routed", route.skip)):
        calls.clear()
        t = run_request(pm, kind, tokens, text, max_tokens=5)
        assert t.gen_tokens == 5 and t.prompt_tokens == 12
        assert (t.router_s > 0) == (kind == "routed")
        assert t.ttft_s <= t.total_s
        # mlx-lm: one prefill call, one call per token, one look-ahead step: 7 per kept block
        counts = {i: calls.count(i) for i in range(6)}
        assert counts == {i: 0 if i in skipped else 7 for i in range(6)}, kind
    assert len(route.skip) == 2


def test_wrapper_overhead_leaves_the_model_whole(bundle):
    pm = load(bundle.path, router_backend="mlx")
    route = pm.route("hello")
    o = wrapper_overhead(pm, route, [1, 2, 3], repeats=5)
    assert len(layer_owner(pm.model).layers) == 6
    assert set(o) == {"dense_request_s", "routed_view_s", "switch_per_forward_s"}
    # A route that skips nothing switches nothing: its per-forward cost is not timed.
    assert wrapper_overhead(pm, pm.route("hello", "dense"), [1], 1)["switch_per_forward_s"] == 0


def test_make_prompt(bundle):
    pm = load(bundle.path, router_backend="mlx")
    a, b = make_prompt(pm.tokenizer, 50, 3), make_prompt(pm.tokenizer, 50, 3)
    assert a == b and len(a) == 50 and all(0 <= i < pm.tokenizer.vocab_size for i in a)
    ids = list(pm.tokenizer.encode("hello, how are you", add_special_tokens=False))
    assert make_prompt(pm.tokenizer, 2 * len(ids) + 1, 0, "hello, how are you") == (
        ids * 3)[: 2 * len(ids) + 1]


def test_router_study_restores_router(bundle):
    pm = load(bundle.path, router_backend="mlx")
    before = pm.router.scores("hello, how are you today?")
    rows = router_study(pm, {8: "hello, how are you today? " * 10, 4: "hello"}, trials=1)
    assert {(r["max_length"], r["num_layers"], r["compiled"]) for r in rows} >= {
        (32, 2, False), (32, 2, True), (32, 1, False)}
    assert all(list(r["router_s"]) == [4, 8] for r in rows)
    assert len(pm.router.net.encoder.encoder.layer) == 2 and pm.router.max_length == 32
    assert (pm.router.scores("hello, how are you today?") == before).all()


def _grows_by(pm, blocks) -> int:
    """Active memory added by evaluating `blocks`' weights (0 when they are resident)."""
    gc.collect()  # arrays of earlier tests' models must not be freed meanwhile
    gc.disable()
    try:
        before = mx.get_active_memory()
        mx.eval([pm.model.layers[i].parameters() for i in blocks])
        return mx.get_active_memory() - before
    finally:
        gc.enable()


def _bytes(pm, blocks) -> int:
    return sum(v.nbytes for i in blocks for _, v in tree_flatten(pm.model.layers[i].parameters()))


def test_lazy_routed_request_never_reads_skipped_blocks(bundle):
    pm = load(bundle.path, router_backend="mlx", lazy=True)
    route = pm.route("She poured the water into the glass")
    run_request(pm, "routed", make_prompt(pm.tokenizer, 12, 0), "", 4, skip=route.skip)
    kept = [i for i in range(6) if i not in route.skip]
    assert abs(_grows_by(pm, kept)) < 0.05 * _bytes(pm, [1])  # already in memory
    # Read only now (a few KB of temporaries may be freed meanwhile).
    assert _grows_by(pm, route.skip) == pytest.approx(_bytes(pm, route.skip), rel=0.05)


def test_residency_evicts_and_reads_back(bundle):
    reference = load(bundle.path, router_backend="mlx")
    want = {n: reference.generate([5, 6, 7, 8], max_tokens=6, skip=s) for n, s in SETS.items()}
    pm = load(bundle.path, router_backend="mlx", lazy=True)
    res = Residency(pm.model, bundle.path / "model", budget=_bytes(pm, range(4)))
    assert res.use(SETS["a"]) == [1, 2]  # never read: dropped from the start
    assert pm.generate([5, 6, 7, 8], max_tokens=6, skip=SETS["a"]) == want["a"]
    assert res.use(SETS["c"]) == [3, 4]  # kept blocks of a and c together exceed 4 blocks
    assert pm.generate([5, 6, 7, 8], max_tokens=6, skip=SETS["c"]) == want["c"]
    assert _grows_by(pm, [3, 4]) == pytest.approx(_bytes(pm, [3, 4]), rel=0.05)  # were out
    assert res.use(SETS["a"]) == [1, 2]
    assert pm.generate([5, 6, 7, 8], max_tokens=6, skip=SETS["a"]) == want["a"]  # read back
    with pytest.raises(PuddingError, match="smaller than one set"):
        Residency(pm.model, bundle.path / "model", budget=_bytes(pm, range(3))).use(SETS["a"])


def test_memory_compare(bundle):
    prompts = ["hello, how are you today?", "Which gas do plants absorb?"]
    pm = load(bundle.path, router_backend="mlx")
    budget = _bytes(pm, range(4))
    out = memory_compare(str(bundle.path), "router", None, prompts, "mlx", budget)
    d, r, b = out["dense"], out["routed"], out["routed, budget"]
    assert [x["skip"] for x in d["requests"]] == [[], []]
    assert [len(x["skip"]) for x in r["requests"]] == [2, 2]
    assert r["active_gb"] < d["active_gb"] and r["peak_gb"] < d["peak_gb"]
    assert b["budget_gb"] == pytest.approx(budget / 1e9)
    assert [x["skip"] for x in b["requests"]] == [x["skip"] for x in r["requests"]]


def test_probe_reply_is_one_line():
    def proc(code, out, err=""):
        return subprocess.CompletedProcess([], code, out, err)

    assert probe_reply(proc(0, 'loading\n{"peak_gb": 1.5}\n')) == {"peak_gb": 1.5}
    with pytest.raises(PuddingError, match=r"^no such file$"):
        probe_reply(proc(1, '{"error": "no such file"}\n'))
    crash = proc(-9, "", "Traceback (most recent call last):\n  File x\nMemoryError: out\n")
    with pytest.raises(PuddingError, match=r"^exited with code -9: MemoryError: out$"):
        probe_reply(crash)
    with pytest.raises(PuddingError, match=r"^exited with code 0$"):
        probe_reply(proc(0, "not json\n"))


def test_probe_child_reports_any_error_as_one_line(monkeypatch, capsys):
    def broken(probe):
        raise ValueError("first line\n  second line")

    monkeypatch.setattr(bench_memory, "memory_probe", broken)
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(
        {"bundle": "b", "route_mode": "router", "skip": None, "prompts": ["hi"],
         "router_backend": "mlx"})))
    with pytest.raises(SystemExit) as e:
        bench_memory.main()
    assert e.value.code == 1
    assert capsys.readouterr().out == '{"error": "ValueError: first line second line"}\n'


def test_cli_failing_memory_probe_is_one_line(bundle):
    # A budget below one set's blocks fails in the probe's child process. The real command
    # in its own process, its progress bar off (it shares stderr, and tqdm reads the
    # environment when imported).
    args = ["bench", "-b", str(bundle.path), "--prompt-lengths", "8", "--gen-lengths", "",
            "--trials", "1", "--warmup", "0", "--memory-requests", "1",
            "--memory-budget", "0.00001"]
    r = subprocess.run([sys.executable, "-m", "pudding_mlx.cli", *args], capture_output=True,
                       text=True, env={**os.environ, "TQDM_DISABLE": "1"}, timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == ("error: memory probe (routed, budget) failed: --memory-budget 0.000 GB "
                        "is smaller than one set's kept blocks\n"), r.stderr


def _medians(trials: list[dict]):
    """median(kind, p, g, key): by hand over the recorded trials of one measurement point."""
    def value(t, key):
        if key == "decode_tps":
            return (t["gen_tokens"] - 1) / (t["total_s"] - t["ttft_s"])
        return t[key]

    def median(kind: str, p: int, g: int, key: str) -> float:
        return statistics.median(value(t, key) for t in trials if (
            t["kind"], t["prompt_tokens"], t["gen_tokens"]) == (kind, p, g))

    return median


def test_cli_end_to_end(bundle, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PUDDING_OPENBLAS", "0")  # main() would re-exec the test process
    out = tmp_path / "res"
    main(["bench", "-b", str(bundle.path), "--prompt-lengths", "16,24", "--gen-lengths", "6",
          "--gen-prompt", "8", "--trials", "2", "--warmup", "1", "--compare-mlx-lm",
          "--router-study", "--memory-budget", "0.0006", "--memory-requests", "2",
          "--output", str(out), "--note", "shared machine"])
    text = capsys.readouterr().out
    assert "Time to first token" in text and "pudding dense time / plain mlx-lm" in text
    assert "routed, budget" in text
    res = json.loads((out / "bench.json").read_text())
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    trials, s, m = res["trials"], res["summary"], res["model"]
    assert len(trials) == 3 * 3 * 2
    assert {t["kind"] for t in trials} == {"dense", "routed", "mlx-lm"}
    assert s["skipped"] == 2 and res["notes"] == ["shared machine"]
    assert [r["prompt_tokens"] for r in s["ttft"]] == [16, 24]
    assert res["machine"]["mlx"] and m["dtype"] == "float32"
    assert m["bytes_per_param"] == pytest.approx(4.0) and m["kv_bytes"] == 4
    weights = DecodeBytes.from_shape(Shape(**m["shape"]), 4, 4)  # fp32: the config's count
    assert m["decode_bytes"] == {**weights.__dict__, "blocks": list(weights.blocks)}
    assert set(res["overhead"]) == {"dense_request_s", "routed_view_s", "switch_per_forward_s"}
    # Every figure from the recorded trials by hand, every ideal from the FLOP/byte model.
    med, shape = _medians(trials), Shape(**m["shape"])
    for row in s["ttft"]:
        p = row["prompt_tokens"]
        speedup = med("dense", p, 1, "ttft_s") / med("routed", p, 1, "ttft_s")
        assert row["ttft_speedup"] == pytest.approx(speedup)
        assert row["ideal_prefill"] == pytest.approx(prefill_ideal(shape, p, 2))
        assert row["ttft_vs_ideal"] == pytest.approx(speedup / prefill_ideal(shape, p, 2))
        assert f"{row['ttft_speedup']:>7.3f}x" in text  # the table shows the report's figures
    (g,) = s["generation"]
    assert (g["prompt_tokens"], g["gen_tokens"]) == (8, 6)
    assert g["total_speedup"] == pytest.approx(
        med("dense", 8, 6, "total_s") / med("routed", 8, 6, "total_s"))
    assert g["decode_speedup"] == pytest.approx(
        med("routed", 8, 6, "decode_tps") / med("dense", 8, 6, "decode_tps"))
    d_ideal = decode_ideal(weights, 8 + 6 // 2, res["route"]["skip"])
    assert g["ideal_decode"] == pytest.approx(d_ideal)
    prefill, total = med("dense", 8, 6, "ttft_s"), med("dense", 8, 6, "total_s")
    assert g["ideal_total"] == pytest.approx(
        combined_ideal([prefill, total - prefill], [prefill_ideal(shape, 8, 2), d_ideal]))
    assert f"{g['total_speedup']:>7.3f}x" in text
    ratios = {(r["prompt_tokens"], r["gen_tokens"]): r for r in s["pudding_vs_mlx_lm"]}
    assert ratios.keys() == {(16, 1), (24, 1), (8, 6)}
    assert ratios[8, 6]["total_ratio"] == pytest.approx(total / med("mlx-lm", 8, 6, "total_s"))
    study = res["router_study"]
    assert set(study[0]["projected_ttft_vs_ideal"]) == {"16", "24"}
    for row in study:
        assert row["share_of_dense_ttft"]["16"] == pytest.approx(
            row["router_s"]["16"] / med("dense", 16, 1, "ttft_s"))


def test_cli_errors(bundle, capsys, monkeypatch):
    monkeypatch.setenv("PUDDING_OPENBLAS", "0")
    for args, msg in ((["--dense"], "always runs dense"),
                      (["--prompt-lengths", "", "--gen-lengths", ""], "nothing to measure"),
                      (["--skip", "0,1"], "protected")):
        with pytest.raises(SystemExit) as e:
            main(["bench", "-b", str(bundle.path), *args])
        assert e.value.code == 2
        assert msg in capsys.readouterr().err

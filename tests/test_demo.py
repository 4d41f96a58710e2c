"""`pudding demo --bundle`: per prompt, dense, the default route and a faster setting, with the
routes the torch router picks, the answers HF torch decodes under them, KL and top-1 to dense by
hand, the ideal speedups from the torch model's own parameters, and speed figures that are the
medians and ranges of the per-round ratios they print (no timing is asserted)."""

from __future__ import annotations

import json
import re
import statistics

import pytest
from click.testing import CliRunner
from helpers import chat_ids, tiny_bundle, torch_greedy, torch_route
from test_fidelity import reference

from convert.demo import PROMPTS, SETTINGS, Speedup, cache_folder
from pudding_mlx.cli import cli

TRIALS, TOKENS = 3, 4


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return tiny_bundle(tmp_path_factory.mktemp("demo") / "b")


@pytest.fixture(scope="module")
def ran(built, tmp_path_factory):
    """(printed output, the --json document) of one demo run on the tiny bundle."""
    path = tmp_path_factory.mktemp("demo-json") / "demo.json"
    result = CliRunner().invoke(cli, ["demo", "--bundle", str(built.path), "--max-tokens",
                                      str(TOKENS), "--trials", str(TRIALS), "--json", str(path)])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output, json.loads(path.read_text())


def ideal_by_hand(model, skip: list[int], prompt: int, context: int) -> tuple[float, float]:
    """(prefill, decode) ideal speedups of skipping `skip`, from the torch model's parameters:
    prefill by matrix-multiply FLOPs (2 per weight per token, attention over the mean causal
    context, the LM head once), decoding by fp32 bytes read per token (kept blocks, KV cache,
    final norm, tied LM head, one embedding row)."""
    cfg = model.config
    layers = model.model.layers
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    weights = [sum(p.numel() for n, p in b.named_parameters() if "norm" not in n) for b in layers]
    per_token = [2 * w + 4 * cfg.num_attention_heads * head_dim * (prompt + 1) / 2
                 for w in weights]
    head = 2 * cfg.vocab_size * cfg.hidden_size
    kept = [i for i in range(len(layers)) if i not in skip]
    prefill = ((prompt * sum(per_token) + head)
               / (prompt * sum(per_token[i] for i in kept) + head))
    block_bytes = [4 * sum(p.numel() for p in b.parameters()) for b in layers]
    kv = 4 * 2 * cfg.num_key_value_heads * head_dim * context
    outside = 4 * (cfg.hidden_size + cfg.vocab_size * cfg.hidden_size + cfg.hidden_size)
    decode = ((sum(block_bytes) + len(layers) * kv + outside)
              / (sum(block_bytes[i] for i in kept) + len(kept) * kv + outside))
    return prefill, decode


def test_three_settings_per_prompt_against_torch(built, ran):
    out, doc = ran
    tok, eos = built.tokenizer, built.tokenizer.eos_token_id
    assert [p["kind"] for p in doc["prompts"]] == [k for k, _ in PROMPTS]
    for (kind, prompt), p in zip(PROMPTS, doc["prompts"], strict=True):
        assert f"] {kind}\n> {prompt}\n" in out
        rows = {r["setting"]: r for r in p["rows"]}
        assert list(rows) == list(SETTINGS)
        ids = chat_ids(tok, prompt)
        assert p["prompt_tokens"] == len(ids) and p["timed_tokens"] == TOKENS
        # the tiny sets all skip 2 blocks: the faster setting (best of the largest) is the
        # router's best, like the default (the paper's rule)
        best = torch_route(built.router, built.router_tokenizer, prompt).name
        assert rows["default"]["name"] == rows["faster"]["name"] == best
        assert rows["faster"]["policy"] == "routed:k2" and rows["default"]["policy"] == "routed"
        assert rows["dense"]["name"] == "dense" and rows["dense"]["skip"] == []
        dense = torch_greedy(built.model, ids, [], TOKENS, eos)
        for row in rows.values():
            skip = built.manifest.candidate(row["name"]).skip if row["skip"] else []
            assert row["skip"] == sorted(skip)
            ref = torch_greedy(built.model, ids, skip, TOKENS, eos)
            assert row["tokens"] == len(ref)
            assert row["answer"] == tok.decode([t for t in ref if t != eos]).strip()
            assert f"{row['setting']:<8} {row['route']}\n{'':<8} answer: {row['answer']}\n" in out
        kl, agree, _ = reference(built.model, ids, dense, rows["default"]["skip"])
        assert rows["default"]["kl"] == pytest.approx(kl.mean(), abs=2e-3)
        assert rows["default"]["agreement"] == pytest.approx(agree.mean())
        assert rows["dense"]["kl"] == 0 and rows["dense"]["agreement"] == 1


def test_speed_figures_are_medians_and_ranges_of_the_rounds(built, ran):
    out, doc = ran
    table = out[out.index("prompt  "):]
    for p in doc["prompts"]:
        for row in p["rows"]:
            if row["setting"] == "dense":
                assert row["prefill"] is None and row["decode"] is None
                continue
            context = p["prompt_tokens"] + TOKENS // 2
            ideals = ideal_by_hand(built.model, row["skip"], p["prompt_tokens"], context)
            cells = []
            for s, ideal in zip((row["prefill"], row["decode"]), ideals, strict=True):
                assert len(s["ratios"]) == TRIALS and all(r > 0 for r in s["ratios"])
                assert s["median"] == statistics.median(s["ratios"])
                assert (s["low"], s["high"]) == (min(s["ratios"]), max(s["ratios"]))
                assert s["within_noise"] == (s["low"] <= 1.0 <= s["high"])
                assert s["ideal"] == pytest.approx(ideal, rel=1e-6)
                shown = "within noise" if s["within_noise"] else f"{s['median']:.2f}x"
                cells += [shown, f"{s['low']:.2f}-{s['high']:.2f}", f"{s['ideal']:.2f}x"]
            line = re.compile(
                rf"^{re.escape(p['kind'])} +{row['setting']} +{len(row['skip'])} +"
                rf"{row['kl']:.3f} +{100 * row['agreement']:.0f}% +" + " +".join(map(
                    re.escape, cells)) + "$", re.M)
            assert line.search(table), (cells, table)


def test_within_noise():
    assert Speedup.from_ratios([0.97, 1.05, 1.1], 1.03).text() == "within noise"
    assert Speedup.from_ratios([1.0, 1.2, 1.3], 1.03).text() == "within noise"
    assert Speedup.from_ratios([0.8, 0.9, 0.95], 1.03).text() == "0.90x"
    s = Speedup.from_ratios([1.2, 1.1, 1.4, 1.3], 1.5)
    assert (s.text(), s.low, s.high, s.within_noise) == ("1.25x", 1.1, 1.4, False)


def test_faster_setting_is_checked(built):
    for spec, what in (("routed", "expected routed@X"), ("routed:k5", "no candidate skips "
                       "exactly 5"), ("routed@0.5", "a tolerance needs a router")):
        result = CliRunner().invoke(cli, ["demo", "--bundle", str(built.path), "--faster", spec])
        assert result.exit_code != 0 and what in str(result.exception), (spec, result.output)
    result = CliRunner().invoke(cli, ["demo", "--bundle", str(built.path), "--trials", "2"])
    assert result.exit_code == 2 and "--trials" in result.output


def test_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("PUDDING_CACHE", str(tmp_path / "c"))
    assert cache_folder() == tmp_path / "c"
    monkeypatch.delenv("PUDDING_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_folder() == tmp_path / "x" / "pudding-mlx"


def test_rebuild_and_bundle_exclude_each_other(built):
    result = CliRunner().invoke(cli, ["demo", "--bundle", str(built.path), "--rebuild"])
    assert result.exit_code != 0
    assert "--rebuild" in str(result.exception)


def test_a_cached_encoder_bundle_is_built_again_with_the_demo_profile(built, monkeypatch,
                                                                       tmp_path):
    """A demo bundle cached by an older pudding (an encoder router) is replaced by a build of
    the demo profile from the shipped products; a cached in-model bundle is used as it is;
    --from-scratch builds without the shipped products."""
    import shutil

    from convert import build, demo
    from convert.profiles import PROFILES
    from convert.shipped import DEMO_PRODUCTS

    monkeypatch.setenv("PUDDING_CACHE", str(tmp_path))
    shutil.copytree(built.path, tmp_path / "demo" / "bundle")
    (tmp_path / "demo" / "work").mkdir()
    calls = []

    def fake_build(model, bundle, work, profile, shipped):
        calls.append((profile, shipped))
        assert not (tmp_path / "demo" / "bundle").exists()  # the old one was removed first
        assert not work.exists()

    monkeypatch.setattr(build, "run_build", fake_build)
    assert demo.demo_bundle(rebuild=False) == tmp_path / "demo" / "bundle"
    assert calls == [(PROFILES["demo"], DEMO_PRODUCTS)]
    assert PROFILES["demo"].target == "fidelity" and PROFILES["demo"].router == "in-model"

    manifest = tmp_path / "demo" / "bundle" / "pudding.json"
    shutil.copytree(built.path, manifest.parent)
    doc = json.loads(manifest.read_text())
    doc["router"].update(kind="in-model", blocks=1)
    manifest.write_text(json.dumps(doc))
    assert demo.demo_bundle(rebuild=False) == manifest.parent
    assert len(calls) == 1
    demo.demo_bundle(rebuild=False, from_scratch=True)
    assert calls[-1] == (PROFILES["demo"], None)


def test_ctrl_c_during_the_demo_build_then_a_rerun_continues_it(monkeypatch, capsys, tmp_path):
    """Ctrl-C in the middle of the demo's build: `pudding build --status` on its work folder
    says which step stopped, the next `pudding demo` reuses the finished steps and resumes the
    stopped one from its partial output (never starts over), and the one after that uses the
    cached bundle."""
    import shutil

    from helpers import run_cli, tiny_in_model_bundle

    from convert import assets, build, demo

    fidelity_bundle = tmp_path / "fidelity"  # what the demo profile builds: an in-model router
    tiny_in_model_bundle(fidelity_bundle, sets={"dense": [], "a": [2], "b": [3]})
    monkeypatch.setenv("PUDDING_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "default_model", lambda: "model")
    root = tmp_path / "demo"
    runs: list[str] = []

    def search():
        runs.append("search")
        (root / "work" / "search.txt").write_text("done")

    def labels():
        part = root / "work" / "labels.part"
        runs.append("labels, resumed" if part.exists() else "labels")
        if not part.exists():
            part.write_text("half")
            raise KeyboardInterrupt
        (root / "work" / "labels.txt").write_text("done")

    def convert():
        runs.append("convert")
        shutil.copytree(fidelity_bundle, root / "bundle")

    def make_steps(model, out, work, profile, data_dir, previous):
        def step(name, file, run):
            return lambda: build.Step(name, {"model": model}, work / file, run,
                                      lambda: (work / file).read_text())

        return [step("search", "search.txt", search), step("labels", "labels.txt", labels),
                step("convert", "../bundle/pudding.json", convert)]

    monkeypatch.setattr(build, "make_steps", make_steps)
    code, out, err = run_cli(["demo"], monkeypatch, capsys)
    assert code == 130 and runs == ["search", "labels"]
    assert "Ctrl-C stops it and the next `pudding demo` continues it" in out
    assert f"pudding build --status --work {root / 'work'}" in out
    assert "run `pudding demo` again to continue it" in err

    code, out, _ = run_cli(["build", "--status", "--work", str(root / "work")], monkeypatch,
                           capsys)
    assert code == 0
    assert "| search | done |" in out and "| labels | interrupted |" in out

    monkeypatch.setattr(demo, "PROMPTS", ())  # the bundle is then only loaded
    code, out, err = run_cli(["demo", "--trials", "3"], monkeypatch, capsys)
    assert code == 0, (out, err)
    assert runs == ["search", "labels", "labels, resumed", "convert"]
    assert "Continuing the demo build" in out and "[search] reused" in out
    code, out, _ = run_cli(["demo"], monkeypatch, capsys)
    assert code == 0 and "Using the cached bundle" in out
    assert len(runs) == 4

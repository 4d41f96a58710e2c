"""`pudding fidelity` against independent references: HF torch logits of the tiny model with the
blocks removed, KL / agreement / NLL computed by hand in numpy, free-running divergence from a
hand-written torch greedy loop; the packaged prompt set and its split; resuming from the cache."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from helpers import run_cli, tiny_bundle

import pudding_mlx
import pudding_mlx.fidelity.run as fidelity
from pudding_mlx.errors import PuddingError
from pudding_mlx.fidelity import metrics
from pudding_mlx.prompts import PACKAGED, ChatPrompt, read_prompts, select

PROMPTS = [
    "Question: Which gas do plants absorb from the air?",
    "How do you boil an egg?",
    "hello, how are you today?",
    "She poured the water into the glass because",
    "Is it true that the sky is blue?",
]
N = 16


@pytest.fixture(scope="module")
def built(tmp_path_factory, one_torch_thread):
    return tiny_bundle(tmp_path_factory.mktemp("fidelity") / "b")


@pytest.fixture(scope="module")
def pm(built):
    return pudding_mlx.load(built.path, router_backend="mlx")


def chat_ids(tok, text: str) -> list[int]:
    return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                   add_generation_prompt=True, return_dict=False)


def torch_logits(hf, ids: list[int], skip: list[int]) -> np.ndarray:
    """HF torch logits [len(ids), V] with the blocks `skip` removed (no cache)."""
    full = hf.model.layers
    hf.model.layers = torch.nn.ModuleList([b for i, b in enumerate(full) if i not in skip])
    try:
        with torch.no_grad():
            return hf(torch.tensor([ids]), use_cache=False).logits[0].double().numpy()
    finally:
        hf.model.layers = full


def torch_greedy(hf, ids: list[int], skip: list[int], n: int, eos: int | None) -> list[int]:
    """Greedy decoding by hand: n tokens (or up to and including eos), full recompute each step."""
    out: list[int] = []
    for _ in range(n):
        out.append(int(torch_logits(hf, ids + out, skip)[-1].argmax()))
        if out[-1] == eos:
            break
    return out


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def reference(hf, ids: list[int], cont: list[int], skip: list[int]):
    """(KL(dense || set), agreement, NLL) per continuation token, by hand in numpy."""
    span = slice(len(ids) - 1, len(ids) + len(cont) - 1)
    d = log_softmax(torch_logits(hf, ids + cont, [])[span])
    s = log_softmax(torch_logits(hf, ids + cont, skip)[span])
    kl = (np.exp(d) * (d - s)).sum(axis=-1)
    agree = (d.argmax(-1) == s.argmax(-1)).astype(int)
    nll = -s[np.arange(len(cont)), cont]
    return kl, agree, nll


def test_metrics_match_hand_computation_on_torch_logits(built, pm):
    hf, tok = built.model, built.tokenizer
    divergences = []
    for text in PROMPTS:
        ids = chat_ids(tok, text)
        assert pm.encode(text) == ids
        cont = metrics.greedy_continuation(pm, ids, N)
        assert cont == torch_greedy(hf, ids, [], N, tok.eos_token_id)
        ref = metrics.forced_logprobs(pm, [], ids, cont)

        dense = metrics.measure(pm, [], ids, cont, ref)
        assert dense.kl == [0.0] * len(cont) and dense.agree == [1] * len(cont)
        assert dense.diverge == len(cont)
        _, _, nll = reference(hf, ids, cont, [])
        np.testing.assert_allclose(dense.nll, nll, atol=2e-4, rtol=1e-4)

        for skip in ([1, 2], [3, 4], [2, 5]):
            got = metrics.measure(pm, skip, ids, cont, ref)
            kl, agree, nll = reference(hf, ids, cont, skip)
            assert max(kl) > 1e-3  # a real perturbation, not a no-op
            np.testing.assert_allclose(got.kl, kl, atol=2e-4, rtol=1e-3)
            np.testing.assert_allclose(got.nll, nll, atol=2e-4, rtol=1e-4)
            assert got.agree == agree.tolist()
            # free-running: the set's own greedy tokens (no end-of-sequence stop) vs dense
            own = torch_greedy(hf, ids, skip, len(cont), None)
            first = next((i for i, (a, b) in enumerate(zip(own, cont, strict=True)) if a != b),
                         len(cont))
            assert got.diverge == first
            divergences.append((first, len(cont)))
            s = got.summary()
            assert s["kl"] == pytest.approx(kl.mean(), abs=2e-4)
            assert s["agreement"] == pytest.approx(agree.mean())
    # the checks above covered sets that diverge at once, later on, and never
    assert any(d == 0 for d, _ in divergences)
    assert any(0 < d < t for d, t in divergences)


def test_compare_on_a_known_distribution():
    import mlx.core as mx

    p = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.6, 0.3]]))
    q = np.log(np.array([[0.25, 0.5, 0.25], [0.2, 0.5, 0.3]]))
    kl, agree, nll = metrics.compare(mx.array(p, dtype=mx.float32),
                                      mx.array(q, dtype=mx.float32), [0, 2])
    expected = [0.5 * np.log(2) + 0.25 * np.log(0.5),
                0.1 * np.log(0.5) + 0.6 * np.log(0.6 / 0.5)]
    np.testing.assert_allclose(kl, expected, atol=1e-6)
    assert agree.tolist() == [0, 1]
    np.testing.assert_allclose(nll, [np.log(4), -np.log(0.3)], atol=1e-6)


def _prompts_file(tmp_path, n: int = 5):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "source": "test", "text": t}) + "\n"
                            for i, t in enumerate(PROMPTS[:n])))
    return path


def test_run_writes_results_and_resumes_from_the_cache(built, tmp_path, monkeypatch):
    out = tmp_path / "out"
    settings = fidelity.FidelitySettings(
        bundle=str(built.path), output=str(out), prompts=str(_prompts_file(tmp_path)),
        limit=3, max_tokens=8, extra_sets={"copy": [1, 2]}, router_backend="mlx",
        resamples=200)
    calls = {"decode": 0, "measure": 0}
    real_cont, real_measure = metrics.greedy_continuation, metrics.measure

    def count_cont(*args, **kwargs):
        calls["decode"] += 1
        return real_cont(*args, **kwargs)

    def count_measure(*args, **kwargs):
        calls["measure"] += 1
        return real_measure(*args, **kwargs)

    monkeypatch.setattr(fidelity, "greedy_continuation", count_cont)
    monkeypatch.setattr(fidelity, "measure", count_measure)
    first = fidelity.run_fidelity(settings)
    assert {p.name for p in out.iterdir()} >= {"results.md", "results.json", "fidelity.png",
                                               "cache"}
    rows = ["dense", "early", "middle", "late", "static", "copy", "routed"]
    assert list(first["summary"]) == rows
    distinct = 4  # dense, early, middle, late (static and copy skip what early skips)
    assert calls == {"decode": 3, "measure": 3 * distinct}
    s = first["summary"]
    assert s["dense"]["kl"]["diff"] == 0 and s["dense"]["agreement"]["diff"] == 1
    assert s["copy"] == s["early"] == s["static"]
    for p in first["prompts"]:  # routed takes its set's values, prompt by prompt
        assert p["route"] in ("early", "middle", "late")
        assert p["routed"] == p[p["route"]]
    assert sum(first["route_counts"].values()) == 3

    # a larger limit computes only the new prompts; the old ones come from the cache
    more = fidelity.run_fidelity(fidelity.FidelitySettings(**{**settings.__dict__, "limit": 5}))
    assert calls == {"decode": 5, "measure": 5 * distinct}
    old = {p["id"]: p for p in first["prompts"]}
    for p in more["prompts"]:
        if p["id"] in old:
            assert p == old[p["id"]]

    # the same run again computes nothing
    def fail(*args, **kwargs):
        raise AssertionError("computed again despite the cache")

    monkeypatch.setattr(fidelity, "greedy_continuation", fail)
    monkeypatch.setattr(fidelity, "measure", fail)
    again = fidelity.run_fidelity(fidelity.FidelitySettings(**{**settings.__dict__, "limit": 5}))
    assert again["summary"] == more["summary"] and again["prompts"] == more["prompts"]

    # another continuation length does not reuse the cached values
    monkeypatch.setattr(fidelity, "greedy_continuation", count_cont)
    monkeypatch.setattr(fidelity, "measure", count_measure)
    fidelity.run_fidelity(fidelity.FidelitySettings(**{**settings.__dict__, "max_tokens": 4}))
    assert calls["decode"] == 5 + 3


def test_routed_row_is_the_routed_sets_values(built, pm, tmp_path):
    res = fidelity.run_fidelity(fidelity.FidelitySettings(
        bundle=str(built.path), output=str(tmp_path / "o"),
        prompts=str(_prompts_file(tmp_path)), max_tokens=6, router_backend="mlx",
        resamples=100))
    for text, p in zip(PROMPTS, res["prompts"], strict=True):
        assert p["route"] == pm.route(text).name
        assert p["routed"] == p[p["route"]]
    # paired differences: routed minus a set is the mean of the per-prompt differences
    for row in ("dense", "early", "middle", "late"):
        for metric in metrics.METRICS:
            diff = np.mean([p["routed"][metric] - p[row][metric] for p in res["prompts"]])
            assert res["pairs"][row][metric]["diff"] == pytest.approx(diff)
    md = (tmp_path / "o" / "results.md").read_text()
    assert "| routed (PuDDing) |" in md and "| static (bundle static) |" in md


def test_cli_and_bad_input(built, tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n\n")
    out = tmp_path / "out"
    code, stdout, err = run_cli(["fidelity", str(built.path), "-o", str(out), "--prompts",
                                 str(prompts), "-m", "4", "--skip", "1,3", "--skip",
                                 "mine=2,4", "--router-backend", "mlx", "--resamples", "50"],
                                monkeypatch, capsys)
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["n"] == 2 and res["sets"]["skip:1,3"] == [1, 3] and res["sets"]["mine"] == [2, 4]
    assert "| skip:1,3 | 1,3 |" in stdout and "| mine | 2,4 |" in stdout
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{"id": 3}\n')
    for args, message in [
        (["--skip", "a,b"], "--skip takes block numbers"),
        (["--skip", "0,1"], "block"),
        (["--prompts", str(empty)], "no prompts"),
        (["--prompts", str(tmp_path / "missing.txt")], "no such prompts file"),
        (["--prompts", str(bad_json)], 'bad.jsonl:2: expected a JSON object with a non-empty'),
        (["--limit", "0"], "--limit must be positive"),
        (["--prompts", str(prompts), "--split", "train"], "no prompts in the 'train' split"),
    ]:
        code, _, err = run_cli(["fidelity", str(built.path), "-o", str(tmp_path / "x"), *args],
                               monkeypatch, capsys)
        assert code == 2 and err.startswith("error:") and message in err, (args, err)
        assert len(err.strip().splitlines()) == 1


def test_packaged_prompts_and_their_split():
    prompts = read_prompts()
    assert len(prompts) >= 300 and PACKAGED.is_file()
    assert len({p.id for p in prompts}) == len(prompts)
    assert len({p.text for p in prompts}) == len(prompts)
    sources = {p.source for p in prompts}
    assert len(sources) >= 3
    # the split by hand: within each source, the half with the smallest sha1("1234:id") trains
    for source in sources:
        ids = [p.id for p in prompts if p.source == source]
        ranked = sorted(ids, key=lambda i: hashlib.sha1(f"1234:{i}".encode()).hexdigest())
        train = set(ranked[:round(len(ids) / 2)])
        for p in prompts:
            if p.source == source:
                assert p.split == ("train" if p.id in train else "heldout")
    held = select(prompts)
    assert len(held) >= 150 and all(p.split == "heldout" for p in held)
    assert len(select(prompts, "all")) == len(prompts)


def test_user_prompt_files_and_limit(tmp_path):
    plain = tmp_path / "p.txt"
    plain.write_text("first prompt\n\n  second prompt  \n")
    got = read_prompts(plain)
    assert [(p.id, p.text, p.split) for p in got] == [("line-1", "first prompt", "heldout"),
                                                      ("line-3", "  second prompt  ", "heldout")]
    jl = tmp_path / "p.data"
    jl.write_text('{"text": "a\\nb", "split": "train"}\n{"text": "c", "id": "x"}\n')
    assert read_prompts(jl) == [ChatPrompt("line-1", "user", "train", "a\nb"),
                                ChatPrompt("x", "user", "heldout", "c")]
    dup = tmp_path / "d.jsonl"
    dup.write_text('{"text": "a", "id": "x"}\n{"text": "b", "id": "x"}\n')
    with pytest.raises(PuddingError, match="appears twice"):
        read_prompts(dup)
    many = [ChatPrompt(str(i), "s", "heldout", f"t{i}") for i in range(50)]
    small, large = select(many, limit=10), select(many, limit=20)
    assert set(small) <= set(large) and len(large) == 20
    assert [int(p.id) for p in large] == sorted(int(p.id) for p in large)

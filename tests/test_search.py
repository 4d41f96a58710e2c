"""The optimised search (packing, prefix reuse, memoisation, data parallel) against a brute-force
reference: plain HF forwards with blocks removed, hand-written loss, every trial from scratch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_cli, tiny_gemma3, tiny_llama, torch_logits

from convert.scoring import BlockRunner
from convert.search import GreedyRun, SetScorer, greedy_search, run_search, tokenize_examples
from pudding_mlx.errors import PuddingError
from pudding_mlx.tasks import TASKS

QUESTIONS = [
    ("Which gas do plants absorb from the air?", ["carbon dioxide", "water", "fine", "Paris"]),
    ("How do you boil an egg?", ["put it in boiling water", "thank you", "the sky is blue"]),
    ("Is it true that the sky is blue?", ["yes", "no", "very much"]),
    ("What is the capital of France?", ["Paris", "the glass", "ten minutes", "water"]),
    ("Why was the glass empty?", ["She poured the water", "hello", "carbon dioxide"]),
    ("How are you today?", ["I am fine, thank you", "boiling water", "yes"]),
    ("What did she pour?", ["water", "an egg", "the air", "Paris"]),
]


def examples():
    out = []
    for i, (q, choices) in enumerate(QUESTIONS):
        row = {"id": f"q{i}", "question": q, "answerKey": "ABCD"[i % len(choices)],
               "choices": {"text": choices, "label": list("ABCD"[:len(choices)])}}
        out.append(TASKS["arc_easy"].example(row))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, tok = tiny_llama(tmp_path_factory.mktemp("llama"), num_layers=8)
    return model, tok


def brute_force(model, tok, exs, k, loss):
    """Greedy search with one plain forward per (trial, choice); returns (blocks, evaluations)."""
    n_layers, chosen, evals = len(model.model.layers), [], 0
    for _ in range(k):
        results = {}
        for b in [b for b in range(1, n_layers - 1) if b not in chosen]:
            total = 0.0
            for ex in exs:
                lp = []
                for ctx, cont in ex.prompt:
                    c = tok.encode(ctx, add_special_tokens=False)
                    a = tok.encode(cont, add_special_tokens=False)
                    logp = torch.log_softmax(torch_logits(model, c + a, chosen + [b]).double(), -1)
                    lp.append(np.mean([logp[len(c) - 1 + t, a[t]].item() for t in range(len(a))]))
                    evals += n_layers - len(chosen) - 1
                g = ex.gold
                if loss == "likelihood":
                    total -= lp[g]
                else:
                    total -= sum(lp[g] - lp[j] for j in range(len(lp)) if j != g)
            results[b] = total
        best = min(results, key=lambda b: (results[b], b))
        chosen.append(best)
    return chosen, evals


@pytest.mark.parametrize("loss", ["likelihood", "margin"])
def test_search_matches_brute_force(tiny, loss):
    model, tok = tiny
    exs = examples()
    ref, ref_evals = brute_force(model, tok, exs, 3, loss)
    fast = SetScorer(model, tokenize_examples(tok, exs), batch_size=3)
    got = greedy_search(fast, GreedyRun.new("c", "arc_easy", loss, 3))
    naive = SetScorer(model, tokenize_examples(tok, exs), batch_size=3, reuse_prefix=False)
    slow = greedy_search(naive, GreedyRun.new("c", "arc_easy", loss, 3))
    prefix = SetScorer(model, tokenize_examples(tok, exs), batch_size=3, state_budget_gb=0)
    mid = greedy_search(prefix, GreedyRun.new("c", "arc_easy", loss, 3))
    assert [p.block for p in got.trajectory] == ref
    assert [p.block for p in slow.trajectory] == ref
    assert [p.block for p in mid.trajectory] == ref
    assert got.candidate.skip == sorted(ref)
    # state reuse replays the very same block computations: losses are bit-identical
    assert [p.loss for p in got.trajectory] == [p.loss for p in mid.trajectory]
    assert fast.runner.evals <= prefix.runner.evals < naive.runner.evals < ref_evals


def test_gemma3_search_matches_brute_force(tmp_path):
    """Gemma 3 (window 3, shorter than every question; full attention in blocks 2 and 5):
    the search, with prefix and state reuse over packed rows, picks the brute force's blocks."""
    model, tok = tiny_gemma3(tmp_path, num_layers=8, window=3, pattern=3)
    exs = examples()
    ref, _ = brute_force(model, tok, exs, 2, "margin")
    got = greedy_search(SetScorer(model, tokenize_examples(tok, exs), batch_size=3),
                        GreedyRun.new("c", "arc_easy", "margin", 2))
    assert [p.block for p in got.trajectory] == ref


def test_state_reuse_replays_the_same_computation(tiny):
    model, tok = tiny
    reqs = tokenize_examples(tok, examples())
    fast, plain = SetScorer(model, reqs, batch_size=3), SetScorer(model, reqs, batch_size=3)
    fast.scores([], [1, 2, 3, 4, 5, 6], watch=[5])
    plain.scores([], [1, 2, 3, 4, 5, 6])
    before = fast.runner.evals, plain.runner.evals
    got, ref = fast.scores([5], [1, 2, 3, 4, 6]), plain.scores([5], [1, 2, 3, 4, 6])
    for b in ref:
        np.testing.assert_array_equal(got[b], ref[b])
    # trials 1-4 resume from the state entering block 5 that phase 1 stored: blocks 2-4, 3-4,
    # 4 and none are not run again
    rows = sum(batch.rows for batch in fast.batches)
    saved = (plain.runner.evals - before[1]) - (fast.runner.evals - before[0])
    assert saved == rows * (3 + 2 + 1 + 0)


def test_second_loss_reuses_first(tiny):
    model, tok = tiny
    scorer = SetScorer(model, tokenize_examples(tok, examples()), batch_size=4)
    greedy_search(scorer, GreedyRun.new("a", "arc_easy", "likelihood", 2))
    after_first = scorer.runner.evals
    greedy_search(scorer, GreedyRun.new("b", "arc_easy", "margin", 2))
    fresh = SetScorer(model, tokenize_examples(tok, examples()), batch_size=4)
    greedy_search(fresh, GreedyRun.new("b", "arc_easy", "margin", 2))
    # phase 1 of the margin search is served from the cache
    assert scorer.runner.evals - after_first < fresh.runner.evals


def test_prefix_forward_equals_plain_forward(tiny):
    model, tok = tiny
    runner = BlockRunner(model)
    text = "Question: How do you boil an egg?\nAnswer: put it in"
    ids = tok.encode(text, add_special_tokens=False)
    batch = runner.prepare([(ids[:-3], ids[-3:] + [ids[0]])])[0]
    skip = [2, 5]
    keep = [i for i in range(8) if i not in skip]
    h = runner.embed(batch)
    h = runner.run(runner.run(h, batch, keep[:3]), batch, keep[3:])
    got = model.lm_head(model.model.norm(h))[0]
    ref = torch_logits(model, ids + [ids[0]], skip)[:-1]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_run_search_resumes_and_is_deterministic(tiny, tmp_path):
    model, tok = tiny
    exs = {"arc_easy": examples()}
    settings = {"model": "tiny", "seed": 0, "samples": 7}
    out = tmp_path / "candidates.json"
    full = run_search(model, tok, exs, settings, out, k=3, progress=False)
    assert full["complete"] and [c["name"] for c in full["candidates"]] == [
        "arc_easy-likelihood-k3", "arc_easy-margin-k3"]
    # Interrupt: keep one phase of the first set only, then resume.
    doc = json.loads(out.read_text())
    doc["complete"] = False
    doc["candidates"] = doc["candidates"][:1]
    doc["candidates"][0]["trajectory"] = doc["candidates"][0]["trajectory"][:1]
    out.write_text(json.dumps(doc))
    resumed = run_search(model, tok, exs, settings, out, k=3, progress=False)
    assert [c["skip"] for c in resumed["candidates"]] == [c["skip"] for c in full["candidates"]]
    assert resumed["candidates"][0]["trajectory"][0] == full["candidates"][0]["trajectory"][0]
    again = run_search(model, tok, exs, settings, tmp_path / "b.json", k=3, progress=False)
    strip = [[(p["block"], p["loss"]) for p in c["trajectory"]] for c in again["candidates"]]
    assert strip == [[(p["block"], p["loss"]) for p in c["trajectory"]]
                     for c in full["candidates"]]


def test_run_search_refuses_other_settings(tiny, tmp_path):
    from pudding_mlx.errors import PuddingError

    model, tok = tiny
    out = tmp_path / "c.json"
    run_search(model, tok, {"arc_easy": examples()[:3]}, {"seed": 0}, out, k=1, progress=False)
    with pytest.raises(PuddingError, match="seed"):
        run_search(model, tok, {"arc_easy": examples()[:3]}, {"seed": 1}, out, k=1,
                   progress=False)


def test_larger_k_extends_a_finished_run(tiny, tmp_path):
    """A rerun with a larger k continues from the finished phases and ends where a fresh
    search for that k does; a smaller k is refused (--from-run cuts)."""
    from pudding_mlx.errors import PuddingError

    model, tok = tiny
    exs = {"arc_easy": examples()}
    out = tmp_path / "c.json"
    small = run_search(model, tok, exs, {"seed": 0}, out, k=1, progress=False)
    extended = run_search(model, tok, exs, {"seed": 0}, out, k=3, progress=False)
    fresh = run_search(model, tok, exs, {"seed": 0}, tmp_path / "f.json", k=3, progress=False)

    def strip(doc):
        return [(c["name"], c["k"], c["skip"], [(p["block"], pytest.approx(p["loss"]))
                                                for p in c["trajectory"]])
                for c in doc["candidates"]]

    assert extended["complete"] and strip(extended) == strip(fresh)
    assert extended["settings"] == fresh["settings"]
    assert [c["trajectory"][0] for c in extended["candidates"]] == [
        c["trajectory"][0] for c in small["candidates"]]  # kept, not recomputed
    with pytest.raises(PuddingError, match="k=3"):
        run_search(model, tok, exs, {"seed": 0}, out, k=2, progress=False)


def _worker(rank, world, port, model_dir, out_file):
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from convert.dist import joined

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    with joined("cpu"):  # as under torchrun
        torch.set_num_threads(1)
        model = AutoModelForCausalLM.from_pretrained(model_dir).float().eval()
        tok = AutoTokenizer.from_pretrained(model_dir)
        run_search(model, tok, {"arc_easy": examples()}, {"seed": 0}, out_file, k=3,
                   progress=False)
    # Leaving freed the group: a gloo thread still running here would live on into interpreter
    # exit, where a rank was seen to abort about once in ten runs.
    tasks = Path("/proc/self/task")
    if tasks.is_dir():
        names = [(t / "comm").read_text().strip() for t in tasks.iterdir()]
        assert not [n for n in names if "gloo" in n], f"rank {rank}: threads {names}"


def test_two_process_search_equals_single(tiny, tmp_path):
    import socket

    model, tok = tiny
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_worker, args=(2, port, str(tmp_path / "m"),
                                               str(tmp_path / "dist.json")), nprocs=2)
    dist = json.loads((tmp_path / "dist.json").read_text())
    single = run_search(model, tok, {"arc_easy": examples()}, {"seed": 0},
                        tmp_path / "single.json", k=3, progress=False)
    assert [c["skip"] for c in dist["candidates"]] == [c["skip"] for c in single["candidates"]]
    for d, s in zip(dist["candidates"], single["candidates"], strict=True):
        assert [p["block"] for p in d["trajectory"]] == [p["block"] for p in s["trajectory"]]
        # Shards batch the rows differently, so fp32 sums differ in the last digits.
        np.testing.assert_allclose([p["loss"] for p in d["trajectory"]],
                                   [p["loss"] for p in s["trajectory"]], rtol=1e-4, atol=1e-5)


def test_sleb_matches_plain_perplexity(tiny):
    from convert.sleb import sleb_search

    model, tok = tiny
    text = " ".join(q + " " + " ".join(c) for q, c in QUESTIONS) * 2
    out = sleb_search(model, tok, text, k=1, seq_len=16, n_chunks=4, progress=False)
    ids = tok.encode(text, add_special_tokens=False)
    chunks = torch.tensor([ids[i * 17:(i + 1) * 17] for i in range(4)])
    nll = {}
    for b in range(1, 7):
        logp = torch.log_softmax(torch_logits(model, chunks, [b]).double(), -1)
        nll[b] = -logp[:, :-1].gather(2, chunks[:, 1:, None]).mean().item()
    best = min(nll, key=nll.get)
    assert out["skip"] == [best]
    assert out["perplexity"][0] == pytest.approx(np.exp(nll[best]), rel=1e-6)


def test_merge_runs_equals_one_run(tiny, tmp_path):
    from convert.search import merge_runs

    model, tok = tiny
    exs = {"arc_easy": examples()[:4], "arc_challenge": examples()[3:]}
    both = run_search(model, tok, exs, {"seed": 0}, tmp_path / "both.json", k=2, progress=False)
    for task in exs:
        run_search(model, tok, {task: exs[task]}, {"seed": 0}, tmp_path / f"{task}.json", k=2,
                   progress=False)
    merged = merge_runs([tmp_path / "arc_challenge.json", tmp_path / "arc_easy.json"],
                        tmp_path / "merged.json", list(exs))
    assert merged["complete"] and merged["settings"] == both["settings"]
    assert merged["calibration"] == both["calibration"]
    assert [(c["name"], c["skip"], [p["loss"] for p in c["trajectory"]])
            for c in merged["candidates"]] == [
        (c["name"], c["skip"], [p["loss"] for p in c["trajectory"]]) for c in both["candidates"]]


def test_from_run_equals_a_smaller_search(tiny, tmp_path, monkeypatch, capsys):
    from convert.search import truncate_run

    model, tok = tiny
    exs = {"arc_easy": examples()}
    big = run_search(model, tok, exs, {"seed": 0}, tmp_path / "k3.json", k=3, progress=False)
    small = run_search(model, tok, exs, {"seed": 0}, tmp_path / "k2.json", k=2, progress=False)
    code, out, _ = run_cli(["search", "-k", "2", "--from-run", str(tmp_path / "k3.json"),
                            "--out", str(tmp_path / "cut.json")], monkeypatch, capsys)
    assert code == 0 and "arc_easy-likelihood-k2: skip" in out
    cut = json.loads((tmp_path / "cut.json").read_text())
    assert cut["settings"] == small["settings"] and cut["calibration"] == small["calibration"]
    assert [(c["name"], c["k"], c["skip"], [(p["block"], p["loss"]) for p in c["trajectory"]])
            for c in cut["candidates"]] == [
        (c["name"], c["k"], c["skip"], [(p["block"], p["loss"]) for p in c["trajectory"]])
        for c in small["candidates"]]
    with pytest.raises(PuddingError, match="k >= 4"):
        truncate_run(big, 4, tmp_path / "bad.json")


def test_sleb_cli_resumes_extends_and_cuts(tmp_path, monkeypatch, capsys):
    tiny_llama(tmp_path / "m", num_layers=6)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(q + " " + " ".join(c) for q, c in QUESTIONS) * 2)
    base = ["sleb", "--model", str(tmp_path / "m"), "--text", str(text), "--seq-len", "16",
            "--chunks", "4", "--dtype", "float32", "--device", "cpu"]

    def run(*args):
        code, out, err = run_cli([*base, *args], monkeypatch, capsys)
        assert code == 0, err
        return json.loads(Path(args[args.index("--out") + 1]).read_text())

    def phases(r):
        return [(p["block"], pytest.approx(p["loss"], rel=1e-6)) for p in r["trajectory"]]

    full = run("-k", "3", "--out", str(tmp_path / "a.json"))
    assert len(full["trajectory"]) == 3 and full["settings"]["k"] == 3
    cut = {**full, "trajectory": full["trajectory"][:1]}  # as if killed after one phase
    (tmp_path / "b.json").write_text(json.dumps(cut))
    resumed = run("-k", "3", "--out", str(tmp_path / "b.json"))
    assert phases(resumed) == phases(full)
    assert resumed["trajectory"][0] == full["trajectory"][0]  # kept, timings and all
    small = run("-k", "2", "--from-run", str(tmp_path / "a.json"),
                "--out", str(tmp_path / "c.json"))
    fresh = run("-k", "2", "--out", str(tmp_path / "d.json"))
    assert small["skip"] == fresh["skip"] and phases(small) == phases(fresh)
    assert small["perplexity"] == pytest.approx(fresh["perplexity"], rel=1e-6)
    code, _, err = run_cli([*base, "--seq-len", "8", "-k", "3", "--out", str(tmp_path / "a.json")],
                           monkeypatch, capsys)  # the last --seq-len counts
    assert code != 0 and "other settings (seq_len)" in err


# -- the fidelity loss: KL to dense on chat prompts' dense continuations --

CHAT_TEXTS = ["Which gas do plants absorb from the air?", "How do you boil an egg?",
              "hello, how are you today?", "What is the capital of France?",
              "She poured the water into the glass because"]
N_CHAT = 6


def chat_prompts():
    from pudding_mlx.prompts import ChatPrompt

    return [ChatPrompt(f"p{i}", "test", "train", t) for i, t in enumerate(CHAT_TEXTS)]


def brute_force_fidelity(model, tok, k):
    """Greedy search with plain HF forwards: dense's continuations by hand-written greedy
    decoding, each trial's KL(dense || set) per token in numpy; the loss is the mean over
    prompts of each prompt's mean KL. Returns (blocks, losses) per phase."""
    from helpers import chat_ids, torch_greedy

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    requests = []
    for text in CHAT_TEXTS:
        ids = chat_ids(tok, text)
        cont = torch_greedy(model, ids, [], N_CHAT, tok.eos_token_id)
        span = slice(len(ids) - 1, len(ids) + len(cont) - 1)
        requests.append((ids + cont, span))
    dense = [log_softmax(torch_logits(model, seq, []).double().numpy()[span])
             for seq, span in requests]
    n_layers, chosen, losses = len(model.model.layers), [], []
    for _ in range(k):
        results = {}
        for b in [b for b in range(1, n_layers - 1) if b not in chosen]:
            kls = []
            for (seq, span), d in zip(requests, dense, strict=True):
                s = log_softmax(torch_logits(model, seq, chosen + [b]).double().numpy()[span])
                kls.append((np.exp(d) * (d - s)).sum(-1).mean())
            results[b] = float(np.mean(kls))
        best = min(results, key=lambda b: (results[b], b))
        chosen.append(best)
        losses.append(results[best])
    return chosen, losses


def test_fidelity_search_matches_brute_force(tiny):
    from convert.search import CHAT, chat_examples

    model, tok = tiny
    ref, ref_losses = brute_force_fidelity(model, tok, 3)
    exs = chat_examples(model, tok, chat_prompts(), N_CHAT)
    evals = {}
    for name, kw in (("fast", {}), ("naive", {"reuse_prefix": False}),
                     ("prefix", {"state_budget_gb": 0})):
        scorer = SetScorer(model, exs, batch_size=2, fidelity=True, **kw)
        got = greedy_search(scorer, GreedyRun.new("c", CHAT, "fidelity", 3))
        assert [p.block for p in got.trajectory] == ref, name
        assert [p.loss for p in got.trajectory] == pytest.approx(ref_losses, rel=1e-4, abs=1e-6)
        evals[name] = scorer.runner.evals
    assert evals["fast"] <= evals["prefix"] < evals["naive"]
    with pytest.raises(PuddingError, match="needs a task scorer"):
        scorer.losses([], [1, 2], "likelihood")


def test_fidelity_search_cli_from_run_and_resume(tiny, tmp_path, monkeypatch, capsys):
    model, tok = tiny
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": p.id, "text": p.text, "split": "train"}) + "\n"
                               for p in chat_prompts()))
    base = ["search", "--model", str(tmp_path / "m"), "--losses", "fidelity", "--samples", "4",
            "--prompts", str(prompts), "--max-tokens", str(N_CHAT), "--dtype", "float32",
            "--device", "cpu", "--batch-size", "2"]

    def run(*args):
        code, out, err = run_cli([*base, *args], monkeypatch, capsys)
        assert code == 0, err
        return json.loads(Path(args[args.index("--out") + 1]).read_text())

    def phases(doc):
        return [[(p["block"], pytest.approx(p["loss"], rel=1e-6)) for p in c["trajectory"]]
                for c in doc["candidates"]]

    big = run("-k", "3", "--out", str(tmp_path / "k3.json"))
    assert [c["name"] for c in big["candidates"]] == ["chat-fidelity-k3"]
    assert big["settings"]["tasks"] == [] and len(big["calibration"]["chat"]) == 4
    assert big["candidates"][0]["task"] == "chat" and big["candidates"][0]["loss"] == "fidelity"
    small = run("-k", "2", "--out", str(tmp_path / "k2.json"))
    code, out, _ = run_cli(["search", "-k", "2", "--from-run", str(tmp_path / "k3.json"),
                            "--out", str(tmp_path / "cut.json")], monkeypatch, capsys)
    assert code == 0 and "chat-fidelity-k2: skip" in out
    cut = json.loads((tmp_path / "cut.json").read_text())
    assert cut["settings"] == small["settings"]
    assert [c["skip"] for c in cut["candidates"]] == [c["skip"] for c in small["candidates"]]
    assert phases(cut) == phases(small)
    # killed after one phase, then resumed: the same trajectory, dense not decoded again
    from convert import fidelity

    decoded, decode = [], fidelity.greedy_continuation
    monkeypatch.setattr(fidelity, "greedy_continuation",
                        lambda *a, **kw: decoded.append(1) or decode(*a, **kw))
    assert len(big["continuations"]) == 4
    doc = {**big, "complete": False}
    doc["candidates"] = [{**big["candidates"][0], "trajectory": big["candidates"][0][
        "trajectory"][:1]}]
    (tmp_path / "part.json").write_text(json.dumps(doc))
    assert phases(run("-k", "3", "--out", str(tmp_path / "part.json"))) == phases(big)
    assert decoded == []
    # killed while decoding: the two continuations kept are not decoded again
    doc = {**big, "complete": False, "candidates": [],
           "continuations": dict(list(big["continuations"].items())[:2])}
    (tmp_path / "early.json").write_text(json.dumps(doc))
    assert phases(run("-k", "3", "--out", str(tmp_path / "early.json"))) == phases(big)
    assert len(decoded) == 2
    code, _, err = run_cli([*base, "--max-tokens", "3", "-k", "3",
                            "--out", str(tmp_path / "k3.json")], monkeypatch, capsys)
    assert code != 0 and "other settings (chat)" in err

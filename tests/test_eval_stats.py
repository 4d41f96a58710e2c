"""Statistics and the MLX log-likelihood kernel of `pudding eval`, against hand computations."""

from __future__ import annotations

import numpy as np
import pytest


def test_decisions_by_hand():
    from pudding_mlx.evaluation.stats import decide, gold_margin

    ll, choices = [-4.0, -6.0, -4.0], ["ab", "abcdef", "a"]
    assert decide(ll, choices, norm=False) == 0  # tie between 0 and 2: the first wins
    assert decide(ll, choices, norm=True) == 1  # -4/2, -6/6 = -1, -4/1
    assert gold_margin(ll, choices, 1, norm=True) == pytest.approx(-1.0 - -2.0)
    assert gold_margin(ll, choices, 1, norm=False) == pytest.approx(-2.0)


def test_chance():
    from pudding_mlx.evaluation.stats import above_chance, chance_level

    assert chance_level([2, 4, 4]) == pytest.approx((0.5 + 0.25 + 0.25) / 3)
    # 1000 two-choice questions: chance 0.5, standard error ~0.0158
    assert not above_chance(0.52, [2] * 1000)
    assert above_chance(0.54, [2] * 1000)


def test_paired_bootstrap_edge_cases_and_width():
    from pudding_mlx.evaluation.stats import paired_bootstrap

    same = paired_bootstrap([([1, 0, 1, 1], [1, 0, 1, 1])], 500, 0)
    assert (same.diff, same.low, same.high, same.n) == (0.0, 0.0, 0.0, 4)
    shift = paired_bootstrap([([1] * 50, [0] * 50)], 500, 0)
    assert shift.low == shift.high == shift.diff == 1.0
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2, 4000)
    b = np.where(rng.random(4000) < 0.8, a, 1 - a)
    d = paired_bootstrap([(a, b)], 2000, 0)
    assert d.diff == pytest.approx(np.mean(a) - np.mean(b))
    half = 1.96 * np.std(a - b, ddof=1) / np.sqrt(len(a))  # normal approximation
    assert (d.high - d.low) / 2 == pytest.approx(half, rel=0.1)
    assert d.low < d.diff < d.high
    assert paired_bootstrap([(a, b)], 2000, 0) == d  # seeded


def test_paired_bootstrap_average_over_tasks():
    from pudding_mlx.evaluation.stats import paired_bootstrap

    rng = np.random.default_rng(2)
    groups = [(rng.integers(0, 2, n), rng.integers(0, 2, n)) for n in (300, 1000)]
    d = paired_bootstrap(groups, 1000, 0)
    assert d.diff == pytest.approx(np.mean([a.mean() - b.mean() for a, b in groups]))
    # variance of a mean of independent task differences
    var = sum(np.var(a - b, ddof=1) / len(a) for a, b in groups) / 4
    assert (d.high - d.low) / 2 == pytest.approx(1.96 * np.sqrt(var), rel=0.15)
    assert d.n == 1300


@pytest.mark.parametrize("arch,batched", [("llama", True), ("llama", False), ("gemma3", None)])
@pytest.mark.parametrize("skip", [[], [2, 3]])
def test_shared_prefill_matches_plain_forward(tmp_path, monkeypatch, skip, arch, batched):
    """Context prefilled once, several continuations (one of 1 token, one crossing the KV
    cache's 256-slot step, some the model's own argmax), as a batch or one by one with cache
    trimming, vs one plain forward per request on the whole sequence: sums and greedy flags.
    Gemma 3's sliding blocks have a rotating cache of 4 tokens, far exceeded by the context:
    neither batched nor trimmable, each continuation runs on a copy."""
    import pudding_mlx.evaluation.loglik as loglik

    if batched is False:
        monkeypatch.setattr(loglik, "_batched", lambda cache, n: None)
    import mlx.core as mx
    from helpers import tiny_gemma3, tiny_llama

    from pudding_mlx.evaluation.loglik import loglikelihoods, score_requests
    from pudding_mlx.masking import skip_view
    from pudding_mlx.model import load_lm

    (tiny_llama if arch == "llama" else tiny_gemma3)(tmp_path / "m")
    model, _, _ = load_lm(tmp_path / "m")
    view = skip_view(model, skip)
    from mlx_lm.models.cache import make_prompt_cache

    rng = np.random.default_rng(0)
    ctx = rng.integers(3, 300, 250).tolist()
    conts = [rng.integers(3, 300, n).tolist() for n in (1, 4, 12, 3)]
    greedy: list[int] = []
    for _ in range(3):
        greedy.append(mx.argmax(view(mx.array(ctx + greedy)[None])[0, -1]).item())
    conts += [greedy, greedy[:1], [*greedy[:2], (greedy[2] + 1) % 300]]
    reqs = [(ctx, c) for c in conts]
    got = loglikelihoods(view, lambda: make_prompt_cache(view), reqs)
    assert score_requests(view, lambda: make_prompt_cache(view), reqs) == (
        [s for s, _ in got], [1, 4, 12, 3, 3, 1, 3])
    flags = []
    for cont, (ll, is_greedy) in zip(conts, got, strict=True):
        logits = view(mx.array(ctx + cont)[None])[0].astype(mx.float32)
        lp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True), dtype=np.float64)
        rows = lp[len(ctx) - 1:len(ctx) - 1 + len(cont)]
        assert ll == pytest.approx(rows[np.arange(len(cont)), cont].sum(), abs=2e-4)
        assert is_greedy == (rows.argmax(-1) == cont).all()
        flags.append(is_greedy)
    assert flags[4:] == [True, True, False]

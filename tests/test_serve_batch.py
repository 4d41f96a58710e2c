"""Batched decoding in `pudding serve`: rows under different routes, joining and leaving a running
batch, decode as each request alone does (mlx-lm's own generate_step over the skip view)."""

from __future__ import annotations

import json
import socket
import threading
import time

import mlx.core as mx
import numpy as np
import pytest
from helpers import tiny_in_model_bundle
from mlx_lm.generate import generate_step

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from test_serve import assert_error, chat, request, serving, stream_open, wait_idle  # noqa: E402

import pudding_mlx  # noqa: E402
from pudding_mlx.serve.batch import RoutedBatch  # noqa: E402

TOL = 1e-4  # on log-probabilities (float32)


@pytest.fixture(scope="module")
def pm(shared_tiny_bundle):
    return pudding_mlx.load(shared_tiny_bundle.path, router_backend="mlx")


def alone(pm, skip, tokens, n) -> list[tuple[int, np.ndarray]]:
    """The reference: mlx-lm's greedy generate_step over the skip view, one request."""
    steps = generate_step(mx.array(tokens), pm.view(skip), prompt_cache=pm.make_cache(skip),
                          max_tokens=n)
    return [(token, np.array(logprobs)) for token, logprobs in steps]


def near_tie_flips(got, want) -> int:
    """Log-probabilities within TOL at every step and the same tokens, but where the
    reference's top two are within 2 * TOL (a flip: later steps are not compared)."""
    assert len(got) == len(want)
    for (token, logprobs), (ref_token, ref) in zip(got, want, strict=True):
        np.testing.assert_allclose(logprobs, ref, atol=TOL)
        if token != ref_token:
            top = np.sort(ref)[-2:]
            assert top[1] - top[0] <= 2 * TOL, "a token differs without a near tie"
            return 1
    return 0


def route_of(pm, skip):
    return pm.route("", skip=skip) if skip else pm.route("", "dense")


def test_rows_with_different_routes_joining_and_leaving_decode_as_alone(pm):
    rng = np.random.default_rng(0)
    vocab = pm.model.args.vocab_size

    def prompt(n):
        return rng.integers(3, vocab, n).tolist()

    # name: (skipped blocks, prompt, step it joins at, tokens to generate)
    rows = {"dense": ([], prompt(9), 0, 8), "a": ([1, 2], prompt(14), 0, 4),
            "b": ([2, 3], prompt(5), 0, 8), "late": ([3, 4], prompt(11), 3, 7),
            "a2": ([1, 2], prompt(7), 3, 6)}  # a second row of one route
    batch = RoutedBatch(pm.model)
    order, got, feed, left = [], {name: [] for name in rows}, {}, {}
    for step in range(12):
        for name, (skip, tokens, join, _) in rows.items():
            if join == step:
                route = route_of(pm, skip)
                cache = pm.make_cache(route)
                pm.prefill(route, tokens, cache)
                batch.add(route.skip, cache)
                order.append(name)
                feed[name] = tokens[-1]
        if step == 5:  # "a" comes back: its caches from when it left, and a new turn
            skip, tokens, _, n = rows["a"]
            held = tokens + [t for t, _ in got["a"]]
            rows["a+"] = (skip, held + prompt(3), None, 5)
            pm.prefill(route_of(pm, skip), rows["a+"][1], left["a"], start=len(held) - 1)
            batch.add(skip, left["a"])
            order.append("a+")
            got["a+"], feed["a+"] = [], rows["a+"][1][-1]
        if not order:
            break
        logits = batch.step([feed[name] for name in order])
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        assert len(batch) == len(order)
        for i, name in enumerate(order):
            feed[name] = int(mx.argmax(logprobs[i]))
            got[name].append((feed[name], np.array(logprobs[i])))
        for name in [n for n in order if len(got[n]) == rows[n][3]]:
            left[name] = batch.remove(order.index(name), keep_cache=True)
            order.remove(name)
    assert not order and len(batch) == 0
    assert all(lane.cache is None for lane in batch.lanes)
    flips = sum(near_tie_flips(got[name], alone(pm, skip, tokens, n))
                for name, (skip, tokens, _, n) in rows.items())
    print(f"near-tie flips: {flips}")
    # a leaving row's caches hold its prompt and every generated token but the last
    skip, tokens, _, n = rows["dense"]
    assert [c.offset for c in left["dense"]] == [len(tokens) + n - 1] * 6


def test_in_model_router_prefix_continues_into_the_batch(tmp_path):
    tb, _ = tiny_in_model_bundle(tmp_path / "b")
    pm = pudding_mlx.load(tb.path)
    text = "Which gas do plants absorb from the air?"
    tokens = pm.encode(text)
    route = pm.route(text, tokens=tokens)
    assert route.prefix is not None and route.skip
    batch = RoutedBatch(pm.model)
    for r, t in [(route, tokens), (pm.route("", "dense"), tokens[:-2])]:
        cache = pm.make_cache(r)
        pm.prefill(r, t, cache)
        batch.add(r.skip, cache)
    assert route.prefix is None  # used up
    feed, got = [tokens[-1], tokens[-3]], [[], []]
    for _ in range(5):
        logits = batch.step(feed)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        feed = mx.argmax(logprobs, axis=-1).tolist()
        for i in range(2):
            got[i].append((feed[i], np.array(logprobs[i])))
    assert near_tie_flips(got[0], alone(pm, route.skip, tokens, 5)) == 0
    assert near_tie_flips(got[1], alone(pm, [], tokens[:-2], 5)) == 0


def test_concurrent_requests_answer_as_each_served_alone(pm, monkeypatch):
    name = pm.path.name
    requests = [(name, "How do you boil an egg?"), (f"{name}:dense", "Tell me a story."),
                (f"{name}:static", "hello, how are you today?"), (name, "Name three colours."),
                (f"{name}:dense", "How do you boil an egg?")]
    with serving(pm, decode_concurrency=4, prompt_cache_bytes=0) as (url, engine):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)

        def ask(model, text, **kwargs):
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": text}], max_tokens=16,
                **kwargs)
            return reply.choices[0].message.content, reply.usage.completion_tokens

        sampled = {"temperature": 1.0, "top_p": 0.9, "seed": 3}
        want = [ask(m, t) for m, t in requests] + [ask(name, "Once upon", **sampled)]
        sizes = []
        step = engine.batch.step

        def recording(tokens):
            sizes.append(len(tokens))
            return step(tokens)

        monkeypatch.setattr(engine.batch, "step", recording)
        got = [None] * len(want)

        def run(i):
            got[i] = ask(*requests[i]) if i < len(requests) else ask(name, "Once upon",
                                                                      **sampled)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(want))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert got == want
        assert max(sizes) >= 3  # decoded together (at most 4)
        assert max(sizes) <= 4


def test_queue_bound_counts_the_decode_batch(pm, monkeypatch):
    """2 decoding and 1 waiting fill the server; the next request gets 503 + Retry-After."""
    monkeypatch.setattr(pm.tokenizer, "eos_token_ids", set())  # long answers
    name = pm.path.name
    with serving(pm, decode_concurrency=2, max_queue=1,
                 max_tokens_limit=100_000) as (url, engine):
        long = chat(f"{name}:dense", max_tokens=100_000, stream=True)
        socks = [stream_open(url, long)[0] for _ in range(2)]
        host, port = url.removeprefix("http://").split(":")
        waiting = socket.create_connection((host, int(port)), timeout=30)
        data = json.dumps(chat(name, max_tokens=100_000)).encode()
        waiting.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                        b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
        socks.append(waiting)
        deadline = time.monotonic() + 10
        while engine.pending < 3:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        status, headers, body = request(url, "GET", "/health", key=None)
        assert (body["generating"], body["waiting"]) == (2, 1)
        status, headers, body = request(url, "POST", "/v1/chat/completions", chat(name))
        assert_error(status, body, 503, "server_busy")
        assert headers["Retry-After"] == "1"
        for sock in socks:
            sock.close()
        wait_idle(engine)
        assert len(engine.rows) == 0 and len(engine.batch) == 0


def test_in_model_router_routes_on_the_worker_thread(tmp_path):
    """The router's head was loaded on another thread than the one that routes."""
    tb, _ = tiny_in_model_bundle(tmp_path / "b")
    pm = pudding_mlx.load(tb.path)
    with serving(pm) as (url, _):
        status, _, body = request(url, "POST", "/v1/chat/completions",
                                  chat(pm.path.name, max_tokens=3), key=None)
    assert status == 200, body
    assert body["pudding"]["reason"] == "router"

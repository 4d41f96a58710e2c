"""Concurrent clients against `pudding serve`: aggregate tokens/s and per-request latency.

Aggregate tokens/s is every generated token over the burst's wall time; decode tokens/s counts
the tokens after each request's first, from the first first token to the burst's end.

For 1, 4, 8 and 16 clients, each sending one streamed greedy chat request at once (the
held-out packaged prompts, with the round's number appended so that no prompt cache helps):
- "batched": `pudding serve` with its defaults (decode concurrency 8, queue 8);
- "one-at-a-time": `pudding serve --decode-concurrency 1 --max-queue 16`;
each on the bundle's routed model (NAME) and on NAME:dense; and "mlx-lm": `mlx_lm.server` on
the bundle's model folder (dense) with its defaults, where it runs. Every side runs in every
round, in rotating order, so a machine getting busier slows all alike; the ratios are taken
within a round, then the median over rounds. The texts of batched and one-at-a-time requests
are compared (one at a time is each request served alone).

Then in-process, after the servers stop: the prompts routed and decoded together as the server
batches them, against each decoded alone by mlx-lm's generate_step over its skip view (largest
log-probability difference, token flips and the reference's top-two gap at each flip); and the
decode step of 8 rows under 4 different sets, one batch with per-block lanes vs one batch per
set (the rows grouped by route), interleaved.

    python benchmarks/serve_speed.py --bundle BUNDLE --out examples/results/serve/serve_speed.json
"""

from __future__ import annotations

import copy
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import click

CLIENTS = (1, 4, 8, 16)


@dataclass
class Reply:
    status: int
    tokens: int = 0
    ttft_s: float | None = None
    latency_s: float | None = None
    text: str = ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], port: int) -> subprocess.Popen:
    env = dict(os.environ, PUDDING_OPENBLAS="0")  # keep this process's LD_PRELOAD as it is
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise click.ClickException(f"{' '.join(command[:4])} did not come up")


def ask(port: int, model: str, prompt: str, max_tokens: int) -> Reply:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}],
                       "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    tic = time.perf_counter()
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
    except ConnectionError:  # mlx_lm.server's listen backlog is 5: more connect attempts reset
        return Reply(0)
    if response.status != 200:
        response.read()
        return Reply(response.status)
    reply = Reply(200)
    for line in response:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            reply.tokens = chunk["usage"]["completion_tokens"]
        elif chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
            reply.ttft_s = reply.ttft_s or time.perf_counter() - tic
            reply.text += chunk["choices"][0]["delta"]["content"]
    reply.latency_s = time.perf_counter() - tic
    conn.close()
    return reply


def burst(port: int, model: str, prompts: list[str], max_tokens: int) -> dict:
    """All prompts sent at once: aggregate tokens/s and per-request latency."""
    with ThreadPoolExecutor(len(prompts)) as pool:
        tic = time.perf_counter()
        replies = list(pool.map(lambda p: ask(port, model, p, max_tokens), prompts))
        wall = time.perf_counter() - tic
    done = [r for r in replies if r.status == 200]
    latency = sorted(r.latency_s for r in done)
    # decoding: every token after each request's first, from the first first token to the end
    decode_s = wall - min((r.ttft_s for r in done if r.ttft_s), default=wall)
    return {"wall_s": wall, "tokens": sum(r.tokens for r in done),
            "tokens_per_s": sum(r.tokens for r in done) / wall,
            "decode_tokens_per_s": sum(max(r.tokens - 1, 0) for r in done) / decode_s
            if decode_s > 0 else None,
            "latency_median_s": statistics.median(latency) if latency else None,
            "latency_p95_s": latency[min(len(latency) - 1, int(0.95 * len(latency)))]
            if latency else None,
            "ttft_median_s": statistics.median(r.ttft_s for r in done if r.ttft_s)
            if done else None,
            "busy_503": sum(r.status == 503 for r in replies),
            "other_errors": sum(r.status not in (0, 200, 503) for r in replies),
            "connection_refused": sum(r.status == 0 for r in replies),
            "texts": [r.text if r.status == 200 else None for r in replies]}


def in_process(bundle: str, prompts: list[str], max_tokens: int, steps: int) -> dict:
    """Batched rows vs each alone (mlx-lm's generate_step), and lanes vs grouped by route."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.generate import generate_step

    import pudding_mlx
    from pudding_mlx.serve.batch import RoutedBatch
    from pudding_mlx.serve.engine import encode_prompt

    pm = pudding_mlx.load(bundle, verify=False)
    rows = []
    for text in prompts:
        tokens = encode_prompt(pm, [{"role": "user", "content": text}])
        rows.append((pm.route(text, tokens=tokens), tokens))
    batch, feed = RoutedBatch(pm.model), []
    for route, tokens in rows:
        cache = pm.make_cache(route)
        pm.prefill(route, tokens, cache)
        batch.add(route.skip, cache)
        feed.append(tokens[-1])
    got = [[] for _ in rows]
    for _ in range(max_tokens):
        logits = batch.step(feed)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        feed = mx.argmax(logprobs, axis=-1).tolist()
        for i, token in enumerate(feed):
            got[i].append((token, np.array(logprobs[i])))
    max_diff, flips = 0.0, []
    for i, (route, tokens) in enumerate(rows):
        steps_alone = generate_step(mx.array(tokens), pm.view(route.skip),
                                    prompt_cache=pm.make_cache(route.skip),
                                    max_tokens=max_tokens)
        for n, ((token, lp), (ref_token, ref)) in enumerate(zip(got[i], steps_alone, strict=True)):
            ref = np.array(ref)
            max_diff = max(max_diff, float(np.abs(lp - ref).max()))
            if token != ref_token:
                top = np.sort(ref)[-2:]
                flips.append({"row": i, "step": n, "top_two_gap": float(top[1] - top[0])})
                break
    match = {"rows": len(rows), "tokens_per_row": max_tokens,
             "routes": sorted({r.name for r, _ in rows}),
             "max_abs_logprob_diff": max_diff, "flips": flips}

    # decode step: 8 rows under 4 sets, per-block lanes vs one batch per set
    sets = [c.skip for c in pm.candidates if c.skip][-4:] or [[]]
    caches = []
    for i, (_, tokens) in enumerate(rows[:8]):
        skip = sets[i % len(sets)]
        cache = pm.make_cache(skip)
        pm.prefill(pm.route("", skip=skip) if skip else pm.route("", "dense"), tokens, cache)
        caches.append((skip, cache, tokens[-1]))
    lanes = RoutedBatch(pm.model)
    groups: dict[tuple, tuple[RoutedBatch, list[int]]] = {}
    for skip, cache, token in caches:
        lanes.add(skip, copy.deepcopy(cache))
        group = groups.setdefault(tuple(skip), (RoutedBatch(pm.model), []))
        group[0].add(skip, cache)
        group[1].append(token)
    lane_feed = [token for _, _, token in caches]
    times = {"lanes": [], "grouped": []}
    for n in range(steps + 1):
        for side in ("lanes", "grouped") if n % 2 else ("grouped", "lanes"):
            tic = time.perf_counter()
            if side == "lanes":
                mx.eval(lanes.step(lane_feed))
            else:
                mx.eval([b.step(f) for b, f in groups.values()])
            if n:  # the first step of each is a warm-up
                times[side].append(time.perf_counter() - tic)
    step_ms = {side: statistics.median(t) * 1e3 for side, t in times.items()}
    grouping = {"rows": len(caches), "sets": [list(s) for s in sets], "steps": steps,
                "step_ms": step_ms, "grouped_over_lanes": step_ms["grouped"] / step_ms["lanes"]}
    return {"match": match, "grouping": grouping}


def ratios(rounds: list[dict], a: str, b: str, n: int, key: str) -> float | None:
    values = [r[a][n][key] / r[b][n][key] for r in rounds
              if a in r and b in r and r[a][n][key] and r[b][n][key]]
    return round(statistics.median(values), 3) if values else None


@click.command()
@click.option("--bundle", "-b", required=True, type=click.Path(exists=True))
@click.option("--max-tokens", default=24, show_default=True)
@click.option("--rounds", default=2, show_default=True)
@click.option("--clients", default=",".join(map(str, CLIENTS)), show_default=True)
@click.option("--no-mlx-lm", is_flag=True, help="Leave out mlx_lm.server.")
@click.option("--grouping-steps", default=12, show_default=True)
@click.option("--out", default=None, type=click.Path(), help="Write the report as JSON.")
def main(bundle, max_tokens, rounds, clients, no_mlx_lm, grouping_steps, out):
    import mlx.core as mx

    from pudding_mlx.prompts import read_prompts, select

    clients = [int(c) for c in clients.split(",")]
    texts = [p.text for p in select(read_prompts(), "heldout", max(clients))]
    bundle = str(Path(bundle).resolve())
    name = Path(bundle).name
    load_start = os.getloadavg()
    pudding = [sys.executable, "-m", "pudding_mlx.cli", "serve", "-b", bundle, "--no-verify",
               "--prompt-cache-mb", "0"]
    servers = {"batched": pudding, "one-at-a-time": pudding + ["--decode-concurrency", "1",
                                                               "--max-queue", "16"]}
    if not no_mlx_lm:
        servers["mlx-lm"] = [sys.executable, "-m", "mlx_lm", "server", "--model",
                             str(Path(bundle) / "model")]
    ports, procs = {}, {}
    sides = {}
    try:
        for server, command in servers.items():
            ports[server] = free_port()
            try:
                procs[server] = start(command + ["--port", str(ports[server])], ports[server])
            except click.ClickException as e:
                print(f"{server}: {e}", file=sys.stderr)
                continue
            models = {"dense": "default_model" if server == "mlx-lm" else f"{name}:dense"}
            if server != "mlx-lm":
                models["routed"] = name
            for kind, model in models.items():
                sides[f"{server} {kind}"] = (ports[server], model)
        for port, model in sides.values():  # warm-up: one request per side
            ask(port, model, texts[0], 4)
        results = []
        for r in range(rounds):
            order = list(sides)[r % len(sides):] + list(sides)[:r % len(sides)]
            result = {side: {} for side in order}
            for n in clients:
                prompts = [f"{t} ({r})" for t in texts[:n]]
                for side in order:
                    result[side][n] = burst(*sides[side], prompts, max_tokens)
                    b = result[side][n]
                    print(f"round {r + 1}, {n} clients, {side}: {b['tokens_per_s']:.1f} tok/s, "
                          f"decode {b['decode_tokens_per_s'] or 0:.1f} tok/s, "
                          f"median latency {b['latency_median_s'] or 0:.1f} s, "
                          f"{b['busy_503']} x 503, {b['other_errors']} other errors",
                          file=sys.stderr)
            results.append(result)
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(60)

    def same_texts(a: str, b: str) -> dict:
        pairs = [(x, y) for r in results for n in clients
                 for x, y in zip(r[a][n]["texts"], r[b][n]["texts"], strict=True)]
        return {"requests": len(pairs), "identical": sum(x == y for x, y in pairs)}

    summary = {}
    for n in clients:
        row = {side: {k: round(statistics.median(r[side][n][k] for r in results), 3)
                      for k in ("decode_tokens_per_s", "tokens_per_s", "latency_median_s",
                                "latency_p95_s", "ttft_median_s")}
               for side in sides}
        for side in sides:
            row[side]["busy_503"] = sum(r[side][n]["busy_503"] for r in results)
        row["ratios"] = {
            f"{a} / {b}, {key}": ratios(results, a, b, n, key)
            for key in ("decode_tokens_per_s", "tokens_per_s")
            for a, b in [("batched routed", "one-at-a-time routed"),
                         ("batched dense", "one-at-a-time dense"),
                         ("batched routed", "batched dense"),
                         ("batched dense", "mlx-lm dense"),
                         ("batched routed", "mlx-lm dense")]
            if a in sides and b in sides}
        summary[n] = row
    texts_match = {k: same_texts(f"batched {k}", f"one-at-a-time {k}")
                   for k in ("routed", "dense")}
    for r in results:
        for side in r.values():
            for b in side.values():
                del b["texts"]
    report = {
        "bundle": bundle, "max_tokens": max_tokens, "rounds": rounds, "clients": clients,
        "prompts": texts,
        "summary": summary,
        "batched_vs_alone_texts": texts_match,
        "in_process": in_process(bundle, texts[:max(clients)], max_tokens, grouping_steps),
        "rounds_raw": results,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_average_start": load_start, "load_average_end": os.getloadavg(),
                    "mlx": mx.__version__,
                    "openblas_preloaded": "openblas" in os.environ.get("LD_PRELOAD", "")},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")


if __name__ == "__main__":
    main()

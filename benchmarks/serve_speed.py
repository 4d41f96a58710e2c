"""Tokens/s through `pudding serve` vs in-process generation on the same bundle, and the time
to the first streamed token.

Three sides, interleaved (their order rotates every trial, so a machine getting busier slows
all alike), same route, prompt, token limit and greedy decoding:
- "in-process": generation on this process's main thread, as `pudding generate` does;
- "in-process-thread": the same on a worker thread, as the server generates (on MLX's Linux
  CPU build the two can differ, which is no cost of serving);
- "server": streamed through a `pudding serve` process (its prompt cache off, so that no trial
  reuses another's prefill).
Reported: medians per side, and medians of the server's ratio to each in-process side within
a trial (the steadier figure on a busy machine). CPU time per token (read from /proc on Linux)
and the share of the server's CPU time spent on its event loop thread (HTTP, JSON, server-sent
events) do not depend on what else the machine runs. Every side gets this process's LD_PRELOAD.

    python benchmarks/serve_speed.py --bundle BUNDLE --out examples/results/serve/speed.json
"""

from __future__ import annotations

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
from dataclasses import asdict, dataclass
from pathlib import Path

import click

PROMPT = "Write a long story about a robot who learns to paint, with many details."
SIDES = ("in-process", "in-process-thread", "server")


@dataclass
class Trial:
    side: str
    tokens: int
    ttft_s: float  # request to first token (server: first streamed text chunk)
    total_s: float  # request to last token
    cpu_s: float | None  # CPU time of the generating process during the request
    text: str
    loop_cpu_s: float | None = None  # of that, the server's event loop thread

    @property
    def decode_tps(self) -> float:
        return (self.tokens - 1) / (self.total_s - self.ttft_s)

    @property
    def total_tps(self) -> float:
        return self.tokens / self.total_s

    @property
    def cpu_per_token(self) -> float | None:
        return None if self.cpu_s is None else self.cpu_s / self.tokens


def in_process(pm, prompt: str, max_tokens: int, side: str) -> Trial:
    from mlx_lm.sample_utils import make_sampler

    cpu, tic = time.process_time(), time.perf_counter()
    route = pm.route(prompt)
    ttft, text, tokens = None, "", 0
    for r in pm.stream_generate(pm.encode(prompt), max_tokens=max_tokens, route=route,
                                sampler=make_sampler(0.0)):
        ttft = ttft or time.perf_counter() - tic
        text, tokens = text + r.text, r.generation_tokens
    return Trial(side, tokens, ttft, time.perf_counter() - tic, time.process_time() - cpu, text)


def process_cpu_s(pid: int, thread: bool = False) -> float | None:
    """User + system CPU seconds of process `pid`, or of its main thread (Linux), else None."""
    try:
        stat = Path(f"/proc/{pid}/task/{pid}/stat" if thread else f"/proc/{pid}/stat")
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def through_server(server: subprocess.Popen, port: int, model: str, prompt: str,
                   max_tokens: int) -> Trial:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}],
                       "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    loop_cpu, cpu = process_cpu_s(server.pid, thread=True), process_cpu_s(server.pid)
    tic = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    ttft, total, text, tokens = None, None, "", 0
    for line in response:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            ttft = ttft or time.perf_counter() - tic
            text += chunk["choices"][0]["delta"]["content"]
            total = time.perf_counter() - tic
    conn.close()
    if cpu is not None:
        cpu, loop_cpu = (process_cpu_s(server.pid) - cpu,
                         process_cpu_s(server.pid, thread=True) - loop_cpu)
    return Trial("server", tokens, ttft, total, cpu, text, loop_cpu)


def start_server(bundle: str, port: int, max_tokens: int) -> subprocess.Popen:
    env = dict(os.environ, PUDDING_OPENBLAS="0")  # keep this process's LD_PRELOAD as it is
    proc = subprocess.Popen(
        [sys.executable, "-m", "pudding_mlx.cli", "serve", "-b", bundle, "--port", str(port),
         "--prompt-cache-mb", "0", "--max-tokens-limit", str(max_tokens), "--no-verify"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
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
    raise click.ClickException("pudding serve did not come up")


def summary(trials: list[Trial]) -> dict:
    cpu = [t.cpu_per_token for t in trials if t.cpu_s is not None]
    return {"tokens": [t.tokens for t in trials],
            "ttft_ms": round(statistics.median(t.ttft_s for t in trials) * 1e3, 1),
            "decode_tps": round(statistics.median(t.decode_tps for t in trials), 2),
            "total_tps": round(statistics.median(t.total_tps for t in trials), 2),
            "cpu_ms_per_token": round(statistics.median(cpu) * 1e3, 2) if cpu else None,
            "trials": [{k: round(v, 4) if isinstance(v, float) else v
                        for k, v in asdict(t).items() if k != "text" and v is not None}
                       for t in trials]}


def versus(base: list[Trial], served: list[Trial]) -> dict:
    """Medians over trials of server / base (tokens/s, CPU per token) and server - base (time
    to first token)."""
    pairs = list(zip(base, served, strict=True))
    out = {"decode_tps_ratio": statistics.median(b.decode_tps / a.decode_tps for a, b in pairs),
           "total_tps_ratio": statistics.median(b.total_tps / a.total_tps for a, b in pairs),
           "ttft_diff_ms": statistics.median((b.ttft_s - a.ttft_s) * 1e3 for a, b in pairs)}
    if all(t.cpu_s for t in base + served):
        out["cpu_per_token_ratio"] = statistics.median(
            b.cpu_per_token / a.cpu_per_token for a, b in pairs)
    out = {k: round(v, 4) for k, v in out.items()}
    out["same_text"] = all(a.text == b.text for a, b in pairs)
    return out


@click.command()
@click.option("--bundle", "-b", required=True, type=click.Path(exists=True))
@click.option("--prompt", default=PROMPT, show_default=True)
@click.option("--max-tokens", default=128, show_default=True)
@click.option("--trials", default=5, show_default=True)
@click.option("--warmup", default=1, show_default=True)
@click.option("--out", default=None, type=click.Path(), help="Write the report as JSON.")
def main(bundle, prompt, max_tokens, trials, warmup, out):
    import mlx.core as mx

    import pudding_mlx

    load_start = os.getloadavg()
    pm = pudding_mlx.load(bundle, verify=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = start_server(bundle, port, max_tokens)
    worker = ThreadPoolExecutor(1)
    model = Path(bundle).resolve().name
    run = {
        "in-process": lambda: in_process(pm, prompt, max_tokens, "in-process"),
        "in-process-thread": lambda: worker.submit(
            in_process, pm, prompt, max_tokens, "in-process-thread").result(),
        "server": lambda: through_server(server, port, model, prompt, max_tokens),
    }
    runs: dict[str, list[Trial]] = {side: [] for side in SIDES}
    try:
        for i in range(warmup + trials):
            done = [run[side]() for side in SIDES[i % 3:] + SIDES[:i % 3]]
            for t in done if i >= warmup else []:
                runs[t.side].append(t)
            print(f"trial {i + 1 - warmup}: " + ", ".join(
                f"{t.side} {t.tokens} tokens, ttft {t.ttft_s * 1e3:.0f} ms, "
                f"{t.decode_tps:.1f} tok/s" for t in done), file=sys.stderr)
    finally:
        server.terminate()
        server.wait(60)
        worker.shutdown()
    route = pm.route(prompt)
    loop_share = [t.loop_cpu_s / t.cpu_s for t in runs["server"] if t.cpu_s]
    report = {
        "bundle": str(Path(bundle).resolve()), "base_model": pm.manifest.base_model,
        "route": {"set": route.name, "skip": route.skip}, "prompt": prompt,
        "prompt_tokens": len(pm.encode(prompt)), "max_tokens": max_tokens,
        "trials": trials, "warmup": warmup,
        "server_vs": {side: versus(runs[side], runs["server"]) for side in SIDES[:2]},
        "server_event_loop_cpu_share": (round(statistics.median(loop_share), 4)
                                        if loop_share else None),
        "sides": {side: summary(runs[side]) for side in SIDES},
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

"""`pudding serve`: the real server on a free local port, the real `openai` client, raw HTTP."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import pytest
from helpers import run_cli

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

import pudding_mlx  # noqa: E402
from pudding_mlx.serve.engine import StopText, encode_prompt  # noqa: E402
from pudding_mlx.serve.prompt_cache import PromptCache, common_prefix  # noqa: E402
from pudding_mlx.serve.server import ServeConfig, Server  # noqa: E402

KEY = "test-key"
QUESTION = "Question: How do you boil an egg?"
FLAGS = {"": [], ":dense": ["--dense"], ":static": ["--static"]}


@pytest.fixture(scope="module")
def pm(shared_tiny_bundle):
    return pudding_mlx.load(shared_tiny_bundle.path, router_backend="mlx")


@pytest.fixture(scope="module")
def name(shared_tiny_bundle):
    return shared_tiny_bundle.path.name


@contextmanager
def serving(pm, **settings):
    """The server on a free port of 127.0.0.1, in a thread: (base URL, its engine)."""
    server = Server(pm, ServeConfig(pm.path.name, port=0, **settings), log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", server.engine
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def server(pm):
    with serving(pm, api_key=KEY, max_tokens_limit=64, max_body_bytes=16_384) as running:
        yield running


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def request(url: str, method: str, path: str, body: bytes | str | dict | None = None,
            headers: dict | None = None, key: str | None = KEY):
    """Raw HTTP: (status, headers, the JSON body)."""
    host = url.removeprefix("http://")
    conn = http.client.HTTPConnection(host, timeout=60)
    headers = {"Content-Type": "application/json", **(headers or {})}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    if isinstance(body, dict):
        body = json.dumps(body)
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    data = json.loads(response.read())
    conn.close()
    return response.status, response.headers, data


def chat(model: str, prompt: str = QUESTION, **kwargs) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], **kwargs}


def cli_text(out: str) -> tuple[str, int]:
    """The generated text and token count printed by `pudding generate`."""
    text = out.split("=" * 10 + "\n", 1)[1].rsplit("\n" + "=" * 10 + "\n", 1)[0]
    tokens = int(out.split("Generation: ")[1].split(" tokens")[0])
    return text, tokens


# --- pieces --------------------------------------------------------------------------------------

def test_stop_text_holds_back_a_possible_stop_string():
    stop = StopText(["END", "xyz", ""])
    assert stop.feed("hello E") == ("hello ", False)
    assert stop.feed("N") == ("", False)
    assert stop.feed("x") == ("EN", False)
    assert stop.feed("yz tail") == ("", True)
    stop = StopText(["END"])
    assert stop.feed("abcEN") == ("abc", False)
    assert stop.flush() == "EN"
    assert StopText([]).feed("anything") == ("anything", False)


def test_prompt_cache_reuses_the_longest_prefix_and_evicts_lru(pm):
    def filled(tokens):
        cache = pm.make_cache([1, 2])
        list(pm.stream_generate(tokens, max_tokens=1, skip=[1, 2], prompt_cache=cache))
        return cache

    a = list(range(10, 30))
    cache = filled(a)  # holds a + one generated token
    held = a + [0]
    lru = PromptCache(max_bytes=10 * sum(c.nbytes for c in cache))
    lru.store((1, 2), held, cache)
    assert lru.fetch((2, 3), a + [5, 6]) == (None, 0)  # another skip set
    got, n = lru.fetch((1, 2), a[:12] + [99])  # partial reuse: a trimmed copy
    assert n == 12 and got[0].offset == 12 and len(lru.entries) == 1
    got, n = lru.fetch((1, 2), held + [7, 8])  # the whole entry leads: handed over
    assert n == len(held) and got is cache and not lru.entries
    lru.store((1, 2), held, cache)
    got, n = lru.fetch((1, 2), held)  # the same tokens: one is left to prefill
    assert n == len(held) - 1 and got[0].offset == n
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    small = PromptCache(max_bytes=sum(c.nbytes for c in cache))
    small.store((1, 2), held, cache)
    small.store((2, 3), [5, 6], filled([5, 6]))
    assert [e.skip for e in small.entries] == [(2, 3)]
    assert small.nbytes <= small.max_bytes


def test_encode_prompt_templates_chats_and_joins_without_a_template(pm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    templated = pm.tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
    assert encode_prompt(pm, messages) == pm.tokenizer.encode(templated,
                                                              add_special_tokens=False)
    assert encode_prompt(pm, "hi") == pm.encode("hi", chat_template=False)
    pm.tokenizer.has_chat_template = False  # (mlx-lm's wrapper defeats monkeypatch here)
    try:
        assert encode_prompt(pm, messages) == pm.encode("Be brief.\nhi", chat_template=False)
    finally:
        pm.tokenizer.has_chat_template = True


# --- the OpenAI API ------------------------------------------------------------------------------

def test_models_and_health(server, client, name):
    assert [m.id for m in client.models.list().data] == [name, f"{name}:dense", f"{name}:static"]
    status, _, body = request(server[0], "GET", "/health", key=None)
    assert status == 200 and body["status"] == "ok" and body["model"] == name


def test_chat_plain_and_streamed(client, pm, name):
    route = pm.route(QUESTION)
    raw = client.chat.completions.with_raw_response.create(
        model=name, messages=[{"role": "user", "content": QUESTION}], max_tokens=12,
        temperature=0)
    plain = raw.parse()
    info = plain.model_extra["pudding"]
    assert info["set"] == route.name and info["skip"] == route.skip and info["router_ms"] > 0
    assert json.loads(raw.headers["x-pudding-route"]) == info
    assert plain.usage.prompt_tokens == len(pm.encode(QUESTION))
    assert plain.usage.completion_tokens == 12 and plain.choices[0].finish_reason == "length"

    chunks = list(client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": QUESTION}], max_completion_tokens=12,
        temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    final = chunks[-2]
    assert final.choices[0].finish_reason == "length"
    assert final.model_extra["pudding"]["set"] == route.name
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_completions_plain_and_streamed(client, pm, name):
    plain = client.completions.create(model=f"{name}:static", prompt=QUESTION, max_tokens=10)
    assert plain.model_extra["pudding"]["skip"] == pm.manifest.static.skip
    assert plain.usage.prompt_tokens == len(pm.encode(QUESTION, chat_template=False))
    chunks = list(client.completions.create(model=f"{name}:static", prompt=QUESTION,
                                            max_tokens=10, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


@pytest.mark.parametrize("suffix", list(FLAGS))
def test_model_names_equal_pudding_generate(client, server, pm, name, suffix,
                                            shared_tiny_bundle, monkeypatch, capsys):
    """Greedy output through the server is `pudding generate` token for token, per mode."""
    prompt = "hello, how are you today?"
    code, out, err = run_cli(["generate", "-b", str(shared_tiny_bundle.path), "-p", prompt,
                              "-m", "20", "--router-backend", "mlx", *FLAGS[suffix]],
                             monkeypatch, capsys)
    assert code == 0, err
    want, count = cli_text(out)
    server[1].prompt_cache.entries.clear()
    got = client.chat.completions.create(model=name + suffix, max_tokens=20, temperature=0,
                                         messages=[{"role": "user", "content": prompt}])
    assert got.choices[0].message.content == want
    assert got.usage.completion_tokens == count


def test_stop_strings(client, name):
    base = client.completions.create(model=f"{name}:dense", prompt=QUESTION, max_tokens=24)
    text = base.choices[0].text
    stop = text[6:9]
    cut = text[: text.index(stop)]
    got = client.completions.create(model=f"{name}:dense", prompt=QUESTION, max_tokens=24,
                                    stop=[stop, "never seen"])
    assert got.choices[0].text == cut and got.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(
        model=f"{name}:dense", messages=[{"role": "user", "content": QUESTION}], max_tokens=24,
        stream=True))
    full = "".join(c.choices[0].delta.content or "" for c in chunks)
    stop = full[5:8]
    chunks = list(client.chat.completions.create(
        model=f"{name}:dense", messages=[{"role": "user", "content": QUESTION}], max_tokens=24,
        stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full[: full.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_sampling_honours_seed(client, name):
    def sample(seed):
        return client.completions.create(model=f"{name}:dense", prompt=QUESTION, max_tokens=12,
                                         temperature=1.0, top_p=0.9, seed=seed).choices[0].text

    assert sample(1) == sample(1) != sample(2)


def test_second_turn_prefills_only_new_tokens(client, server, pm, name, monkeypatch):
    """Turn 2 of a chat continues turn 1's cache: it prefills only its new tokens, and its
    output equals a cold run of the whole conversation; under another route it starts over."""
    engine = server[1]
    engine.prompt_cache.entries.clear()
    prefilled = []  # tokens each request feeds: its prefill and its first decode step
    real = pm.prefill

    def counting(route, tokens, cache, start=0, **kwargs):
        prefilled.append(len(tokens) - start)
        return real(route, tokens, cache, start, **kwargs)

    monkeypatch.setattr(pm, "prefill", counting)
    model = f"{name}:static"
    turn1 = [{"role": "user", "content": QUESTION}]
    first = client.chat.completions.create(model=model, messages=turn1, max_tokens=10)
    assert prefilled == [first.usage.prompt_tokens]
    stored = engine.prompt_cache.entries[-1].tokens  # turn 1's prompt and answer
    turn2 = turn1 + [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "And how do you peel it?"}]
    second = client.chat.completions.create(model=model, messages=turn2, max_tokens=10)
    tokens = list(pm.tokenizer.encode(pm.tokenizer.apply_chat_template(
        turn2, tokenize=False, add_generation_prompt=True), add_special_tokens=False))
    reused = common_prefix(stored, tokens)
    assert reused >= first.usage.prompt_tokens
    assert second.usage.prompt_tokens == len(tokens)
    assert second.usage.prompt_tokens_details.cached_tokens == reused
    assert prefilled[1] == len(tokens) - reused

    engine.prompt_cache.entries.clear()
    cold = client.chat.completions.create(model=model, messages=turn2, max_tokens=10)
    assert prefilled[2] == len(tokens) and cold.usage.prompt_tokens_details.cached_tokens == 0
    assert cold.choices[0].message.content == second.choices[0].message.content

    dense = client.chat.completions.create(model=f"{name}:dense", messages=turn2, max_tokens=3)
    assert dense.usage.prompt_tokens_details.cached_tokens == 0 and prefilled[3] == len(tokens)


def test_max_tokens_limit_caps_requests(client, name):
    got = client.completions.create(model=f"{name}:dense", prompt="hello", max_tokens=5000)
    assert got.usage.completion_tokens <= 64
    if got.choices[0].finish_reason == "length":
        assert got.usage.completion_tokens == 64


# --- errors --------------------------------------------------------------------------------------

def assert_error(status, body, want: int, code: str | None = None):
    assert status == want, body
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]
    if code:
        assert body["error"]["code"] == code


def test_errors_are_openai_error_objects(server, name):
    url = server[0]
    path = "/v1/chat/completions"
    status, headers, body = request(url, "POST", path, chat(name), key=None)
    assert_error(status, body, 401, "invalid_api_key")
    assert headers["WWW-Authenticate"] == "Bearer"
    assert_error(*request(url, "GET", "/v1/models", key="wrong")[::2], 401)
    assert request(url, "GET", "/health", key=None)[0] == 200
    assert_error(*request(url, "POST", path, chat("gpt-4o"))[::2], 404, "model_not_found")
    assert_error(*request(url, "POST", "/v1/completions", {"model": name + ":x", "prompt": "a"}
                          )[::2], 404)
    assert_error(*request(url, "GET", "/v1/nothing")[::2], 404)
    for bad in ['{"model": ', "[]", "", json.dumps({"model": name}),
                json.dumps(chat(name, temperature="hot")), json.dumps(chat(name, n=2)),
                json.dumps(chat(name, max_tokens=0)), json.dumps(chat(name, top_p=2)),
                json.dumps({"messages": [{"role": "robot", "content": "hi"}]}),
                json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
                json.dumps({"prompt": ["a", "b"]})]:
        target = "/v1/completions" if "prompt" in bad else path
        assert_error(*request(url, "POST", target, bad)[::2], 400)
    status, _, body = request(url, "POST", "/v1/completions", {"prompt": ""})
    assert_error(status, body, 400)
    assert "empty" in body["error"]["message"]


def test_request_bodies_over_the_limit_get_413(server, name):
    url = server[0]
    big = chat(name, "word " * 5000)
    assert_error(*request(url, "POST", "/v1/chat/completions", big)[::2], 413,
                 "request_too_large")
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
    payload = json.dumps(big).encode()
    conn.request("POST", "/v1/chat/completions",
                 body=iter([payload[i:i + 4096] for i in range(0, len(payload), 4096)]),
                 headers={"Authorization": f"Bearer {KEY}",
                          "Content-Type": "application/json"}, encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["message"]
    conn.close()


# --- load and faults -----------------------------------------------------------------------------

def stream_open(url: str, body: dict) -> tuple[socket.socket, bytes]:
    """A raw streamed request; returns the socket once its first SSE event arrived."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                 b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
    head = b""
    while b"data: " not in head:
        head += sock.recv(4096)
    return sock, head


def wait_idle(engine, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while engine.pending:
        assert time.monotonic() < deadline, "the server did not become idle"
        time.sleep(0.02)


def test_disconnects_free_the_slot_and_full_queue_gets_503(pm, name, monkeypatch):
    monkeypatch.setattr(pm.tokenizer, "eos_token_ids", set())  # long answers
    with serving(pm, max_queue=0, decode_concurrency=1,
                 max_tokens_limit=100_000) as (url, engine):
        long = chat(f"{name}:dense", max_tokens=100_000, stream=True)
        sock, head = stream_open(url, long)
        assert b"200 OK" in head and engine.pending == 1
        status, headers, body = request(url, "POST", "/v1/chat/completions", chat(name))
        assert_error(status, body, 503, "server_busy")
        assert headers["Retry-After"] == "1"
        sock.close()
        wait_idle(engine)
        assert len(engine.prompt_cache.entries[-1].tokens) < 20_000  # stopped early
        assert request(url, "POST", "/v1/chat/completions", chat(name, max_tokens=2))[0] == 200

        # A non-streamed request whose client leaves mid-generation, and one left waiting.
        with serving(pm, max_queue=1, decode_concurrency=1,
                     max_tokens_limit=100_000) as (url2, engine2):
            sock, _ = stream_open(url2, long)
            host, port = url2.removeprefix("http://").split(":")
            waiting = socket.create_connection((host, int(port)), timeout=30)
            data = json.dumps(chat(name, max_tokens=100_000)).encode()
            waiting.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                            b"application/json\r\nContent-Length: %d\r\n\r\n%s"
                            % (len(data), data))
            deadline = time.monotonic() + 10
            while engine2.pending < 2:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            waiting.close()
            deadline = time.monotonic() + 10
            while engine2.pending > 1:  # the waiting request left the queue at once
                assert time.monotonic() < deadline
                time.sleep(0.02)
            sock.close()
            wait_idle(engine2)


def vm_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def test_load_every_request_completes_or_gets_503(pm, name):
    """8 clients x 5 requests against 2 decoding and a queue of 2: each gets 200 or 503,
    /health answers throughout, and memory returns to its idle level."""
    clients, per_client, limit_s = 8, 5, 60
    with serving(pm, max_queue=2, decode_concurrency=2,
                 prompt_cache_bytes=1 << 20) as (url, engine):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=4)
        wait_idle(engine)
        time.sleep(0.2)
        idle_active = mx.get_active_memory() - engine.prompt_cache.nbytes
        idle_rss = vm_rss()
        outcomes, health, stop = [], [], threading.Event()
        deadline = time.monotonic() + limit_s

        def poll():
            while not stop.is_set():
                tic = time.monotonic()
                status, _, body = request(url, "GET", "/health", key=None)
                health.append((status, time.monotonic() - tic, body["waiting"]))
                time.sleep(0.05)

        def run(i: int):
            for j in range(per_client):
                if time.monotonic() > deadline:
                    outcomes.append("timeout")
                    return
                messages = [{"role": "user", "content": f"{QUESTION} ({i}, {j})"}]
                try:
                    if j % 2:
                        list(client.chat.completions.create(
                            model=name, messages=messages, max_tokens=24, stream=True))
                    else:
                        client.chat.completions.create(model=name, messages=messages,
                                                       max_tokens=24)
                    outcomes.append(200)
                except openai.APIStatusError as e:
                    outcomes.append(e.status_code)
                    assert e.response.headers["Retry-After"] == "1"

        poller = threading.Thread(target=poll)
        poller.start()
        threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(limit_s + 30)
        stop.set()
        poller.join()
        assert len(outcomes) == clients * per_client
        assert set(outcomes) <= {200, 503} and 200 in outcomes
        assert health and all(s == 200 for s, _, _ in health)
        assert max(t for _, t, _ in health) < 2.0
        assert max(w for _, _, w in health) <= 2
        wait_idle(engine)
        time.sleep(0.2)
        assert engine.prompt_cache.nbytes <= 1 << 20
        assert mx.get_active_memory() - engine.prompt_cache.nbytes <= idle_active + (1 << 20)
        assert vm_rss() - idle_rss < 64 << 20


# --- the command ---------------------------------------------------------------------------------

def test_serve_cli_errors(tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(["serve", "-b", str(tmp_path / "missing")], monkeypatch, capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    monkeypatch.setitem(sys.modules, "fastapi", None)  # the extra not installed
    for module in ("pudding_mlx.serve.command", "pudding_mlx.serve.server"):
        monkeypatch.delitem(sys.modules, module)
    code, _, err = run_cli(["serve", "-b", "x"], monkeypatch, capsys)
    assert code == 2 and "pip install 'pudding-mlx[serve]'" in err


def test_serve_imports_no_torch():
    code = "import sys; sys.modules['torch'] = None\nimport pudding_mlx.serve.command\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr


def test_serve_command_stops_cleanly_on_ctrl_c(shared_tiny_bundle):
    """`pudding serve` in its own process: Ctrl-C during a long streamed answer ends the
    request and the process without a traceback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PUDDING_OPENBLAS="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pudding_mlx.cli", "serve", "-b", str(shared_tiny_bundle.path),
         "--port", str(port), "--max-tokens-limit", "100000", "--router-backend", "mlx"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "pudding serve did not come up"
            try:
                if request(url, "GET", "/health", key=None)[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        name = shared_tiny_bundle.path.name
        sock, received = stream_open(url, chat(f"{name}:dense", "Tell me a story.",
                                               max_tokens=100_000, stream=True))
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        sock.settimeout(10)
        while chunk := sock.recv(65536):  # until the server closes the connection
            received += chunk
        sock.close()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "Uvicorn running" in err
    events = [line for line in received.decode().splitlines() if line.startswith("data: ")]
    assert "shutting down" in events[-2] and events[-1] == "data: [DONE]"

"""`stepforge serve` under hostile requests: strict field validation with the
OpenAI error envelope, a body-size limit, cancellation of abandoned work,
round-robin fairness, and a bounded stop on SIGTERM.

All traffic is loopback (127.0.0.1) and every request loop is bounded in
count and time. Scheduling is checked with a fake backend that runs one batch
per step the test releases, so assertions count units, not seconds.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import STEPFORGE, ServerThread, free_port

from stepforge.serve.base import Completion, GenerationResult, ModelBackend
from stepforge.serve.errors import GenerationError
from stepforge.serve.openai_schema import MAX_STOP_CHARS, MAX_STOP_STRINGS, ServerLimits
from stepforge.serve.server import create_app

LIMITS = ServerLimits(max_n=8, max_tokens=64, max_prompts=4, max_body_bytes=64 * 1024, body_timeout_s=0.5, max_queued_units=12)
CHAT = [{"role": "user", "content": "hi"}]


class StepBackend(ModelBackend):
    """Echoes prompts. When `stepped`, each batch waits for a step the test
    releases; every batch's prompts are recorded as it starts."""

    def __init__(self, stepped: bool = False):
        self.stepped = stepped
        self.steps = threading.Semaphore(0)
        self.started: list[list[str]] = []

    def generate(self, requests):
        prompts = [r.prompt if r.prompt is not None else r.messages[-1]["content"] for r in requests]
        self.started.append(prompts)
        if self.stepped and not self.steps.acquire(timeout=20):
            raise GenerationError("the test never released this batch")
        if any("BOOM" in p for p in prompts):
            raise RuntimeError("unexpected backend failure")
        return [
            GenerationResult(request_id=r.request_id, prompt_tokens=len(p), completions=[
                Completion(text=p[::-1], finish_reason="length", completion_tokens=r.sampling.max_tokens)
                for _ in range(r.sampling.n)
            ])
            for r, p in zip(requests, prompts)
        ]

    def count_tokens(self, text):
        return len(text)

    def units(self, prompt: str) -> int:
        """Units of `prompt` started so far."""
        return sum(batch.count(prompt) for batch in list(self.started))


@pytest.fixture(scope="module")
def echo():
    backend = StepBackend()
    with ServerThread(create_app(backend, "m", limits=LIMITS)) as srv:
        yield srv, backend


def post_raw(port: int, path: str, raw: bytes, timeout: float = 10) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{port}{path}", content=raw, headers={"content-type": "application/json"}, timeout=timeout)


def assert_envelope(r: httpx.Response, status: int | None = None, param: str | None = None) -> dict:
    assert r.headers["content-type"].startswith("application/json"), r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"]
    if status is not None:
        assert r.status_code == status, r.text
    if param is not None:
        assert err["param"] == param, err
    return err


def obj(**fields) -> bytes:
    return json.dumps(fields).encode()


# (path, raw body, expected status, expected param); raw JSON where json.dumps cannot say it
HOSTILE = [
    # stop strings: non-empty, bounded in count and length, strings only
    ("/v1/completions", obj(prompt="x", stop=[""]), 400, "stop"),
    ("/v1/completions", obj(prompt="x", stop=""), 400, "stop"),
    ("/v1/completions", obj(prompt="x", stop=["a"] * (MAX_STOP_STRINGS + 1)), 400, "stop"),
    ("/v1/completions", obj(prompt="x", stop=["a" * (MAX_STOP_CHARS + 1)]), 400, "stop"),
    ("/v1/completions", obj(prompt="x", stop=[1]), 400, "stop"),
    ("/v1/chat/completions", obj(messages=CHAT, stop=[""]), 400, "stop"),
    # seeds: within what torch.manual_seed accepts, integers only
    ("/v1/completions", obj(prompt="x", seed=2**64), 400, "seed"),
    ("/v1/completions", obj(prompt="x", seed=-(2**63) - 1), 400, "seed"),
    ("/v1/completions", obj(prompt="x", seed=10**40), 400, "seed"),
    ("/v1/completions", obj(prompt="x", seed="7"), 400, "seed"),
    ("/v1/completions", obj(prompt="x", seed=True), 400, "seed"),
    # text: valid UTF-8, no lone surrogates
    ("/v1/completions", b'{"prompt": "E1 \\ud800 = step."}', 400, None),
    ("/v1/completions", b'{"prompt": "\\udfff"}', 400, None),
    ("/v1/completions", b'{"prompt": "\xff\xfe"}', 400, None),
    ("/v1/completions", b'{"prompt": "x", "stop": ["\\ud83d"]}', 400, None),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, None),
    ("/tokenize", b'{"prompt": "\\ud800"}', 400, None),
    # n and max_tokens: strict integers within the server's limits
    ("/v1/completions", obj(prompt="x", n=True), 400, "n"),
    ("/v1/completions", obj(prompt="x", n="1"), 400, "n"),
    ("/v1/completions", obj(prompt="x", n=1.0), 400, "n"),
    ("/v1/completions", obj(prompt="x", n=0), 400, "n"),
    ("/v1/completions", obj(prompt="x", n=LIMITS.max_n + 1), 400, "n"),
    ("/v1/completions", obj(prompt="x", n=256), 400, "n"),
    ("/v1/chat/completions", obj(messages=CHAT, n=False), 400, "n"),
    ("/v1/completions", obj(prompt="x", max_tokens=True), 400, "max_tokens"),
    ("/v1/completions", obj(prompt="x", max_tokens="16"), 400, "max_tokens"),
    ("/v1/completions", obj(prompt="x", max_tokens=0), 400, "max_tokens"),
    ("/v1/completions", obj(prompt="x", max_tokens=LIMITS.max_tokens + 1), 400, "max_tokens"),
    ("/v1/completions", obj(prompt="x", max_tokens=16000), 400, "max_tokens"),
    ("/v1/chat/completions", obj(messages=CHAT, max_tokens=16000), 400, "max_tokens"),
    ("/v1/chat/completions", obj(messages=CHAT, max_completion_tokens=LIMITS.max_tokens + 1), 400, "max_completion_tokens"),
    # other sampling fields
    ("/v1/completions", obj(prompt="x", temperature="1"), 400, "temperature"),
    ("/v1/completions", obj(prompt="x", temperature=2.5), 400, "temperature"),
    ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    ("/v1/completions", b'{"prompt": "x", "top_p": Infinity}', 400, "top_p"),
    ("/v1/completions", obj(prompt="x", top_p=0), 400, "top_p"),
    ("/v1/completions", obj(prompt="x", stream="false"), 400, "stream"),
    ("/v1/completions", obj(prompt="x", stream=True), 400, "stream"),
    ("/v1/completions", obj(prompt="x", model=5), 400, "model"),
    ("/v1/completions", obj(prompt="x", model="other"), 404, None),
    # prompts and messages
    ("/v1/completions", obj(n=1), 400, "prompt"),
    ("/v1/completions", obj(prompt=[]), 400, "prompt"),
    ("/v1/completions", obj(prompt=[1, 2, 3]), 400, "prompt"),
    ("/v1/completions", obj(prompt=None), 400, "prompt"),
    ("/v1/completions", obj(prompt=["p"] * (LIMITS.max_prompts + 1)), 400, "prompt"),
    ("/v1/chat/completions", obj(messages=[]), 400, "messages"),
    ("/v1/chat/completions", obj(messages=[{"role": "user"}]), 400, "messages"),
    ("/v1/chat/completions", obj(messages=[{"role": "user", "content": [{"type": "text"}]}]), 400, "messages"),
    ("/v1/chat/completions", obj(messages=[{"role": 1, "content": "x"}]), 400, "messages"),
    ("/v1/chat/completions", obj(messages="hi"), 400, "messages"),
    ("/tokenize", obj(prompt=5), 400, "prompt"),
    # not a JSON object
    ("/v1/completions", b"", 400, None),
    ("/v1/completions", b"{", 400, None),
    ("/v1/completions", b"[]", 400, None),
    ("/v1/completions", b"null", 400, None),
    ("/v1/completions", b'"prompt"', 400, None),
]


@pytest.mark.parametrize(("path", "raw", "status", "param"), HOSTILE)
def test_each_malformed_field_gets_a_4xx_envelope(echo, path, raw, status, param):
    srv, backend = echo
    before = len(backend.started)
    assert_envelope(post_raw(srv.port, path, raw), status, param)
    assert len(backend.started) == before  # rejected at the edge: the backend never saw it


def test_boundary_values_are_accepted(echo):
    srv, _ = echo
    body = {"prompt": ["a", "b", "c", "d"], "n": LIMITS.max_n, "max_tokens": LIMITS.max_tokens, "seed": 2**64 - 1,
            "stop": ["s" * MAX_STOP_CHARS] * MAX_STOP_STRINGS, "temperature": 0}
    r = httpx.post(f"{srv.base_url}/completions", json=body, timeout=10)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 4 * LIMITS.max_n
    r = httpx.post(f"{srv.base_url}/chat/completions", json={"messages": CHAT, "seed": -(2**63), "stop": "é\U0001f600"}, timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "ih"
    r = post_raw(srv.port, "/v1/completions", b'{"prompt": "a\\ud83d\\ude00", "max_tokens": 1}')  # an escaped surrogate pair
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "\U0001f600a"


def test_unexpected_failures_and_unknown_routes_get_envelopes(echo):
    srv, _ = echo
    err = assert_envelope(httpx.post(f"{srv.base_url}/completions", json={"prompt": "BOOM"}, timeout=10), 500)
    assert err["type"] == "server_error" and "RuntimeError" in err["message"]
    assert_envelope(httpx.get(f"{srv.base_url}/nowhere", timeout=10), 404)
    assert_envelope(httpx.get(f"{srv.base_url}/completions", timeout=10), 405)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
FIELDS = ["prompt", "messages", "n", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed", "stream", "model"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize"]),
       body=st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=5))
def test_any_json_body_gets_a_result_or_a_4xx_envelope(echo, path, body):
    srv, _ = echo
    r = post_raw(srv.port, path, json.dumps(body).encode())
    if r.status_code != 200:
        assert 400 <= r.status_code < 500
        assert_envelope(r)


def raw_request(port: int, path: str, headers: dict[str, str], body: bytes = b"") -> socket.socket:
    """Send a request by hand on a fresh loopback connection; returns the open socket."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = "".join(f"{k}: {v}\r\n" for k, v in {"host": "127.0.0.1", "content-type": "application/json", **headers}.items())
    sock.sendall(f"POST {path} HTTP/1.1\r\n{head}\r\n".encode() + body)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict]:
    """Status and JSON body of the next response on `sock`, which it then closes."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk and len(data) < 65536, f"no complete response head: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = int(next(v for k, _, v in (line.partition(": ") for line in lines[1:]) if k.lower() == "content-length"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the response body"
        body += chunk
    sock.close()
    return int(lines[0].split()[1]), json.loads(body[:length])


def test_a_huge_content_length_is_refused_unread(echo):
    srv, backend = echo
    before = len(backend.started)
    sock = raw_request(srv.port, "/v1/completions", {"content-length": str(20 * 1024**2)}, b'{"prompt": "')
    status, body = read_response(sock)  # answered although 20 MB are still owed
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert len(backend.started) == before


def test_a_streamed_body_is_cut_off_at_the_limit(echo):
    srv, backend = echo
    before = len(backend.started)
    sock = raw_request(srv.port, "/v1/completions", {"transfer-encoding": "chunked"})
    sock.sendall(b"%x\r\n%s\r\n" % (12, b'{"prompt": "'))
    chunk = b"a" * 8192
    for _ in range(LIMITS.max_body_bytes // len(chunk) + 1):  # one chunk past the limit, then stop sending
        sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    status, body = read_response(sock)  # answered mid-body; the rest need never be sent
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert len(backend.started) == before


def test_a_body_sent_too_slowly_gets_408(echo):
    srv, backend = echo
    before = len(backend.started)
    sock = raw_request(srv.port, "/v1/completions", {"content-length": "40"}, b'{"prompt": ')  # and then nothing
    status, body = read_response(sock)
    assert status == 408 and body["error"]["code"] == "request_timeout"
    assert len(backend.started) == before


def test_a_body_just_under_the_limit_is_served(echo):
    srv, _ = echo
    raw = obj(prompt="x", max_tokens=1)
    raw = raw[:-1] + b" " * (LIMITS.max_body_bytes - len(raw)) + b"}"
    assert len(raw) == LIMITS.max_body_bytes
    assert post_raw(srv.port, "/v1/completions", raw).status_code == 200


MAX_BATCH = 2
BIG_N = LIMITS.max_n


def wait_for(predicate, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture
def stepped():
    backend = StepBackend(stepped=True)
    app = create_app(backend, "m", max_batch=MAX_BATCH, limits=LIMITS)
    with ServerThread(app) as srv:
        yield srv, backend, app.state.batcher
        for _ in range(BIG_N * 2):  # let anything left run out so the server stops at once
            backend.steps.release()


def big_request(port: int) -> socket.socket:
    raw = obj(prompt="BIG", n=BIG_N, max_tokens=LIMITS.max_tokens, temperature=1.0)
    return raw_request(port, "/v1/completions", {"content-length": str(len(raw))}, raw)


def post_in_thread(url: str, body: dict) -> tuple[threading.Thread, dict]:
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(r=httpx.post(url, json=body, timeout=20)), daemon=True)
    thread.start()
    return thread, out


def release_until_started(backend: StepBackend, prompt: str) -> int:
    """Release batches one at a time until one holding `prompt` starts; returns how many."""
    released = 0
    while not any(prompt in batch for batch in list(backend.started)):
        assert released < BIG_N, f"{prompt} never got a batch"
        backend.steps.release()
        released += 1
        wait_for(lambda done=released: len(backend.started) > done or any(prompt in b for b in list(backend.started)),
                 "the next batch")
    return released


def still_waiting(sock: socket.socket) -> bool:
    """True when no response byte has arrived on `sock`."""
    sock.setblocking(False)
    try:
        return not sock.recv(1)  # b"" would mean the server closed it
    except BlockingIOError:
        return True
    finally:
        sock.setblocking(True)


def test_a_small_request_is_served_while_a_huge_one_runs(stepped):
    srv, backend, batcher = stepped
    big = big_request(srv.port)
    wait_for(lambda: backend.units("BIG") == MAX_BATCH, "the first batch of the big request")
    thread, small = post_in_thread(f"{srv.base_url}/completions", {"prompt": "SMALL", "max_tokens": 2})
    wait_for(lambda: batcher.queued_units() == BIG_N - MAX_BATCH + 1, "the small request to be queued")
    assert release_until_started(backend, "SMALL") == 1  # only the batch running when it arrived
    assert backend.started[1] == ["SMALL"]  # it leads the next batch, unslowed by the big one's costlier units
    backend.steps.release()
    thread.join(20)
    assert small["r"].status_code == 200 and small["r"].json()["choices"][0]["text"] == "LLAMS"
    assert backend.units("BIG") <= 3 * MAX_BATCH - 1 < BIG_N and still_waiting(big)  # the big one is far from done
    big.close()


def test_work_of_an_abandoned_request_is_cancelled(stepped):
    srv, backend, batcher = stepped
    big = big_request(srv.port)
    wait_for(lambda: backend.units("BIG") == MAX_BATCH, "the first batch of the big request")
    assert batcher.queued_units() == BIG_N - MAX_BATCH
    big.close()  # the client leaves while its first batch runs
    wait_for(lambda: batcher.queued_units() == 0, "the abandoned units to be dropped")
    thread, small = post_in_thread(f"{srv.base_url}/completions", {"prompt": "SMALL", "max_tokens": 2})
    assert release_until_started(backend, "SMALL") == 1
    backend.steps.release()
    thread.join(20)
    assert small["r"].status_code == 200
    assert backend.started == [["BIG"] * MAX_BATCH, ["SMALL"]]  # nothing of the big request ran after it left


def test_sigterm_during_generation_stops_the_server_promptly(tiny_model_dir):  # noqa: F811 - the fixture
    """A real `stepforge serve` on the tiny model, busy with a request of
    n * max_tokens far beyond what it can finish, exits soon after SIGTERM."""
    port = free_port()
    proc = subprocess.Popen(
        [STEPFORGE, "serve", "--backend", "hf", "--model", str(tiny_model_dir), "--device", "cpu", "--port", str(port),
         "--max-batch", "2", "--shutdown-timeout", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.3)
        raw = obj(prompt="E1 = step.", n=64, max_tokens=512, temperature=1.0)
        client = raw_request(port, "/v1/completions", {"content-length": str(len(raw))}, raw)  # 32 batches of 2 x 512 tokens
        time.sleep(1.5)  # generation under way
        assert proc.poll() is None and still_waiting(client)
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        proc.wait(timeout=30)  # 2 s grace + at most 2 s for the running batch, plus slack on a busy machine
        print(f"server exited {time.monotonic() - started:.1f} s after SIGTERM")
        assert proc.returncode == -signal.SIGTERM  # uvicorn re-raises the signal once it has shut down
        client.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_work_past_the_queue_bound_gets_503(stepped):
    srv, backend, batcher = stepped
    big = big_request(srv.port)
    wait_for(lambda: batcher.queued_units() == BIG_N - MAX_BATCH, "the big request to be queued")
    more = {"prompt": "MORE", "n": BIG_N, "temperature": 1.0}  # BIG_N - MAX_BATCH + BIG_N > max_queued_units
    err = assert_envelope(httpx.post(f"{srv.base_url}/completions", json=more, timeout=10), 503)
    assert "busy" in err["message"] and batcher.queued_units() == BIG_N - MAX_BATCH
    thread, small = post_in_thread(f"{srv.base_url}/completions", {"prompt": "SMALL", "max_tokens": 2})  # still fits
    wait_for(lambda: batcher.queued_units() == BIG_N - MAX_BATCH + 1, "the small request to be queued")
    big.close()
    wait_for(lambda: batcher.queued_units() == 1, "the abandoned units to be dropped")
    release_until_started(backend, "SMALL")
    backend.steps.release()
    thread.join(20)
    assert small["r"].status_code == 200 and backend.units("MORE") == 0

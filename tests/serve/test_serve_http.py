"""`stepforge serve`'s HTTP API on the tiny model, and the OpenAI-compatible
backend talking to it (and to a flaky fake server, for retries)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from support import ServerThread, free_port

from stepforge.serve.base import BackendConfig, GenerationRequest, SamplingParams, make_backend
from stepforge.serve.errors import BackendUnavailableError, InvalidRequestError, ModelNotFoundError, PromptTooLongError
from stepforge.serve.server import create_app

MODEL = "tiny-qwen"
CHAT = [{"role": "user", "content": "Write E1 = step.Map"}]


@pytest.fixture(scope="module")
def server(hf_backend):
    with ServerThread(create_app(hf_backend, MODEL)) as srv:
        yield srv


@pytest.fixture
def client_backend(server):
    backend = make_backend(BackendConfig(kind="openai", model=MODEL, base_url=server.base_url, timeout_s=30, max_retries=0))
    yield backend
    backend.close()


def test_models_and_health(server):
    r = httpx.get(f"{server.base_url}/models")
    assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == [MODEL]
    assert httpx.get(f"http://127.0.0.1:{server.port}/health").json() == {"status": "ok"}


def test_openai_backend_matches_local_generation(client_backend, hf_backend):
    reqs = [
        GenerationRequest(prompt="E1 = step.", request_id="p", sampling=SamplingParams(n=3, max_tokens=10, seed=4)),
        GenerationRequest(messages=CHAT, request_id="c", sampling=SamplingParams(n=2, max_tokens=6, seed=9, stop=["e"])),
    ]
    remote = client_backend.generate(reqs)
    local = hf_backend.generate(reqs)
    assert [r.request_id for r in remote] == ["p", "c"]
    for rr, lr in zip(remote, local):
        assert rr.prompt_tokens == lr.prompt_tokens
        assert [c.model_dump() for c in rr.completions] == [c.model_dump() for c in lr.completions]
    assert remote[0].prompt_tokens == len(hf_backend.tokenizer("E1 = step.")["input_ids"])
    assert client_backend.count_tokens("E1 = step.Map") == hf_backend.count_tokens("E1 = step.Map")


def test_completion_reply_shape_and_usage(server, hf_backend):
    body = {"model": MODEL, "prompt": ["E1 = step.", "Zip"], "n": 2, "max_tokens": 5, "stop": "\n", "seed": 1}
    r = httpx.post(f"{server.base_url}/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "text_completion" and [c["index"] for c in data["choices"]] == [0, 1, 2, 3]
    assert all("\n" not in c["text"] for c in data["choices"])
    prompt_tokens = sum(len(hf_backend.tokenizer(p)["input_ids"]) for p in body["prompt"])
    completion_tokens = sum(c["completion_tokens"] for c in data["choices"])
    assert data["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                             "total_tokens": prompt_tokens + completion_tokens}
    chat = httpx.post(f"{server.base_url}/chat/completions", json={"messages": CHAT, "max_tokens": 3, "n": 2}, timeout=30).json()
    assert chat["object"] == "chat.completion" and len(chat["choices"]) == 2
    assert chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["usage"]["prompt_tokens"] == len(hf_backend.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)["input_ids"])


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"prompt": "x", "n": 0}, 400, "n"),
        ({"n": 1}, 400, "prompt"),
        ({"prompt": "x", "top_p": 0}, 400, "top_p"),
        ({"prompt": "x", "stream": True}, 400, "stream"),
        ({"prompt": "x", "temperature": 0.005}, 400, "temperature"),
        ({"prompt": "x", "temperature": 2.5}, 400, "temperature"),
        ({"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
        ({"prompt": "x", "model": "other"}, 404, "does not exist"),
        ({"prompt": "LONG", "max_tokens": 1}, 400, "context"),
    ],
)
def test_bad_requests_get_openai_errors(server, long_prompt, body, status, fragment):
    if body.get("prompt") == "LONG":
        body = {**body, "prompt": long_prompt}
    r = httpx.post(f"{server.base_url}/completions", json=body, timeout=30)
    assert r.status_code == status
    err = r.json()["error"]
    assert fragment in err["message"] and err["type"]


def test_client_errors_are_typed_and_not_retried(server, long_prompt):
    start = time.monotonic()
    with make_backend(BackendConfig(kind="openai", model="other", base_url=server.base_url, max_retries=3, backoff_s=5)) as b:
        with pytest.raises(ModelNotFoundError):
            b.generate([GenerationRequest(prompt="x", sampling=SamplingParams(max_tokens=2))])
    with make_backend(BackendConfig(kind="openai", model=MODEL, base_url=server.base_url, max_retries=3, backoff_s=5)) as b:
        with pytest.raises(PromptTooLongError):
            b.generate([GenerationRequest(prompt=long_prompt, sampling=SamplingParams(max_tokens=2))])
    assert time.monotonic() - start < 5  # no backoff sleeps happened


class FlakyHandler(BaseHTTPRequestHandler):
    """Answers 503 `failures` times, then a valid completion."""

    failures = 2
    attempts = 0
    lock = threading.Lock()

    def do_POST(self):  # noqa: N802 - http.server API
        length = int(self.headers.get("content-length", 0))
        self.rfile.read(length)
        with FlakyHandler.lock:
            FlakyHandler.attempts += 1
            fail = FlakyHandler.attempts <= FlakyHandler.failures
        if fail:
            payload, status = {"error": {"message": "overloaded", "type": "server_error"}}, 503
        elif self.path.endswith("/bad"):
            payload, status = {}, 400
        else:
            payload, status = {
                "id": "cmpl-1", "object": "text_completion", "created": 0, "model": "m",
                "choices": [{"index": 0, "text": "ok", "finish_reason": "stop", "logprobs": None}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
            }, 200
        raw = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky_server():
    FlakyHandler.attempts = 0
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FlakyHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def test_retries_on_503_then_succeeds(flaky_server):
    FlakyHandler.failures = 2
    with make_backend(BackendConfig(kind="openai", model="m", base_url=flaky_server, max_retries=3, backoff_s=0.01)) as b:
        result = b.generate([GenerationRequest(prompt="hi", sampling=SamplingParams(max_tokens=4))])[0]
    assert FlakyHandler.attempts == 3
    assert (result.texts, result.prompt_tokens, result.completion_tokens) == (["ok"], 3, 2)


def test_gives_up_after_max_retries(flaky_server):
    FlakyHandler.failures = 10
    with make_backend(BackendConfig(kind="openai", model="m", base_url=flaky_server, max_retries=2, backoff_s=0.01)) as b:
        with pytest.raises(BackendUnavailableError, match="503 after 3 attempt"):
            b.generate([GenerationRequest(prompt="hi")])
    assert FlakyHandler.attempts == 3


def test_unreachable_server_fails_fast():
    url = f"http://127.0.0.1:{free_port()}/v1"
    start = time.monotonic()
    with make_backend(BackendConfig(kind="openai", model="m", base_url=url, max_retries=1, backoff_s=0.01, timeout_s=5)) as b:
        with pytest.raises(BackendUnavailableError, match="unreachable after 2 attempt"):
            b.generate([GenerationRequest(prompt="hi")])
    assert time.monotonic() - start < 5


def test_server_rejections_map_to_typed_errors(server):
    with make_backend(BackendConfig(kind="openai", model=MODEL, base_url=server.base_url, max_retries=2, backoff_s=5)) as b:
        start = time.monotonic()
        with pytest.raises(InvalidRequestError, match=r"rejected the request \(400\).*n: "):
            b.generate([GenerationRequest(prompt="x", sampling=SamplingParams(n=300, max_tokens=1))])  # server allows n <= 256
        assert time.monotonic() - start < 5

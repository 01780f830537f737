"""End to end through the `stepforge` console script: tiny-model, sample, serve."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from support import STEPFORGE, free_port, stand_in_env

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def stepforge(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([STEPFORGE, *args], capture_output=True, text=True, timeout=timeout, env=env or ENV)


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "tiny"
    proc = stepforge("tiny-model", str(out), "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    return out


def test_tiny_model_is_a_loadable_qwen2_checkpoint(cli_model):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(cli_model, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(cli_model, local_files_only=True)
    assert config.model_type == "qwen2" and config.num_hidden_layers == 2
    assert config.vocab_size == len(tok) <= 4096
    assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>"} <= set(tok.get_vocab())
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


SAMPLE_ARGS = ["--prompt", "E1 = step.", "-n", "4", "--max-tokens", "12", "--seed", "5", "--json"]


@pytest.fixture(scope="module")
def hf_sample(cli_model) -> dict:
    proc = stepforge("sample", "--backend", "hf", "--model", str(cli_model), *SAMPLE_ARGS)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_sample_hf_json(cli_model, hf_sample):
    from transformers import AutoTokenizer

    data = hf_sample
    assert len(data["completions"]) == 4 and len(set(data["completions"])) > 1
    tok = AutoTokenizer.from_pretrained(cli_model, local_files_only=True)
    assert data["usage"]["prompt_tokens"] == len(tok("E1 = step.")["input_ids"])
    assert data["usage"]["completion_tokens"] == sum(data["completion_tokens"]) > 0
    assert all(k <= 12 for k in data["completion_tokens"])


def start_server(backend: str, model: Path, env: dict) -> tuple[subprocess.Popen, int]:
    """`stepforge serve` on a free port, once /health answers."""
    port = free_port()
    server = subprocess.Popen(
        [STEPFORGE, "serve", "--backend", backend, "--model", str(model), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    deadline = time.monotonic() + 90
    while True:
        if server.poll() is not None:
            raise AssertionError(server.stderr.read())
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server, port
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.terminate()
            raise AssertionError("server did not come up")
        time.sleep(0.3)


def test_sample_openai_against_stepforge_serve(cli_model, hf_sample):
    server, port = start_server("hf", cli_model, ENV)
    try:
        remote = stepforge("sample", "--backend", "openai", "--base-url", f"http://127.0.0.1:{port}/v1",
                           "--model", str(cli_model), *SAMPLE_ARGS)
        assert remote.returncode == 0, remote.stderr
        assert json.loads(remote.stdout) == hf_sample  # same model and seed: same answers and token counts
        wrong = stepforge("sample", "--backend", "openai", "--base-url", f"http://127.0.0.1:{port}/v1", "--model", "other", "--prompt", "x")
        assert wrong.returncode == 2 and "does not serve model 'other'" in wrong.stderr
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_expected_errors_are_one_line(tmp_path):
    proc = stepforge("sample", "--backend", "hf", "--model", str(tmp_path / "none"), "--prompt", "x")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: model path does not exist: {tmp_path / 'none'}"]
    proc = stepforge("sample", "--backend", "openai", "--model", "m", "--prompt", "x")
    assert proc.returncode == 2 and "base_url" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(("flag", "value", "field"), [("--max-n", "0", "max_n"), ("--max-body-bytes", "10", "max_body_bytes")])
def test_serve_limit_flags_are_validated_before_loading(tmp_path, flag, value, field):
    proc = stepforge("serve", "--model", str(tmp_path / "none"), flag, value)
    assert proc.returncode == 2 and field in proc.stderr and "Traceback" not in proc.stderr


GREEDY_ARGS = ["--prompt", "E1 = step.", "-n", "2", "--temperature", "0", "--max-tokens", "12", "--repetition-penalty", "1.3",
               "--stop", "t", "--json"]


def test_sample_vllm_through_the_stand_in(cli_model):
    """`stepforge sample --backend vllm` runs serve/vllm_backend.py against the
    stand-in engine; greedy answers equal the transformers backend's."""
    vllm = stepforge("sample", "--backend", "vllm", "--model", str(cli_model), *GREEDY_ARGS, env=stand_in_env())
    assert vllm.returncode == 0, vllm.stderr
    hf = stepforge("sample", "--backend", "hf", "--model", str(cli_model), *GREEDY_ARGS)
    assert hf.returncode == 0, hf.stderr
    assert json.loads(vllm.stdout) == json.loads(hf.stdout)
    sampled = stepforge("sample", "--backend", "vllm", "--model", str(cli_model), *SAMPLE_ARGS,
                        env=stand_in_env(STAND_IN_VLLM_FINISH=json.dumps({"0/2": "abort", "0/3": "repetition"})))
    assert sampled.returncode == 0, sampled.stderr
    data = json.loads(sampled.stdout)
    assert data["finish_reasons"][2:] == ["abort", "repetition"] and "abort" in data["details"][2]
    assert len(set(data["completions"])) > 1 and data["usage"]["completion_tokens"] == sum(data["completion_tokens"])


def test_bad_temperature_fails_before_any_engine_starts(cli_model, tmp_path):
    proc = stepforge("sample", "--backend", "vllm", "--model", str(tmp_path / "no-model"), "--prompt", "x",
                     "--temperature", "0.005", env=stand_in_env())
    assert proc.returncode == 2 and "neither greedy" in proc.stderr and "Traceback" not in proc.stderr


def test_serve_vllm_through_the_stand_in(cli_model):
    """`stepforge serve --backend vllm` on the stand-in, sampled over HTTP: the
    same answers as sampling the vLLM backend directly."""
    env = stand_in_env()
    direct = stepforge("sample", "--backend", "vllm", "--model", str(cli_model), *SAMPLE_ARGS, env=env)
    assert direct.returncode == 0, direct.stderr
    server, port = start_server("vllm", cli_model, env)
    try:
        remote = stepforge("sample", "--backend", "openai", "--base-url", f"http://127.0.0.1:{port}/v1",
                           "--model", str(cli_model), *SAMPLE_ARGS)
        assert remote.returncode == 0, remote.stderr
        assert json.loads(remote.stdout) == json.loads(direct.stdout)
    finally:
        server.terminate()
        server.wait(timeout=30)

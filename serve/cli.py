"""`stepforge serve`, `stepforge sample` and `stepforge tiny-model`.

Heavy libraries load inside the commands, so `stepforge --help` stays fast.
Expected failures (missing model, unreachable server, bad settings) print one
`error: ...` line on stderr and exit with status 2 (stepforge.errors).
"""

from __future__ import annotations

import json
import os
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer

from stepforge.errors import ConfigError, cli_errors, fail


class BackendChoice(str, Enum):
    hf = "hf"
    vllm = "vllm"
    openai = "openai"


def _offline_quiet() -> None:
    """No downloads ever; no progress bars or advisory logs on the console."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _backend_config(config_file: Optional[Path], overrides: dict[str, Any]):
    """A BackendConfig from an optional YAML file, with command-line flags on top."""
    from .config import config_from_dict, load_backend_config

    data: dict[str, Any] = {}
    if config_file is not None:
        data = load_backend_config(config_file).model_dump(exclude_unset=True)
    data.update({k: v for k, v in overrides.items() if v is not None})
    if "model" not in data:
        fail("give --model (a local checkpoint dir, or the served name with --backend openai)", 2)
    return config_from_dict(data, "options")


def _run_guarded(fn) -> None:
    """Run `fn`, turning expected errors (and invalid option values) into one line each on stderr (exit 2)."""
    from pydantic import ValidationError

    from stepforge.config_io import format_problems

    with cli_errors():
        try:
            fn()
        except ValidationError as exc:
            raise ConfigError(format_problems(exc, "options")) from None


BACKEND_OPT = typer.Option(None, "--backend", help="Backend kind (default hf).")
MODEL_OPT = typer.Option(None, "--model", help="Local checkpoint dir (hf, vllm) or served model name (openai).")
CONFIG_OPT = typer.Option(None, "--config", help="YAML file with backend settings (a `backend:` section or the whole file).")


def sample(
    prompt: str = typer.Option(..., "--prompt", help="Prompt text (a user message with --chat)."),
    backend: Optional[BackendChoice] = BACKEND_OPT,
    model: Optional[str] = MODEL_OPT,
    base_url: Optional[str] = typer.Option(None, "--base-url", help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1"),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="API key (default $OPENAI_API_KEY)."),
    chat: bool = typer.Option(False, "--chat", help="Send the prompt as a chat message (chat template)."),
    n: int = typer.Option(1, "-n", "--n", help="Completions to sample."),
    temperature: float = typer.Option(0.7, "--temperature"),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k", help="Sample from the k likeliest tokens (0: off)."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="vLLM-style penalty (1.0: off)."),
    max_tokens: int = typer.Option(128, "--max-tokens"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help="Stop string (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda (hf)."),
    lora: Optional[str] = typer.Option(None, "--lora", help="peft LoRA adapter dir."),
    config_file: Optional[Path] = CONFIG_OPT,
) -> None:
    """Sample completions for one prompt and print them."""
    _offline_quiet()

    def run() -> None:
        from .base import GenerationRequest, SamplingParams, make_backend

        # the sampling settings are checked first: a bad temperature never starts an engine
        sampling = SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k,
                                  repetition_penalty=repetition_penalty, max_tokens=max_tokens, seed=seed, stop=stop or [])
        config = _backend_config(
            config_file,
            {"kind": backend.value if backend else None, "model": model, "base_url": base_url,
             "api_key": api_key, "device": device, "lora_path": lora},
        )
        request = (
            GenerationRequest(messages=[{"role": "user", "content": prompt}], sampling=sampling)
            if chat
            else GenerationRequest(prompt=prompt, sampling=sampling)
        )
        with make_backend(config) as b:
            result = b.generate([request])[0]
        _print_result(result, as_json)

    _run_guarded(run)


def _print_result(result, as_json: bool) -> None:
    usage = {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }
    if as_json:
        payload = {
            "completions": result.texts,
            "finish_reasons": [c.finish_reason for c in result.completions],
            "details": [c.detail for c in result.completions],
            "completion_tokens": [c.completion_tokens for c in result.completions],
            "usage": usage,
        }
        typer.echo(json.dumps(payload))
        return
    for i, c in enumerate(result.completions):
        note = f"; {c.detail}" if c.detail else ""
        typer.echo(f"--- completion {i} ({c.finish_reason}, {c.completion_tokens} tokens{note}) ---")
        typer.echo(c.text)
    typer.echo(f"--- usage: {usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion tokens ---")


def _default_max_batch(config, replicas: int) -> int:
    """Units per backend call: one round of the hf engine's internal batches
    (so a small request waits behind at most one round), else 64."""
    if config.kind == "hf":
        return config.batch_size * max(replicas, 1)
    return 64


def serve(
    backend: Optional[BackendChoice] = BACKEND_OPT,
    model: Optional[str] = MODEL_OPT,
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name", help="Name clients use (default: --model as given)."),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="Upstream server (backend openai)."),
    api_key: Optional[str] = typer.Option(None, "--api-key"),
    device: Optional[str] = typer.Option(None, "--device"),
    dtype: Optional[str] = typer.Option(None, "--dtype"),
    lora: Optional[str] = typer.Option(None, "--lora"),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len"),
    tensor_parallel_size: Optional[int] = typer.Option(None, "--tensor-parallel-size"),
    gpu_memory_utilization: Optional[float] = typer.Option(None, "--gpu-memory-utilization"),
    replicas: int = typer.Option(0, "--replicas", help="0: model in this process; N: a pool of N Ray actors."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster (default $RAY_ADDRESS, else local)."),
    config_file: Optional[Path] = CONFIG_OPT,
    max_n: int = typer.Option(64, "--max-n", help="Largest n (samples per prompt) a request may ask for."),
    max_completion_tokens: int = typer.Option(4096, "--max-completion-tokens", help="Largest max_tokens a request may ask for."),
    max_prompts: int = typer.Option(64, "--max-prompts", help="Most prompts in one /v1/completions request."),
    max_body_bytes: int = typer.Option(1024**2, "--max-body-bytes", help="Largest request body; bigger ones get 413 unread."),
    body_timeout: float = typer.Option(30.0, "--body-timeout", help="Seconds a client may take to send its request body (else 408)."),
    max_queued_units: int = typer.Option(16384, "--max-queued-units", help="Most samples waiting over all requests; more get 503."),
    max_batch: Optional[int] = typer.Option(
        None, "--max-batch", min=1,
        help="Most units (samples) per backend call: smaller is fairer, bigger is faster "
             "(default: hf batch_size x replicas, else 64)."),
    shutdown_timeout: int = typer.Option(5, "--shutdown-timeout", min=0, help="Seconds running requests get to finish on SIGTERM/SIGINT."),
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions)."""
    _offline_quiet()

    def run() -> None:
        from stepforge.config_io import validate

        from .base import make_backend
        from .openai_schema import ServerLimits
        from .server import run_server

        limits = validate(ServerLimits, {"max_n": max_n, "max_tokens": max_completion_tokens, "max_prompts": max_prompts,
                                         "max_body_bytes": max_body_bytes, "body_timeout_s": body_timeout,
                                         "max_queued_units": max_queued_units}, "options", what="server limits")
        config = _backend_config(
            config_file,
            {"kind": backend.value if backend else None, "model": model, "served_model_name": served_model_name,
             "base_url": base_url, "api_key": api_key, "device": device, "dtype": dtype, "lora_path": lora,
             "max_model_len": max_model_len, "tensor_parallel_size": tensor_parallel_size,
             "gpu_memory_utilization": gpu_memory_utilization},
        )
        if replicas > 0:
            from .actors import ModelPool

            instance = ModelPool(config, replicas, address=ray_address)
        else:
            instance = make_backend(config)
        typer.echo(f"serving {config.name} at http://{host}:{port}/v1", err=True)
        run_server(instance, config.name, host=host, port=port, limits=limits,
                   max_batch=max_batch or _default_max_batch(config, replicas),
                   shutdown_timeout_s=shutdown_timeout)

    _run_guarded(run)


def tiny_model(
    out_dir: Path = typer.Argument(..., help="Directory to write the model to."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights."),
    vocab_size: int = typer.Option(2048, "--vocab-size", help="Upper bound on the BPE vocabulary."),
) -> None:
    """Write a tiny random Qwen2 model with a BPE tokenizer trained on project text."""
    _offline_quiet()
    from .tiny_model import build_tiny_model

    try:
        path = build_tiny_model(out_dir, seed=seed, vocab_size=vocab_size)
    except OSError as exc:
        fail(f"cannot write {out_dir}: {exc}")
    typer.echo(str(path))


def register(app: typer.Typer) -> None:
    """Add the serving commands to the root `stepforge` app."""
    app.command("serve")(serve)
    app.command("sample")(sample)
    app.command("tiny-model")(tiny_model)


"""transformers backend: any local causal-LM checkpoint, CPU or CUDA.

Requests with the same sampling settings are batched together (left padding,
`num_return_sequences = n`). A request with a seed is generated on its own
under a forked RNG seeded with it (as is one with a repetition penalty, which
transformers would apply to the padding ids too), so its output depends only on the model,
the prompt, the seed and its sampling settings, never on the rest of the batch
(on one machine and software stack: other hardware or library versions may
change the numerics and so the tokens).

Generation settings are built from the request alone: the checkpoint's
generation_config (which may carry its own top_k, repetition_penalty,
temperature...) contributes only its EOS ids, so a request samples the same
way here as on vLLM and over the OpenAI API.
"""

from __future__ import annotations

import contextlib
import threading
from collections import defaultdict
from pathlib import Path

from .base import BackendConfig, Completion, GenerationRequest, GenerationResult, ModelBackend, SamplingParams
from .errors import BackendUnavailableError, ModelNotFoundError
from .prompts import cut_at_stop, encode_prompt, new_token_budget, tokens_to_stop


def check_model_dir(path: str, what: str = "model") -> Path:
    """The path as a directory holding a transformers config, else ModelNotFoundError."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelNotFoundError(f"{what} path does not exist: {p}")
    if not p.is_dir() or not (p / "config.json").is_file():
        raise ModelNotFoundError(f"{what} path is not a model directory (no config.json): {p}")
    return p


def check_adapter_dir(path: str) -> Path:
    """The path as a peft adapter directory, else ModelNotFoundError."""
    p = Path(path).expanduser()
    if not (p / "adapter_config.json").is_file():
        raise ModelNotFoundError(f"LoRA adapter path is not a peft adapter (no adapter_config.json): {p}")
    return p


def resolve_device(device: str) -> str:
    """`auto` -> cuda when available, else cpu; `cuda` must be available."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError("device 'cuda' requested but CUDA is not available")
    return device


def resolve_dtype(dtype: str, device: str):
    """The torch dtype: `auto` is float32 on CPU and bf16 (else fp16) on CUDA."""
    import torch

    if dtype == "auto":
        if device == "cpu":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, dtype)


def _token_ids_only(config):
    """A GenerationConfig keeping only a checkpoint's special token ids.

    transformers fills every setting a call leaves unset from the model's
    generation_config; with this one in its place, unset settings get the
    library's neutral defaults, never the checkpoint's sampling choices.
    """
    from transformers import GenerationConfig

    keep = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
    return GenerationConfig(**{k: getattr(config, k) for k in keep if getattr(config, k, None) is not None})


class HFBackend(ModelBackend):
    """A transformers model (optionally with a peft LoRA adapter) behind the backend interface."""

    def __init__(self, config: BackendConfig):
        self.config = config
        model_dir = check_model_dir(config.model)
        tok_dir = check_model_dir(config.tokenizer, "tokenizer") if config.tokenizer else model_dir
        adapter_dir = check_adapter_dir(config.lora_path) if config.lora_path else None

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = resolve_device(config.device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, local_files_only=True, dtype=resolve_dtype(config.dtype, self.device)
            )
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(f"cannot load a causal LM from {model_dir}: {exc}") from None
        model.generation_config = _token_ids_only(model.generation_config)
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_dir))
        self.model = model.to(self.device).eval()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.max_model_len = config.max_model_len or getattr(self.model.config, "max_position_embeddings", None)
        self.eos_ids = self._eos_ids()
        self._lock = threading.Lock()
        self._torch = torch

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` without special tokens added."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Generate every request; batches share sampling settings, seeded ones run alone."""
        prompts = [encode_prompt(self.tokenizer, r) for r in requests]
        budgets = [new_token_budget(len(p), r.sampling.max_tokens, self.max_model_len) for p, r in zip(prompts, requests)]
        outputs: list[list[Completion] | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, (req, budget) in enumerate(zip(requests, budgets)):
            s = req.sampling
            if s.seed is not None or s.repetition_penalty != 1.0:
                # alone: its own RNG; and transformers' repetition penalty would also hit the padding ids
                groups[("alone", i)].append(i)
            else:
                groups[(s.n, s.temperature, s.top_p, s.top_k, s.repetition_penalty, tuple(s.stop), budget)].append(i)
        with self._lock:
            for members in groups.values():
                first = requests[members[0]].sampling
                for start in range(0, len(members), self.config.batch_size):
                    chunk = members[start : start + self.config.batch_size]
                    done = self._generate_batch([prompts[i] for i in chunk], first, budgets[chunk[0]])
                    for i, comps in zip(chunk, done):
                        outputs[i] = comps
        return [
            GenerationResult(request_id=r.request_id, prompt_tokens=len(p), completions=c)
            for r, p, c in zip(requests, prompts, outputs)
        ]

    def _generation_config(self, s: SamplingParams, max_new: int):
        """A fresh GenerationConfig holding exactly the request's settings
        (every other logits processor off), whatever the checkpoint ships."""
        from transformers import GenerationConfig

        sampled = {} if s.greedy else {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k}
        return GenerationConfig(
            max_new_tokens=max_new,
            num_return_sequences=s.samples_to_draw,
            do_sample=not s.greedy,
            repetition_penalty=s.repetition_penalty,
            num_beams=1,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=sorted(self.eos_ids),
            stop_strings=list(s.stop) or None,
            **sampled,
        )

    def _generate_batch(self, prompts: list[list[int]], s: SamplingParams, max_new: int) -> list[list[Completion]]:
        torch = self._torch
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        kwargs = {"tokenizer": self.tokenizer} if s.stop else {}
        per_prompt = s.samples_to_draw  # greedy: decoded once, repeated n times
        gc = self._generation_config(s, max_new)
        with self._rng(s.seed), torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=gc, **kwargs)
        rows = out[:, width:].tolist()
        comps = [self._completion(row, s.stop) for row in rows]
        grouped = [comps[i * per_prompt : (i + 1) * per_prompt] for i in range(len(prompts))]
        return [g if per_prompt == s.n else [g[0].model_copy() for _ in range(s.n)] for g in grouped]

    def _rng(self, seed: int | None):
        """A context seeded with `seed` that leaves the global RNG untouched;
        without a seed, the global RNG is used (and advances)."""
        if seed is None:
            return contextlib.nullcontext()
        torch = self._torch
        devices = [torch.device(self.device).index or 0] if self.device.startswith("cuda") else []

        @contextlib.contextmanager
        def seeded():
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                yield

        return seeded()

    def _completion(self, ids: list[int], stops: list[str]) -> Completion:
        """Text and exact token count of one generated row (padding after the end ignored)."""
        end = next((k for k, t in enumerate(ids) if t in self.eos_ids), None)
        body = ids if end is None else ids[:end]
        decode = lambda x: self.tokenizer.decode(x, skip_special_tokens=True)  # noqa: E731
        text, hit = cut_at_stop(decode(body), stops)
        if hit:
            return Completion(text=text, finish_reason="stop", completion_tokens=tokens_to_stop(decode, body, stops))
        if end is not None:
            return Completion(text=text, finish_reason="stop", completion_tokens=end + 1)
        return Completion(text=text, finish_reason="length", completion_tokens=len(body))

    def close(self) -> None:
        """Drop the model and free accelerator memory."""
        self.model = None
        if self.device.startswith("cuda"):
            self._torch.cuda.empty_cache()

"""Supervised fine-tuning of a LoRA adapter on the chat dataset (trl + peft).

`train_sft(examples, model, out, settings)`:

1. loads the base checkpoint (local files only) and its tokenizer, in fp32
   on CPU and in bf16 on a CUDA device that supports it (`precision: auto`);
2. turns every example (`messages` = the proposer's prompt + one assistant
   message with the answer) into trl's conversational prompt-completion form
   (`prompt` = the prompt messages, `completion` = the assistant message), so
   that SFTTrainer renders both with the model's chat template, with the
   generation prompt opened after the prompt, and puts the loss on the
   completion only (`completion_only_loss=True`: every prompt token's label is
   -100). An example longer than `max_length` tokens is an error naming the
   task (trl would silently truncate it, or drop it when the prompt alone
   fills `max_length`);
3. trains the LoRA adapter with SFTTrainer, saves the adapter and the
   tokenizer to `out` (so `proposer.backend.lora_path=out` works as is), and
   with `merge` writes the merged full model and tokenizer to `out/merged`;
4. writes `out/sft.json` (settings, base model, dataset summary, train
   metrics) and `out/dataset.jsonl` (the examples trained on).

`build_trainer` is the same pipeline without training (the tests inspect its
collated batches).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from stepforge.errors import StepforgeError

from .data import SFTExample, write_dataset
from .settings import SFTSettings

ADAPTER_CONFIG = "adapter_config.json"
MERGED_DIR = "merged"
SFT_RECORD = "sft.json"
DATASET_FILE = "dataset.jsonl"


class TrainingError(StepforgeError):
    """SFT cannot run: a bad base model, an empty or over-long dataset, an unusable output folder."""


@dataclass
class SFTResult:
    out_dir: Path
    adapter_dir: Path
    merged_dir: Path | None
    examples: int
    steps: int
    train_loss: float | None
    seconds: float
    record: dict[str, Any] = field(default_factory=dict)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device 'cuda' requested but CUDA is not available")
    return device


def resolve_precision(precision: str, device: str) -> str:
    """`fp32`, `bf16` or `fp16`: `auto` is bf16 on a CUDA device that supports it, else fp32 (fp16 on old GPUs)."""
    import torch

    if precision != "auto":
        if device == "cpu" and precision == "fp16":
            raise TrainingError("precision fp16 needs a CUDA device; use fp32 or bf16 on CPU")
        return precision
    if device == "cpu":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _check_model_dir(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise TrainingError(f"base model path is not a model directory (no config.json): {p}")
    return p


def load_tokenizer(model_path: str | Path):
    """The checkpoint's tokenizer (with a chat template and a pad token)."""
    from transformers import AutoTokenizer

    model_dir = _check_model_dir(model_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise TrainingError(f"cannot load the tokenizer of {model_dir}: {exc}") from None
    if not getattr(tokenizer, "chat_template", None):
        raise TrainingError(f"{model_dir}: the tokenizer has no chat template; SFT on chat prompts needs one")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(model_path: str | Path, settings: SFTSettings):
    """(model, device, precision) of a local checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = _check_model_dir(model_path)
    device = resolve_device(settings.device)
    precision = resolve_precision(settings.precision, device)
    # weights stay fp32 under fp16 mixed precision (the grad scaler needs fp32 master weights)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float32}[precision]
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise TrainingError(f"cannot load a causal LM from {model_dir}: {exc}") from None
    return model, device, precision


def model_context(model_path: str | Path) -> int | None:
    """The checkpoint's context length (max_position_embeddings), if its config states one."""
    try:
        config = json.loads((Path(model_path).expanduser() / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = config.get("max_position_embeddings") or (config.get("text_config") or {}).get("max_position_embeddings")
    return int(value) if isinstance(value, int) and value > 0 else None


def to_prompt_completion(examples: Sequence[SFTExample]) -> list[dict[str, Any]]:
    """trl's conversational prompt-completion rows: the prompt messages and the assistant answer."""
    rows = []
    for ex in examples:
        rows.append({"prompt": [dict(m) for m in ex.prompt], "completion": [{"role": "assistant", "content": ex.answer}]})
    return rows


def token_lengths(tokenizer, example: SFTExample) -> tuple[int, int]:
    """(prompt tokens with the generation prompt opened, prompt + answer tokens), as the trainer renders them."""
    prompt = tokenizer.apply_chat_template(list(example.prompt), tokenize=True, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(list(example.messages), tokenize=True)
    return len(_ids(prompt)), len(_ids(full))


def _ids(out) -> list[int]:
    if isinstance(out, dict) or hasattr(out, "keys"):
        return list(out["input_ids"])
    return list(out)


def check_lengths(tokenizer, examples: Sequence[SFTExample], max_length: int,
                  context: int | None = None) -> list[tuple[int, int]]:
    """Token lengths of every example; TrainingError for any longer than `max_length` (or the model's context)."""
    lengths = [token_lengths(tokenizer, ex) for ex in examples]
    if context is not None:
        over = [(ex, n) for ex, (_, n) in zip(examples, lengths) if n > context]
        if over:
            ex, n = max(over, key=lambda item: item[1])
            raise TrainingError(
                f"{len(over)} of {len(examples)} examples are longer than the model's context of {context} tokens "
                f"(longest: {ex.task_key}, {n} tokens); use a shorter prompt (e.g. prompt.knowledge: none)"
            )
    too_long = [(ex, n) for ex, (_, n) in zip(examples, lengths) if n > max_length]
    if too_long:
        ex, n = max(too_long, key=lambda item: item[1])
        raise TrainingError(
            f"{len(too_long)} of {len(examples)} examples are longer than max_length={max_length} tokens "
            f"(longest: {ex.task_key}, {n} tokens); raise max_length (--set max_length={n}) or use a "
            f"shorter prompt (prompt.knowledge: none)"
        )
    return lengths


def sft_config(settings: SFTSettings, out_dir: Path, device: str, precision: str):
    """trl's SFTConfig for these settings (no checkpoints; the adapter is saved at the end)."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(out_dir / "trainer"),
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.learning_rate,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=settings.warmup_ratio,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        seed=settings.seed,
        data_seed=settings.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=device == "cpu",
        activation_checkpointing=settings.gradient_checkpointing,  # transformers 5 name of gradient_checkpointing
        max_length=settings.max_length,
        completion_only_loss=True,
        assistant_only_loss=False,
        packing=False,
        logging_steps=settings.logging_steps,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=True,
    )


def lora_config(settings: SFTSettings):
    from peft import LoraConfig

    lora = settings.lora
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules),
        bias=lora.bias,
        modules_to_save=list(lora.modules_to_save) or None,
        task_type="CAUSAL_LM",
    )


def _trainer_class():
    """SFTTrainer whose optimizer gives the fully trained modules (`modules_to_save`) their own learning rate."""
    from trl import SFTTrainer

    class StepforgeSFTTrainer(SFTTrainer):
        modules_to_save_lr: float | None = None

        def create_optimizer(self, model=None):
            fresh = self.optimizer is None
            optimizer = super().create_optimizer(model)
            if not fresh or self.modules_to_save_lr is None:
                return optimizer
            opt_model = self.model if model is None else model
            saved = {id(p) for n, p in opt_model.named_parameters() if p.requires_grad and ".modules_to_save." in n}
            moved_groups = []
            for group in optimizer.param_groups:
                moved = [p for p in group["params"] if id(p) in saved]
                if moved:
                    group["params"] = [p for p in group["params"] if id(p) not in saved]
                    moved_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": moved,
                                         "lr": self.modules_to_save_lr})
            optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
            for group in moved_groups:
                optimizer.add_param_group(group)
            return optimizer

    return StepforgeSFTTrainer


def build_trainer(examples: Sequence[SFTExample], model_path: str | Path, out_dir: str | Path, settings: SFTSettings):
    """The SFTTrainer (model with a fresh LoRA adapter, tokenized dataset), ready to train."""
    from datasets import Dataset

    if not examples:
        raise TrainingError("the dataset is empty: no buffer entry or extra task gave an example")
    out = Path(out_dir)
    tokenizer = load_tokenizer(model_path)
    check_lengths(tokenizer, examples, settings.max_length, model_context(model_path))
    model, device, precision = load_base(model_path, settings)
    dataset = Dataset.from_list(to_prompt_completion(examples))
    trainer_cls = _trainer_class()
    trainer_cls.modules_to_save_lr = settings.lora.modules_to_save_lr if settings.lora.modules_to_save else None
    try:
        trainer = trainer_cls(
            model=model,
            args=sft_config(settings, out, device, precision),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora_config(settings),
        )
    except ValueError as exc:  # e.g. target modules the model does not have
        raise TrainingError(f"cannot set up SFT on {model_path}: {exc}") from None
    return trainer


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and (out / ADAPTER_CONFIG).exists():
        raise TrainingError(f"--out {out}: already holds an adapter; choose another folder or remove it")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrainingError(f"--out {out}: cannot create the folder: {exc.strerror or exc}") from None


def train_sft(
    examples: Sequence[SFTExample],
    model_path: str | Path,
    out_dir: str | Path,
    settings: SFTSettings,
    merge: bool | None = None,
    sources: dict[str, Any] | None = None,
) -> SFTResult:
    """Train, save the adapter + tokenizer to `out_dir` (and the merged model with `merge`)."""
    out = Path(out_dir)
    merge = settings.merge if merge is None else merge
    _prepare_out(out)
    started = time.time()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    trainer = build_trainer(examples, model_path, out, settings)
    result = trainer.train()
    trainer.model.save_pretrained(str(out))
    trainer.processing_class.save_pretrained(str(out))
    merged_dir = None
    if merge:
        merged_dir = out / MERGED_DIR
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(str(merged_dir))
        trainer.processing_class.save_pretrained(str(merged_dir))
        del merged
    seconds = time.time() - started
    write_dataset(out / DATASET_FILE, examples)
    history = [h for h in trainer.state.log_history if "loss" in h]
    record = {
        "base_model": str(Path(model_path).expanduser().resolve()),
        "adapter": str(out.resolve()),
        "merged": str(merged_dir.resolve()) if merged_dir else None,
        "examples": len(examples),
        "tasks": sorted({ex.task_key for ex in examples}),
        "sources": sources or {},
        "steps": int(trainer.state.global_step),
        "train_loss": float(result.training_loss) if result.training_loss is not None else None,
        "final_loss": float(history[-1]["loss"]) if history else None,
        "loss_history": [{"step": int(h["step"]), "loss": float(h["loss"])} for h in history],
        "seconds": round(seconds, 3),
        "device": str(trainer.args.device),
        "settings": settings.model_dump(mode="json"),
    }
    (out / SFT_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    _remove_trainer_dir(out / "trainer")
    del trainer, result
    _release_accelerator()
    return SFTResult(out, out, merged_dir, len(examples), record["steps"], record["train_loss"], seconds, record)


def _release_accelerator() -> None:
    """Free the trained model's GPU memory in this process (an ablation serves the adapter next, e.g. with vLLM)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _remove_trainer_dir(path: Path) -> None:
    """The trainer's output folder holds nothing we keep (no checkpoints are saved)."""
    import shutil

    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


__all__ = [
    "SFTResult",
    "TrainingError",
    "build_trainer",
    "check_lengths",
    "load_base",
    "load_tokenizer",
    "model_context",
    "lora_config",
    "resolve_precision",
    "sft_config",
    "to_prompt_completion",
    "train_sft",
]

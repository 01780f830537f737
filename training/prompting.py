"""Prompt settings shared by SFT data and the evaluation run, and the compact prompt.

The proposer prompt is `stepforge.loop.prompts.proposer_messages(knowledge,
demonstrations, task_ir, style)`. Two things decide it besides the task and
the demonstrations: the style (`proposer.style` of an improve config) and the
knowledge text in the system message. `proposer.options.knowledge` (and the
SFT settings' `prompt.options.knowledge`) selects the knowledge:

- `full` (default): the loop's base knowledge (`load_knowledge()`), the
  published setting;
- `none`: the compact prompt: the system message keeps the role and the
  answer format but no STeP reference (a few hundred tokens instead of many
  thousands). A fine-tuned model carries the language in its weights, and
  short prompts make SFT on CPU take seconds instead of minutes.

The loop's own LLM proposer always uses the full knowledge; an improve run
with the compact prompt uses this module's proposer factory,
`proposer: {kind: custom, factory: "stepforge.training.prompting:llm_proposer",
backend: {...}, options: {knowledge: none}}`, which builds the loop's
`LLMProposer` with the same backend, sampling settings and style and only the
knowledge swapped (see `llm_proposer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .settings import PromptSettings, TrainingConfigError

KNOWLEDGE_CHOICES = ("full", "none")
PROMPT_OPTION_KEYS = ("knowledge",)
FACTORY = "stepforge.training.prompting:llm_proposer"


@dataclass(frozen=True)
class CompactKnowledge:
    """Stands in for the loop's Knowledge in `proposer_messages`: no reference text."""

    def render(self, style: str = "ir") -> str:
        if style not in ("ir", "python"):
            raise ValueError(f"unknown style {style!r}; expected 'ir' or 'python'")
        return ""


def check_options(options: dict[str, Any], where: str = "prompt.options") -> dict[str, Any]:
    """The prompt options, validated (unknown keys or values are a TrainingConfigError)."""
    options = dict(options or {})
    knowledge = options.get("knowledge", "full")
    if knowledge not in KNOWLEDGE_CHOICES:
        raise TrainingConfigError(f"{where}.knowledge: expected one of {', '.join(KNOWLEDGE_CHOICES)}, got {knowledge!r}")
    return {"knowledge": knowledge}


def knowledge_for(options: dict[str, Any]):
    """The knowledge object the prompt is built with."""
    if check_options(options)["knowledge"] == "none":
        return CompactKnowledge()
    from stepforge.loop.knowledge import load_knowledge

    return load_knowledge()


def resolve_prompt_options(settings: PromptSettings) -> tuple[str, dict[str, Any]]:
    """(style, options): from the improve config `loop_config` when given, else the inline settings."""
    if settings.loop_config:
        from stepforge.loop.config import ConfigError, load_config

        try:
            cfg = load_config(settings.loop_config).effective()
        except ConfigError as exc:
            raise TrainingConfigError(str(exc)) from None
        options = {k: v for k, v in cfg.proposer.options.items() if k in PROMPT_OPTION_KEYS}
        return cfg.proposer.style, check_options(options, f"{settings.loop_config}: proposer.options")
    return settings.style, check_options(settings.options)


def proposer_section(backend: dict[str, Any], options: dict[str, Any], style: str = "ir",
                     **extra: Any) -> dict[str, Any]:
    """The `proposer:` section of an improve config that prompts like `options` say.

    The full knowledge uses the loop's own LLM proposer; the compact prompt uses
    this module's factory (same proposer class, knowledge swapped).
    """
    options = check_options(options)
    section: dict[str, Any] = {"style": style, "backend": dict(backend), **extra}
    if options["knowledge"] == "full":
        section["kind"] = "llm"
    else:
        section.update({"kind": "custom", "factory": FACTORY, "options": options})
    return section


def llm_proposer(cfg, tasks):
    """Factory for `proposer.kind: custom`: the loop's LLMProposer with the knowledge of `proposer.options`.

    Everything else is what `stepforge improve` does for `kind: llm`: the same
    backend (a Ray model pool, as the loop builds it, so `lora_path`, vLLM and
    replicas work unchanged), max_tokens, stop, top_p and style.
    """
    from stepforge.loop.agents import LLMProposer
    from stepforge.serve.actors import ModelPool, init_ray

    options = check_options(cfg.proposer.options, "proposer.options")
    backend = cfg.proposer.backend
    if backend is None:
        raise TrainingConfigError("proposer.backend: the compact-prompt LLM proposer needs a backend")
    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    pool = ModelPool(backend, replicas=cfg.proposer.replicas, address=cfg.ray.address)
    return LLMProposer(pool, knowledge_for(options), style=cfg.proposer.style, max_tokens=cfg.proposer.max_tokens,
                       stop=cfg.proposer.stop or None, top_p=cfg.proposer.top_p)


__all__ = [
    "CompactKnowledge",
    "FACTORY",
    "KNOWLEDGE_CHOICES",
    "check_options",
    "knowledge_for",
    "llm_proposer",
    "proposer_section",
    "resolve_prompt_options",
]

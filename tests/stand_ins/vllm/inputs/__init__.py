"""Prompt types `LLM.generate` accepts besides plain strings."""

from __future__ import annotations

from typing import TypedDict


class TextPrompt(TypedDict, total=False):
    """A text prompt, tokenized by the engine."""

    prompt: str


class TokensPrompt(TypedDict, total=False):
    """A pre-tokenized prompt."""

    prompt_token_ids: list[int]
    prompt: str

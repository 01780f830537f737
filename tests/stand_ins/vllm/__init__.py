"""A stand-in for vLLM's offline interface, for tests on machines without a GPU.

Written from vLLM's documentation; see tests/stand_ins/README.md.
"""

from .entrypoints.llm import LLM
from .inputs import TextPrompt, TokensPrompt
from .outputs import CompletionOutput, RequestOutput
from .sampling_params import SamplingParams

__version__ = "0.19.1+stand-in"

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "TextPrompt", "TokensPrompt"]

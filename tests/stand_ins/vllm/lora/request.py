"""`LoRARequest`: which adapter a request runs with."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LoRARequest:
    """A LoRA adapter: a name, a positive integer id unique per adapter, and
    the local directory of a peft adapter."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    def __post_init__(self) -> None:
        if self.lora_int_id < 1:
            raise ValueError(f"id must be > 0, got {self.lora_int_id}")
        if not self.lora_path:
            raise ValueError("lora_path must be given")

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path

    def __hash__(self) -> int:
        return hash(self.lora_int_id)

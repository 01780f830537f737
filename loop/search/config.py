"""The search proposer's settings (`SearchConfig`) and how a caller's settings become one."""

from __future__ import annotations

from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, field_validator


class SearchConfig(BaseModel):
    """Settings of the search proposer; every key has a default."""

    model_config = ConfigDict(extra="forbid")

    max_expansions: int = Field(default=6000, ge=1, description="per sample and search of the portfolio: "
                                "expansions allowed after its previous program")
    expansion_schedule: list[int] = Field(default_factory=list, description="max_expansions by Algorithm 1's "
                                          "round: round r uses entry min(r, len - 1), so tasks still unsolved get "
                                          "a larger budget later (empty: max_expansions in every round)")
    candidate_schedule: list[int] = Field(default_factory=list, description="programs per request by "
                                          "Algorithm 1's round (at most the request's n): round r uses entry "
                                          "min(r, len - 1) (empty: the request's n)")
    max_seconds: float = Field(default=15.0, gt=0, description="per sample and search of the portfolio: seconds "
                               "(of its own work) allowed after its previous program")
    heuristic_weights: list[float] = Field(default_factory=lambda: [2.0, 4.0], min_length=1,
                                           description="nats per estimated remaining operator; one search per "
                                           "weight, interleaved (the first follows the prior, larger ones are "
                                           "greedier)")
    noise: float = Field(default=1.5, ge=0, description="scale (nats) of the per-move Exp(1) noise at temperature 1")
    max_statements: int = Field(default=16, ge=1, description="operator applications per program (Copies excluded)")
    max_live_extra: int = Field(default=3, ge=0, description="live streams allowed beyond the number of outputs")
    max_fn_uses: int = Field(default=2, ge=1, description="times one fn may be applied")
    max_copies: int = Field(default=4, ge=0, description="Copy operations per program")
    allow_reshape: bool = Field(default=False, description="also try Reshape as glue")
    mix: float = Field(default=0.25, ge=0, le=1, description="weight of the base prior in the learned prior")
    fn_order: bool = Field(default=True, description="cost fn applications by the task's fn order")
    max_demonstrations: int = Field(default=64, ge=0, description="most demonstrations the prior is fitted on")
    similarity_floor: float = Field(default=0.25, ge=0, le=1, description="weight of a demonstration of a task "
                                    "unlike the target (1: every demonstration counts fully)")
    base_share: float = Field(default=0.25, ge=0, lt=1, description="with demonstrations: share of the samples "
                              "drawn from a second search in the base prior's order, so demonstrations cannot hide "
                              "what the base prior finds (0: learned prior only)")


    @field_validator("expansion_schedule", "candidate_schedule")
    @classmethod
    def _schedule(cls, v: list[int]) -> list[int]:
        if any(int(x) < 1 for x in v):
            raise ValueError(f"expected counts >= 1, got {v}")
        return v

    def candidates(self, round_: int, n: int) -> int:
        """Programs a request of round `round_` asking for `n` gets at most (`candidate_schedule`)."""
        if not self.candidate_schedule:
            return n
        return min(n, self.candidate_schedule[min(max(round_, 0), len(self.candidate_schedule) - 1)])

    def for_round(self, round_: int) -> "SearchConfig":
        """These settings with the round's `max_expansions` (from `expansion_schedule`)."""
        if not self.expansion_schedule:
            return self
        budget = self.expansion_schedule[min(max(round_, 0), len(self.expansion_schedule) - 1)]
        return self if budget == self.max_expansions else self.model_copy(update={"max_expansions": budget})


def as_config(config: Any) -> SearchConfig:
    """A SearchConfig from None (the defaults), a SearchConfig, a mapping of its keys or an object with `.options`."""
    if config is None:
        return SearchConfig()
    if isinstance(config, SearchConfig):
        return config
    if isinstance(config, Mapping):
        return SearchConfig(**dict(config))
    options = getattr(config, "options", None)  # the loop's ProposerConfig carries search settings in `options`
    if isinstance(options, Mapping):
        return SearchConfig(**dict(options))
    raise TypeError(f"expected a SearchConfig, a mapping of its keys or None, got {type(config).__name__}")


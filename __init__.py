"""stepforge: LLM agents that write STeP programs, verified by a vectorised simulator."""

__version__ = "0.1.0"

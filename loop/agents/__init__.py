"""The LLM agents: the proposer, the guardians, their prompts, knowledge and reply parsing."""

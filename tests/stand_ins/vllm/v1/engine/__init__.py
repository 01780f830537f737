"""The V1 engine's finish reasons, as vLLM documents them (values of
`CompletionOutput.finish_reason`).

stop: EOS, a stop string or a stop token id; length: max_tokens reached or
the context filled; abort: the request was aborted; error: a request-level
engine failure; repetition: a repeating token pattern was cut short.
"""

FINISH_REASON_STRINGS = ("stop", "length", "abort", "error", "repetition")

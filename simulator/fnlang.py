"""The fn language of open mode (docs/language.md, section 5a): model-written fn bodies, parsed and interpreted.

`OpenCompiler` is the body compiler `fns.make_fn` takes for untrusted bodies:
`fnlang_parse` accepts the body or rejects it (`FnLanguageError`, naming the
fn, the line and the construct) before any of it runs, and turns it into
closures over `fnlang_eval`; nothing is exec'd, eval'd or compiled. The
vocabulary (`fnlang_vocab`) maps each allowed name to the one torch function
it means.

While a body runs, every call and every operator on tensors first computes
the size of its result from the argument shapes and raises `ResourceError`
if it would pass the element cap (the streams' cap, `max_elements`), divided
by the number of elements evaluated at once under vmap (`for_batch`). Python
integers stay below 2**62, and `**` of integers is bounded before it runs.

The closures of an accepted body depend only on its text, its fn's name and
arity, the size values, the parameter names and the vocabulary (the values a
body reads come in per call), so they are kept in a small LRU: a candidate's
fns, verified at several bindings or again in another candidate, are parsed
and compiled once.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterable, Mapping, Optional

from stepforge.simulator.errors import FnLanguageError
from stepforge.simulator.fnlang_eval import InterpretedBody
from stepforge.simulator.fnlang_parse import MAX_BODY_CHARS, MAX_DEPTH, MAX_STATEMENTS, compile_body, parse_body
from stepforge.simulator.fnlang_vocab import STANDARD
from stepforge.simulator.fns import FnSignature, StepFn, make_fn
from stepforge.simulator.interpreter import DEFAULT_MAX_ELEMENTS

_COMPILED: "OrderedDict[tuple, Any]" = OrderedDict()  # see the module docstring
_MAX_COMPILED = 2048


def _compiled(apply: str, sig: FnSignature, sizes: dict[str, int], parameters: frozenset[str],
              vocabulary: frozenset[str]):
    key = (apply, sig.func_name, len(sig.input_type.fields()), len(sig.output_type.fields()), sig.is_fold,
           tuple(sorted(sizes.items())), parameters, vocabulary)
    run = _COMPILED.get(key)
    if run is None:
        run = compile_body(parse_body(apply, sig.func_name), sig, sizes, parameters, vocabulary)
        _COMPILED[key] = run
        if len(_COMPILED) > _MAX_COMPILED:
            _COMPILED.popitem(last=False)
    else:
        _COMPILED.move_to_end(key)
    return run


class OpenCompiler:
    """The body compiler for model-written fns (pass as `make_fn(..., compile_body=OpenCompiler(...))`).

    `parameters`: the task's parameter names (`input_data['P']`); `vocabulary`:
    the names allowed (default: the standard vocabulary); `max_elements`: the
    element cap of one tensor a body makes.
    """

    def __init__(self, parameters: Iterable[str] = (), vocabulary: Optional[Iterable[str]] = None,
                 max_elements: int = DEFAULT_MAX_ELEMENTS):
        self.parameters = frozenset(parameters)
        self.vocabulary = frozenset(STANDARD if vocabulary is None else vocabulary)
        self.max_elements = int(max_elements)

    def __call__(self, apply: str, sig: FnSignature, namespace: Mapping[str, Any]) -> InterpretedBody:
        sizes = {k: v for k, v in namespace.items()
                 if k.endswith("_value") and isinstance(v, int) and not isinstance(v, bool)}
        run = _compiled(apply, sig, sizes, self.parameters, self.vocabulary)
        return InterpretedBody(run, namespace.get("input_data", {}), self.max_elements)


def make_open_fn(name: str, func_name: str, input_dtype, output_dtype, apply: str, init=None,
                 namespace: Optional[dict] = None, parameters: Iterable[str] = (),
                 vocabulary: Optional[Iterable[str]] = None, max_elements: int = DEFAULT_MAX_ELEMENTS) -> StepFn:
    """A StepFn from a model-written fn entry; FnLanguageError if its body is outside the language."""
    return make_fn(name, func_name, input_dtype, output_dtype, apply, init, namespace,
                   compile_body=OpenCompiler(parameters, vocabulary, max_elements), batch_direct=False)


__all__ = ["FnLanguageError", "InterpretedBody", "MAX_BODY_CHARS", "MAX_DEPTH", "MAX_STATEMENTS", "OpenCompiler",
           "make_open_fn"]

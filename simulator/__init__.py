"""The STeP language: types, symbolic shapes, operators, the safe program
parser and two interpreters (vectorised torch, and a naive element-by-element
oracle).

Public API::

    parse_dtype(spec)            -> ElemType    ("fp32", "Buffer(fp32, [D])", list for tuples)
    parse_dims(dims)             -> Shape       (tuple of Dim, innermost first)
    StreamType(elem, shape)                     static type of a stream
    Stream(type, data)                          a value: Tensor, or list of Tensors for tuples
    make_fn(...)                 -> StepFn      a task function from its `apply` source
    make_open_fn(...)            -> StepFn      a model-written fn, in the fn language (fnlang.py)
    parse_program(text)          -> Program     whitelisted AST walk; never exec
    check_affine(program)        -> list[AffineViolation]
    typecheck(program, inputs, fns) -> list[StreamType]   the returned streams' types
    run_program(program, inputs, fns, binding, engine="vectorised"|"naive",
                max_elements=2**27, max_live_elements=None) -> list[Stream]
                                    each stream is freed after its last use; the streams
                                    alive at once may hold max_live_elements (default
                                    2 * max_elements), checked before allocation

Every error derives from `SimulatorError` and has a one-line `.message` fit to
show a model; `ProgramSyntaxError`, `StepTypeError`, `ResourceError` and
`StepRuntimeError` carry the program line; `FnLanguageError` (a model-written
fn body outside the fn language) names the fn and the body's line.
"""

from stepforge.simulator.errors import (
    FnLanguageError,
    ProgramSyntaxError,
    ResourceError,
    SimulatorError,
    StepRuntimeError,
    StepTypeError,
)
from stepforge.simulator.fnlang import make_open_fn
from stepforge.simulator.fns import StepFn, make_fn
from stepforge.simulator.interpreter import run_program, typecheck
from stepforge.simulator.program import AffineViolation, Program, check_affine, parse_program
from stepforge.simulator.shapes import Dim, Shape, parse_dims
from stepforge.simulator.types import (
    BufferType,
    ElemType,
    MultihotType,
    ScalarType,
    TupleType,
    parse_dtype,
)
from stepforge.simulator.values import Stream, StreamType

__all__ = [
    "AffineViolation",
    "BufferType",
    "Dim",
    "ElemType",
    "FnLanguageError",
    "MultihotType",
    "Program",
    "ProgramSyntaxError",
    "ResourceError",
    "ScalarType",
    "Shape",
    "SimulatorError",
    "StepFn",
    "StepRuntimeError",
    "StepTypeError",
    "Stream",
    "StreamType",
    "TupleType",
    "check_affine",
    "make_fn",
    "make_open_fn",
    "parse_dims",
    "parse_dtype",
    "parse_program",
    "run_program",
    "typecheck",
]

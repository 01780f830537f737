"""Task files, part 1: the declarations a task is made of, and the checks of their fields.

Constants of the format, `TaskFileError`, the normalisation and checks of code
blocks, dtypes, dims and fold inits, and the models of a task's parts
(`StreamDecl`, `InputDecl`, `ParameterDecl`, `FnDecl`, `OutputDecl`,
`MultihotGen`, `Tolerance`, `Vocabulary`). The task itself is in task_model.py,
reading files in task_loading.py; benchmark/schema.py is the public face.
"""

from __future__ import annotations

import keyword
import math
import re
import textwrap
from pathlib import Path
from typing import Any, ClassVar, Optional, Union

from pydantic import ConfigDict, Field, field_validator, model_validator

from stepforge.config_io import StrictModel
from stepforge.errors import StepforgeError

TASKS_ROOT = Path(__file__).resolve().parent / "tasks"

# Groups in the order docs/benchmark.md lists them; other groups follow alphabetically.
GROUP_ORDER = ("attention", "bmm", "gemm", "norm", "rope", "moe-index", "moe-expert", "moe-end-to-end",
               "norm-ext", "similarity", "mlp", "attention-ext", "pooling", "decode", "routing", "moe-ext")

DATA_GENS = ("torch.rand", "torch.randn", "torch.ones", "binary")
INIT_WORDS = ("-inf",)
MAX_INT = 2**31  # integers in a task file, as in a program (simulator.program.MAX_INT_LITERAL)
INIT_NUMBERS = (0, 1, -1, -math.inf)
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z_0-9]*$")
_DIM_TEXT = re.compile(r"^\s*([A-Za-z_][A-Za-z_0-9]*|\d+)(\s*[*/]\s*([A-Za-z_][A-Za-z_0-9]*|\d+))*\s*$")


class TaskFileError(StepforgeError, ValueError):
    """A task file (or task text) that does not follow the schema.

    `path` is the file (or a label such as `<string>`), `errors` a list of
    `(key_path, what_was_expected)`; `str(err)` is one line per error, the
    first line naming the file, the key path and the expectation.
    """

    def __init__(self, path: str | Path | None, errors: list[tuple[str, str]]):
        self.path = str(path) if path is not None else "<task>"
        self.errors = list(errors) or [("", "invalid task")]
        self.key, self.expected = self.errors[0]
        super().__init__(self._format())

    def _format(self) -> str:
        lines = [f"{self.path}: {k}: {m}" if k else f"{self.path}: {m}" for k, m in self.errors[:8]]
        if len(self.errors) > 8:
            lines.append(f"{self.path}: ... and {len(self.errors) - 8} more problems")
        return "\n".join(lines)

    @property
    def message(self) -> str:
        """The first problem, one line."""
        return self._format().splitlines()[0]


# ---------------------------------------------------------------------------
# field checks (ValueError messages become "<key path>: <message>")


def normalise_code(text: str) -> str:
    """Dedent, drop trailing spaces and blank first/last lines, end with one newline."""
    lines = [line.rstrip() for line in textwrap.dedent(text.replace("\r\n", "\n")).split("\n")]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines) + "\n" if lines else ""


def _code(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected {what} as a text block (a YAML `|` literal), got {_show(value)}")
    code = normalise_code(value)
    if not code:
        raise ValueError(f"expected {what}, got an empty block")
    return code


def _check_python(code: str, as_body: bool) -> None:
    """Syntax-check a block; a body may `return` at top level (it runs as a function body)."""
    source = "def __task_block__(input=None, state=None):\n" + textwrap.indent(code, "    ") if as_body else code
    try:
        compile(source, "<task>", "exec")
    except SyntaxError as exc:
        line = (exc.lineno or 1) - (1 if as_body else 0)
        raise ValueError(f"Python syntax error on line {max(line, 1)} of the block: {exc.msg}") from None


def _ends_with_expression(code: str) -> bool:
    import ast

    tree = ast.parse(code)
    return bool(tree.body) and isinstance(tree.body[-1], ast.Expr)


def _has_return(code: str) -> bool:
    """A `return` at the body's own level (not inside a nested def or lambda)."""
    from stepforge.simulator.fns import body_returns

    return body_returns(code)


def _show(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        from stepforge.simulator.errors import format_int

        return format_int(value)
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_dtype(value: Any) -> Union[str, list[str]]:
    from stepforge.simulator import parse_dtype

    if isinstance(value, list):
        if not value:
            raise ValueError("expected a dtype string or a non-empty list of dtype strings (a tuple type)")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise ValueError(f"item {i}: expected a dtype string such as fp32 or 'Buffer(fp32, [D])', got {_show(item)}")
    elif not isinstance(value, str):
        raise ValueError(f"expected a dtype string such as fp32 or 'Buffer(fp32, [D])', or a list of them, got {_show(value)}")
    try:
        parse_dtype(value)
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    return value


def _check_dims(value: Any) -> list[Union[int, str]]:
    from stepforge.simulator import parse_dims

    if not isinstance(value, list) or not value:
        raise ValueError(f"expected a non-empty list of dims, innermost first, e.g. [K, N, M], got {_show(value)}")
    for i, d in enumerate(value):
        size = isinstance(d, int) and 0 < d <= MAX_INT
        if isinstance(d, bool) or not (size or isinstance(d, str) and _DIM_TEXT.match(d)):
            raise ValueError(f"item {i}: expected a positive integer up to 2**31, a size symbol or a product such as K*N, "
                             f"got {_show(d)}")
    try:
        parse_dims(value)
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    return [d.strip() if isinstance(d, str) else d for d in value]


def _check_init_value(v: Any) -> bool:
    """One of 0, 1, -1 (an int or a float equal to it) or -inf (the word, or YAML's `-.inf`)."""
    if isinstance(v, bool):
        return False
    if isinstance(v, (int, float)):
        return v in INIT_NUMBERS
    return isinstance(v, str) and v.strip() in INIT_WORDS


def _check_identifier(v: Any, example: str) -> str:
    """A name programs and code blocks can use: an identifier, not a keyword, not `__dunder`."""
    if not isinstance(v, str) or not _IDENT.match(v) or keyword.iskeyword(v) or v.startswith("__"):
        raise ValueError(f"expected a Python identifier (not a keyword, not starting with __) such as {example}, "
                         f"got {_show(v)}")
    return v


def _declared_symbols(code: Optional[str]) -> Optional[set[str]]:
    """The size symbols `global` sets with `ctx[X] = ...`; None if it changes ctx in a way a reader cannot follow."""
    import ast

    names: set[str] = set()
    if not code:
        return names
    for node in ast.walk(ast.parse(code)):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign, ast.For)) else []
        for t in targets:
            for sub in ast.walk(t):
                if isinstance(sub, ast.Subscript) and isinstance(sub.value, ast.Name) and sub.value.id == "ctx":
                    key = sub.slice
                    if isinstance(key, ast.Name):
                        names.add(key.id)
                    elif isinstance(key, ast.Constant) and isinstance(key.value, str):
                        names.add(key.value)
                    else:
                        return None
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "ctx" \
                and node.attr not in ("get", "items", "keys", "values"):
            return None  # ctx.update(...), ctx.setdefault(...): set at run time only
        if isinstance(node, ast.Name) and node.id == "ctx" and not isinstance(getattr(node, "ctx", None), ast.Load):
            return None  # ctx rebound
    return names


def _stream_symbols(dtype, dims) -> list[str]:
    """The size symbols an element type and (optionally) dims name, in order."""
    from stepforge.simulator import parse_dims, parse_dtype

    elem = parse_dtype(dtype)
    shape = tuple(parse_dims(dims)) if dims is not None else ()
    found: list[str] = []
    for dim in shape + tuple(d for f in elem.fields() for d in f.elem_dims()):
        found.extend(s for s in dim.symbols if s not in found)
    return found


_PROBLEM_SEP = " | "  # joins the problems one validator finds; config_io.validation_problems splits on it


# ---------------------------------------------------------------------------
# models


class _Strict(StrictModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=False)


class MultihotGen(_Strict):
    """`data_gen: {min: a, max: b}`: each position gets between a and b ones at random routes."""

    min: int = Field(ge=0, le=2**31)
    max: int = Field(ge=0, le=2**31)

    @model_validator(mode="after")
    def _order(self):
        if self.min > self.max:
            raise ValueError(f"expected min <= max, got min={self.min}, max={self.max}")
        return self


class _NamedStream(_Strict):
    """What inputs, parameters and outputs share: a name, an element type and dims."""

    _example_name: ClassVar[str] = "E0"

    name: str
    dtype: Union[str, list[str]]
    dims: list[Union[int, str]]

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, v):
        return _check_identifier(v, cls._example_name)

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype(cls, v):
        return _check_dtype(v)

    @field_validator("dims", mode="before")
    @classmethod
    def _dims(cls, v):
        return _check_dims(v)


class StreamDecl(_NamedStream):
    """An input stream or a parameter: `{name, dtype, dims, data_gen}`."""

    dtype: Union[str, list[str]] = "fp32"
    data_gen: Union[str, MultihotGen]

    @model_validator(mode="before")
    @classmethod
    def _min_max_on_the_input(cls, data):
        """The published form: `min` and `max` on a Multihot input itself stand for `data_gen: {min, max}`."""
        if not isinstance(data, dict) or not ({"min", "max"} & set(data)):
            return data
        if "data_gen" in data:
            raise ValueError("min: give the ones per position either as data_gen: {min, max} or as min and max "
                             "on the input, not both")
        missing = [k for k in ("min", "max") if k not in data]
        if missing:
            raise ValueError(f"{missing[0]}: required key is missing (min and max on a Multihot input come together)")
        data = dict(data)
        data["data_gen"] = {"min": data.pop("min"), "max": data.pop("max")}
        return data

    @field_validator("data_gen", mode="before")
    @classmethod
    def _gen(cls, v):
        if isinstance(v, dict):
            unknown = sorted(str(k) for k in v if k not in ("min", "max"))
            missing = [k for k in ("min", "max") if k not in v]
            if unknown or missing:
                raise ValueError(f"expected {{min: a, max: b}} for a Multihot input, got {_show(v)}")
            for k in ("min", "max"):
                if isinstance(v[k], bool) or not isinstance(v[k], int) or not 0 <= v[k] <= MAX_INT:
                    raise ValueError(f"{k}: expected a non-negative integer up to 2**31 (a number of ones), "
                                     f"got {_show(v[k])}")
            if v["min"] > v["max"]:
                raise ValueError(f"expected min <= max, got min={v['min']}, max={v['max']}")
            return MultihotGen(min=v["min"], max=v["max"])
        if isinstance(v, str) and v.strip() in DATA_GENS:
            return v.strip()
        raise ValueError(f"expected one of {', '.join(DATA_GENS)}, or {{min: a, max: b}} for a Multihot input, got {_show(v)}")

    @model_validator(mode="after")
    def _gen_fits(self):
        if isinstance(self.data_gen, MultihotGen):
            from stepforge.simulator import MultihotType, parse_dtype

            elem = parse_dtype(self.dtype)
            if not isinstance(elem, MultihotType):
                raise ValueError(f"data_gen: {{min, max}} is for Multihot inputs; {self.name} has dtype {self.dtype}")
        return self


class InputDecl(StreamDecl):
    """`inputs[i]`: an input stream, named `E0`, `E1`, ..."""

    dtype: Union[str, list[str]]


class ParameterDecl(StreamDecl):
    """`parameters[i]`: a weight read by fns and oracles as `input_data[name]` (dtype defaults to fp32)."""


class FnDecl(_Strict):
    """`fns[i]`: a task function; programs call it by `func_name`."""

    name: str
    func_name: str
    input_dtype: Union[str, list[str]]
    output_dtype: Union[str, list[str]]
    apply: str
    init: Optional[Union[int, float, str, list[Union[int, float, str]]]] = None

    @field_validator("name", "func_name", mode="before")
    @classmethod
    def _ident(cls, v):
        return _check_identifier(v, "fn_add")

    @field_validator("input_dtype", "output_dtype", mode="before")
    @classmethod
    def _dtype(cls, v):
        return _check_dtype(v)

    @field_validator("apply", mode="before")
    @classmethod
    def _apply(cls, v):
        code = _code(v, "a Python body for one element")
        _check_python(code, as_body=True)
        if not (_has_return(code) or _ends_with_expression(code)):
            raise ValueError("expected a body with a `return` of one tensor per output field, "
                             "or one whose last line is that expression")
        return code

    @field_validator("init", mode="before")
    @classmethod
    def _init(cls, v):
        if v is None:
            return v
        values = v if isinstance(v, list) else [v]
        if not values or not all(_check_init_value(x) for x in values):
            raise ValueError(f"expected one value per output field from 0, 1, -1, -inf (a list, or a bare value), got {_show(v)}")
        return [x.strip() if isinstance(x, str) else x for x in values] if isinstance(v, list) else (v.strip() if isinstance(v, str) else v)

    @model_validator(mode="after")
    def _init_fields(self):
        if self.init is not None:
            n_out = len(self.output_dtype) if isinstance(self.output_dtype, list) else 1
            n_init = len(self.init) if isinstance(self.init, list) else 1
            if n_init != n_out:
                raise ValueError(f"init: {n_init} value(s) given but output_dtype has {n_out} field(s)")
        return self

    def init_list(self) -> Optional[list]:
        if self.init is None:
            return None
        return list(self.init) if isinstance(self.init, list) else [self.init]


class OutputDecl(_NamedStream):
    """`outputs[i]`: an expected output stream and its oracle (one block per field)."""

    _example_name: ClassVar[str] = "S0"

    data_transform: Union[str, list[str]]

    @field_validator("data_transform", mode="before")
    @classmethod
    def _transform(cls, v):
        blocks = v if isinstance(v, list) else [v]
        if not blocks:
            raise ValueError("expected one Python block per field")
        out = []
        for i, block in enumerate(blocks):
            code = _code(block, "a Python block whose last line is the expected tensor")
            try:
                _check_python(code, as_body=False)
            except ValueError as exc:
                raise ValueError(f"block {i}: {exc}") from None
            if not _ends_with_expression(code):
                raise ValueError(f"block {i}: its last line must be an expression (the expected tensor)")
            out.append(code)
        return out if isinstance(v, list) else out[0]

    @model_validator(mode="after")
    def _fields(self):
        n_fields = len(self.dtype) if isinstance(self.dtype, list) else 1
        if len(self.transforms()) != n_fields:
            raise ValueError(f"data_transform: {len(self.transforms())} block(s) given but dtype has {n_fields} field(s)")
        return self

    def transforms(self) -> list[str]:
        return list(self.data_transform) if isinstance(self.data_transform, list) else [self.data_transform]


class Tolerance(_Strict):
    """`tolerance: {rtol, atol}`: absolute numbers replacing the verifier's defaults."""

    rtol: Optional[float] = Field(default=None, ge=0)
    atol: Optional[float] = Field(default=None, ge=0)


class Vocabulary(_Strict):
    """`vocabulary: {add: [...], remove: [...]}`: the standard fn vocabulary of open mode, extended or narrowed."""

    add: list[str] = Field(default_factory=list)
    remove: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _known(self):
        self.names()
        return self

    def names(self) -> frozenset[str]:
        """The names an open candidate's fns may use."""
        from stepforge.simulator.fnlang_vocab import vocabulary

        return vocabulary(self.add, self.remove)



"""Task files: the structural IR of docs/task-format.md, as pydantic models.

A task file is one YAML mapping with the keys of the spec (`test_name`,
`global`, `inputs`, `parameters`, `fns`, `outputs`, `impl`) and stepforge's
optional keys (`group`, `description`, `bindings`, `tolerance`, and for open
mode `open` and `vocabulary`, see OPEN_MODE.md); see docs/task-format.md.
`load_task` reads one file, `load_benchmark` the
whole benchmark keyed by `<group>/<test_name>`. Every problem with a file is a
`TaskFileError` that names the file, the key path (`fns[2].init`) and what was
expected; callers never see a raw pydantic or YAML traceback.

`Task.to_yaml()` writes the same schema back, code as literal `|` blocks:
this is the prompt format the model sees (without `impl`) and the format of
earned solutions (with it). Loading what `to_yaml` wrote gives an equal Task.

Decisions the spec leaves open (tested in tests/test_benchmark_schema.py):
- code blocks (`global`, `apply`, `data_transform`, `impl`) are normalised on
  load: common indentation removed, trailing spaces and blank edge lines
  dropped, one final newline. This is what makes the YAML round trip exact.
- `data_transform` and `init` keep the form the file used (a bare value for
  one field, or a list), so a dump reproduces the author's file.
- unknown keys are errors (a typo such as `fn:` for `fns:` must not silently
  drop a task's functions).
- `func_name` must be unique (programs use it); `name` may repeat.
- Python syntax of every code block is checked on load (its line is named);
  dtypes and dims are parsed with the simulator's own parsers.
"""

from __future__ import annotations

import hashlib
import json
import keyword
import math
import re
import textwrap
from pathlib import Path
from typing import Any, ClassVar, Iterable, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StrictBool, ValidationError, field_validator, model_validator

from stepforge.config_io import StrictModel
from stepforge.errors import StepforgeError

TASKS_ROOT = Path(__file__).resolve().parent / "tasks"

# Groups in the order docs/benchmark.md lists them; other groups follow alphabetically.
GROUP_ORDER = ("attention", "bmm", "gemm", "norm", "rope", "moe-index", "moe-expert", "moe-end-to-end")

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
            raise ValueError(f"{missing[0]}: required key missing (min and max on a Multihot input come together)")
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


class Task(_Strict):
    """One benchmark task (docs/task-format.md plus stepforge's optional keys)."""

    test_name: str
    group: Optional[str] = None
    description: Optional[str] = None
    global_code: Optional[str] = Field(default=None, alias="global")
    inputs: list[InputDecl]
    parameters: list[ParameterDecl] = Field(default_factory=list)
    fns: list[FnDecl]
    outputs: list[OutputDecl]
    bindings: list[dict[str, int]] = Field(default_factory=list)
    tolerance: Optional[Tolerance] = None
    open: StrictBool = True
    vocabulary: Optional[Vocabulary] = None
    impl: Optional[str] = None
    _source: Optional[str] = PrivateAttr(default=None)  # the file (or label) it was loaded from

    @field_validator("test_name", mode="before")
    @classmethod
    def _test_name(cls, v):
        if isinstance(v, int) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, str) or not re.match(r"^[A-Za-z0-9_.\-]+$", v):
            raise ValueError(f"expected an id of letters, digits, '_', '-' or '.', got {_show(v)}")
        return v

    @field_validator("group", mode="before")
    @classmethod
    def _group(cls, v):
        if v is not None and (not isinstance(v, str) or not re.match(r"^[A-Za-z0-9_\-]+$", v)):
            raise ValueError(f"expected a group name of letters, digits, '_' or '-', got {_show(v)}")
        return v

    @field_validator("description", mode="before")
    @classmethod
    def _description(cls, v):
        if v is not None and not isinstance(v, str):
            raise ValueError(f"expected text, got {_show(v)}")
        return v.strip() if isinstance(v, str) else v

    @field_validator("global_code", mode="before")
    @classmethod
    def _global(cls, v):
        if v is None:
            return v
        code = _code(v, "Python code")
        _check_python(code, as_body=False)
        return code

    @field_validator("impl", mode="before")
    @classmethod
    def _impl(cls, v):
        if v is None:
            return v
        return _code(v, "the program (STeP statements ending in return)")

    @field_validator("inputs", "fns", "outputs", mode="before")
    @classmethod
    def _non_empty(cls, v, info):
        if not isinstance(v, list) or not v:
            raise ValueError(f"expected a non-empty list of {info.field_name} entries, got {_show(v)}")
        return v

    @field_validator("parameters", mode="before")
    @classmethod
    def _params(cls, v):
        if v is None:
            return []
        if not isinstance(v, list):
            raise ValueError(f"expected a list of parameters, got {_show(v)}")
        return v

    @field_validator("bindings", mode="before")
    @classmethod
    def _bindings(cls, v):
        if v is None:
            return []
        if not isinstance(v, list):
            raise ValueError(f"expected a list of size bindings such as [{{M: 3, N: 4, K: 6, D: 8}}], got {_show(v)}")
        for i, b in enumerate(v):
            if not isinstance(b, dict) or not b:
                raise ValueError(f"item {i}: expected a map from size symbol to a positive integer, got {_show(b)}")
            for k, n in b.items():
                if not isinstance(k, str) or not _IDENT.match(k) or k.endswith("_value"):
                    raise ValueError(f"item {i}: expected size symbols such as M or D as keys, got {_show(k)}")
                if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= MAX_INT:
                    raise ValueError(f"item {i}: {k}: expected a positive integer up to 2**31, got {_show(n)}")
        return v

    @model_validator(mode="after")
    def _names(self):
        problems = []
        for kind, items, attr in (("inputs", self.inputs, "name"), ("parameters", self.parameters, "name"),
                                  ("outputs", self.outputs, "name"), ("fns", self.fns, "func_name")):
            seen: dict[str, int] = {}
            for i, item in enumerate(items):
                value = getattr(item, attr)
                if value in seen:
                    problems.append(f"{kind}[{i}].{attr}: {value!r} repeats {kind}[{seen[value]}]; expected unique names")
                seen[value] = i
        clash = {i.name for i in self.inputs} & {p.name for p in self.parameters}
        if clash:
            problems.append(f"parameters: {sorted(clash)} also name inputs; input_data needs unique names")
        if problems:
            raise ValueError(_PROBLEM_SEP.join(problems))
        return self

    @model_validator(mode="after")
    def _symbols_defined(self):
        """Every size symbol of a dims list or a dtype has a value: a default (M N K D) or `ctx[X] = ...` in global."""
        from stepforge.simulator.shapes import DEFAULT_SIZES

        declared = _declared_symbols(self.global_code)
        if declared is None:  # global sets ctx in a way only running it shows; the verifier checks then
            return self
        defined = set(DEFAULT_SIZES) | declared
        places = [(f"{kind}[{i}]", key, d)
                  for kind, items in (("inputs", self.inputs), ("parameters", self.parameters), ("outputs", self.outputs))
                  for i, d in enumerate(items) for key in ("dtype", "dims")]
        places += [(f"fns[{i}]", key, f) for i, f in enumerate(self.fns) for key in ("input_dtype", "output_dtype")]
        problems = []
        for where, key, decl in places:
            value = getattr(decl, key)
            symbols = _stream_symbols(value, None) if "dtype" in key else _stream_symbols("fp32", value)
            for sym in symbols:
                if sym not in defined:
                    problems.append(f"{where}.{key}: size symbol {sym} is not defined; expected one of "
                                    f"{', '.join(sorted(defined))} (M, N, K, D have defaults; global sets others "
                                    f"with ctx[{sym}] = ...)")
        if problems:
            raise ValueError(_PROBLEM_SEP.join(problems))
        return self

    # -- conveniences -------------------------------------------------------
    @property
    def source(self) -> str:
        """Where the task came from, for errors: its file, else `task <key>`."""
        return self._source or f"task {self.key}"

    def __eq__(self, other: object) -> bool:  # where a task was loaded from is not part of it
        return isinstance(other, Task) and self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]  # mutable, like every pydantic model

    def with_source(self, source: Optional[str]) -> "Task":
        """This task, naming `source` in its errors (kept by copies)."""
        self._source = source
        return self

    @property
    def key(self) -> str:
        """`<group>/<test_name>` (just `test_name` for a task without a group)."""
        return f"{self.group}/{self.test_name}" if self.group else self.test_name

    def fn_by_func_name(self, func_name: str) -> FnDecl:
        for fn in self.fns:
            if fn.func_name == func_name:
                return fn
        raise KeyError(func_name)

    def reference_lines(self) -> int:
        """Statements of the reference `impl` (without the final return), 0 without one."""
        if not self.impl:
            return 0
        lines = [ln for ln in self.impl.splitlines() if ln.strip() and not ln.strip().startswith("#")]
        return len([ln for ln in lines if not ln.strip().startswith("return")])

    def without_impl(self) -> "Task":
        return self.model_copy(update={"impl": None})

    def fingerprint(self) -> str:
        """A hash of everything but `impl` and `description`: tasks with equal fingerprints verify alike."""
        data = self.model_dump(mode="json", by_alias=True, exclude={"impl", "description", "open", "vocabulary"})
        if self.vocabulary is not None:  # only open mode reads it; tasks without one keep their fingerprint
            data["vocabulary"] = self.vocabulary.model_dump()
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self, include_impl: bool = True, include_meta: bool = True) -> dict:
        """The task as a plain mapping in file key order (None/empty optional keys left out)."""
        out: dict[str, Any] = {"test_name": self.test_name}
        if include_meta and self.group is not None:
            out["group"] = self.group
        if include_meta and self.description:
            out["description"] = _Literal(self.description) if "\n" in self.description else _Folded(self.description)
        if self.global_code:
            out["global"] = _Literal(self.global_code)
        out["inputs"] = [_decl(d, "data_gen") for d in self.inputs]
        if self.parameters:
            out["parameters"] = [_decl(d, "data_gen") for d in self.parameters]
        out["fns"] = [_fn_dict(f) for f in self.fns]
        out["outputs"] = [_decl(d, "data_transform") for d in self.outputs]
        if include_meta and self.bindings:
            out["bindings"] = [_Flow(dict(b)) for b in self.bindings]
        if include_meta and self.tolerance is not None:
            out["tolerance"] = _Flow(self.tolerance.model_dump(exclude_none=True))
        if include_meta and not self.open:
            out["open"] = False
        if include_meta and self.vocabulary is not None:
            out["vocabulary"] = _Flow({k: _FlowList(v) for k, v in self.vocabulary.model_dump().items() if v})
        if include_impl and self.impl:
            out["impl"] = _Literal(self.impl)
        return out

    def to_yaml(self, include_impl: bool = True, include_meta: bool = True) -> str:
        """The task file text; code as literal `|` blocks, dims and dtype lists in flow style.

        `include_impl=False` is the prompt form (the model writes the impl);
        `include_meta=False` also leaves out group, description, bindings and
        tolerance (what a model needs is in the spec keys).
        """
        return yaml.dump(self.to_dict(include_impl, include_meta), Dumper=_Dumper, sort_keys=False,
                         allow_unicode=True, width=100, default_flow_style=False)

    @classmethod
    def from_yaml(cls, text: str, source: str | Path = "<string>") -> "Task":
        """Parse task text; TaskFileError (naming `source`) on any problem."""
        return _task_from_text(text, str(source))


# ---------------------------------------------------------------------------
# YAML output


class _Literal(str):
    """A code block: dumped as a `|` literal."""


class _Folded(str):
    """Prose on one logical line: dumped as a folded `>` block, wrapped for reading."""


class _Flow(dict):
    """A small mapping dumped on one line."""


class _FlowList(list):
    """A list of scalars dumped on one line."""


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data):  # never write &id001 anchors
        return True

    def increase_indent(self, flow=False, indentless=False):  # indent block sequences under their key
        return super().increase_indent(flow, False)


def _repr_literal(dumper: yaml.SafeDumper, data: str):
    return dumper.represent_scalar("tag:yaml.org,2002:str", str(data), style="|")


def _repr_flow(dumper: yaml.SafeDumper, data: dict):
    return dumper.represent_mapping("tag:yaml.org,2002:map", dict(data), flow_style=True)


def _repr_flow_list(dumper: yaml.SafeDumper, data: list):
    return dumper.represent_sequence("tag:yaml.org,2002:seq", list(data), flow_style=True)


_Dumper.add_representer(_Literal, _repr_literal)
_Dumper.add_representer(_Folded, lambda d, data: d.represent_scalar("tag:yaml.org,2002:str", str(data), style=">"))
_Dumper.add_representer(_Flow, _repr_flow)
_Dumper.add_representer(_FlowList, _repr_flow_list)


def _dtype_out(dtype):
    return _FlowList(dtype) if isinstance(dtype, list) else dtype


def _decl(d: BaseModel, extra: str) -> dict:
    out: dict[str, Any] = {"name": d.name, "dtype": _dtype_out(d.dtype), "dims": _FlowList(d.dims)}
    value = getattr(d, extra)
    if extra == "data_gen":
        out[extra] = _Flow(value.model_dump()) if isinstance(value, MultihotGen) else value
    else:
        out[extra] = [_Literal(b) for b in value] if isinstance(value, list) else _Literal(value)
    return out


def _fn_dict(f: FnDecl) -> dict:
    out: dict[str, Any] = {"name": f.name, "func_name": f.func_name, "input_dtype": _dtype_out(f.input_dtype),
                           "output_dtype": _dtype_out(f.output_dtype)}
    if f.init is not None:
        out["init"] = _FlowList(f.init) if isinstance(f.init, list) else f.init
    out["apply"] = _Literal(f.apply)
    return out


# ---------------------------------------------------------------------------
# loading


def _loc_path(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = str(part)
            if text.startswith(("function-", "tagged-union", "union[", "list[", "dict[", "literal[")) \
                    or text in {"str", "int", "float", "bool", "MultihotGen", "list", "dict", "none"}:
                continue  # pydantic's union member tags are not keys of the file
            out += ("." if out else "") + ("global" if text == "global_code" else text)
    return out


_EXPECTED = {
    "missing": "required key missing",
    "string_type": "expected text",
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "greater_than_equal": "expected a number >= {ge}",
}


def _error_list(exc: ValidationError) -> list[tuple[str, str]]:
    seen = set()
    out = []
    for err in exc.errors(include_url=False):
        key = _loc_path(err["loc"])
        kind = err["type"]
        if kind == "extra_forbidden":
            parent, _, name = key.rpartition(".")
            msg = f"unknown key {name!r}; expected one of {', '.join(_allowed_keys(parent))}"
        elif kind in ("value_error", "assertion_error"):
            msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        elif kind in _EXPECTED:
            msg = _EXPECTED[kind].format(**(err.get("ctx") or {}))
            if kind != "missing":
                msg += f", got {_show(err.get('input'))}"
        else:
            msg = err["msg"]
        parts = msg.split(_PROBLEM_SEP) if kind == "value_error" else [msg]
        for part in parts:
            k, m = key, part
            located = _LOCATED.match(part) if kind == "value_error" else None
            if located:  # a check over several keys names the key path it is about
                k = f"{key}.{located.group(1)}" if key else located.group(1)
                m = located.group(2)
            if (k, m) not in seen:
                seen.add((k, m))
                out.append((k, m))
    return out


_PROBLEM_SEP = " | "
_LOCATED = re.compile(r"^([A-Za-z_][A-Za-z_0-9]*(?:\[\d+\]|\.[A-Za-z_][A-Za-z_0-9]*)*): (.*)$")


def _allowed_keys(parent: str) -> list[str]:
    last = re.sub(r"\[\d+\]$", "", parent.rpartition(".")[2]) if parent else ""
    model = {"inputs": InputDecl, "parameters": ParameterDecl, "fns": FnDecl, "outputs": OutputDecl,
             "tolerance": Tolerance, "data_gen": MultihotGen, "vocabulary": Vocabulary}.get(last, Task)
    return [f.alias or name for name, f in model.model_fields.items()]


def _task_from_text(text: str, source: str) -> Task:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "YAML"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise TaskFileError(source, [(where, f"not valid YAML: {problem}")]) from None
    return task_from_dict(data, source)


def task_from_dict(data: Any, source: str = "<task>") -> Task:
    """Validate a mapping (e.g. parsed YAML) into a Task; TaskFileError on any problem."""
    if not isinstance(data, dict):
        raise TaskFileError(source, [("", f"expected a mapping of task keys (test_name, inputs, fns, outputs, ...) "
                                          f"at the top level, got {type(data).__name__}")])
    try:
        return Task.model_validate(data).with_source(source)
    except ValidationError as exc:
        raise TaskFileError(source, _error_list(exc)) from None


def load_task(path: str | Path) -> Task:
    """Load one task file; TaskFileError naming the file on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TaskFileError(path, [("", f"cannot read the file: {exc.strerror or exc}")]) from None
    return _task_from_text(text, str(path))


def load_benchmark(root: str | Path | None = None) -> dict[str, Task]:
    """Every `<root>/<group>/<test_name>.yaml`, keyed `<group>/<test_name>`, in a stable order.

    Groups come in docs/benchmark.md's order (others alphabetically after them),
    tasks by test_name within a group. A file's `group` key, if present, must
    match its folder, and its `test_name` its file name.
    """
    root = Path(root) if root is not None else TASKS_ROOT
    if not root.is_dir():
        raise TaskFileError(root, [("", "the benchmark folder does not exist")])
    groups = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))),
                    key=lambda p: (GROUP_ORDER.index(p.name) if p.name in GROUP_ORDER else len(GROUP_ORDER), p.name))
    tasks: dict[str, Task] = {}
    for group_dir in groups:
        for path in sorted(group_dir.glob("*.yaml")):
            task = load_task(path)
            if task.group is None:
                task = task.model_copy(update={"group": group_dir.name})
            elif task.group != group_dir.name:
                raise TaskFileError(path, [("group", f"expected {group_dir.name!r} (the folder), got {task.group!r}")])
            if task.test_name != path.stem:
                raise TaskFileError(path, [("test_name", f"expected {path.stem!r} (the file name), got {task.test_name!r}")])
            tasks[task.key] = task
    return tasks


def resolve_task(key_or_path: str | Path, root: str | Path | None = None) -> Task:
    """A benchmark key (`norm/G_0_8_01`), a unique test_name, or a path to a task file."""
    text = str(key_or_path)
    path = Path(text)
    if text.endswith((".yaml", ".yml")) or path.is_file():
        return load_task(path)
    tasks = load_benchmark(root)
    if text in tasks:
        return tasks[text]
    matches = [t for t in tasks.values() if t.test_name == text]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise KeyError(f"{text!r} names {len(matches)} tasks: {', '.join(t.key for t in matches)}; use <group>/<id>")
    raise KeyError(f"no task {text!r}; keys look like {next(iter(tasks), 'group/id')} (see `stepforge tasks`)")


__all__ = [
    "FnDecl",
    "InputDecl",
    "MultihotGen",
    "OutputDecl",
    "ParameterDecl",
    "StreamDecl",
    "TASKS_ROOT",
    "Task",
    "TaskFileError",
    "Tolerance",
    "Vocabulary",
    "load_benchmark",
    "load_task",
    "normalise_code",
    "resolve_task",
    "task_from_dict",
]

"""Task files, part 2: the `Task` model (its cross-key checks, identity, YAML output).

`Task.to_yaml()` writes the schema back, code as literal `|` blocks (the
prompt form and the form of earned solutions); `Task.from_yaml` reads text
with task_loading.py.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, Field, PrivateAttr, StrictBool, field_validator, model_validator

from stepforge.benchmark.task_decls import (
    _IDENT,
    _PROBLEM_SEP,
    MAX_INT,
    FnDecl,
    InputDecl,
    MultihotGen,
    OutputDecl,
    ParameterDecl,
    Tolerance,
    Vocabulary,
    _check_python,
    _code,
    _declared_symbols,
    _show,
    _stream_symbols,
    _Strict,
)


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
        from stepforge.benchmark.task_loading import _task_from_text

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



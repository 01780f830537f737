"""What the search proposer needs to know about a task, read from its structural IR.

`SearchTask.from_ir(text)` reads the task YAML the proposer is given (the
prompt form, without `impl`): the input and output stream types, the fns'
element types and fold inits, and the size binding (the default sizes plus
what the task's `global` sets, e.g. `E`). Fn bodies are never compiled or run
here: each fn becomes a `StepFn` whose body raises if called, which is all
the typing rules (`stepforge.simulator.ops`) look at. The `global` block is
task-file code (trusted, like in the verifier) and is run once to learn the
sizes it binds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stepforge.config_io import read_yaml_text
from stepforge.errors import ConfigError, StepforgeError
from stepforge.simulator.fns import StepFn, build_namespace, namespace_binding, parse_init
from stepforge.simulator.shapes import DEFAULT_SIZES, Dim, as_dim, parse_dims
from stepforge.simulator.types import BufferType, MultihotType, TupleType, parse_dtype
from stepforge.simulator.values import StreamType


class SearchTaskError(StepforgeError, ValueError):
    """The task IR cannot be read by the search proposer (names the key)."""


def _never_called(input, state=None):  # noqa: A002 - the fn body signature of the simulator
    raise RuntimeError("the search proposer's fns are for typing only; the verifier runs the real ones")


@dataclass
class SearchTask:
    """Typed view of a task: inputs, outputs, fns (file order), binding and usable sizes."""

    inputs: list[tuple[str, StreamType]]
    outputs: list[tuple[str, StreamType]]
    fns: dict[str, StepFn]  # func_name -> typing-only StepFn, in file order
    binding: dict[str, int]
    sizes: list[Dim] = field(default_factory=list)  # non-1 dims a Repeat may insert
    test_name: str = ""

    @property
    def fn_order(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.fns)}

    @classmethod
    def from_ir(cls, text: str) -> "SearchTask":
        try:
            data = read_yaml_text(text, "the task IR")
        except ConfigError as exc:
            raise SearchTaskError(str(exc)) from None
        if not isinstance(data, dict):
            raise SearchTaskError("the task IR must be a YAML mapping with inputs, fns and outputs")
        return cls.from_dict(data)

    @classmethod
    def from_task(cls, task: Any) -> "SearchTask":
        """From a parsed benchmark `Task`."""
        return cls.from_dict(task.model_dump(mode="python", by_alias=True))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SearchTask":
        for key in ("inputs", "fns", "outputs"):
            if not isinstance(data.get(key), list) or not data[key]:
                raise SearchTaskError(f"{key}: expected a non-empty list")

        def stream(entry: Any, where: str) -> tuple[str, StreamType]:
            if not isinstance(entry, dict) or "name" not in entry:
                raise SearchTaskError(f"{where}: expected a mapping with name, dtype and dims")
            try:
                return str(entry["name"]), StreamType(parse_dtype(entry.get("dtype", "fp32")), parse_dims(entry["dims"]))
            except (KeyError, ValueError) as exc:
                raise SearchTaskError(f"{where}: {exc}") from None

        inputs = [stream(e, f"inputs[{i}]") for i, e in enumerate(data["inputs"])]
        outputs = [stream(e, f"outputs[{i}]") for i, e in enumerate(data["outputs"])]
        fns: dict[str, StepFn] = {}
        for i, f in enumerate(data["fns"]):
            where = f"fns[{i}]"
            if not isinstance(f, dict) or "func_name" not in f:
                raise SearchTaskError(f"{where}: expected a mapping with func_name, input_dtype and output_dtype")
            try:
                out_type = parse_dtype(f["output_dtype"])
                init = f.get("init")
                fns[str(f["func_name"])] = StepFn(
                    name=str(f.get("name", f["func_name"])),
                    func_name=str(f["func_name"]),
                    input_type=parse_dtype(f["input_dtype"]),
                    output_type=out_type,
                    body=_never_called,
                    init=None if init is None else parse_init(init, len(out_type.fields()), str(f["func_name"])),
                    source=str(f.get("apply", "")),
                )
            except (KeyError, ValueError) as exc:
                raise SearchTaskError(f"{where}: {exc}") from None
        binding = dict(DEFAULT_SIZES)
        code = data.get("global")
        if code:
            try:
                binding = namespace_binding(build_namespace(DEFAULT_SIZES, global_code=str(code)))
            except Exception as exc:  # task-file code; report which key failed
                raise SearchTaskError(f"global: running it failed: {type(exc).__name__}: {exc}") from None
        task = cls(inputs, outputs, fns, binding, test_name=str(data.get("test_name", "")))
        task.sizes = task._usable_sizes()
        return task

    # -- sizes ----------------------------------------------------------------
    def _usable_sizes(self) -> list[Dim]:
        """Every non-1 dim of the task's types whose symbols have values: what Repeat(n=...) may use."""
        seen: list[Dim] = []

        def add(d: Dim):
            if d == Dim.const(1) or d in seen:
                return
            if all(s in self.binding for s in d.symbols):
                seen.append(d)

        def add_elem(elem):
            for leaf in elem.fields():
                if isinstance(leaf, BufferType):
                    for d in leaf.dims:
                        add(d)
                    if isinstance(leaf.inner, MultihotType):
                        add(as_dim(leaf.inner.width))
                elif isinstance(leaf, MultihotType):
                    add(as_dim(leaf.width))

        for _, st in self.inputs + self.outputs:
            for d in st.shape:
                add(d)
            add_elem(st.elem)
        for fn in self.fns.values():
            add_elem(fn.input_type)
            add_elem(fn.output_type)
        # symbols first (Repeat(n=M) reads better than a product), then products, in a stable order
        return sorted(seen, key=lambda d: (len(d.powers) != 1 or d.powers[0][1] != 1, str(d)))

    def multihot_widths(self) -> set[int]:
        """Concrete widths of every Multihot type the task mentions."""
        widths: set[int] = set()

        def visit(elem):
            for leaf in elem.fields():
                inner = leaf.inner if isinstance(leaf, BufferType) else leaf
                if isinstance(inner, MultihotType):
                    try:
                        widths.add(as_dim(inner.width).evaluate(self.binding))
                    except ValueError:
                        pass

        for _, st in self.inputs + self.outputs:
            visit(st.elem)
        for fn in self.fns.values():
            visit(fn.input_type)
            visit(fn.output_type)
        return widths


def fields_of(elem) -> tuple:
    """The flat field tuple of an element type (a tuple type's items, else the type itself)."""
    return tuple(elem.items) if isinstance(elem, TupleType) else (elem,)


__all__ = ["SearchTask", "SearchTaskError", "fields_of"]

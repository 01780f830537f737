"""Shared plumbing of every config and schema: the YAML reader, `--set`, the strict base model, error lines.

* `read_yaml_text` / `read_yaml_file` / `read_mapping`: safe YAML that refuses
  what would make loading or reporting blow up: duplicate keys (a second
  `fns:` would silently drop the first), alias expansion past a small bound
  (an alias bomb), nesting past a depth bound, text that is not UTF-8.
* `apply_overrides`: `--set key.path=value` on a mapping.
* `StrictModel`: the pydantic base of every settings model: unknown keys are
  errors, and numbers are numbers (`n: true` or `n: '1'` is not 1).
* `validation_problems` / `format_problems`: a pydantic `ValidationError` as
  `(key.path, expectation)` pairs and as `WHERE: key.path: expectation` lines.
"""

from __future__ import annotations

import copy
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from stepforge.errors import ConfigError, short_repr

MAX_YAML_NODES = 100_000  # nodes after alias expansion
MAX_YAML_DEPTH = 64
MAX_YAML_BYTES = 8 * 1024 * 1024


class YamlError(ConfigError):
    """A YAML text that cannot be read; `where` names the source and the line, `problem` what is wrong."""

    def __init__(self, source: str, where: str, problem: str):
        self.source, self.where, self.problem = source, where, problem
        super().__init__(f"{source}: {where}: {problem}")


def _at(node: yaml.Node) -> str:
    mark = node.start_mark
    return f"line {mark.line + 1}, column {mark.column + 1}"


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader with duplicate keys refused and nesting bounded while scanning and composing."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_YAML_DEPTH} levels deep",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def fetch_flow_collection_start(self, TokenClass):
        # the scanner reads a run of `[` or `{` to its end before composing starts: bound it here
        if self.flow_level >= MAX_YAML_DEPTH:
            raise yaml.scanner.ScannerError(None, None, f"nested more than {MAX_YAML_DEPTH} levels deep",
                                            self.get_mark())
        super().fetch_flow_collection_start(TokenClass)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    key = key_node.value
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {short_repr(key)} (first at {_at(seen[key])})",
                            key_node.start_mark)
                    seen[key] = key_node
        return super().construct_mapping(node, deep)


def _expanded_size(root: yaml.Node, source: str) -> int:
    """Nodes of the document with every alias expanded, counted without expanding; refuses cycles and bombs."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise YamlError(source, _at(node), "an alias refers to its own anchor (a recursive document)")
        active.add(key)
        if isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(item) for item in node.value)
        else:
            total = 1
        active.discard(key)
        if total > MAX_YAML_NODES:
            raise YamlError(source, _at(node), f"expands to more than {MAX_YAML_NODES} values through aliases "
                                               f"(an alias bomb?)")
        sizes[key] = total
        return total

    return size(root)


def read_yaml_text(text: str | bytes, source: str = "<yaml>") -> Any:
    """Parse one YAML document safely and within bounds; `YamlError` naming `source` and the line."""
    if isinstance(text, bytes):
        text = decode_text(text, source)
    if len(text) > MAX_YAML_BYTES:
        raise YamlError(source, "(file)", f"larger than {MAX_YAML_BYTES // (1024 * 1024)} MiB")
    loader = None
    try:
        loader = _BoundedLoader(text)  # the reader refuses unprintable characters here already
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, source)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "(YAML)"
        if isinstance(exc, yaml.reader.ReaderError):
            where = f"character {exc.position + 1}"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise YamlError(source, where, f"not valid YAML: {problem}") from None
    except RecursionError:
        raise YamlError(source, "(YAML)", f"nested more than {MAX_YAML_DEPTH} levels deep") from None
    finally:
        if loader is not None:
            loader.dispose()


def decode_text(data: bytes, source: str) -> str:
    """UTF-8 text of `data` (a BOM is dropped); `YamlError` naming the byte offset otherwise."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise YamlError(source, f"byte {exc.start}", "not UTF-8 text (save the file as UTF-8)") from None


def read_text_file(path: str | Path, what: str = "file") -> str:
    """A UTF-8 text file; `ConfigError` naming the file when it is missing, unreadable or not UTF-8."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    return decode_text(data, str(path))


def read_yaml_file(path: str | Path, what: str = "config file") -> Any:
    """The YAML document of a file (see `read_yaml_text`)."""
    return read_yaml_text(read_text_file(path, what), str(path))


def read_mapping(path: str | Path, what: str = "settings", allow_empty: bool = True,
                 noun: str = "config file") -> dict:
    """A YAML file (a `noun`) whose top level is a mapping of `what`; empty is `{}` unless `allow_empty` is false."""
    data = read_yaml_file(path, noun)
    if data is None:
        if allow_empty:
            return {}
        raise ConfigError(f"{path}: (top level): the file is empty; expected a mapping of {what}")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: (top level): expected a mapping of {what}, got {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------
# --set overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """`key.path=value` -> (["key", "path"], value parsed as a YAML scalar or flow value)."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected key.path=value")
    key, _, raw = text.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"--set {text}: expected key.path=value with a dotted key such as proposer.backend.model")
    try:
        value = read_yaml_text(raw, f"--set {key}") if raw.strip() else ""
    except ConfigError:
        value = raw
    return parts, value


def apply_overrides(data: dict, overrides: Iterable[str]) -> tuple[dict, set[str]]:
    """A copy of `data` with every `--set key.path=value` applied; also the keys that were set."""
    out = copy.deepcopy(data)
    keys: set[str] = set()
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
                node[part] = child
            elif not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(f"--set {text}: {where} is {short_repr(child)}, not a mapping; "
                                  f"cannot set {'.'.join(parts)}")
            node = child
        node[parts[-1]] = value
        keys.add(".".join(parts))
    return out, keys


# ---------------------------------------------------------------------------
# the strict base model


def _number_kinds(annotation: Any) -> set[type]:
    """The number types (int, float) a field's annotation admits, looking through Optional/Union/Annotated."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _number_kinds(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return set().union(*(_number_kinds(a) for a in typing.get_args(annotation)))
    return {annotation} & {int, float}


class StrictModel(BaseModel):
    """Base of every settings model: unknown keys are errors; a number field takes numbers only."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_numbers(cls, value: Any, info) -> Any:
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        if field is None or not isinstance(value, (bool, str)):
            return value
        kinds = _number_kinds(field.annotation)
        if not kinds or _admits_text_or_bool(field.annotation):
            return value
        noun = "an integer" if kinds == {int} else "a number"
        raise ValueError(f"expected {noun}, got {short_repr(value)}")


def _admits_text_or_bool(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _admits_text_or_bool(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return any(_admits_text_or_bool(a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return True
    return annotation in (str, bool, Any) or (isinstance(annotation, type) and issubclass(annotation, (str, Path)))


# ---------------------------------------------------------------------------
# validation errors as key paths

_EXPECTED = {
    "missing": "required key is missing",
    "string_type": "expected a string",
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "greater_than_equal": "expected a number >= {ge}",
    "greater_than": "expected a number > {gt}",
    "less_than_equal": "expected a number <= {le}",
    "less_than": "expected a number < {lt}",
}
_PROBLEM_SEP = " | "
_LOCATED = re.compile(r"^([A-Za-z_][A-Za-z_0-9]*(?:\[\d+\]|\.[A-Za-z_][A-Za-z_0-9]*)*): (.*)$")


def _model_of(annotation: Any) -> Optional[type[BaseModel]]:
    """The pydantic model an annotation holds (directly, in Optional, or as a list's items)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _field(model: Optional[type[BaseModel]], name: str):
    if model is None:
        return None
    for field_name, field in model.model_fields.items():
        if name in (field_name, field.alias):
            return field
    return None


def _walk(loc: tuple, model: Optional[type[BaseModel]]) -> tuple[str, Optional[type[BaseModel]]]:
    """A location as `a.b[0].c`, dropping pydantic's union and validator tags; also the model it ends in."""
    key = ""
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
            continue
        text = str(part)
        field = _field(model, text)
        if field is not None:
            key += ("." if key else "") + text
            model = _model_of(field.annotation)
        elif model is None and re.fullmatch(r"[A-Za-z_][A-Za-z_0-9]*", text) and not _is_tag(text):
            key += ("." if key else "") + text
        # anything else is a union member or validator tag: not a key
    return key, model


def _is_tag(text: str) -> bool:
    return text in {"str", "int", "float", "bool", "list", "dict", "none", "any"} or text[:1].isupper()


def _allowed(model: Optional[type[BaseModel]]) -> str:
    return ", ".join(f.alias or name for name, f in model.model_fields.items()) if model is not None else ""


def validation_problems(exc: ValidationError, model: Optional[type[BaseModel]] = None) -> list[tuple[str, str]]:
    """`(key.path, expectation)` for each problem of `exc`, without repeats; values shown short."""
    seen: set[tuple[str, str]] = set()
    out: list[tuple[str, str]] = []
    for err in exc.errors(include_url=False):
        kind = err["type"]
        loc = err["loc"]
        if kind == "extra_forbidden":
            key, parent = _walk(loc[:-1], model)
            name = str(loc[-1])
            allowed = _allowed(parent)
            key = f"{key}.{name}" if key else name
            msg = f"unknown key {name!r}" + (f"; expected one of: {allowed}" if allowed else "")
        else:
            key, _ = _walk(loc, model)
            if kind in ("value_error", "assertion_error"):
                msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
            elif kind in _EXPECTED:
                msg = _EXPECTED[kind].format(**(err.get("ctx") or {}))
                if kind != "missing":
                    msg += f", got {short_repr(err.get('input'))}"
            else:
                msg = err["msg"]
                if msg.startswith("Input should be "):
                    msg = "expected " + msg.removeprefix("Input should be ")
                if "input" in err:
                    msg += f", got {short_repr(err['input'])}"
        parts = msg.split(_PROBLEM_SEP) if kind == "value_error" else [msg]
        if len(parts) > 1 and not all(_LOCATED.match(p) for p in parts):
            parts = [msg]  # " | " inside one message, not a list of located problems
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


def format_problems(exc: ValidationError, where: str, model: Optional[type[BaseModel]] = None,
                    set_keys: Optional[set[str]] = None, prefix: str = "") -> str:
    """One line per problem: `WHERE: key.path: expectation`, marking keys that came from `--set`.

    `prefix` is put before every key path (for a section validated on its own).
    """
    lines: list[str] = []
    for key, msg in validation_problems(exc, model):
        if prefix:
            key = f"{prefix}.{key}" if key else prefix
        key = key or "(top level)"
        origin = " (from --set)" if set_keys and any(key == k or key.startswith(k + ".") or k.startswith(key + ".")
                                                     for k in set_keys) else ""
        line = f"{where}: {key}{origin}: {msg}"
        if line not in lines:
            lines.append(line)
    return "\n".join(lines)


def validate(model: type[BaseModel], data: Any, where: str, set_keys: Optional[set[str]] = None,
             error: Callable[[str], Exception] = ConfigError, what: str = "settings"):
    """`model.model_validate(data)`, or `error(lines)` with one `WHERE: key: expectation` line per problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise error(f"{where}: (top level): expected a mapping of {what}, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise error(format_problems(exc, where, model, set_keys)) from None

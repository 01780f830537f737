"""The STeP program language (docs/language.md section 3): a whitelisted AST walk.

Program text is model output: it is parsed with `ast.parse` (which runs
nothing) and every node is checked against the forms below; anything else is
rejected with an error naming the line and the construct. The result is a
small IR that the interpreters run. No program text is ever exec'd.

Allowed statements:
    X = step.Op(kw=...).apply(ARG)           ARG: a name, or a (nested) tuple of names
    A, B = step.Copy().apply(X)              unpacking of a multi-stream result
    FS = [f0, f1]                            a list literal of fn names
    YS = [step.Op(...).apply(ARG) for a, b in zip(L1, L2)]   (or `for a in L1`)
    return X  /  return X, Y
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Union

from stepforge.simulator.errors import ProgramSyntaxError, format_int

OPS = (
    "Map", "Zip", "Accum", "Scan", "Copy", "Bufferize", "Streamify", "Promote",
    "Repeat", "RepeatRef", "Flatten", "Reshape", "Partition", "Merge",
)
MAX_PROGRAM_CHARS = 20_000
MAX_STATEMENTS = 300
MAX_ARG_DEPTH = 8
# Past any element budget (a size this large is a `resource` error anyway), and
# small enough that every message can print it.
MAX_INT_LITERAL = 2**31
MAX_LABEL_CHARS = 80


@dataclass(frozen=True)
class NameRef:
    """A bare name in a keyword argument: a fn, a size symbol, `X_value`, a loop variable."""

    name: str


@dataclass(frozen=True)
class SizeExpr:
    """A product of sizes in a keyword argument, e.g. `K*N`."""

    factors: tuple[Union[int, NameRef], ...]


KwValue = Union[int, NameRef, SizeExpr, tuple]


@dataclass(frozen=True)
class OpCall:
    op: str
    kwargs: tuple[tuple[str, KwValue], ...]
    line: int

    def kw(self) -> dict[str, KwValue]:
        return dict(self.kwargs)

    def label(self) -> str:
        """The call as program text, exactly (`Accum(fn=f, b=1)`)."""
        return f"{self.op}({format_kwargs(self.kwargs)})"

    def brief(self) -> str:
        """The call for a message: its label, cut to MAX_LABEL_CHARS."""
        text = self.label()
        return text if len(text) <= MAX_LABEL_CHARS else text[: MAX_LABEL_CHARS - 4] + "...)"


def format_kw_value(value: KwValue) -> str:
    """A keyword argument's value as program text (`D`, `K*N`, `[1, 2]`, `3`)."""
    if isinstance(value, NameRef):
        return value.name
    if isinstance(value, SizeExpr):
        return "*".join(format_kw_value(f) for f in value.factors)
    if isinstance(value, tuple):
        return "[" + ", ".join(format_kw_value(v) for v in value) + "]"
    return str(int(value))


def format_kwargs(kwargs: tuple[tuple[str, KwValue], ...]) -> str:
    """`k=v, ...` as program text."""
    return ", ".join(f"{k}={format_kw_value(v)}" for k, v in kwargs)


# An apply argument: a name, or a tuple of arguments.
Arg = Union[str, tuple]


@dataclass(frozen=True)
class Apply:
    targets: tuple[str, ...]
    unpack: bool
    call: OpCall
    arg: Arg
    line: int


@dataclass(frozen=True)
class FnList:
    target: str
    fns: tuple[str, ...]
    line: int


@dataclass(frozen=True)
class Comprehension:
    """`target = [call.apply(arg) for vars in zip(*iterables)]`."""

    target: str
    call: OpCall
    arg: Arg
    loop_vars: tuple[str, ...]
    iterables: tuple[Union[str, tuple[str, ...]], ...]  # a list name, or an inline fn-name list
    line: int


@dataclass(frozen=True)
class Return:
    names: tuple[str, ...]
    line: int


Statement = Union[Apply, FnList, Comprehension, Return]


@dataclass
class Program:
    statements: list[Statement]
    source: str = field(repr=False, default="")

    @property
    def returns(self) -> Return:
        return self.statements[-1]  # parse_program guarantees this

    def __len__(self) -> int:
        return len(self.statements)


def _fail(node: ast.AST | None, what: str) -> ProgramSyntaxError:
    return ProgramSyntaxError(what, getattr(node, "lineno", None))


def _describe(node: ast.AST) -> str:
    names = {
        ast.Import: "an import", ast.ImportFrom: "an import", ast.For: "a for loop", ast.While: "a while loop",
        ast.If: "an if statement", ast.With: "a with statement", ast.FunctionDef: "a function definition",
        ast.Lambda: "a lambda", ast.ClassDef: "a class definition", ast.Try: "a try statement",
        ast.Subscript: "a subscript", ast.Attribute: "an attribute access", ast.Global: "a global statement",
        ast.Delete: "a del statement", ast.AugAssign: "an augmented assignment", ast.Expr: "a bare expression",
        ast.Constant: "a literal", ast.JoinedStr: "an f-string", ast.BinOp: "an arithmetic expression",
        ast.DictComp: "a dict comprehension", ast.SetComp: "a set comprehension", ast.GeneratorExp: "a generator",
        ast.Await: "an await", ast.Yield: "a yield", ast.NamedExpr: "an assignment expression", ast.Starred: "a starred expression",
    }
    for cls, text in names.items():
        if isinstance(node, cls):
            return text
    if isinstance(node, ast.Call):
        callee = ast.unparse(node.func)
        return "a call to " + (callee if len(callee) <= 60 else callee[:57] + "...")
    return type(node).__name__


def parse_program(text: str) -> Program:
    """Parse program text into the STeP IR, or raise ProgramSyntaxError naming the line."""
    if not isinstance(text, str):
        raise ProgramSyntaxError(f"a program must be text, got {type(text).__name__}")
    if len(text) > MAX_PROGRAM_CHARS:
        raise ProgramSyntaxError(f"the program is {len(text)} characters long; the limit is {MAX_PROGRAM_CHARS}")
    try:
        tree = ast.parse(text, mode="exec")
    except SyntaxError as exc:
        raise ProgramSyntaxError(f"Python syntax error: {exc.msg}", exc.lineno) from None
    except (RecursionError, MemoryError, ValueError) as exc:
        raise ProgramSyntaxError(f"the program cannot be parsed ({type(exc).__name__})") from None
    if len(tree.body) > MAX_STATEMENTS:
        raise ProgramSyntaxError(f"the program has {len(tree.body)} statements; the limit is {MAX_STATEMENTS}")
    statements: list[Statement] = []
    for node in tree.body:
        if statements and isinstance(statements[-1], Return):
            raise _fail(node, "statements after `return` are not allowed")
        try:
            statements.append(_statement(node))
        except RecursionError:  # a deep chain (a.b.c..., M*M*...) that ast.parse accepted
            raise _fail(node, "the statement is nested too deeply") from None
    if not statements or not isinstance(statements[-1], Return):
        raise ProgramSyntaxError("the program must end with `return` of its output stream(s)", len(text.splitlines()) or None)
    return Program(statements, text)


def _statement(node: ast.stmt) -> Statement:
    if isinstance(node, ast.Return):
        if node.value is None:
            raise _fail(node, "`return` needs the output stream(s)")
        items = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
        return Return(tuple(_name(i, "return") for i in items), node.lineno)
    if not isinstance(node, ast.Assign):
        raise _fail(node, f"{_describe(node)} is not part of STeP; a program is assignments of "
                          "step.<Op>(...).apply(...) and a final return")
    if len(node.targets) != 1:
        raise _fail(node, "chained assignment (a = b = ...) is not allowed")
    target = node.targets[0]
    value = node.value
    if isinstance(value, ast.List):
        return FnList(_name(target, "assignment target"), tuple(_name(e, "fn list") for e in value.elts), node.lineno)
    if isinstance(value, ast.ListComp):
        return _comprehension(_name(target, "assignment target"), value, node.lineno)
    call, arg = _apply(value)
    if isinstance(target, (ast.Tuple, ast.List)):
        names = tuple(_name(e, "unpacking target") for e in target.elts)
        if len(set(names)) != len(names):
            raise _fail(node, "an unpacking target repeats a name")
        return Apply(names, True, call, arg, node.lineno)
    return Apply((_name(target, "assignment target"),), False, call, arg, node.lineno)


def _name(node: ast.AST, where: str) -> str:
    if isinstance(node, ast.Name):
        if node.id.startswith("__") or node.id == "step":
            raise _fail(node, f"the name {node.id!r} cannot be used as a stream")
        return node.id
    raise _fail(node, f"{_describe(node)} is not allowed in a {where}; expected a name")


def _apply(node: ast.AST) -> tuple[OpCall, Arg]:
    """`step.Op(kw=...).apply(arg)`."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "apply"):
        raise _fail(node, f"{_describe(node)} is not allowed; expected step.<Op>(...).apply(...)")
    if node.keywords or len(node.args) != 1:
        raise _fail(node, ".apply takes exactly one argument: a stream, a tuple of streams or a list")
    inner = node.func.value
    if not (isinstance(inner, ast.Call) and isinstance(inner.func, ast.Attribute)
            and isinstance(inner.func.value, ast.Name) and inner.func.value.id == "step"):
        raise _fail(node, f"{_describe(inner)} is not allowed; expected step.<Op>(...)")
    op = inner.func.attr
    if op not in OPS:
        raise _fail(inner, f"unknown operator step.{op}; the operators are {', '.join(OPS)}")
    if inner.args:
        raise _fail(inner, f"step.{op} takes keyword arguments only, e.g. step.Accum(fn=f, b=1)")
    kwargs = []
    for kw in inner.keywords:
        if kw.arg is None:
            raise _fail(inner, "`**` arguments are not allowed")
        if any(kw.arg == k for k, _ in kwargs):  # ast.parse accepts this; only Python's compiler rejects it
            raise _fail(inner, f"step.{op}: keyword argument {kw.arg} is given more than once")
        kwargs.append((kw.arg, _kw_value(kw.value)))
    return OpCall(op, tuple(kwargs), node.lineno), _arg(node.args[0], 0)


def _int_literal(node: ast.AST) -> int | None:
    """The value of an integer literal (`3`, `0x10`, `-1`), bounded by MAX_INT_LITERAL; None if not one."""
    negative = isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
    const = node.operand if negative else node
    if not (isinstance(const, ast.Constant) and isinstance(const.value, int) and not isinstance(const.value, bool)):
        return None
    if const.value > MAX_INT_LITERAL:
        raise _fail(node, f"the integer literal {format_int(const.value)} is too large; "
                          f"integer literals are limited to {MAX_INT_LITERAL:,} (2**31)")
    return -const.value if negative else const.value


def _kw_value(node: ast.AST) -> KwValue:
    value = _int_literal(node)
    if value is not None:
        return value
    if isinstance(node, ast.Name):
        if node.id.startswith("__"):
            raise _fail(node, f"the name {node.id!r} is not allowed")
        return NameRef(node.id)
    if isinstance(node, (ast.Tuple, ast.List)):
        return tuple(_kw_value(e) for e in node.elts)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        factors: list = []
        for side in (node.left, node.right):
            v = _kw_value(side)
            if isinstance(v, SizeExpr):
                factors.extend(v.factors)
            elif isinstance(v, (int, NameRef)):
                factors.append(v)
            else:
                raise _fail(node, "only sizes can be multiplied in a keyword argument")
        return SizeExpr(tuple(factors))
    raise _fail(node, f"{_describe(node)} is not allowed as a keyword argument; use an integer, a size, "
                      "a fn name or a list of integers")


def _arg(node: ast.AST, depth: int) -> Arg:
    if depth > MAX_ARG_DEPTH:
        raise _fail(node, "the argument is nested too deeply")
    if isinstance(node, ast.Name):
        return _name(node, "argument")
    if isinstance(node, ast.Tuple):
        if not node.elts:
            raise _fail(node, "an empty tuple is not a stream")
        return tuple(_arg(e, depth + 1) for e in node.elts)
    raise _fail(node, f"{_describe(node)} is not allowed as an .apply argument; pass a stream name or a tuple of names")


def _comprehension(target: str, node: ast.ListComp, line: int) -> Comprehension:
    if len(node.generators) != 1:
        raise _fail(node, "a list comprehension may have one `for` clause only")
    gen = node.generators[0]
    if gen.ifs or gen.is_async:
        raise _fail(node, "a list comprehension may not filter with `if`")
    if isinstance(gen.target, ast.Tuple):
        loop_vars = tuple(_name(e, "loop variable") for e in gen.target.elts)
    else:
        loop_vars = (_name(gen.target, "loop variable"),)
    if len(set(loop_vars)) != len(loop_vars):
        raise _fail(node, "loop variables repeat a name")
    it = gen.iter
    if isinstance(it, ast.Call) and isinstance(it.func, ast.Name) and it.func.id == "zip" and not it.keywords:
        iterables = tuple(_iterable(a) for a in it.args)
    elif isinstance(it, (ast.Name, ast.List)):
        iterables = (_iterable(it),)
    else:
        raise _fail(it, f"{_describe(it)} is not allowed; iterate over zip(list, list) or a list name")
    if len(iterables) != len(loop_vars):
        raise _fail(node, f"{len(loop_vars)} loop variable(s) for {len(iterables)} list(s)")
    call, arg = _apply(node.elt)
    return Comprehension(target, call, arg, loop_vars, iterables, line)


def _iterable(node: ast.AST) -> Union[str, tuple[str, ...]]:
    if isinstance(node, ast.Name):
        return _name(node, "zip argument")
    if isinstance(node, ast.List):
        return tuple(_name(e, "fn list") for e in node.elts)
    raise _fail(node, f"{_describe(node)} is not allowed inside zip(...); use list names or a list of fn names")


# ---------------------------------------------------------------------------
# The affine rule: every stream is consumed at most once.


@dataclass(frozen=True)
class AffineViolation:
    name: str
    defined_line: int | None
    lines: tuple[int, ...]

    @property
    def message(self) -> str:
        where = f"defined on line {self.defined_line}" if self.defined_line else "a program input"
        lines = ", ".join(str(n) for n in self.lines)
        return (f"stream {self.name} ({where}) is consumed {len(self.lines)} times (lines {lines}); "
                f"each stream may be consumed once: Copy it")


def arg_names(arg: Arg) -> list[str]:
    """The stream names an .apply argument reads, in order."""
    if isinstance(arg, str):
        return [arg]
    return [n for item in arg for n in arg_names(item)]


def check_affine(program: Program) -> list[AffineViolation]:
    """Every stream consumed more than once, by name, definition line and use lines.

    Passing a stream to `.apply` (alone, in a tuple, or via a comprehension's
    list) consumes it; so does `return`. Fn names and fn lists are not streams.
    A comprehension body that uses a stream from outside the loop consumes it
    once per item. Re-assigning a name starts a new stream.
    """
    defined: dict[str, int | None] = {}  # current definition line of each stream name
    fn_lists: set[str] = set()
    uses: dict[tuple[str, int | None], list[int]] = {}

    def use(name: str, line: int, times: int = 1):
        if name in fn_lists:
            return
        key = (name, defined.get(name))
        uses.setdefault(key, []).extend([line] * times)

    def define(name: str, line: int):
        defined[name] = line
        fn_lists.discard(name)

    for st in program.statements:
        if isinstance(st, Apply):
            for n in arg_names(st.arg):
                use(n, st.line)
            for t in st.targets:
                define(t, st.line)
        elif isinstance(st, FnList):
            defined[st.target] = st.line
            fn_lists.add(st.target)
        elif isinstance(st, Comprehension):
            for it in st.iterables:
                if isinstance(it, str):
                    use(it, st.line)
            inner_uses = arg_names(st.arg)
            fn_vars = set(st.loop_vars) - set(inner_uses)
            for v in st.loop_vars:
                if v not in fn_vars and inner_uses.count(v) > 1:
                    uses.setdefault((f"{v} (loop variable)", st.line), []).extend([st.line] * inner_uses.count(v))
            for n in inner_uses:
                if n not in st.loop_vars:
                    use(n, st.line, times=2)  # used once per item: more than once unless the list has one item
            define(st.target, st.line)
        elif isinstance(st, Return):
            for n in st.names:
                use(n, st.line)
    return [
        AffineViolation(name, line, tuple(lines))
        for (name, line), lines in uses.items()
        if len(lines) > 1
    ]

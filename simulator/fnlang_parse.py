"""The fn language's parser (docs/language.md, section 5a): accept a model-written body, or reject it before it runs.

`parse_body` parses the text with `ast.parse` (parsing runs nothing) after
bounding its length, then bounds its statements, nodes and nesting.
`compile_body` walks the tree accepting only the constructs docs/language.md section 5a lists
and turns each node into a closure over `fnlang_eval`: nothing is exec'd,
eval'd or compiled as Python. Anything outside the language raises
`FnLanguageError` naming the fn, the line and the construct.
"""

from __future__ import annotations

import ast
import math
import operator
from typing import Callable, Mapping, Optional

import stepforge.simulator.fnlang_eval as E
from stepforge.simulator.errors import FnLanguageError
from stepforge.simulator.fnlang_vocab import ATTRIBUTES, KEYWORDS, KNOWN, pointwise
from stepforge.simulator.fns import FnSignature

MAX_BODY_CHARS = 4000
MAX_STATEMENTS = 64
MAX_NODES = 1500
MAX_DEPTH = 24
MAX_INT_LITERAL = 2**31
RESERVED = frozenset({"input", "state", "input_data", "torch", "math"})

_BINOPS = {ast.Add: ("+", operator.add), ast.Sub: ("-", operator.sub), ast.Mult: ("*", operator.mul),
           ast.Div: ("/", operator.truediv), ast.FloorDiv: ("//", operator.floordiv), ast.Mod: ("%", operator.mod),
           ast.Pow: ("**", operator.pow), ast.MatMult: ("@", operator.matmul)}
_OTHER_BINOPS = {ast.BitAnd: "&", ast.BitOr: "|", ast.BitXor: "^", ast.LShift: "<<", ast.RShift: ">>"}
_COMPARE = {ast.Lt: ("<", operator.lt), ast.LtE: ("<=", operator.le), ast.Gt: (">", operator.gt),
            ast.GtE: (">=", operator.ge), ast.Eq: ("==", operator.eq), ast.NotEq: ("!=", operator.ne)}
_INDEX_OPS = (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod)
_CONSTRUCTS = {
    ast.Import: "import", ast.ImportFrom: "import", ast.If: "'if'", ast.For: "a loop ('for')",
    ast.While: "a loop ('while')", ast.FunctionDef: "'def'", ast.AsyncFunctionDef: "'def'", ast.ClassDef: "'class'",
    ast.With: "'with'", ast.AsyncWith: "'with'", ast.Try: "'try'", ast.Global: "'global'", ast.Nonlocal: "'nonlocal'",
    ast.Delete: "'del'", ast.Assert: "'assert'", ast.Raise: "'raise'", ast.Pass: "'pass'", ast.Break: "'break'",
    ast.Continue: "'continue'", ast.AugAssign: "augmented assignment", ast.AnnAssign: "annotated assignment",
    ast.Lambda: "lambda", ast.ListComp: "a comprehension", ast.SetComp: "a comprehension",
    ast.DictComp: "a comprehension", ast.GeneratorExp: "a comprehension", ast.IfExp: "a conditional expression",
    ast.JoinedStr: "an f-string", ast.NamedExpr: "':='", ast.BoolOp: "'and'/'or'", ast.Dict: "a dict",
    ast.Set: "a set", ast.Await: "'await'", ast.Yield: "'yield'", ast.YieldFrom: "'yield'", ast.Starred: "'*' unpacking",
    ast.Match: "'match'", ast.AsyncFor: "a loop ('for')", ast.Subscript: "a subscript", ast.Attribute: "an attribute",
    ast.Call: "a call", ast.Compare: "a comparison", ast.BinOp: "an operator", ast.List: "a list", ast.Tuple: "a tuple",
}
if hasattr(ast, "TryStar"):
    _CONSTRUCTS[ast.TryStar] = "'try'"


def _construct(node: ast.AST) -> str:
    return _CONSTRUCTS.get(type(node), type(node).__name__)


def _private(name: str) -> bool:
    return name.startswith("_")


class _Compiler:
    """Walks one parsed body, rejecting what is outside the language, building closures for the rest."""

    def __init__(self, sig: FnSignature, sizes: Mapping[str, int], parameters: frozenset[str],
                 vocabulary: frozenset[str]):
        self.fn = sig.func_name
        self.n_inputs = len(sig.input_type.fields())
        self.n_state = len(sig.output_type.fields()) if sig.is_fold else None
        self.sizes, self.parameters, self.vocabulary = dict(sizes), parameters, vocabulary
        self.defined: set[str] = set()

    def fail(self, node: Optional[ast.AST], what: str):
        raise FnLanguageError(self.fn, getattr(node, "lineno", None), what)

    def site(self, node: ast.AST) -> E.Site:
        return E.Site(self.fn, node.lineno)

    # -- statements ---------------------------------------------------------
    def body(self, tree: ast.Module) -> E.Closure:
        stmts = tree.body
        if not stmts:
            self.fail(None, "the body is empty")
        if len(stmts) > MAX_STATEMENTS:
            self.fail(stmts[MAX_STATEMENTS], f"the body has {len(stmts)} statements (limit {MAX_STATEMENTS})")
        steps: list[E.Closure] = []
        for i, st in enumerate(stmts):
            last = i == len(stmts) - 1
            if isinstance(st, ast.Assign):
                steps.append(self.assign(st))
            elif isinstance(st, (ast.Return, ast.Expr)) and last:
                if st.value is None:
                    self.fail(st, "'return' needs a value: return [tensor, ...]")
                steps.append(self.expr(st.value))
            elif isinstance(st, ast.Return):
                self.fail(st, "statements after 'return' are not allowed")
            elif isinstance(st, ast.Expr):
                self.fail(st, "an expression statement before the last line is not allowed")
            else:
                self.fail(st, f"{_construct(st)} is not allowed")
        if not isinstance(stmts[-1], (ast.Return, ast.Expr)):
            self.fail(stmts[-1], "the body must end with 'return [...]' or an expression")
        *assigns, result = steps

        def run(env: E.Env):
            for step in assigns:
                step(env)
            return result(env)

        return run

    def assign(self, st: ast.Assign) -> E.Closure:
        if len(st.targets) != 1:
            self.fail(st, "chained assignment (a = b = ...) is not allowed")
        target, value = st.targets[0], self.expr(st.value)
        if isinstance(target, ast.Name):
            name = self.target_name(target)

            def set_one(env: E.Env):
                env.vars[name] = value(env)

            return set_one
        if isinstance(target, (ast.Tuple, ast.List)):
            names, site = [self.target_name(t) for t in target.elts], self.site(st)

            def set_many(env: E.Env):
                env.vars.update(zip(names, E.unpack(site, value(env), len(names))))

            return set_many
        self.fail(target, f"assigning to {_construct(target)} is not allowed (assign names only)")

    def target_name(self, node: ast.AST) -> str:
        if not isinstance(node, ast.Name):
            self.fail(node, f"assigning to {_construct(node)} is not allowed (assign names only)")
        name = node.id
        if name in RESERVED or name.endswith("_value") or _private(name):
            self.fail(node, f"assigning to the name '{name}' is not allowed")
        self.defined.add(name)
        return name

    # -- expressions --------------------------------------------------------
    def expr(self, node: ast.AST) -> E.Closure:
        method = getattr(self, "x_" + type(node).__name__, None)
        if method is None:
            self.fail(node, f"{_construct(node)} is not allowed")
        return method(node)

    def x_Constant(self, node: ast.Constant) -> E.Closure:
        v = node.value
        if isinstance(v, str):
            self.fail(node, "a string literal is not allowed (only a parameter name in input_data['P'])")
        if v is not None and not isinstance(v, (bool, int, float)):
            self.fail(node, f"a {type(v).__name__} literal is not allowed")
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_INT_LITERAL:
            self.fail(node, f"the integer literal {v} is too large (limit {MAX_INT_LITERAL})")
        return lambda env: v

    def x_Name(self, node: ast.Name) -> E.Closure:
        name = node.id
        if name == "input":
            return lambda env: env.vars["input"]
        if name == "state":
            if self.n_state is None:
                self.fail(node, "'state' exists only in a fold (a fn with init)")
            return lambda env: env.vars["state"]
        if name in self.defined:
            return lambda env: env.vars[name]
        if name in self.sizes:
            value = self.sizes[name]
            return lambda env: value
        if name in ("torch", "math"):
            self.fail(node, f"the name '{name}' on its own is not allowed")
        if name == "input_data":
            self.fail(node, "input_data is only allowed as input_data['P'] for a parameter P of the task")
        if _private(name):
            self.fail(node, f"the name '{name}' is not allowed")
        self.fail(node, f"the name '{name}' is not defined (a body sees input, state, the names it assigned, "
                        f"size values such as {next(iter(sorted(self.sizes)), 'D_value')}, and math.pi)")

    def x_Attribute(self, node: ast.Attribute) -> E.Closure:
        if _private(node.attr):
            self.fail(node, f"attribute '{node.attr}' is not allowed")
        if isinstance(node.value, ast.Name) and node.value.id == "math" and node.attr == "pi":
            return lambda env: math.pi
        if node.attr in ATTRIBUTES and node.attr in self.vocabulary and not _is_module(node.value):
            value, site = self.expr(node.value), self.site(node)
            return lambda env: E.transpose(site, value(env))
        hint = "" if _is_module(node.value) else " (x.T is the one attribute)"
        self.fail(node, f"attribute '{node.attr}' is not allowed{hint}")

    def x_Subscript(self, node: ast.Subscript) -> E.Closure:
        base = node.value
        if isinstance(base, ast.Name) and base.id in ("input", "state"):
            return self.field(node, base.id)
        if isinstance(base, ast.Name) and base.id == "input_data":
            key = node.slice
            if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
                self.fail(node, "input_data[...] needs a parameter name in quotes, e.g. input_data['W']")
            if key.value not in self.parameters:
                known = ", ".join(sorted(self.parameters)) or "none"
                self.fail(node, f"input_data[{key.value!r}]: the task has no parameter {key.value!r} (parameters: {known})")
            name, site = key.value, self.site(node)
            return lambda env: E.parameter(site, env, name)
        value, index, site = self.expr(base), self.index(node.slice), self.site(node)
        return lambda env: E.subscript(site, value(env), index(env))

    def field(self, node: ast.Subscript, which: str) -> E.Closure:
        n = self.n_inputs if which == "input" else self.n_state
        if n is None:
            self.fail(node, "'state' exists only in a fold (a fn with init)")
        key = node.slice
        i = _int_literal(key)
        if i is None:
            self.fail(node, f"{which}[...] takes an integer literal, e.g. {which}[0]")
        if not -n <= i < n:
            self.fail(node, f"{which}[{i}] is out of range: the fn has {n} {which} field(s)")
        return lambda env: env.vars[which][i]

    def index(self, node: ast.AST) -> E.Closure:
        if isinstance(node, ast.Tuple):
            items = [self.index_item(e) for e in node.elts]
            return lambda env: tuple(item(env) for item in items)
        return self.index_item(node)

    def index_item(self, node: ast.AST) -> E.Closure:
        if isinstance(node, ast.Slice):
            parts = [None if p is None else self.index_int(p) for p in (node.lower, node.upper, node.step)]
            return lambda env: slice(*(None if p is None else p(env) for p in parts))
        if isinstance(node, ast.Constant) and (node.value is None or node.value is Ellipsis):
            value = node.value
            return lambda env: value
        return self.index_int(node)

    def index_int(self, node: ast.AST) -> E.Closure:
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return self.x_Constant(node)
        if isinstance(node, ast.Name):
            value, site, name = self.x_Name(node), self.site(node), node.id
            return lambda env: E.index_int(site, value(env), name)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            inner = self.index_int(node.operand)
            return lambda env: -inner(env)
        if isinstance(node, ast.BinOp) and isinstance(node.op, _INDEX_OPS):
            return self.x_BinOp(node, index=True)
        self.fail(node, f"{_construct(node)} in a subscript is not allowed "
                        f"(indices are integers, size values, slices, ..., None)")

    def x_BinOp(self, node: ast.BinOp, index: bool = False) -> E.Closure:
        if type(node.op) not in _BINOPS:
            self.fail(node, f"the operator '{_OTHER_BINOPS.get(type(node.op), type(node.op).__name__)}' is not allowed")
        symbol, op = _BINOPS[type(node.op)]
        sub = self.index_int if index else self.expr
        left, right, site = sub(node.left), sub(node.right), self.site(node)
        size_of = KNOWN["matmul"].size if symbol == "@" else pointwise
        return lambda env: E.binop(site, env, symbol, op, size_of, left(env), right(env))

    def x_UnaryOp(self, node: ast.UnaryOp) -> E.Closure:
        if not isinstance(node.op, ast.USub):
            symbol = {ast.Not: "not", ast.Invert: "~", ast.UAdd: "unary +"}.get(type(node.op), "?")
            self.fail(node, f"the operator '{symbol}' is not allowed")
        operand, site = self.expr(node.operand), self.site(node)
        return lambda env: E.negate(site, operand(env))

    def x_Compare(self, node: ast.Compare) -> E.Closure:
        if len(node.ops) != 1:
            self.fail(node, "a chained comparison is not allowed (compare two values)")
        if type(node.ops[0]) not in _COMPARE:
            self.fail(node, f"the comparison '{type(node.ops[0]).__name__}' is not allowed (use < <= > >= == !=)")
        symbol, op = _COMPARE[type(node.ops[0])]
        left, right, site = self.expr(node.left), self.expr(node.comparators[0]), self.site(node)
        return lambda env: E.compare(site, env, symbol, op, pointwise, left(env), right(env))

    def x_List(self, node: ast.List) -> E.Closure:
        items = [self.expr(e) for e in node.elts]
        return lambda env: [item(env) for item in items]

    def x_Tuple(self, node: ast.Tuple) -> E.Closure:
        items = [self.expr(e) for e in node.elts]
        return lambda env: tuple(item(env) for item in items)

    def x_Call(self, node: ast.Call) -> E.Closure:
        name, function, receiver = self.callee(node.func)
        args = []
        for a in node.args:
            if isinstance(a, ast.Starred):
                self.fail(a, "'*' unpacking is not allowed")
            args.append(self.expr(a))
        kwargs = {}
        for kw in node.keywords:
            if kw.arg is None:
                self.fail(kw.value, "'**' arguments are not allowed")
            if kw.arg not in KEYWORDS:
                self.fail(kw.value, f"the keyword argument '{kw.arg}' is not allowed "
                                    f"(allowed: {', '.join(sorted(KEYWORDS))})")
            kwargs[kw.arg] = self.expr(kw.value)
        size_of, site = KNOWN[name].size, self.site(node)
        label = f"torch.{name}" if receiver is None else f".{name}"

        def call(env: E.Env):
            values = ([receiver(env)] if receiver is not None else []) + [a(env) for a in args]
            named = {k: v(env) for k, v in kwargs.items()}
            return E.call(site, env, label, size_of, function, values, named, method=receiver is not None)

        return call

    def callee(self, func: ast.AST) -> tuple[str, Callable, Optional[E.Closure]]:
        """(vocabulary name, the torch callable, the receiver closure for x.F or None)."""
        if isinstance(func, ast.Name):
            self.fail(func, f"calling '{func.id}' is not allowed (calls are torch.F(...), "
                            f"torch.nn.functional.F(...) or x.F(...) for F in the vocabulary)")
        if not isinstance(func, ast.Attribute):
            self.fail(func, f"calling {_construct(func)} is not allowed")
        name = func.attr
        if _private(name):
            self.fail(func, f"attribute '{name}' is not allowed")
        path = _dotted(func)
        if path is not None and path[0] in ("torch", "math"):
            for part in path[1:]:
                if _private(part):
                    self.fail(func, f"attribute '{part}' is not allowed")
            if path[0] == "torch" and (len(path) == 2 or path[1:3] == ["nn", "functional"] and len(path) == 4):
                entry = KNOWN.get(name)
                if name not in self.vocabulary or entry is None or entry.function is None:
                    self.fail(func, f"the torch function '{name}' is not in the vocabulary")
                return name, entry.function, None
            self.fail(func, f"'{'.'.join(path)}' is not allowed (call torch.F or torch.nn.functional.F "
                            f"for F in the vocabulary)")
        entry = KNOWN.get(name)
        if name not in self.vocabulary or entry is None:
            self.fail(func, f"the method '{name}' is not in the vocabulary")
        if entry.method is None:
            self.fail(func, f"'{name}' has no method form: write torch.{name}(x, ...)")
        return name, entry.method, self.expr(func.value)


def _is_module(node: ast.AST) -> bool:
    path = _dotted(node)
    return path is not None and path[0] in ("torch", "math")


def _dotted(node: ast.AST) -> Optional[list[str]]:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id] + parts[::-1]
    return None


def _int_literal(node: ast.AST) -> Optional[int]:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = _int_literal(node.operand)
        return None if inner is None else -inner
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        return node.value
    return None


def parse_body(source: str, func_name: str) -> ast.Module:
    """Parse after bounding the text; then bound its statements, nodes and nesting."""
    if len(source) > MAX_BODY_CHARS:
        line = source.count("\n", 0, MAX_BODY_CHARS) + 1
        raise FnLanguageError(func_name, line, f"the body has {len(source):,} characters (limit {MAX_BODY_CHARS:,})")
    try:
        tree = ast.parse(source, mode="exec")
    except SyntaxError as exc:
        raise FnLanguageError(func_name, exc.lineno, f"not Python syntax: {exc.msg}") from None
    except (RecursionError, MemoryError, ValueError):
        raise FnLanguageError(func_name, None, "the body is too deeply nested to parse") from None
    nodes, stack = 0, [(node, 1) for node in tree.body]
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise FnLanguageError(func_name, getattr(node, "lineno", None),
                                  f"the body has more than {MAX_NODES} syntax nodes")
        if depth > MAX_DEPTH:
            raise FnLanguageError(func_name, getattr(node, "lineno", None),
                                  f"an expression nested more than {MAX_DEPTH} deep is not allowed")
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node)
                     if not isinstance(child, (ast.expr_context, ast.operator, ast.unaryop, ast.cmpop, ast.boolop)))
    return tree


def compile_body(tree: ast.Module, sig: FnSignature, sizes: Mapping[str, int], parameters: frozenset[str],
                 vocabulary: frozenset[str]) -> E.Closure:
    """The closure that evaluates an accepted body; FnLanguageError for anything outside the language."""
    return _Compiler(sig, sizes, parameters, vocabulary).body(tree)


__all__ = ["MAX_BODY_CHARS", "MAX_DEPTH", "MAX_INT_LITERAL", "MAX_NODES", "MAX_STATEMENTS", "compile_body",
           "parse_body"]

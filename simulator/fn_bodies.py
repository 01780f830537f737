"""How a fn's `apply` text becomes the callable body of a StepFn: the body compilers.

A body compiler is `compile_body(apply, signature, namespace) -> body`, where
`body(inputs, state)` returns the fn's output fields. `compile_trusted_body`
compiles a task file's body as Python (task-file code only, run in a
verification worker); model-written bodies use the fn language's interpreter
(`fnlang.OpenCompiler`), which never runs them as Python.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any, Callable

from stepforge.simulator.types import ElemType


def _function_module(source: str, label: str) -> ast.Module:
    tree = ast.parse(source, filename=label)
    if not tree.body:
        raise ValueError(f"{label}: empty body")
    has_return = body_returns(tree)
    body = tree.body
    if not has_return:
        last = body[-1]
        if not isinstance(last, ast.Expr):
            raise ValueError(f"{label}: the body needs a `return` or must end with an expression")
        body = body[:-1] + [ast.Return(value=last.value)]
    args = ast.arguments(
        posonlyargs=[],
        args=[ast.arg("input"), ast.arg("state")],
        kwonlyargs=[],
        kw_defaults=[],
        defaults=[ast.Constant(None)],
    )
    fdef = ast.FunctionDef(name="_step_fn", args=args, body=body, decorator_list=[], returns=None, type_params=[])
    module = ast.Module(body=[fdef], type_ignores=[])
    return ast.fix_missing_locations(module)


def body_returns(body: "str | ast.AST") -> bool:
    """Whether a fn body (source or parsed) has a `return` of its own, outside nested defs and lambdas."""
    stack = list(ast.iter_child_nodes(ast.parse(body) if isinstance(body, str) else body))
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Return):
            return True
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            stack.extend(ast.iter_child_nodes(node))
    return False


@dataclass(frozen=True)
class FnSignature:
    """What a body compiler knows of the fn it compiles."""

    func_name: str
    input_type: ElemType
    output_type: ElemType
    is_fold: bool


BodyCompiler = Callable[[str, FnSignature, dict], Callable]


def compile_trusted_body(apply: str, sig: FnSignature, namespace: dict) -> Callable:
    """A task file's body as a Python function whose globals are `namespace` (task-file code only)."""
    label = f"<fn {sig.func_name}>"
    module = _function_module(apply, label)
    local: dict[str, Any] = {}
    exec(compile(module, label, "exec"), namespace, local)  # task-file code, run in a worker
    return local["_step_fn"]


__all__ = ["BodyCompiler", "FnSignature", "body_returns", "compile_trusted_body"]

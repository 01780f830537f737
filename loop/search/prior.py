"""The search proposer's prior over STeP programs, learned from demonstrations.

Two parts, both estimated from the `impl`s the loop hands the proposer
(`ProposalRequest.demonstrations`), both smoothed toward a hand-written base
prior (the "base knowledge": which operators and parameters are common), so
that with no demonstrations the prior *is* the base prior:

* an interpolated trigram model over operator tokens. A token is the
  operator name with its task-independent parameters: `Bufferize(a=1)`,
  `Accum(b=1)`, `Flatten(L=[2])`, `Repeat` (sizes and fn names are
  task-specific and left out). A `Map` over a tuple, `Map(fn=f).apply((a, b))`,
  is tokenised as `Zip` then `Map` (the search builds it that way). A fn list
  is `FnList`, a list comprehension `[Map]`::

      P1(w)     = (c(w)     + b1 * P0(w))     / (N     + b1)
      P2(w|v)   = (c(v w)   + b2 * P1(w))     / (c(v)   + b2)
      P3(w|u v) = (c(u v w) + b3 * P2(w|v))   / (c(u v) + b3)
      P(w|u v)  = (1 - mix) * P3(w|u v) + mix * P0(w)

  `P0` is the base prior. The final mixture with `P0` means a token the
  demonstrations never used keeps at least `mix * P0` of its probability, so
  demonstrations re-order the search but cannot make any program much less
  likely than it was cold.

* the order in which a program applies the task's fns. Task files list fns
  roughly in the order the known solutions use them. Each fn application is
  `next` (a fn listed after every fn used so far), `back` (an unused fn
  listed before one already used) or `reuse` (a fn used before); the three
  probabilities are a Dirichlet-smoothed estimate from the demonstrations
  (which carry their task IR, so their fn order is known) around a base of
  0.75 / 0.15 / 0.10.

`OpPrior` is a plain picklable object; `fit` returns a new prior.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

from stepforge.config_io import read_yaml_text
from stepforge.errors import ConfigError
from stepforge.simulator.program import Apply, Comprehension, FnList, NameRef, OpCall, Program, Return, parse_program

BOS = "<s>"

# Base probability of each operator (before its parameters), the "base knowledge".
BASE_OP_PROB: dict[str, float] = {
    "Map": 0.20,
    "Zip": 0.10,
    "Accum": 0.09,
    "Scan": 0.006,  # prefix folds (positions, online softmax) are rare next to reductions
    "Bufferize": 0.10,
    "Streamify": 0.08,
    "Promote": 0.04,
    "Repeat": 0.05,
    "RepeatRef": 0.015,
    "Flatten": 0.04,
    "Reshape": 0.005,
    "Copy": 0.07,
    "Partition": 0.03,
    "Merge": 0.03,
    "FnList": 0.03,
    "[Map]": 0.03,
}
# Parameters: integers are geometric (1 most likely), Promote's b may be 0.
_INT_PARAMS = {"a": 1, "b": 1}  # smallest usual value
_GEOM = 0.45  # P(v = low + i) = (1 - _GEOM) * _GEOM ** i

FN_ORDER_BASE = {"next": 0.75, "back": 0.15, "reuse": 0.10}

_TOKEN_RE = re.compile(r"^(\[?)([A-Za-z]+)\]?(?:\((.*)\))?$")


def make_token(op: str, params: Optional[Mapping[str, object]] = None) -> str:
    """The token of one operator application: `Op` or `Op(k=v, ...)` (int params only)."""
    shown = []
    for key, value in sorted((params or {}).items()):
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            shown.append(f"{key}={value}")
        elif isinstance(value, tuple) and all(isinstance(v, int) for v in value):
            shown.append(f"{key}=[{','.join(str(v) for v in value)}]")
    return f"{op}({','.join(shown)})" if shown else op


def base_prob(token: str) -> float:
    """P0 of a token: the operator's base probability times its parameters' probability."""
    m = _TOKEN_RE.match(token)
    if not m:
        return 1e-4
    bracket, op, params = m.groups()
    key = f"[{op}]" if bracket else op
    p = BASE_OP_PROB.get(key, 1e-3)
    if params:
        for item in params.split(","):
            if "=" not in item:
                continue
            k, v = item.split("=", 1)
            if v.startswith("["):
                continue  # a list value continues after the comma; handled below
            if k in _INT_PARAMS and v.lstrip("-").isdigit():
                low = 0 if (op == "Promote" and k == "b") else 1
                i = int(v) - low
                if op == "Promote" and k == "b":
                    # b=1 (after the innermost dim) is the usual choice, then 0, 2, 3...
                    p *= {1: 0.45, 0: 0.25}.get(int(v), 0.3 * _GEOM ** max(0, int(v) - 2))
                else:
                    p *= (1 - _GEOM) * _GEOM ** max(0, i) if i >= 0 else 1e-3
        lm = re.search(r"L=\[([0-9,]*)\]", params)
        if lm:
            levels = [int(x) for x in lm.group(1).split(",") if x]
            start = levels[0] if levels else 1
            p *= (1 - _GEOM) * _GEOM ** (start - 1) * (0.5 ** (len(levels) - 1))
    return p


def call_token(call: OpCall) -> str:
    """The token of a parsed operator call (fn names and sizes abstracted away)."""
    params = {}
    for key, value in call.kwargs:
        if isinstance(value, int) and not isinstance(value, bool):
            params[key] = value
        elif isinstance(value, tuple) and value and all(isinstance(v, int) for v in value):
            params[key] = tuple(value)
    return make_token(call.op, params)


def program_tokens(program: Program) -> list[str]:
    """The token sequence of a program, in statement order (returns are not tokens)."""
    tokens: list[str] = []
    for st in program.statements:
        if isinstance(st, Apply):
            if st.call.op == "Map" and isinstance(st.arg, tuple):
                tokens.append("Zip")
            tokens.append(call_token(st.call))
        elif isinstance(st, FnList):
            tokens.append("FnList")
        elif isinstance(st, Comprehension):
            tokens.append("[" + call_token(st.call) + "]")
        elif isinstance(st, Return):
            pass
    return tokens


def fn_applications(program: Program) -> list[str]:
    """Fn names in the order the program applies them (a comprehension's fn list counts once, by its first fn)."""
    fn_lists: dict[str, tuple[str, ...]] = {}
    order: list[str] = []
    for st in program.statements:
        if isinstance(st, FnList):
            fn_lists[st.target] = st.fns
        elif isinstance(st, Apply):
            fn = st.call.kw().get("fn")
            if isinstance(fn, NameRef):
                order.append(fn.name)
        elif isinstance(st, Comprehension):
            for it in st.iterables:
                names = it if isinstance(it, tuple) else fn_lists.get(it, ())
                if names:
                    order.append(names[0])
                    break
    return order


def fn_order_category(index: int, used_indices: Iterable[int], reused: bool) -> str:
    """`next`, `back` or `reuse` for applying the fn with file index `index` after `used_indices`."""
    if reused:
        return "reuse"
    used = list(used_indices)
    return "next" if not used or index > max(used) else "back"


@functools.lru_cache(maxsize=512)
def _task_fn_order(task_ir: str) -> dict[str, int]:
    try:
        data = read_yaml_text(task_ir, "the task IR")
    except ConfigError:
        return {}
    if not isinstance(data, dict) or not isinstance(data.get("fns"), list):
        return {}
    return {f["func_name"]: i for i, f in enumerate(data["fns"]) if isinstance(f, dict) and "func_name" in f}


_SYMBOL = re.compile(r"\b(?!fp32\b|Buffer\b|Multihot\b)[A-Za-z_][A-Za-z_0-9]*\b")


def _abstract_dtype(dtype) -> str:
    """A dtype with size symbols abstracted (`Buffer(fp32, [D])` -> `Buffer(fp32,[S])`)."""
    text = ",".join(dtype) if isinstance(dtype, list) else str(dtype)
    return _SYMBOL.sub("S", text).replace(" ", "")


@functools.lru_cache(maxsize=512)
def task_signature(task_ir: str) -> frozenset[str]:
    """What a task looks like to the search: its fns' abstracted types (and foldness), its streams' types and ranks."""
    try:
        data = read_yaml_text(task_ir, "the task IR")
    except ConfigError:
        return frozenset()
    if not isinstance(data, dict):
        return frozenset()
    sig: set[str] = set()
    for f in data.get("fns") or []:
        if isinstance(f, dict) and "input_dtype" in f and "output_dtype" in f:
            kind = "fold" if f.get("init") is not None else "map"
            sig.add(f"{kind}:{_abstract_dtype(f['input_dtype'])}->{_abstract_dtype(f['output_dtype'])}")
    for key in ("inputs", "outputs"):
        for st in data.get(key) or []:
            if isinstance(st, dict) and "dtype" in st and isinstance(st.get("dims"), list):
                sig.add(f"{key}:{_abstract_dtype(st['dtype'])}/{len(st['dims'])}")
    return frozenset(sig)


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


@dataclass
class OpPrior:
    """Trigram prior over operator tokens plus a fn-order model; see the module docstring."""

    beta1: float = 1.0
    beta2: float = 1.0
    beta3: float = 1.0
    mix: float = 0.25
    fn_order_strength: float = 4.0  # pseudo-counts of the base fn-order distribution
    uni: Counter = field(default_factory=Counter)
    bi: Counter = field(default_factory=Counter)
    tri: Counter = field(default_factory=Counter)
    ctx1: Counter = field(default_factory=Counter)
    ctx2: Counter = field(default_factory=Counter)
    fn_order: Counter = field(default_factory=Counter)
    n_programs: int = 0
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    # -- estimation ---------------------------------------------------------
    def fit(self, demonstrations: Iterable[tuple], target_ir: Optional[str] = None,
            floor: float = 0.25) -> "OpPrior":
        """A new prior with the demonstrations' counts added; unparseable impls are skipped.

        `demonstrations` are `(impl, task_ir or None)` pairs. With `target_ir`
        (the task being searched), each demonstration counts with weight
        `floor + (1 - floor) * similarity` of its task to the target (Jaccard
        similarity of their fn and stream signatures, see `task_signature`), so
        experience from similar tasks shapes the prior most; without it, or for
        a demonstration without task IR, the weight is 1.
        """
        new = OpPrior(self.beta1, self.beta2, self.beta3, self.mix, self.fn_order_strength,
                      Counter(self.uni), Counter(self.bi), Counter(self.tri), Counter(self.ctx1),
                      Counter(self.ctx2), Counter(self.fn_order), self.n_programs)
        target = task_signature(target_ir) if target_ir else None
        for impl, task_ir in demonstrations:
            try:
                program = parse_program(impl)
            except Exception:  # a demonstration the parser rejects teaches nothing
                continue
            weight = 1.0
            if target and task_ir:
                weight = floor + (1 - floor) * jaccard(target, task_signature(task_ir))
            new.n_programs += 1
            tokens = program_tokens(program)
            history = [BOS, BOS]
            for tok in tokens:
                u, v = history[-2], history[-1]
                new.uni[tok] += weight
                new.bi[(v, tok)] += weight
                new.ctx1[v] += weight
                new.tri[(u, v, tok)] += weight
                new.ctx2[(u, v)] += weight
                history.append(tok)
            order = _task_fn_order(task_ir) if task_ir else {}
            if order:
                used: list[int] = []
                for name in fn_applications(program):
                    if name not in order:
                        continue
                    idx = order[name]
                    new.fn_order[fn_order_category(idx, used, idx in used)] += weight
                    used.append(idx)
        return new

    # -- probabilities --------------------------------------------------------
    def prob(self, token: str, context: Sequence[str]) -> float:
        u, v = (list(context)[-2:] if len(context) >= 2 else [BOS] * (2 - len(context)) + list(context))
        key = (u, v, token)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        p0 = base_prob(token)
        n = sum(self.uni.values())
        p1 = (self.uni[token] + self.beta1 * p0) / (n + self.beta1)
        p2 = (self.bi[(v, token)] + self.beta2 * p1) / (self.ctx1[v] + self.beta2)
        p3 = (self.tri[(u, v, token)] + self.beta3 * p2) / (self.ctx2[(u, v)] + self.beta3)
        p = (1 - self.mix) * p3 + self.mix * p0 if n else p0
        self._cache[key] = p
        return p

    def cost(self, token: str, context: Sequence[str]) -> float:
        """-log P(token | the last two tokens of `context`), in nats."""
        return -math.log(self.prob(token, context))

    def fn_order_cost(self, category: str) -> float:
        total = sum(self.fn_order.values())
        p = (self.fn_order[category] + self.fn_order_strength * FN_ORDER_BASE[category]) / (total + self.fn_order_strength)
        return -math.log(p)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state


__all__ = [
    "BASE_OP_PROB",
    "BOS",
    "FN_ORDER_BASE",
    "OpPrior",
    "base_prob",
    "call_token",
    "fn_applications",
    "fn_order_category",
    "jaccard",
    "make_token",
    "program_tokens",
    "task_signature",
]

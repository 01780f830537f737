"""Time the simulator's two engines: naive (element by element) vs vectorised.

    python scripts/bench_simulator.py [--tasks published] [--repeats 3] [--only SUBSTRING] [--builtin]
        [--sizes default,large] [--device cpu]

Programs: the reference solutions of the selected tasks (`--tasks`: a split,
published / new / all, or keys and globs; default published, the 26 tasks the
figures have always been measured on), or, when the benchmark cannot be
loaded (or with --builtin), a built-in set: batched matmul, layer norm,
online-softmax attention and routed experts. The script says which.

Each program runs at the default sizes (M=5 N=7 K=9 D=16) and at M=16 N=32
K=32 D=32, one thread. The vectorised time is the best of --repeats runs after
a warm-up (fns learn once how they batch, as in the verifier); the naive time
is one run; the results are compared (allclose). Each task's oracle (its
`data_transform` in float32 on the same inputs) is timed as the vectorised
run. Each program's kernels and its oracle's are also recorded at the
dispatcher (a TorchDispatchMode) and replayed back to back, best of --repeats:
the same tensor work with no interpreter, the floor of the vectorised/oracle
ratio for any engine that issues those kernels. The last three lines are

    kernel replay: vectorised <n> kernels in <f>s, oracles <m> kernels in <g>s (<q>x the oracles' time)
    vectorised <v>s, oracles <o>s at M=16 N=32 K=32 D=32 (<r>x)
    speedup <X>x at M=16 N=32 K=32 D=32 (naive <a>s, vectorised <b>s)

over the programs that ran at that size (the first two over those with an
oracle). Timings are for reading, not tests. With --device cuda the inputs
are built on the CPU (same seeds), moved to the GPU, and both engines run
there; each timing ends with a CUDA synchronize.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from stepforge.simulator import (
    MultihotType,
    SimulatorError,
    Stream,
    StreamType,
    make_fn,
    parse_dims,
    parse_dtype,
    parse_program,
    run_program,
)
from stepforge.simulator.fns import build_namespace, namespace_binding

SIZES = {
    "default": {"M": 5, "N": 7, "K": 9, "D": 16},
    "large": {"M": 16, "N": 32, "K": 32, "D": 32},
}


@dataclass
class Case:
    """A program, how to build its inputs and fns for a binding, and its task's own torch oracle."""

    name: str
    text: str
    build: Callable[[dict, int], tuple[dict, dict, dict, dict]]  # (sizes, seed) -> (inputs, fns, binding, input_data)
    # (sizes, seed) -> a call computing the expected outputs from the same inputs in float32
    oracle: Optional[Callable[[dict, int], Callable[[], Any]]] = None


# ---------------------------------------------------------------------------
# benchmark tasks


def _generate(decl, stype: StreamType, binding: dict, gen: torch.Generator):
    tensors = []
    for shape, field in zip(stype.tensor_shapes(binding), stype.fields()):
        spec = decl.data_gen
        if isinstance(field, MultihotType) or not isinstance(spec, str):
            width = shape[-1]
            lo, hi = (spec.min, spec.max) if not isinstance(spec, str) else (0, width)
            positions = math.prod(shape[:-1])
            counts = torch.randint(lo, min(hi, width) + 1, (positions, 1), generator=gen)
            ranks = torch.rand((positions, width), generator=gen).argsort(-1).argsort(-1)
            tensors.append((ranks < counts).float().reshape(shape))
        elif spec == "torch.rand":
            tensors.append(torch.rand(shape, generator=gen))
        elif spec == "torch.ones":
            tensors.append(torch.ones(shape))
        elif spec == "binary":
            tensors.append((torch.rand(shape, generator=gen) < 0.5).float())
        else:
            tensors.append(torch.randn(shape, generator=gen))
    return tensors[0] if len(tensors) == 1 else tensors


def task_case(key: str, task) -> Case:
    def build(sizes: dict, seed: int):
        return build_with_namespace(sizes, seed)[:4]

    def oracle(sizes: dict, seed: int):
        from stepforge.benchmark.verifier import oracle_function

        run = oracle_function(task)
        ns = build_with_namespace(sizes, seed)[4]
        return lambda: run(ns, torch.float32)

    def build_with_namespace(sizes: dict, seed: int):
        input_data: dict = {}
        ns = build_namespace(dict(sizes), input_data, task.global_code)
        binding = namespace_binding(ns)
        gen = torch.Generator().manual_seed(seed)
        inputs = {}
        for d in task.inputs:
            stype = StreamType(parse_dtype(d.dtype), parse_dims(d.dims))
            data = _generate(d, stype, binding, gen)
            input_data[d.name] = data
            inputs[d.name] = Stream(stype, data)
        for d in task.parameters:
            stype = StreamType(parse_dtype(d.dtype), parse_dims(d.dims))
            input_data[d.name] = _generate(d, stype, binding, gen)
        fns = {f.func_name: make_fn(f.name, f.func_name, f.input_dtype, f.output_dtype, f.apply, f.init_list(),
                                    namespace=ns) for f in task.fns}
        return inputs, fns, binding, input_data, ns

    return Case(key, task.impl, build, oracle)


def benchmark_cases(selection: str = "all") -> tuple[list[Case], str]:
    """The reference solutions of the tasks `selection` names (see `selection.select_option`).

    A selection that names no task raises ConfigError; a benchmark that cannot be
    loaded gives no cases and says why.
    """
    try:
        from stepforge.benchmark.schema import load_benchmark

        tasks = load_benchmark()
    except Exception as exc:  # the benchmark is optional for this script
        return [], f"benchmark not loadable ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    from stepforge.benchmark.selection import select_option

    keys = select_option(selection, tasks)
    cases = [task_case(key, tasks[key]) for key in keys if tasks[key].impl]
    if not cases:
        return [], "the selected tasks have no reference solutions"
    return cases, f"the reference solutions of --tasks {selection} ({len(cases)})"


# ---------------------------------------------------------------------------
# built-in representative programs


def _builtin(name: str, text: str, streams: dict, fns: list, params: Optional[Callable] = None,
             global_sizes: Optional[dict] = None) -> Case:
    """streams: name -> (dtype, dims, kind) with kind randn | multihot:lo:hi."""

    def build(sizes: dict, seed: int):
        binding = dict(sizes, **(global_sizes or {}))
        gen = torch.Generator().manual_seed(seed)
        input_data: dict = {}
        ns = build_namespace(binding, input_data)
        if params:
            input_data.update(params(binding, gen))
        inputs = {}
        for n, (dtype, dims, kind) in streams.items():
            stype = StreamType(parse_dtype(dtype), parse_dims(dims))
            (shape,) = stype.tensor_shapes(binding)
            if kind.startswith("multihot"):
                _, lo, hi = kind.split(":")
                positions, width = math.prod(shape[:-1]), shape[-1]
                counts = torch.randint(int(lo), int(hi) + 1, (positions, 1), generator=gen)
                ranks = torch.rand((positions, width), generator=gen).argsort(-1).argsort(-1)
                data = (ranks < counts).float().reshape(shape)
            else:
                data = torch.randn(shape, generator=gen)
            inputs[n] = Stream(stype, data)
        table = {f[0]: make_fn(f[0], f[0], f[1], f[2], f[3], f[4] if len(f) > 4 else None, namespace=ns) for f in fns}
        return inputs, table, binding, input_data

    def oracle(sizes: dict, seed: int):
        inputs, _, binding, input_data = build(sizes, seed)
        return lambda: builtin_reference(name, inputs, binding, input_data)

    return Case(name, text, build, oracle)


BMM = """b1 = step.Bufferize(a=1).apply(E1)
b2 = step.Repeat(n=N).apply(b1)
b3 = step.Streamify().apply(b2)
b4 = step.Bufferize(a=1).apply(b3)
ab = step.Map(fn=scale_row).apply((E0, b4))
c = step.Accum(fn=add_row, b=1).apply(ab)
return c"""

LAYERNORM = """x1, x2 = step.Copy().apply(E0)
s = step.Accum(fn=moments, b=1).apply(x1)
sr = step.Repeat(n=D).apply(s)
y = step.Map(fn=normalise).apply((x2, sr))
return y"""

ATTENTION = """k1 = step.Bufferize(a=1).apply(E1)
k2 = step.Repeat(n=N).apply(k1)
k3 = step.Streamify().apply(k2)
kr = step.Bufferize(a=1).apply(k3)
v1 = step.Bufferize(a=1).apply(E2)
v2 = step.Repeat(n=N).apply(v1)
v3 = step.Streamify().apply(v2)
vr = step.Bufferize(a=1).apply(v3)
qr = step.Repeat(n=K).apply(E0)
s = step.Map(fn=dot).apply((qr, kr))
z = step.Zip().apply((s, vr))
o = step.Accum(fn=online, b=1).apply(z)
y = step.Map(fn=finish).apply(o)
return y"""

EXPERTS = """i1, i2 = step.Copy().apply(E1)
parts = step.Partition(N=E).apply((E0, i1))
outs = [step.Map(fn=f).apply(p) for p, f in zip(parts, [expert0, expert1, expert2, expert3])]
y = step.Merge(fn=add_row).apply((outs, i2))
return y"""


def builtin_cases() -> list[Case]:
    row = "Buffer(fp32, [D])"
    experts = [(f"expert{e}", row, row, f"[torch.tanh(input[0] @ input_data['W'][{e}])]") for e in range(4)]
    return [
        _builtin("bmm", BMM,
                 {"E0": ("fp32", ["K", "N", "M"], "randn"), "E1": (row, ["K", "M"], "randn")},
                 [("scale_row", ["fp32", row], row, "[input[0] * input[1]]"),
                  ("add_row", row, row, "[state[0] + input[0]]", 0)]),
        _builtin("layernorm", LAYERNORM, {"E0": ("fp32", ["D", "N", "M"], "randn")},
                 [("moments", "fp32", ["fp32", "fp32"], "[state[0] + input[0], state[1] + input[0] * input[0]]", [0, 0]),
                  ("normalise", ["fp32", "fp32", "fp32"], "fp32",
                   "mean = input[1] / D_value\nvar = input[2] / D_value - mean * mean\n"
                   "return [(input[0] - mean) / torch.sqrt(var + 1e-5)]")]),
        _builtin("attention", ATTENTION,
                 {"E0": (row, ["N", "M"], "randn"), "E1": (row, ["K", "M"], "randn"), "E2": (row, ["K", "M"], "randn")},
                 [("dot", [row, row], "fp32", "[(input[0] * input[1]).sum() / math.sqrt(D_value)]"),
                  ("online", ["fp32", row], ["fp32", "fp32", row],
                   "m = torch.maximum(state[0], input[0])\na = torch.exp(state[0] - m)\np = torch.exp(input[0] - m)\n"
                   "return [m, state[1] * a + p, state[2] * a[..., None] + p[..., None] * input[1]]",
                   ["-inf", 0, 0]),
                  ("finish", ["fp32", "fp32", row], row, "[input[2] / input[1][..., None]]")]),
        _builtin("experts", EXPERTS,
                 {"E0": (row, ["N", "M"], "randn"), "E1": ("Multihot(fp32, E)", ["N", "M"], "multihot:0:2")},
                 experts + [("add_row", row, row, "[state[0] + input[0]]", 0)],
                 params=lambda b, gen: {"W": torch.randn(4, b["D"], b["D"], generator=gen) / math.sqrt(b["D"])},
                 global_sizes={"E": 4}),
    ]


def builtin_reference(name: str, inputs: dict, binding: dict, input_data: dict) -> list:
    """Plain torch results of the built-in programs (tests compare against them)."""
    if name == "bmm":
        a, b = inputs["E0"].data, inputs["E1"].data  # (M, N, K), (M, K, D)
        return [a @ b]
    if name == "layernorm":
        x = inputs["E0"].data  # (M, N, D)
        mean = x.mean(-1, keepdim=True)
        var = (x * x).mean(-1, keepdim=True) - mean * mean
        return [(x - mean) / torch.sqrt(var + 1e-5)]
    if name == "attention":
        q, k, v = inputs["E0"].data, inputs["E1"].data, inputs["E2"].data  # (M, N, D), (M, K, D), (M, K, D)
        s = q @ k.transpose(-1, -2) / math.sqrt(binding["D"])
        return [torch.softmax(s, -1) @ v]
    if name == "experts":
        x, idx, w = inputs["E0"].data, inputs["E1"].data, input_data["W"]  # (M, N, D), (M, N, E), (E, D, D)
        outs = torch.stack([torch.tanh(x @ w[e]) for e in range(idx.shape[-1])], -2)  # (M, N, E, D)
        return [(outs * idx[..., None]).sum(-2)]
    raise KeyError(name)


# ---------------------------------------------------------------------------
# timing


def _clone(inputs: dict) -> dict:
    return {n: Stream(s.type, [t.clone() for t in s.data] if isinstance(s.data, list) else s.data.clone())
            for n, s in inputs.items()}


def _agree(a: list, b: list) -> tuple[bool, float]:
    worst, ok = 0.0, len(a) == len(b)
    for x, y in zip(a, b):
        for tx, ty in zip(x.field_tensors(), y.field_tensors()):
            if tx.shape != ty.shape:
                return False, math.inf
            if tx.numel():
                scale = max(1.0, ty.abs().nan_to_num(0.0, posinf=0.0, neginf=0.0).max().item())
                diff = (tx - ty).abs().nan_to_num(0.0).max().item()
                worst = max(worst, diff / scale)
            ok = ok and torch.allclose(tx, ty, rtol=1e-4, atol=1e-4, equal_nan=True)
    return ok, worst


def _to_device(value, device: str):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def time_case(case: Case, sizes: dict, repeats: int, seed: int = 0, device: str = "cpu") -> dict:
    program = parse_program(case.text)
    inputs, fns, binding, input_data = case.build(sizes, seed)
    inputs = {n: Stream(s.type, _to_device(s.data, device)) for n, s in inputs.items()}
    for name, value in list(input_data.items()):  # shared with the fns' namespace: moved in place
        input_data[name] = _to_device(value, device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def run(engine: str, fresh: dict):
        with torch.device(device):
            out = run_program(program, fresh, fns, dict(binding), engine=engine)
        sync()
        return out

    run("vectorised", _clone(inputs))  # warm-up: fns learn whether they vmap
    best = math.inf
    for _ in range(repeats):
        fresh = _clone(inputs)  # a copy per run, made outside the timing (the oracle's inputs are not copied either)
        t0 = time.perf_counter()
        vec = run("vectorised", fresh)
        best = min(best, time.perf_counter() - t0)
    fresh = _clone(inputs)
    t0 = time.perf_counter()
    nai = run("naive", fresh)
    naive_s = time.perf_counter() - t0
    ok, worst = _agree(vec, nai)
    return {"naive": naive_s, "vectorised": best, "ok": ok, "worst": worst,
            "oracle": time_oracle(case, sizes, repeats, seed)}


class KernelRecorder(TorchDispatchMode):
    """Records every kernel dispatched inside it: (op, args, kwargs, result)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.calls.append((func, args, kwargs, out))
        return out


def record_kernels(call: Callable[[], Any]) -> list[tuple]:
    """The kernels `call()` dispatches, in order, with their arguments and results."""
    recorder = KernelRecorder()
    with recorder:
        call()
    return recorder.calls


def replay_kernels(calls: list[tuple]) -> list:
    """Run recorded kernels again on their recorded arguments; their new results."""
    return [func(*args, **kwargs) for func, args, kwargs, _ in calls]


def time_replay(calls: list[tuple], repeats: int, device: str = "cpu") -> float:
    """Best of `repeats` back-to-back replays of `calls` (after a warm-up)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    replay_kernels(calls)
    sync()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for func, args, kwargs, _ in calls:
            func(*args, **kwargs)
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def replay_case(case: Case, sizes: dict, repeats: int, seed: int = 0, device: str = "cpu") -> dict:
    """Kernel counts and replay times of a program's vectorised run and of its oracle."""
    program = parse_program(case.text)
    inputs, fns, binding, input_data = case.build(sizes, seed)
    inputs = {n: Stream(s.type, _to_device(s.data, device)) for n, s in inputs.items()}
    for name, value in list(input_data.items()):
        input_data[name] = _to_device(value, device)

    def vectorised():
        with torch.device(device):
            run_program(program, _clone(inputs), fns, dict(binding), engine="vectorised")

    vectorised()  # warm: what fns learn on their first call is not part of a run
    calls = record_kernels(vectorised)
    out = {"kernels": len(calls), "replay": time_replay(calls, repeats, device)}
    if case.oracle is not None:
        oracle = case.oracle(sizes, seed)
        oracle()
        oracle_calls = record_kernels(oracle)
        out.update(oracle_kernels=len(oracle_calls), oracle_replay=time_replay(oracle_calls, repeats, device))
    return out


def time_oracle(case: Case, sizes: dict, repeats: int, seed: int = 0) -> Optional[float]:
    """Best of `repeats` runs (after a warm-up) of the task's own torch oracle on the same inputs."""
    if case.oracle is None:
        return None
    call = case.oracle(sizes, seed)
    call()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t0)
    return best


def _label(sizes: dict) -> str:
    return " ".join(f"{k}={sizes[k]}" for k in ("M", "N", "K", "D"))


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="vectorised runs to take the best of (after a warm-up)")
    parser.add_argument("--tasks", default="published",
                        help="a split (published, new, all) or comma-separated task keys and globs (default: published)")
    parser.add_argument("--only", default=None, help="only programs whose name contains this")
    parser.add_argument("--builtin", action="store_true", help="use the built-in programs even if the benchmark loads")
    parser.add_argument("--sizes", default="default,large", help="comma list of: " + ", ".join(SIZES))
    parser.add_argument("--device", default="cpu", help="where both engines run: cpu, cuda, cuda:1, ...")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available")

    from stepforge.errors import ConfigError

    try:
        cases, source = ([], "--builtin given") if args.builtin else benchmark_cases(args.tasks)
    except ConfigError as exc:
        parser.error(str(exc))  # exits 2 with the usage and the message
    if not cases:
        cases = builtin_cases()
        print(f"programs: built-in representative set (bmm, layernorm, attention, experts); {source}")
    else:
        print(f"programs: {source}")
    if args.only:
        cases = [c for c in cases if args.only in c.name]
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"vectorised = best of {args.repeats} after a warm-up")

    totals = {}
    for size_name in args.sizes.split(","):
        sizes = SIZES[size_name.strip()]
        print()
        print(f"== {_label(sizes)}")
        print(f"{'program':32s} {'naive s':>9s} {'vectorised s':>13s} {'speedup':>9s} {'oracle s':>9s}  check")
        tn = tv = 0.0
        to = tvo = 0.0  # oracle time, and vectorised time over the programs that have an oracle
        replay = {"kernels": 0, "replay": 0.0, "oracle_kernels": 0, "oracle_replay": 0.0}  # over those too
        skipped, ratios = [], []
        for case in cases:
            try:
                r = time_case(case, sizes, args.repeats, device=args.device)
            except (SimulatorError, ValueError, RuntimeError) as exc:
                msg = getattr(exc, "message", None) or str(exc)
                skipped.append(case.name)
                print(f"{case.name:32s} {'-':>9s} {'-':>13s} {'-':>9s}  skipped: {type(exc).__name__}: {msg.splitlines()[0][:90]}")
                continue
            tn += r["naive"]
            tv += r["vectorised"]
            if r["oracle"] is not None:
                to += r["oracle"]
                tvo += r["vectorised"]
                for k, v in replay_case(case, sizes, args.repeats, device=args.device).items():
                    replay[k] += v
            ratios.append(r["naive"] / r["vectorised"])
            check = "ok" if r["ok"] else f"MISMATCH (max rel diff {r['worst']:.2e})"
            oracle = f"{r['oracle']:9.4f}" if r["oracle"] is not None else f"{'-':>9s}"
            print(f"{case.name:32s} {r['naive']:9.3f} {r['vectorised']:13.4f} {r['naive'] / r['vectorised']:8.1f}x "
                  f"{oracle}  {check}")
            sys.stdout.flush()
        geomean = math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else float("nan")
        print(f"{'total':32s} {tn:9.3f} {tv:13.4f} {tn / tv if tv else float('nan'):8.1f}x  (geometric mean of "
              f"per-program speedups {geomean:.1f}x)" + (f"  ({len(skipped)} skipped: {', '.join(skipped)})" if skipped else ""))
        totals[size_name.strip()] = (sizes, tn, tv, to, tvo, replay)
    sizes, tn, tv, to, tvo, replay = totals.get("large", list(totals.values())[-1])
    ratio = f"{tvo / to:.2f}x" if to > 0 else "no oracles"
    floor = f"{replay['replay'] / to:.2f}x the oracles' time" if to > 0 else "no oracles"
    print(f"kernel replay: vectorised {replay['kernels']} kernels in {replay['replay']:.4f}s, oracles "
          f"{replay['oracle_kernels']} kernels in {replay['oracle_replay']:.4f}s ({floor})")
    print(f"vectorised {tvo:.4f}s, oracles {to:.4f}s at {_label(sizes)} ({ratio})")
    print(f"speedup {tn / tv:.1f}x at {_label(sizes)} (naive {tn:.3f}s, vectorised {tv:.3f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Speed and memory of every registered estimator, as ratios measured in one run.

For each estimator of ``rtrl_jax.registered()`` (with default options; RFLO with ``leak=0.9``), each cell
(tanh RNN = ``nn.SimpleCell``, ``nn.GRUCell``) and each hidden size ``n``, a jitted ``lax.scan`` of
``T`` full online training steps (``estimator.step`` then ``estimator.grad`` of a cotangent) is
compiled and timed (``T = --steps`` for exact RTRL, KF and OK; ``T = --fast-steps`` for the ``O(P)``
estimators and for BPTT, whose steps are so short that a call's fixed cost would dominate ten; their
short calls are timed best of at least 20, the others best of ``--repeats``).
Recorded per row: per-step time, compile time, FLOPs per step (exact RTRL: the ``2 P S²`` of the
``D·J`` product; others: XLA's cost analysis of one step), the fraction of the
matmul rate measured in the same run (on the product ``(P × S)·(S × S)`` of the same shape, and on a
square 1024 matmul), peak memory from ``compiled.memory_analysis()`` against the trace size, whether
any ``P × P`` array appears in the compiled HLO, and the ratio to one BPTT step (forward + backward
of the same cell). Then: fitted exponent of time against ``n``, batch throughput of exact RTRL
(tanh RNN, n = 32 and 64, against one batched matmul of the same shapes), and exact RTRL
against a plain NumPy implementation of the textbook recursion (explicit Kronecker product), and
exact RTRL's ``row_blocks`` trade of speed for peak memory at the largest ``n``.

Usage::

    python benchmarks/speed_memory.py                       # defaults: a few minutes on 2 CPU cores
    python benchmarks/speed_memory.py --large               # adds n = 256/512 where it makes sense
    python benchmarks/speed_memory.py --estimators rtrl uoro --sizes 64 128 --json out.json

The backend is whatever JAX selects (``JAX_PLATFORMS`` picks it: CPU, GPU or TPU).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import sys
import time
from pathlib import Path

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rtrl_jax as rj  # noqa: E402

INPUT = 8
CELLS = {"tanh": lambda n: nn.SimpleCell(n), "gru": lambda n: nn.GRUCell(n)}
# Options for estimators that need one with these cells (RFLO's leak α = 1 - 1/τ, here τ = 10).
OPTIONS = {"rflo": {"leak": 0.9}}
# O(P)-per-step estimators, timed over --fast-steps steps.
FAST = ("uoro", "snap", "rflo", "tbptt")
DTYPE = jnp.float32


def _best_time(fn, *args, repeats):
    jax.block_until_ready(fn(*args))
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def matmul_rate(rows, inner, cols, batch=1, repeats=5):
    """FLOP/s of ``batch`` (rows × inner)·(inner × cols) float32 products (one batched matmul for
    ``batch > 1``), jitted, on the default device."""
    lead = (batch,) if batch > 1 else ()
    a = jax.random.normal(jax.random.PRNGKey(0), (*lead, rows, inner), DTYPE)
    b = jax.random.normal(jax.random.PRNGKey(1), (*lead, inner, cols), DTYPE)
    seconds = _best_time(jax.jit(jnp.matmul), a, b, repeats=repeats)
    return 2.0 * batch * rows * inner * cols / seconds


def _nbytes(tree):
    return sum(int(np.prod(np.shape(x))) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _peak(compiled):
    m = compiled.memory_analysis()
    if m is None:
        return None
    return int(
        m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    )


def _has_pp_array(hlo_text, num_params):
    """Whether the HLO holds an array with two dimensions of at least ``num_params``."""
    for dims in re.findall(r"[fsu]\d+\[([\d,]+)\]", hlo_text):
        sizes = [int(d) for d in dims.split(",") if d]
        if sum(s >= num_params for s in sizes) >= 2:
            return True
    return False


def _problem(cell_name, n, batch, cells=CELLS):
    core = rj.from_linen(cells[cell_name](n), INPUT)
    params, carry = core.init(jax.random.PRNGKey(0), DTYPE)
    carries = jax.tree.map(lambda c: jnp.broadcast_to(c, (batch, *c.shape)), carry)
    return core, params, carry, carries


def _train_scan(core, estimator, params, steps, batch):
    """A jitted function running ``steps`` online training steps over ``batch`` streams."""

    def one(trace, carry, x, key, w):
        carry, out, trace = estimator.step(trace, params, carry, x, key=key)
        carry_bar = rj.carry_cotangent(core, carry, w * out)
        grads = estimator.grad(trace, params, carry_bar)
        trace = estimator.observe(trace, params, carry_bar)  # learning from the loss (DNI) is timed too
        return trace, carry, grads

    def scan(traces, carries, xs, keys, ws, step_fn):
        def body(state, inputs):
            traces, carries, acc = state
            traces, carries, grads = step_fn(traces, carries, *inputs)
            acc = jax.tree.map(lambda a, g: a + g, acc, grads)
            return (traces, carries, acc), None

        acc = jax.tree.map(jnp.zeros_like, params)
        (traces, carries, acc), _ = jax.lax.scan(body, (traces, carries, acc), (xs, keys, ws))
        return traces, carries, acc

    def run(traces, carries, xs, keys, ws):
        if batch == 1:
            # One stream: the batch axis is dropped outside the scan, so the step sees the shapes
            # a single-stream user has (a squeeze/expand inside it cost XLA:CPU extra passes).
            inputs = jax.tree.map(lambda a: a[:, 0], (xs, keys, ws))
            traces, carries, acc = scan(*jax.tree.map(lambda a: a[0], (traces, carries)), *inputs, one)
            return *jax.tree.map(lambda a: a[None], (traces, carries)), acc

        def batched(*args):
            traces, carries, grads = jax.vmap(one)(*args)
            return traces, carries, jax.tree.map(lambda g: g.sum(0), grads)

        return scan(traces, carries, xs, keys, ws, batched)

    return jax.jit(run, donate_argnums=(0,))


def bench_estimator(name, cell_name, n, batch, steps, repeats, **options):
    core, params, carry, carries = _problem(cell_name, n, batch)
    estimator = rj.make_estimator(name, core, **{**OPTIONS.get(name, {}), **options})
    keys0 = jax.random.split(jax.random.PRNGKey(1), batch)
    init = jax.vmap(lambda c, k: estimator.init(params, c, key=k))
    traces = init(carries, keys0)
    xs = jax.random.normal(jax.random.PRNGKey(2), (steps, batch, INPUT), DTYPE)
    keys = jax.random.split(jax.random.PRNGKey(3), (steps, batch))
    ws = jax.random.normal(jax.random.PRNGKey(4), (steps, batch, n), DTYPE)
    fn = _train_scan(core, estimator, params, steps, batch)
    start = time.perf_counter()
    compiled = fn.lower(traces, carries, xs, keys, ws).compile()
    compile_s = time.perf_counter() - start

    def call():
        return compiled(init(carries, keys0), carries, xs, keys, ws)

    jax.block_until_ready(call())
    best = math.inf
    for _ in range(repeats):
        fresh = init(carries, keys0)
        jax.block_until_ready(fresh)
        start = time.perf_counter()
        jax.block_until_ready(compiled(fresh, carries, xs, keys, ws))
        best = min(best, time.perf_counter() - start)
    step_s = best / steps

    num_params = core.num_params
    size = core.carry_size
    single = jax.tree.map(lambda t: t[0], traces)
    trace_bytes = _nbytes(single) * batch
    if name == "rtrl":
        flops = 2.0 * num_params * size * size * batch
    else:
        step1 = jax.jit(lambda tr, c, x, k: estimator.step(tr, params, c, x, key=k))
        cost = step1.lower(single, carry, xs[0, 0], keys[0, 0]).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops = float(cost.get("flops", float("nan"))) * batch if cost else float("nan")
    peak = _peak(compiled)
    return {
        "estimator": name,
        "cell": cell_name,
        "n": n,
        "batch": batch,
        "params": num_params,
        "carry": size,
        "step_s": step_s,
        "stream_steps_per_s": batch / step_s,
        "compile_s": compile_s,
        "flops_per_step": flops,
        "flop_rate": flops / step_s,
        "trace_bytes": trace_bytes,
        "peak_bytes": peak,
        "peak_over_trace": None if peak is None or not trace_bytes else peak / trace_bytes,
        "pp_array_in_hlo": _has_pp_array(compiled.as_text(), num_params),
    }


def bptt_step_time(cell_name, n, steps, repeats):
    """Seconds per step of BPTT (forward + backward through a scan) for the same cell."""
    core, params, carry, _ = _problem(cell_name, n, 1)
    xs = jax.random.normal(jax.random.PRNGKey(2), (steps, INPUT), DTYPE)
    ws = jax.random.normal(jax.random.PRNGKey(4), (steps, n), DTYPE)

    def loss(p):
        _, outs = rj.unroll(core, p, carry, xs)
        return jnp.sum(outs * ws)

    return _best_time(jax.jit(jax.grad(loss)), params, repeats=repeats) / steps


def numpy_rtrl_peer(n, steps, repeats=3, seed=0):
    """Textbook exact RTRL for h_t = tanh(W [h_{t-1}; x_t; 1]) in NumPy (float32).

    ``J`` (``S × P``, ``P = n (n + INPUT + 1)``, parameters ``vec(W)`` row-major) follows
    ``J_t = D_t J_{t-1} + I_t`` with ``D_t = diag(1 - h_t²) W_h`` and the immediate Jacobian written
    with an explicit Kronecker product ``I_t = diag(1 - h_t²) (I_n ⊗ z_tᵀ)``, ``z_t = [h_{t-1}; x_t; 1]``.
    Returns seconds per step.
    """
    rng = np.random.default_rng(seed)
    width = n + INPUT + 1
    w = (rng.standard_normal((n, width)) / np.sqrt(width)).astype(np.float32)
    xs = rng.standard_normal((steps, INPUT)).astype(np.float32)
    eye = np.eye(n, dtype=np.float32)
    best = math.inf
    for _ in range(repeats):
        h = np.zeros(n, np.float32)
        jac = np.zeros((n, n * width), np.float32)
        start = time.perf_counter()
        for t in range(steps):
            z = np.concatenate([h, xs[t], np.ones(1, np.float32)])
            h = np.tanh(w @ z)
            gain = (1.0 - h * h)[:, None]
            dynamics = gain * w[:, :n]
            immediate = gain * np.kron(eye, z[None, :])
            jac = dynamics @ jac + immediate
        best = min(best, time.perf_counter() - start)
    return best / steps


def fit_exponent(ns, times):
    if len(ns) < 2:
        return None
    slope, _ = np.polyfit(np.log(ns), np.log(times), 1)
    return float(slope)


def _buildable(name):
    core, _, _, _ = _problem("tanh", 8, 1)
    try:
        rj.make_estimator(name, core, **OPTIONS.get(name, {}))
    except (ValueError, TypeError) as e:
        return str(e)
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--estimators", nargs="*", default=None, help="default: all registered")
    parser.add_argument("--sizes", nargs="*", type=int, default=None, help="hidden sizes n")
    parser.add_argument("--large", action="store_true", help="add n = 256 (RTRL) and 512 (others)")
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--steps", type=int, default=10, help="scan length for exact RTRL, KF and OK")
    parser.add_argument(
        "--fast-steps",
        type=int,
        default=100,
        help="scan length for the O(P) estimators and BPTT (a call's fixed cost is spread over it)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default="benchmarks/results/speed_memory.json")
    parser.add_argument("--markdown", default="benchmarks/results/speed_memory.md")
    args = parser.parse_args(argv)

    names = args.estimators or [info.name for info in rj.registered()]
    skipped = {}
    for name in list(names):
        reason = _buildable(name)
        if reason:
            skipped[name] = reason
            names.remove(name)

    def sizes_for(name):
        if args.sizes:
            return args.sizes
        if name == "rtrl":
            return [32, 64, 128, 256] if args.large else [32, 64, 128]
        return [64, 128, 256, 512] if args.large else [64, 128, 256]

    square = 1024
    square_rate = matmul_rate(square, square, square)
    rows = []
    for name in names:
        for cell_name in CELLS:
            for n in sizes_for(name):
                steps, repeats = (
                    (args.fast_steps, max(args.repeats, 20)) if name in FAST else (args.steps, args.repeats)
                )
                row = bench_estimator(name, cell_name, n, 1, steps, repeats)
                if name == "rtrl":
                    row["matmul_rate_same_shape"] = matmul_rate(row["params"], row["carry"], row["carry"])
                    row["fraction_of_same_shape_matmul"] = row["flop_rate"] / row["matmul_rate_same_shape"]
                row["fraction_of_square_matmul"] = row["flop_rate"] / square_rate
                rows.append(row)
                print(json.dumps(row), flush=True)

    bptt = {}
    for cell_name in CELLS:
        for n in sorted({r["n"] for r in rows}):
            bptt[f"{cell_name}/{n}"] = bptt_step_time(cell_name, n, args.fast_steps, max(args.repeats, 20))
    for row in rows:
        row["over_bptt_step"] = row["step_s"] / bptt[f"{row['cell']}/{row['n']}"]

    exponents = {}
    for name in names:
        for cell_name in CELLS:
            sel = [r for r in rows if r["estimator"] == name and r["cell"] == cell_name]
            exponents[f"{name}/{cell_name}"] = fit_exponent([r["n"] for r in sel], [r["step_s"] for r in sel])

    memory_rows = []
    if "rtrl" in names:
        n = max(sizes_for("rtrl"))
        for cell_name in CELLS:
            for blocks in (1, 2, 4, 8):
                row = bench_estimator("rtrl", cell_name, n, 1, args.steps, args.repeats, row_blocks=blocks)
                row["row_blocks"] = blocks
                row["matmul_rate_same_shape"] = matmul_rate(row["params"], row["carry"], row["carry"])
                row["fraction_of_same_shape_matmul"] = row["flop_rate"] / row["matmul_rate_same_shape"]
                memory_rows.append(row)
                print(json.dumps(row), flush=True)

    batch_rows = []
    if "rtrl" in names:
        for n, batch in ((n, b) for n in (32, 64) for b in args.batches):
            row = bench_estimator("rtrl", "tanh", n, batch, args.steps, args.repeats)
            row["matmul_rate_same_shape"] = matmul_rate(row["params"], row["carry"], row["carry"], batch)
            row["fraction_of_same_shape_matmul"] = row["flop_rate"] / row["matmul_rate_same_shape"]
            row["fraction_of_square_matmul"] = row["flop_rate"] / square_rate
            batch_rows.append(row)
            print(json.dumps(row), flush=True)

    peers = []
    if "rtrl" in names:
        for n in (32, 64, 128):
            match = [r for r in rows if r["estimator"] == "rtrl" and r["cell"] == "tanh" and r["n"] == n]
            ours = match[0] if match else bench_estimator("rtrl", "tanh", n, 1, args.steps, args.repeats)
            numpy_s = numpy_rtrl_peer(n, steps=max(args.steps // 2, 3))
            peers.append(
                {
                    "n": n,
                    "rtrl_jax_step_s": ours["step_s"],
                    "numpy_step_s": numpy_s,
                    "speedup": numpy_s / ours["step_s"],
                }
            )
            print(json.dumps(peers[-1]), flush=True)

    result = {
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.default_backend(),
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": platform.processor(),
        "command": " ".join(["python", "benchmarks/speed_memory.py", *(argv or sys.argv[1:])]),
        "dtype": "float32",
        "steps": args.steps,
        "fast_steps": args.fast_steps,
        "square_matmul": {"size": square, "flop_rate": square_rate},
        "rows": rows,
        "bptt_step_s": bptt,
        "exponents": exponents,
        "row_blocks": memory_rows,
        "batch": batch_rows,
        "numpy_peer": peers,
        "skipped": skipped,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    md = markdown(result)
    Path(args.markdown).write_text(md)
    print(md)


def _fmt(x, spec):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown(result):
    lines = [
        f"device: {result['device']} ({result['platform']}), jax {result['jax']}, "
        f"flax {result['flax']}, numpy {result['numpy']}, python {result['python']}; float32; "
        f"square {result['square_matmul']['size']} matmul: "
        f"{result['square_matmul']['flop_rate'] / 1e9:.1f} GFLOP/s",
        "",
        "| estimator | cell | n | P | step ms | compile s | GFLOP/s | ×same-shape mm | ×square mm "
        "| peak/trace | P×P in HLO | ×BPTT step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['estimator']} | {r['cell']} | {r['n']} | {r['params']} | {r['step_s'] * 1e3:.3f} "
            f"| {r['compile_s']:.2f} | {_fmt(r['flop_rate'] / 1e9, '.1f')} "
            f"| {_fmt(r.get('fraction_of_same_shape_matmul'), '.2f')} "
            f"| {_fmt(r['fraction_of_square_matmul'], '.2f')} | {_fmt(r['peak_over_trace'], '.2f')} "
            f"| {'yes' if r['pp_array_in_hlo'] else 'no'} | {r['over_bptt_step']:.1f} |"
        )
    lines += ["", "| estimator/cell | fitted exponent of step time vs n |", "|---|---|"]
    for k, v in result["exponents"].items():
        lines.append(f"| {k} | {_fmt(v, '.2f')} |")
    if result["row_blocks"]:
        lines += [
            "",
            "| exact RTRL: cell | n | row_blocks | step ms | ×same-shape mm | peak/trace |",
            "|---|---|---|---|---|---|",
        ]
        for r in result["row_blocks"]:
            lines.append(
                f"| {r['cell']} | {r['n']} | {r['row_blocks']} | {r['step_s'] * 1e3:.3f} "
                f"| {r['fraction_of_same_shape_matmul']:.2f} | {_fmt(r['peak_over_trace'], '.2f')} |"
            )
    if result["batch"]:
        lines += [
            "",
            "| exact RTRL, tanh: n | batch | stream-steps/s | GFLOP/s | ×same-shape batched mm "
            "| ×square mm | traces MB |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in result["batch"]:
            lines.append(
                f"| {r['n']} | {r['batch']} | {r['stream_steps_per_s']:.0f} | {r['flop_rate'] / 1e9:.1f} "
                f"| {_fmt(r.get('fraction_of_same_shape_matmul'), '.2f')} "
                f"| {_fmt(r.get('fraction_of_square_matmul'), '.2f')} | {r['trace_bytes'] / 1e6:.1f} |"
            )
    if result["numpy_peer"]:
        lines += [
            "",
            "| tanh RNN n | rtrl_jax step ms | NumPy textbook (kron) step ms | NumPy / rtrl_jax |",
            "|---|---|---|---|",
        ]
        for p in result["numpy_peer"]:
            lines.append(
                f"| {p['n']} | {p['rtrl_jax_step_s'] * 1e3:.3f} | {p['numpy_step_s'] * 1e3:.3f} "
                f"| {p['speedup']:.1f} |"
            )
    if result["skipped"]:
        lines += ["", "Skipped (do not build with default options):"]
        lines += [f"- {k}: {v}" for k, v in result["skipped"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""rtrl_jax against its peers, side by side in one run: per-step time of online training.

Every system trains the tanh RNN of ``benchmarks/peers/problem.py`` (same weights, same inputs and
cotangents, drawn from a seed with NumPy), float32, batch 1, and is timed per online training step
(forward step, trace update, gradient of the step loss ``½ Σ w_t ⊙ h_t²`` from its cotangent
``w_t ⊙ h_t``, accumulated) for each algorithm it offers among exact RTRL, UORO, KF-RTRL, SnAp-1 and RFLO:

- rtrl_jax, in this process: the jitted ``lax.scan`` of ``speed_memory._train_scan`` (RFLO with
  ``leak = RFLO_LEAK``; KF-RTRL with ``joint=True``, one Kronecker factor ``u ⊗ A`` per
  pre-activation with ``u`` over ``[x; h; 1]``, the algorithm of the peers and of Mujika et al.
  2018), ``--steps`` steps per call for exact RTRL and KF, ``--fast-steps`` for the others, best of
  ``--repeats`` calls, each from a fresh trace; and rows no peer runs (``VARIANTS``: rtrl_jax's
  default KF-RTRL, one factor per Dense kernel with the bias tracked exactly, ``kf-per-kernel``);
- each peer, by its timing driver ``benchmarks/peers/time_<peer>.py`` run as a subprocess by the
  peer's own virtual environment (``benchmarks/peers/setup.sh`` creates them): braintrace on its
  own jitted scan, the PyTorch ``sketched-rtrl`` and the NumPy ``vanilla-rtrl`` reference
  implementations in their own Python loops, with the same steps and repeats.

The run is ``--sweeps`` sweeps of (rtrl_jax, then every peer), so each peer's figure has an
rtrl_jax figure taken next to it; each ratio ``peer / rtrl_jax`` is taken within a sweep, and the
table gives the range over sweeps. Target: rtrl_jax faster than every peer (every ratio > 1).
Every system gets ``--threads`` threads (OMP/MKL/OpenBLAS variables, torch's thread count; with
fewer threads than cores the whole run is pinned to that many cores, which XLA's pool follows).

Check: the deterministic algorithms (exact RTRL, SnAp-1, RFLO) also report their accumulated
gradient over ``--check-steps`` steps at ``--check-n`` units; each is compared with a reference
(exact RTRL: ``jax.grad`` through a ``lax.scan`` of the same loss, float32; SnAp-1 and RFLO:
rtrl_jax's) by the largest absolute difference over the largest reference entry.

Usage::

    bash benchmarks/peers/setup.sh                  # once: the peers' clones and virtual environments
    python benchmarks/peers.py                      # n ∈ {32, 64, 128, 256}, 2 sweeps
    python benchmarks/peers.py --sizes 32 --repeats 1 --sweeps 1 --peers vanilla-rtrl --out /tmp/p.md
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "peers"))
import _report  # noqa: E402
from common import DETERMINISTIC, PEERS_DIR, SLOW, add_run_options, step_seconds  # noqa: E402
from problem import INPUT, RFLO_LEAK, gradient_rows, tanh_rnn  # noqa: E402
from speed_memory import _train_scan  # noqa: E402

import rtrl_jax as rj  # noqa: E402

PEERS = ("braintrace", "sketched-rtrl", "vanilla-rtrl")
ALGORITHMS = ("rtrl", "uoro", "kf", "snap", "rflo")
# rtrl_jax's options for the algorithms the peers run: KF-RTRL as theirs, one factor per pre-activation.
OPTIONS = {"rflo": {"leak": RFLO_LEAK}, "kf": {"joint": True}}
# Rows of rtrl_jax alone, each timed when its algorithm is and tabled after it: row -> (algorithm, options).
VARIANTS = {"kf-per-kernel": ("kf", {})}
ROWS = tuple(r for a in ALGORITHMS for r in (a, *(v for v, (base, _) in VARIANTS.items() if base == a)))
# Largest |difference| over the largest |reference| entry at which two float32 gradients agree.
AGREE = 1e-4


def _params(problem):
    return {
        "h": {"kernel": jnp.asarray(problem["w_rec"].T)},
        "i": {"kernel": jnp.asarray(problem["w_in"].T), "bias": jnp.asarray(problem["bias"])},
    }


def _rows(params):
    return gradient_rows(
        np.asarray(params["h"]["kernel"]).T,
        np.asarray(params["i"]["kernel"]).T,
        np.asarray(params["i"]["bias"]),
    )


def _algorithm(row):
    """The algorithm of table row ``row`` and rtrl_jax's options for it."""
    return VARIANTS.get(row, (row, OPTIONS.get(row, {})))


def rtrl_jax_run(name, problem, steps):
    """``run()``: ``steps`` online steps of table row ``name`` (an algorithm or a variant) from a fresh
    trace, in one jitted scan; returns the accumulated gradient rows."""
    n = problem["w_rec"].shape[0]
    core = rj.from_linen(nn.SimpleCell(n), INPUT)
    params = _params(problem)
    algorithm, options = _algorithm(name)
    estimator = rj.make_estimator(algorithm, core, **options)
    carry = jnp.zeros((1, n), jnp.float32)
    keys0 = jax.random.split(jax.random.PRNGKey(1), 1)
    init = jax.jit(jax.vmap(lambda c, k: estimator.init(params, c, key=k)))
    xs = jnp.asarray(problem["xs"])[:steps, None]
    ws = jnp.asarray(problem["ws"])[:steps, None]
    keys = jax.random.split(jax.random.PRNGKey(3), (steps, 1))
    scan = _train_scan(core, estimator, params, steps, 1)

    def run():
        traces = jax.block_until_ready(init(carry, keys0))
        _, _, grads = jax.block_until_ready(scan(traces, carry, xs, keys, ws))
        return _rows(grads)

    return run


def bptt_rows(problem):
    """The float32 BPTT gradient of ``Σ_t ½ Σ w_t ⊙ h_t²`` (``jax.grad`` through ``lax.scan``)."""
    n = problem["w_rec"].shape[0]
    core = rj.from_linen(nn.SimpleCell(n), INPUT)
    xs, ws = jnp.asarray(problem["xs"]), jnp.asarray(problem["ws"])

    def loss(params):
        _, outs = rj.unroll(core, params, jnp.zeros(n, jnp.float32), xs)
        return 0.5 * jnp.sum(ws * outs**2)

    return _rows(jax.grad(loss)(_params(problem)))


def sweep_rtrl_jax(args):
    names = [r for r in ROWS if _algorithm(r)[0] in args.algorithms]
    rows = [
        {
            "algorithm": name,
            "n": n,
            # A timed call makes its fresh trace and runs the scan, as every peer's makes its state.
            "step_s": step_seconds(
                partial(rtrl_jax_run, name),
                n,
                args.steps if _algorithm(name)[0] in SLOW else args.fast_steps,
                args.repeats,
                args.seed,
                warmup=1,
            ),
        }
        for name in names
        for n in args.sizes
    ]
    problem = tanh_rnn(args.check_n, args.check_steps, args.seed)
    check = {
        name: rtrl_jax_run(name, problem, args.check_steps)().tolist()
        for name in args.algorithms
        if name in DETERMINISTIC
    }
    return {"system": "rtrl_jax", "rows": rows, "check": check}


def peer_command(peer, args):
    python = args.peers_dir / f"venv-{peer}" / "bin" / "python"
    script = HERE / "peers" / f"time_{peer.replace('-', '_')}.py"
    options = ["--sizes", *map(str, args.sizes), "--algorithms", *args.algorithms]
    for flag in ("steps", "fast_steps", "repeats", "check_n", "check_steps", "seed"):
        options += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return [str(python), str(script), *options]


def sweep_peer(peer, args, env):
    done = subprocess.run(peer_command(peer, args), capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{peer} driver failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def thread_environment(threads):
    """The environment of every process of the run: ``threads`` threads for each library."""
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    return env


def _span(values, spec):
    lo, hi = min(values), max(values)
    return format(lo, spec) if format(lo, spec) == format(hi, spec) else f"{lo:{spec}}–{hi:{spec}}"


def compare(sweeps, check, peers):
    """Per (algorithm, n): each system's ms per step over sweeps, each peer's ratio to rtrl_jax within
    each sweep, and whether rtrl_jax is faster than every peer in every sweep. ``sweeps`` is a list
    of ``{system: result}``; ``check`` maps algorithm to ``{system: gradient rows}`` with the
    reference under ``"reference"``."""
    table = []
    ours = [{(r["algorithm"], r["n"]): r["step_s"] for r in s["rtrl_jax"]["rows"]} for s in sweeps]
    for key in sorted(ours[0], key=lambda k: (ROWS.index(k[0]), k[1])):
        row = {"algorithm": key[0], "n": key[1], "rtrl_jax_ms": [o[key] * 1e3 for o in ours], "peers": {}}
        for peer in peers:
            theirs = [{(r["algorithm"], r["n"]): r["step_s"] for r in s[peer]["rows"]} for s in sweeps]
            if key in theirs[0]:
                row["peers"][peer] = {
                    "ms": [t[key] * 1e3 for t in theirs],
                    "ratio": [t[key] / o[key] for t, o in zip(theirs, ours, strict=True)],
                }
        row["target_1"] = bool(row["peers"]) and all(min(p["ratio"]) > 1 for p in row["peers"].values())
        table.append(row)
    checks = []
    for name, systems in check.items():
        reference = np.asarray(systems["reference"])
        scale = np.abs(reference).max()
        for system, grad in systems.items():
            if system != "reference":
                error = float(np.abs(np.asarray(grad) - reference).max() / scale)
                checks.append({"algorithm": name, "system": system, "error": error, "agrees": error <= AGREE})
    return table, checks


def markdown(table, checks, peers, check_reference):
    header = "| algorithm | n | rtrl_jax ms | " + " | ".join(f"{p} ms | {p} / rtrl_jax" for p in peers)
    lines = [
        header + " | target 1 |",
        "|---|---|---|" + "---|---|" * len(peers) + "---|",
    ]
    for row in table:
        cells = []
        for peer in peers:
            p = row["peers"].get(peer)
            cells += [_span(p["ms"], ".3f"), _span(p["ratio"], ".2f")] if p else ["–", "–"]
        verdict = "yes" if row["target_1"] else ("no peer" if not row["peers"] else "**no**")
        lines.append(
            f"| {row['algorithm']} | {row['n']} | {_span(row['rtrl_jax_ms'], '.3f')} | "
            + " | ".join(cells)
            + f" | {verdict} |"
        )
    held = [r for r in table if r["target_1"]]
    compared = [r for r in table if r["peers"]]
    lines += [
        "",
        f"Target 1 (rtrl_jax faster than every peer in every sweep): {len(held)} of {len(compared)} rows"
        " with a peer.",
    ]
    for row in table:
        for peer, p in row["peers"].items():
            if min(p["ratio"]) <= 1:
                lines.append(
                    f"- missed: {row['algorithm']}, n = {row['n']}: {peer} takes {_span(p['ratio'], '.2f')}× "
                    f"rtrl_jax's time (rtrl_jax up to {1 / min(p['ratio']):.2f}× slower)"
                )
    lines += [
        "",
        f"Same quantity: accumulated gradient over the check run against the reference ({check_reference});"
        f" error = max |g − ref| / max |ref|, agrees at ≤ {AGREE:g}.",
        "",
        "| algorithm | system | error | agrees |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {c['algorithm']} | {c['system']} | {c['error']:.1e} | {'yes' if c['agrees'] else '**no**'} |"
        for c in checks
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = _report.parser(__doc__)
    parser.add_argument("--peers", nargs="*", default=list(PEERS))
    parser.add_argument("--peers-dir", type=Path, default=PEERS_DIR)
    parser.add_argument("--sweeps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    add_run_options(parser).set_defaults(out=Path("benchmarks/results/peers.md"), algorithms=list(ALGORITHMS))
    args = parser.parse_args(argv)

    env = thread_environment(args.threads) | {"PEERS_DIR": str(args.peers_dir)}
    os.environ.update({k: env[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    cores = len(os.sched_getaffinity(0))
    if args.threads < cores:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])

    sweeps = []
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    for index in range(args.sweeps):
        results = {"rtrl_jax": sweep_rtrl_jax(args)}
        for peer in args.peers:
            results[peer] = sweep_peer(peer, args, env)
        sweeps.append(results)
        print(f"sweep {index + 1}: {time.perf_counter() - start:.0f} s", flush=True)
        # Written after every sweep, so a run stopped early leaves the sweeps it finished.
        report(args, argv, sweeps, cores, time.perf_counter() - start, load_before)


def report(args, argv, sweeps, cores, seconds, load_before):
    """Checks the gradients of the first sweep, tabulates ``sweeps`` and writes ``args.out``."""
    problem = tanh_rnn(args.check_n, args.check_steps, args.seed)
    check = {}
    for name in (a for a in args.algorithms if a in DETERMINISTIC):
        systems = {s: r["check"][name] for s, r in sweeps[0].items() if name in r["check"]}
        reference = bptt_rows(problem).tolist() if name == "rtrl" else systems.pop("rtrl_jax")
        check[name] = {"reference": reference, **systems}
    table, checks = compare(sweeps, check, args.peers)
    versions = {peer: sweeps[0][peer]["versions"] for peer in args.peers}
    notes = {peer: sweeps[0][peer]["notes"] for peer in args.peers}
    details = (
        f"float32, batch 1, {args.threads} threads for every system on {cores} cores "
        f"({platform.processor() or platform.machine()}), {len(sweeps)} of {args.sweeps} sweeps, "
        f"{seconds:.0f} s in all; 1-min load average {load_before:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after; peers: "
        + "; ".join(f"{p} ({', '.join(f'{k} {v}' for k, v in versions[p].items())})" for p in args.peers)
    )
    env_line = _report.environment(details)
    reference = "exact RTRL: float32 jax.grad through lax.scan; SnAp-1, RFLO: rtrl_jax's"
    md = markdown(table, checks, args.peers, reference)
    md += "\n\n" + "\n".join(f"- {p}: {notes[p]}" for p in args.peers)
    _report.write(args.out, "peers.py", argv, env_line, md)
    if args.out is not None:
        record = {
            "environment": env_line,
            "threads": args.threads,
            "versions": versions,
            "table": table,
            "checks": checks,
            "sweeps": [
                {s: {k: v for k, v in r.items() if k != "check"} for s, r in sweep.items()}
                for sweep in sweeps
            ],
        }
        args.out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    print(md)


if __name__ == "__main__":
    main()

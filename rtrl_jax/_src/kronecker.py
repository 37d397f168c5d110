"""Kronecker-factored influence traces for any Flax linen cell built from Dense layers.

Shared machinery of KF-RTRL (:mod:`rtrl_jax._src.kf_rtrl`) and r-OK (:mod:`rtrl_jax._src.ok`).

Every ``flax.linen.Dense`` layer ``z = a W (+ b)`` applied once inside a cell step, with input
``a ∈ R^in`` and kernel ``W ∈ R^{in×out}``, has the immediate influence

    ∂h_t/∂W[i, j] = a_i · G_t[:, j],      G_t = ∂h_t/∂z ∈ R^{S×out},

a single Kronecker product ``a ⊗ G``. With ``J_W`` the influence of ``W`` on the ``S`` carry
units (a tensor ``S × in × out``), the exact recursion ``J_W ← D_t J_W + a_t ⊗ G_t`` keeps a
Kronecker-sum form: if ``J_W = Σ_q u_q ⊗ A_q`` (``u_q ∈ R^in``, ``A_q ∈ R^{S×out}``, meaning
``J_W[s, i, j] = Σ_q u_q[i] A_q[s, j]``) then

    D_t J_W + a_t ⊗ G_t = Σ_q u_q ⊗ (D_t A_q) + a_t ⊗ G_t,

``r + 1`` terms from ``r``. ``D_t A_q`` is the cell's tangent map in the carry applied to the
``out`` columns of ``A_q`` (one JVP each). KF-RTRL (``r = 1``) and r-OK differ only in how they
reduce the ``r + 1`` terms back to ``r`` unbiasedly; that reduction is their ``reduce`` function.
Reverse KF-RTRL (:mod:`rtrl_jax._src.reverse_kf`) keeps the factors the other way round
(``reverse=True``: ``u`` over the output index, ``A`` over the input index).

The Dense layers are found with ``flax.linen.intercept_methods``: the interceptor records each
Dense's input ``a`` and adds a zero perturbation to its output ``z``; one reverse pass per carry
unit (``jax.vjp`` vmapped over the carry basis) then gives ``G`` for every kernel together with
the exact immediate Jacobian of all remaining parameters. Those (biases, element-wise weights,
kernels of layers applied more than once or to non-vector inputs, parameters of non-Dense layers)
are tracked exactly as dense rows ``(P_other, S)``, as in exact RTRL but only for themselves.

Memory per kernel is ``r (in + S·out)``, so ``O(r n²)`` for an ``n``-unit cell; a dense
``S × P`` trace is never formed. Each ``A_q`` is stored transposed, ``(out, S)``: its rows are carry
tangents, which ``D_t`` maps with no transposition, and ``vec(A_q)`` is a contiguous row for the
reductions' QR factorisations. ``D_t`` is applied with one JVP per stored row, or, for cells whose
JVP costs several ``S × S`` products (a GRU's three hidden kernels, counted by
:func:`carry_jvp_matvecs`), by forming ``D_t`` once and multiplying, whichever costs fewer FLOPs.

**Serialised linear algebra.** In a program compiled for CPU the kernels' reductions run one after
the other when they call LAPACK (r-OK's QR factorisations; :func:`after`: a data dependency on the
previous kernel's result), as do the QR factorisations inside one r-OK reduction; GPU and TPU
programs carry no such dependency, nor do reductions without LAPACK calls (KF-RTRL's merge). On CPU,
jaxlib's batched LAPACK kernels (under ``jax.vmap``: a batch of streams or of keys) split their
batch over XLA's intra-op thread pool and block until the pieces are done; two such calls started
at once on a two-thread pool each hold a thread and wait forever for the other (seen as a hang
with jaxlib 0.10.2 on two cores: both pool threads parked in ``OrthogonalQr``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from rtrl_jax._src.base import Estimator, after
from rtrl_jax._src.registry import unsupported_message

ReduceFn = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


class DenseKernel(NamedTuple):
    """A Dense kernel tracked in Kronecker form.

    Attributes:
      path: the Dense module's path in the cell (its kernel is ``params[*path]["kernel"]``).
      in_size: the kernel's input size (``u`` factors have this size).
      out_size: the kernel's output size (``A`` factors are ``S × out_size``).
    """

    path: tuple[str, ...]
    in_size: int
    out_size: int


class KroneckerLayout(NamedTuple):
    """Which parameter leaves are Kronecker-factored kernels and which are tracked exactly.

    Attributes:
      kernels: the factored Dense kernels.
      kernel_leaves: for each kernel, the index of its leaf in ``jax.tree.leaves(params)``.
      other_leaves: indices of the leaves tracked exactly.
    """

    kernels: tuple[DenseKernel, ...]
    kernel_leaves: tuple[int, ...]
    other_leaves: tuple[int, ...]


class KroneckerState(NamedTuple):
    """Trace of a Kronecker-sum estimator (KF-RTRL is rank 1, r-OK rank r).

    For kernel ``k``: ``J_k ≈ Σ_q u[k][q] ⊗ a[k][q]``.

    Attributes:
      u: per kernel, ``(r, in)`` input-side factors (``(r, out)`` output-side factors for reverse
        KF-RTRL).
      a: per kernel, ``(r, out, S)`` carry-side factors, stored transposed (``a[k][q] = A_qᵀ``):
        each row is a carry tangent, so ``D_t`` acts on the rows with no transposition
        (``(r, in, S)`` for reverse KF-RTRL).
      exact: ``(P_other, S)`` exact influence of the parameters that are not factored kernels
        (in the order of ``ravel_pytree`` of those leaves).
    """

    u: tuple[jax.Array, ...]
    a: tuple[jax.Array, ...]
    exact: jax.Array


def _is_linen_module(module: Any) -> bool:
    try:
        import flax.linen as nn
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, nn.Module)


def _is_dense_call(context: Any) -> bool:
    import flax.linen as nn

    return isinstance(context.module, nn.Dense) and context.method_name == "__call__"


def _key_name(key: Any) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return key


def _dense_calls(core: Any) -> dict[tuple[str, ...], list[tuple[tuple[int, ...], tuple[int, ...]]]]:
    """Every Dense call of one step of the cell: path -> [(input shape, output shape), ...]."""
    import flax.linen as nn

    calls: dict[tuple[str, ...], list] = {}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if _is_dense_call(context):
            calls.setdefault(tuple(context.module.path), []).append(
                (tuple(jnp.shape(args[0])), tuple(jnp.shape(out)))
            )
        return out

    def run(params, carry, x):
        with nn.intercept_methods(interceptor):
            return core.apply(params, carry, x)

    x = jax.ShapeDtypeStruct(tuple(core.input_shape), jnp.float32)
    jax.eval_shape(run, core.params_spec, core.carry_spec, x)
    return calls


def kronecker_layout(core: Any) -> KroneckerLayout:
    """Finds the Dense kernels of ``core``'s linen cell that can be factored.

    A kernel is factored when its Dense layer is applied exactly once per step to a vector input;
    every other parameter leaf is tracked exactly.
    """
    calls = _dense_calls(core)
    paths_leaves = jax.tree_util.tree_flatten_with_path(core.params_spec)[0]
    leaf_index = {tuple(_key_name(k) for k in path): i for i, (path, _) in enumerate(paths_leaves)}
    kernels, kernel_leaves = [], []
    for path, uses in calls.items():
        index = leaf_index.get((*path, "kernel"))
        if index is None or len(uses) != 1:
            continue
        (in_shape, out_shape) = uses[0]
        kernel_shape = tuple(paths_leaves[index][1].shape)
        if len(in_shape) != 1 or len(out_shape) != 1 or kernel_shape != (in_shape[0], out_shape[0]):
            continue
        kernels.append(DenseKernel(path, in_shape[0], out_shape[0]))
        kernel_leaves.append(index)
    other = tuple(i for i in range(len(paths_leaves)) if i not in set(kernel_leaves))
    return KroneckerLayout(tuple(kernels), tuple(kernel_leaves), other)


def unsupported_reason(core: Any) -> str | None:
    """Why Kronecker-factored estimators cannot serve ``core``, or ``None`` when they can."""
    module = getattr(core, "module", None)
    if module is None or not _is_linen_module(module):
        kind = "no module" if module is None else f"a {type(module).__module__} module"
        return (
            f"it needs a flax.linen cell whose Dense kernels it can factor (the core has {kind};"
            " build it with rtrl_jax.from_linen)"
        )
    try:
        layout = kronecker_layout(core)
    except Exception as error:  # noqa: BLE001 - any failure to trace the cell is a reason
        return f"its cell could not be traced for Dense layers ({type(error).__name__}: {error})"
    if not layout.kernels:
        return (
            f"the cell {type(module).__name__} has no flax.linen.Dense layer applied once per step"
            " to a vector input, so there is no Kronecker factor to track"
        )
    return None


def check_supported(core: Any, estimator_name: str) -> None:
    """Raises ``ValueError`` naming the core and the estimators that can serve it."""
    reason = unsupported_reason(core)
    if reason is not None:
        raise ValueError(unsupported_message(estimator_name, core, reason))


class _Linearized(NamedTuple):
    carry: Any
    out: Any
    dynamics: Callable[[jax.Array], jax.Array]  # flat carry tangent -> flat carry tangent
    inputs: tuple[jax.Array, ...]  # per kernel, the Dense input a_t
    outer_grads: tuple[jax.Array, ...]  # per kernel, G_tᵀ = (∂h_t/∂z)ᵀ, (out, S)
    immediate_other: jax.Array  # (P_other, S)


class _Split(NamedTuple):
    kernels: list
    other: list  # the leaves tracked exactly
    other_flat: jax.Array
    rebuild: Callable[[list, jax.Array], Any]  # (kernel leaves, flat other) -> params
    rebuild_leaves: Callable[[list, list], Any]  # (kernel leaves, other leaves) -> params


def _split(layout: KroneckerLayout, params: Any) -> _Split:
    leaves, treedef = jax.tree.flatten(params)
    kernels = [leaves[i] for i in layout.kernel_leaves]
    other = [leaves[i] for i in layout.other_leaves]
    other_flat, unravel_other = ravel_pytree(other)

    def rebuild_leaves(kernel_leaves, other_leaves):
        new = list(leaves)
        for i, leaf in zip(layout.kernel_leaves, kernel_leaves, strict=True):
            new[i] = leaf
        for i, leaf in zip(layout.other_leaves, other_leaves, strict=True):
            new[i] = leaf
        return treedef.unflatten(new)

    def rebuild(kernel_leaves, flat_other):
        return rebuild_leaves(kernel_leaves, unravel_other(flat_other))

    return _Split(kernels, other, other_flat, rebuild, rebuild_leaves)


def _linearize(core: Any, layout: KroneckerLayout, params: Any, carry: Any, x: Any) -> _Linearized:
    import flax.linen as nn

    split = _split(layout, params)
    flat_carry, unravel_carry = ravel_pytree(carry)
    index = {kernel.path: k for k, kernel in enumerate(layout.kernels)}
    dtype = jnp.result_type(flat_carry, *jax.tree.leaves(params))

    def apply(other, perturbations, h):
        captured = [None] * len(layout.kernels)

        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if _is_dense_call(context) and tuple(context.module.path) in index:
                k = index[tuple(context.module.path)]
                captured[k] = args[0]
                out = out + perturbations[k].astype(out.dtype)
            return out

        with nn.intercept_methods(interceptor):
            new_carry, out = core.apply(split.rebuild_leaves(split.kernels, other), unravel_carry(h), x)
        return ravel_pytree(new_carry)[0], (new_carry, out, tuple(captured))

    zeros = tuple(jnp.zeros((kernel.out_size,), dtype) for kernel in layout.kernels)
    new_flat, immediate_vjp, (new_carry, out, inputs) = jax.vjp(
        lambda o, z: apply(o, z, flat_carry), split.other, zeros, has_aux=True
    )
    size = new_flat.size
    other_rows, outer_grads = jax.vmap(immediate_vjp, out_axes=-1)(jnp.eye(size, dtype=new_flat.dtype))
    # The exact rows leaf by leaf, joined once: differentiating the flat vector instead had XLA
    # write their concatenation and then read it again, transposed, in the trace update.
    immediate_other = jnp.concatenate(
        [rows.reshape(-1, size) for rows in other_rows] or [jnp.zeros((0, size), new_flat.dtype)]
    )
    _, dynamics = jax.linearize(lambda h: apply(split.other, zeros, h)[0], flat_carry)
    return _Linearized(new_carry, out, dynamics, inputs, outer_grads, immediate_other)


def carry_jvp_matvecs(core: Any) -> float:
    """How many ``S × S`` matrix-vector products one JVP of the cell in its carry costs: the FLOPs
    of the tangent map (XLA's count for the JVP minus the step's own) over ``2 S²``. A tanh RNN
    has about 1, a GRU about 3 (its three hidden kernels); ``nan`` when XLA reports no count."""
    flat_spec = jax.eval_shape(lambda carry: ravel_pytree(carry)[0], core.carry_spec)
    x_spec = jax.ShapeDtypeStruct(tuple(core.input_shape), flat_spec.dtype)

    def step(params, carry, x):
        return core.apply(params, carry, x)

    def carry_jvp(params, carry, x, tangent):
        flat, unravel = ravel_pytree(carry)
        return jax.jvp(lambda h: ravel_pytree(core.apply(params, unravel(h), x)[0])[0], (flat,), (tangent,))

    def flops(fn, *specs):
        lowered = jax.jit(fn).lower(*specs)
        try:
            cost = lowered.cost_analysis()
        except NotImplementedError:  # a backend without XLA's cost analysis
            return float("nan")
        cost = cost[0] if isinstance(cost, list) else cost
        return float((cost or {}).get("flops", float("nan")))

    specs = (core.params_spec, core.carry_spec, x_spec)
    return (flops(carry_jvp, *specs, flat_spec) - flops(step, *specs)) / (2.0 * flat_spec.size**2)


def reverse_immediate(
    inputs: jax.Array, outer_grad: jax.Array, signs: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The immediate term ``a_t ⊗ G_t`` as one reverse Kronecker product, unbiasedly.

    ``G_t[s, j] = Σ_l G_t[s, l] E[ν_l ν_j]`` for independent uniform signs ``ν ∈ {±1}^out``, so
    ``J[s, i, j] = a_i (G_t ν)_s ν_j`` (``u = ν``, ``A = (G_t ν) ⊗ a_t`` over the input index) has
    mean ``a_t ⊗ G_t``.

    Args:
      inputs: ``(in,)`` the Dense input ``a_t``.
      outer_grad: ``(out, S)`` ``G_tᵀ``.
      signs: ``(out,)`` the signs ``ν``.

    Returns:
      ``(u, A)`` of shapes ``(out,)`` and ``(in, S)`` (``A`` stored transposed, rows carry tangents).
    """
    return signs, inputs[:, None] * (signs @ outer_grad)[None, :]


def kronecker_estimator(
    core: Any, *, rank: int, reduce: ReduceFn, name: str, reverse: bool = False, serialise: bool = False
) -> Estimator:
    """An estimator that keeps ``rank`` Kronecker terms per Dense kernel of ``core``'s cell.

    Args:
      core: a :class:`~rtrl_jax.Core` from :func:`~rtrl_jax.from_linen`.
      rank: the number ``r`` of Kronecker terms kept per kernel.
      reduce: ``(u (r+1, in), a (r+1, out, S), key) -> (u (r, in), a (r, out, S))``, an unbiased
        reduction of ``r + 1`` terms (the ``r`` propagated ones, then the immediate one) to ``r``.
      name: the estimator's name for error messages.
      reverse: factor each kernel the other way round, ``J_W[s, i, j] ≈ Σ_q A_q[s, i] u_q[j]``
        (``u_q`` over the output index, ``A_q`` over the input index), with the immediate term
        entering as :func:`reverse_immediate` (its signs drawn from each kernel's key).
      serialise: ``reduce`` calls LAPACK, so on CPU each kernel's reduction waits for the previous
        one's result (module docstring); a reduction of element-wise work and norms runs free.

    Returns:
      An :class:`~rtrl_jax.Estimator` whose trace is a :class:`KroneckerState`; ``step`` needs
      ``key=`` (a ``jax.random`` key).
    """
    check_supported(core, name)
    layout = kronecker_layout(core)
    num_kernels = len(layout.kernels)
    # D_t acts on every stored row: r·out per kernel, and the exactly tracked parameters. With c
    # matrix-vector products per carry JVP, forming D_t once (c S³) and multiplying (rows · S²)
    # beats c JVPs per row (c · rows · S²) when rows (c - 1) > c S (a GRU; never a tanh RNN).
    size = core.carry_size
    leaves = jax.tree.leaves(core.params_spec)
    rows = rank * sum(k.in_size if reverse else k.out_size for k in layout.kernels)
    rows += sum(int(leaves[i].size) for i in layout.other_leaves)
    matvecs = carry_jvp_matvecs(core)
    explicit_dynamics = bool(rows * (matvecs - 1) > matvecs * size)  # False when matvecs is nan

    def init(params, carry, *, key=None):
        del key
        flat_carry, _ = ravel_pytree(carry)
        split = _split(layout, params)
        dtype = jnp.result_type(flat_carry, *jax.tree.leaves(params))
        size = flat_carry.size
        sides = [(k.out_size, k.in_size) if reverse else (k.in_size, k.out_size) for k in layout.kernels]
        u = tuple(jnp.zeros((rank, u_size), dtype) for u_size, _ in sides)
        a = tuple(jnp.zeros((rank, a_size, size), dtype) for _, a_size in sides)
        return KroneckerState(u, a, jnp.zeros((split.other_flat.size, size), dtype))

    def step(trace, params, carry, x, *, key=None):
        if key is None:
            raise ValueError(f"{name}.step needs a random key: step(..., key=key).")
        lin = _linearize(core, layout, params, carry, x)
        # D_t applied to every stored carry-side row: the rows of A (out, S) are carry tangents.
        if explicit_dynamics:
            dynamics_t = jax.vmap(lin.dynamics)(jnp.eye(size, dtype=trace.exact.dtype))  # row i: D e_i

            def propagate(tangents):
                return tangents @ dynamics_t

        else:
            propagate = jax.vmap(lin.dynamics)
        keys = jax.random.split(key, max(num_kernels, 1))
        new_u, new_a = [], []
        previous = ()
        for k in range(num_kernels):
            a = trace.a[k]
            moved = propagate(a.reshape(-1, a.shape[-1])).reshape(a.shape)
            reduce_key, u_new, a_new = keys[k], lin.inputs[k], lin.outer_grads[k]
            if reverse:
                reduce_key, sign_key = jax.random.split(keys[k])
                signs = jax.random.rademacher(sign_key, (layout.kernels[k].out_size,), dtype=a.dtype)
                u_new, a_new = reverse_immediate(u_new.astype(a.dtype), a_new.astype(a.dtype), signs)
            u_stack = jnp.concatenate([trace.u[k], u_new[None].astype(trace.u[k].dtype)])
            a_stack = jnp.concatenate([moved, a_new[None].astype(a.dtype)])
            if serialise:  # one kernel's reduction after the other (module docstring)
                u_stack, a_stack = after((u_stack, a_stack), previous)
            u_k, a_k = reduce(u_stack, a_stack, reduce_key)
            previous = (u_k, a_k)
            new_u.append(u_k)
            new_a.append(a_k)
        exact = propagate(trace.exact) + lin.immediate_other.astype(trace.exact.dtype)
        return lin.carry, lin.out, KroneckerState(tuple(new_u), tuple(new_a), exact)

    def grad(trace, params, carry_bar):
        split = _split(layout, params)
        c = ravel_pytree(carry_bar)[0].astype(trace.exact.dtype)
        contraction = "qj,qis,s->ij" if reverse else "qi,qjs,s->ij"
        kernels = [
            jnp.einsum(contraction, u, a, c).astype(w.dtype)
            for u, a, w in zip(trace.u, trace.a, split.kernels, strict=True)
        ]
        other = (trace.exact @ c).astype(split.other_flat.dtype)
        return split.rebuild(kernels, other)

    return Estimator(init, step, grad)

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

**Joint factors** (``joint=True``). Kernels whose outputs are summed before anything else touches
them, ``z = a_1 W_1 + a_2 W_2 + b``, feed one pre-activation and share ``G_t``; their joined
influence is then one Kronecker product over the stacked input ``[a_1; a_2; 1]`` (the ``1`` stands
for the bias ``b``), ``J ≈ Σ_q u_q ⊗ A_q`` with ``u_q`` over the stacked input and one ``A_q`` for the
group, as in Mujika et al. 2018's KF-RTRL (``u`` over ``[x; h; 1]`` for the tanh RNN). One ``D_t A``
product per group replaces one per kernel plus the bias's ``out`` exact rows. The groups are found
from one concrete probe of the cell outside any trace (random parameters, carry and input;
:func:`shared_pre_activations`): kernels whose ``G`` are bitwise equal, finite and not all zero on
the probe form a group, and each Dense's own bias joins its kernel's group (a constant input 1 in
``u``). A kernel that shares ``G`` with no other forms a group with its bias alone, so a cell whose
kernels all feed different pre-activations keeps one factor per kernel; a kernel without bias in
such a cell has exactly the per-kernel factor. Flax's cells give: ``SimpleCell`` one group
``(i, h, i.bias)``; ``GRUCell`` ``(ir, hr, ir.bias)``, ``(iz, hz, iz.bias)``, ``(in, in.bias)`` and
``(hn, hn.bias)`` (``hn``'s output is multiplied by the reset gate before it meets ``in``'s);
``LSTMCell`` one group per gate, ``(ii, hi, hi.bias)`` etc.; ``MGUCell`` ``(if, hf, if.bias)``,
``(in, in.bias)`` and ``hn`` (with its bias when the cell has a reset gate). The joint trace is
more constrained than the per-kernel one (``r`` terms for the whole group instead of ``r`` per
kernel, the biases no longer exact) and cheaper.

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
import numpy as np
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


class KroneckerFactor(NamedTuple):
    """One Kronecker factor of the trace (``Σ_q u_q ⊗ A_q``) and the parameters it stands for.

    Attributes:
      kernels: indices into :attr:`KroneckerLayout.kernels` of the Dense kernels that feed the
        factor's pre-activation; their inputs are stacked in ``u`` in this order.
      bias_leaves: leaf indices (in ``jax.tree.leaves(params)``) of those kernels' Dense biases,
        whose constant input 1 follows the kernels' inputs in ``u``.
      in_size: the size of ``u``: the kernels' input sizes plus one per bias.
      out_size: the pre-activation's size (``A`` is ``S × out_size``).
    """

    kernels: tuple[int, ...]
    bias_leaves: tuple[int, ...]
    in_size: int
    out_size: int


class KroneckerLayout(NamedTuple):
    """Which parameter leaves are Kronecker-factored kernels and which are tracked exactly.

    Attributes:
      kernels: the factored Dense kernels.
      kernel_leaves: for each kernel, the index of its leaf in ``jax.tree.leaves(params)``.
      other_leaves: indices of the leaves tracked exactly.
      factors: the Kronecker factors: one per kernel, or with ``joint=True`` one per group of
        kernels feeding the same pre-activation, with their biases.
    """

    kernels: tuple[DenseKernel, ...]
    kernel_leaves: tuple[int, ...]
    other_leaves: tuple[int, ...]
    factors: tuple[KroneckerFactor, ...]

    @property
    def factored_leaves(self) -> tuple[int, ...]:
        """The leaves the factors stand for, factor by factor, in the order of their ``u`` rows."""
        return tuple(
            leaf
            for factor in self.factors
            for leaf in (*(self.kernel_leaves[k] for k in factor.kernels), *factor.bias_leaves)
        )


class KroneckerState(NamedTuple):
    """Trace of a Kronecker-sum estimator (KF-RTRL is rank 1, r-OK rank r).

    For factor ``k`` (``KroneckerLayout.factors``: a Dense kernel, or a group of them with
    their biases): ``J_k ≈ Σ_q u[k][q] ⊗ a[k][q]``.

    Attributes:
      u: per factor, ``(r, in)`` input-side factors (``(r, out)`` output-side factors for reverse
        KF-RTRL).
      a: per factor, ``(r, out, S)`` carry-side factors, stored transposed (``a[k][q] = A_qᵀ``):
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


def kronecker_layout(core: Any, *, joint: bool = False) -> KroneckerLayout:
    """Finds the Dense kernels of ``core``'s linen cell that can be factored, and their factors.

    A kernel is factored when its Dense layer is applied exactly once per step to a vector input.
    Without ``joint`` each kernel is one factor and every other parameter leaf (biases included) is
    tracked exactly. With ``joint`` the kernels that feed the same pre-activation share a factor
    with their biases (module docstring; found by :func:`shared_pre_activations`).
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
    factors = tuple(
        KroneckerFactor((k,), (), kernel.in_size, kernel.out_size) for k, kernel in enumerate(kernels)
    )
    layout = _with_factors(
        KroneckerLayout(tuple(kernels), tuple(kernel_leaves), (), factors), len(paths_leaves)
    )
    if not joint:
        return layout
    joint_factors = []
    for group in shared_pre_activations(core, layout):
        biases = tuple(
            leaf_index[bias] for bias in ((*kernels[k].path, "bias") for k in group) if bias in leaf_index
        )
        in_size = sum(kernels[k].in_size for k in group) + len(biases)
        joint_factors.append(KroneckerFactor(tuple(group), biases, in_size, kernels[group[0]].out_size))
    return _with_factors(layout._replace(factors=tuple(joint_factors)), len(paths_leaves))


def _with_factors(layout: KroneckerLayout, num_leaves: int) -> KroneckerLayout:
    """``layout`` with every leaf its factors do not stand for tracked exactly."""
    factored = set(layout.factored_leaves)
    return layout._replace(other_leaves=tuple(i for i in range(num_leaves) if i not in factored))


def shared_pre_activations(core: Any, layout: KroneckerLayout) -> list[list[int]]:
    """The kernels of ``layout`` grouped by the pre-activation they feed: indices into
    ``layout.kernels``, groups in the order of their first kernel.

    Kernels feed the same pre-activation exactly when their ``G_t = ∂h_t/∂z`` are the same function
    (their outputs are summed before anything else reads them). One concrete probe of the cell
    decides it, outside any trace, on random parameters, carry and input (each leaf standard normal
    over the square root of its first dimension, the input standard normal): kernels whose ``G``
    on the probe are bitwise equal (the sum's reverse pass hands each summand the same cotangent),
    finite and not all zero form a group. A kernel whose ``G`` is not finite or all zero on the
    probe, which then tells nothing, stays in a group of its own.
    """
    rng = np.random.default_rng(0)

    def draw(spec):  # standard normal over √(the first dimension): pre-activations of order one
        scale = 1.0 / np.sqrt(spec.shape[0]) if spec.shape else 1.0
        return (scale * rng.standard_normal(spec.shape)).astype(spec.dtype)

    params, carry = jax.tree.map(draw, (core.params_spec, core.carry_spec))
    x = rng.standard_normal(tuple(core.input_shape)).astype(np.float32)
    # One compiled program: run op by op, the probe would compile each small operation on its own.
    with jax.ensure_compile_time_eval():
        probe = jax.jit(
            lambda p, c, x: _linearize(core, layout, p, c, x).outer_grads,
            compiler_options={"xla_backend_optimization_level": 0},
        )
        outer = [np.asarray(g) for g in probe(params, carry, x)]
    groups: list[list[int]] = []
    for k, g in enumerate(outer):
        informative = bool(np.all(np.isfinite(g)) and np.any(g != 0))
        group = next((group for group in groups if informative and np.array_equal(outer[group[0]], g)), None)
        if group is None:
            groups.append([k])
        else:
            group.append(k)
    return groups


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
    inputs: tuple[jax.Array, ...]  # per factor, its stacked input: Dense inputs a_t, a 1 per bias
    outer_grads: tuple[jax.Array, ...]  # per factor, G_tᵀ = (∂h_t/∂z)ᵀ, (out, S)
    immediate_other: jax.Array  # (P_other, S)


class _Split(NamedTuple):
    factored: list  # the leaves the factors stand for (KroneckerLayout.factored_leaves)
    other: list  # the leaves tracked exactly
    other_flat: jax.Array
    rebuild: Callable[[list, jax.Array], Any]  # (factored leaves, flat other) -> params
    rebuild_leaves: Callable[[list, list], Any]  # (factored leaves, other leaves) -> params


def _split(layout: KroneckerLayout, params: Any) -> _Split:
    leaves, treedef = jax.tree.flatten(params)
    factored_leaves = layout.factored_leaves
    factored = [leaves[i] for i in factored_leaves]
    other = [leaves[i] for i in layout.other_leaves]
    other_flat, unravel_other = ravel_pytree(other)

    def rebuild_leaves(new_factored, other_leaves):
        new = list(leaves)
        for i, leaf in zip(factored_leaves, new_factored, strict=True):
            new[i] = leaf
        for i, leaf in zip(layout.other_leaves, other_leaves, strict=True):
            new[i] = leaf
        return treedef.unflatten(new)

    def rebuild(new_factored, flat_other):
        return rebuild_leaves(new_factored, unravel_other(flat_other))

    return _Split(factored, other, other_flat, rebuild, rebuild_leaves)


def _stacked_input(factor: KroneckerFactor, inputs: tuple[jax.Array, ...]) -> jax.Array:
    """A factor's ``u``-side input: its kernels' Dense inputs, then a 1 per bias."""
    parts = [inputs[k] for k in factor.kernels]
    if factor.bias_leaves:
        parts.append(jnp.ones((len(factor.bias_leaves),), parts[0].dtype))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def tapped_apply(
    core: Any, layout: KroneckerLayout, params: Any, carry: Any, x: Any, perturbations: dict[int, jax.Array]
) -> tuple[Any, Any, tuple[jax.Array, ...]]:
    """One step of ``core``'s linen cell that records the input ``a`` of every Dense kernel of
    ``layout`` and adds ``perturbations[k]`` to kernel ``k``'s output ``z`` (for the ``k`` given).

    Differentiating the new carry with respect to a zero perturbation gives ``∂h_t/∂z`` of that
    kernel (its ``G_t``), with one reverse pass for every kernel together.

    Returns:
      ``(new_carry, out, inputs)``, ``inputs[k]`` the Dense input of kernel ``k``.
    """
    import flax.linen as nn

    index = {kernel.path: k for k, kernel in enumerate(layout.kernels)}
    inputs: list[Any] = [None] * len(layout.kernels)

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        k = index.get(tuple(context.module.path)) if _is_dense_call(context) else None
        if k is None:
            return out
        inputs[k] = args[0]
        return out + perturbations[k].astype(out.dtype) if k in perturbations else out

    with nn.intercept_methods(interceptor):
        new_carry, out = core.apply(params, carry, x)
    return new_carry, out, tuple(inputs)


def _linearize(core: Any, layout: KroneckerLayout, params: Any, carry: Any, x: Any) -> _Linearized:
    split = _split(layout, params)
    flat_carry, unravel_carry = ravel_pytree(carry)
    dtype = jnp.result_type(flat_carry, *jax.tree.leaves(params))

    def apply(other, perturbations, h):
        # G_t is read once per factor, at its first kernel's output: its kernels all share it.
        first = {factor.kernels[0]: z for factor, z in zip(layout.factors, perturbations, strict=True)}
        new_carry, out, captured = tapped_apply(
            core, layout, split.rebuild_leaves(split.factored, other), unravel_carry(h), x, first
        )
        return ravel_pytree(new_carry)[0], (new_carry, out, captured)

    zeros = tuple(jnp.zeros((factor.out_size,), dtype) for factor in layout.factors)
    new_flat, immediate_vjp, (new_carry, out, captured) = jax.vjp(
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
    inputs = tuple(_stacked_input(factor, captured) for factor in layout.factors)
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
    core: Any,
    *,
    rank: int,
    reduce: ReduceFn,
    name: str,
    reverse: bool = False,
    serialise: bool = False,
    joint: bool = False,
) -> Estimator:
    """An estimator that keeps ``rank`` Kronecker terms per Dense kernel (or group) of ``core``'s cell.

    Args:
      core: a :class:`~rtrl_jax.Core` from :func:`~rtrl_jax.from_linen`.
      rank: the number ``r`` of Kronecker terms kept per factor (a kernel, or a joint group).
      reduce: ``(u (r+1, in), a (r+1, out, S), key) -> (u (r, in), a (r, out, S))``, an unbiased
        reduction of ``r + 1`` terms (the ``r`` propagated ones, then the immediate one) to ``r``.
      name: the estimator's name for error messages.
      reverse: factor each kernel the other way round, ``J_W[s, i, j] ≈ Σ_q A_q[s, i] u_q[j]``
        (``u_q`` over the output index, ``A_q`` over the input index), with the immediate term
        entering as :func:`reverse_immediate` (its signs drawn from each kernel's key).
      serialise: ``reduce`` calls LAPACK, so on CPU each kernel's reduction waits for the previous
        one's result (module docstring); a reduction of element-wise work and norms runs free.
      joint: one factor per group of kernels feeding the same pre-activation, with their biases,
        instead of one per kernel (module docstring, :func:`kronecker_layout`).

    Returns:
      An :class:`~rtrl_jax.Estimator` whose trace is a :class:`KroneckerState`; ``step`` needs
      ``key=`` (a ``jax.random`` key).

    Raises:
      ValueError: the core has no factorable kernel, or ``joint`` is not a bool.
    """
    if not isinstance(joint, bool):
        raise ValueError(f"{name}: joint must be True or False, got {joint!r}.")
    check_supported(core, name)
    layout = kronecker_layout(core, joint=joint)
    num_factors = len(layout.factors)
    # D_t acts on every stored row: r·out per factor, and the exactly tracked parameters. With c
    # matrix-vector products per carry JVP, forming D_t once (c S³) and multiplying (rows · S²)
    # beats c JVPs per row (c · rows · S²) when rows (c - 1) > c S (a GRU; never a tanh RNN).
    size = core.carry_size
    leaves = jax.tree.leaves(core.params_spec)
    rows = rank * sum(f.in_size if reverse else f.out_size for f in layout.factors)
    rows += sum(int(leaves[i].size) for i in layout.other_leaves)
    matvecs = carry_jvp_matvecs(core)
    explicit_dynamics = bool(rows * (matvecs - 1) > matvecs * size)  # False when matvecs is nan

    def init(params, carry, *, key=None):
        del key
        flat_carry, _ = ravel_pytree(carry)
        split = _split(layout, params)
        dtype = jnp.result_type(flat_carry, *jax.tree.leaves(params))
        size = flat_carry.size
        sides = [(f.out_size, f.in_size) if reverse else (f.in_size, f.out_size) for f in layout.factors]
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
        keys = jax.random.split(key, max(num_factors, 1))
        new_u, new_a = [], []
        previous = ()
        for k in range(num_factors):
            a = trace.a[k]
            moved = propagate(a.reshape(-1, a.shape[-1])).reshape(a.shape)
            reduce_key, u_new, a_new = keys[k], lin.inputs[k], lin.outer_grads[k]
            if reverse:
                reduce_key, sign_key = jax.random.split(keys[k])
                signs = jax.random.rademacher(sign_key, (layout.factors[k].out_size,), dtype=a.dtype)
                u_new, a_new = reverse_immediate(u_new.astype(a.dtype), a_new.astype(a.dtype), signs)
            u_stack = jnp.concatenate([trace.u[k], u_new[None].astype(trace.u[k].dtype)])
            a_stack = jnp.concatenate([moved, a_new[None].astype(a.dtype)])
            if serialise:  # one factor's reduction after the other (module docstring)
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
        # Each factor's (in, out) gradient, its rows split among the kernels and biases it stands for.
        rows = []
        for factor, u, a in zip(layout.factors, trace.u, trace.a, strict=True):
            sizes = [layout.kernels[k].in_size for k in factor.kernels] + [1] * len(factor.bias_leaves)
            rows += jnp.split(jnp.einsum(contraction, u, a, c), np.cumsum(sizes)[:-1])
        factored = [g.reshape(w.shape).astype(w.dtype) for g, w in zip(rows, split.factored, strict=True)]
        other = (trace.exact @ c).astype(split.other_flat.dtype)
        return split.rebuild(factored, other)

    return Estimator(init, step, grad)

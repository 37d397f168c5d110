"""Low-rank sketched RTRL (SK-RTRL): SnAp-1 plus a rank-``r`` factorisation of what it drops.

The influence ``J_t = dh_t/dθ`` (``S × P``) is kept as

    Ĵ_t = S_t + L_t R_tᵀ,       S_t on SnAp-1's pattern M,  L_t ∈ R^{S×r},  R_t ∈ R^{P×r},

``S_t`` stored as SnAp-1's compressed trace (:mod:`rtrl_jax._src.snap`) and ``R_t`` with
orthonormal (or zero) columns. SnAp-1's pattern keeps, for each parameter ``θ``, the carry entries
of the one unit ``U(θ)`` it moves immediately (units: :func:`rtrl_jax.find_units`), so with
``D̂_t = D_t − blockdiag_units(D_t)`` (the dynamics between different units) one exact step of ``Ĵ`` is

    D_t Ĵ_{t-1} + I_t = S_t + (D_t L_{t-1}) R_{t-1}ᵀ + N_t,
    S_t = (D_t S_{t-1} + I_t) ⊙ M    (SnAp-1's step),     N_t = D̂_t S_{t-1}   (off the pattern).

SnAp-1 drops ``D_t L R_{t-1}ᵀ + N_t``; SK-RTRL keeps its best rank-``r`` approximation:

1. **Pre-projection** to ``c`` directions (option ``append``, default ``c = r``): ``N_t`` has rank
   ``≤ S`` and ``N_t N_tᵀ = D̂_t K D̂_tᵀ`` with ``K = S_{t-1} S_{t-1}ᵀ`` (block-diagonal over units,
   read off the compressed trace); with ``K = V Λ Vᵀ`` the ``S × S`` matrix ``B_0 = D̂_t V Λ^{1/2}``
   has ``B_0 B_0ᵀ = N_t N_tᵀ``, and its SVD gives ``N_t``'s top ``c`` left singular vectors
   ``U_c`` and singular values. ``N_t ≈ U_c Y``, ``Y = U_cᵀ N_t = (D̂_tᵀ U_c)ᵀ S_{t-1}`` (``c`` SnAp
   contractions), discarding ``τ_c = (Σ_{i>c} σ_i(B_0)²)^{1/2}``. With ``c ≥ S`` nothing is discarded
   (``U_c = I``).
2. **Orthogonalise** ``Yᵀ`` against ``R``: ``G = R_{t-1}ᵀ Yᵀ``, ``Yᵀ − R G = Q T`` (thin QR, ``P × c``).
   Then ``D_t L Rᵀ + U_c Y = C [R, Q]ᵀ`` with the small core ``C = [D_t L + U_c Gᵀ, U_c Tᵀ]``
   (``S × (r + c)``) and ``[R, Q]`` orthonormal.
3. **Truncate**: ``C = W Σ Vᵀ`` (SVD), keep the top ``r`` (non-negligible) triplets:
   ``L_t = W_r Σ_r``, ``R_t = [R, Q] V_r``; discarded ``τ_r = (Σ_{i>r} σ_i²)^{1/2}``.

**The bound.** The error ``E_t = J_t − Ĵ_t`` obeys ``E_t = D_t E_{t-1} + Δ_t`` with ``Δ_t`` what the
two truncations discarded, ``‖Δ_t‖_F ≤ η_t = τ_c + τ_r``, so

    ‖J_t − Ĵ_t‖_F ≤ e_t = ‖D_t‖_2 e_{t-1} + η_t,

which the trace carries (``bound``; ``‖D_t‖_2`` is the largest singular value, ``O(S³)``, far
tighter than the Frobenius norm for a dense cell). Where ``‖D_t‖_2 > 1`` the bound grows
geometrically; it saturates at the dtype's largest finite value (still a bound), so a long run never
holds an infinity in its trace (the trainer's non-finite guard would restart it). With ``r = 0``
the whole of ``N_t`` is dropped, ``η_t = ‖N_t‖_F = tr(D̂_t K D̂_tᵀ)^{1/2}``: SnAp-1 itself, with a
running bound on its error.

**The rank knob.** ``r = 0`` is SnAp-1 exactly; ``r ≥ S`` (the carry size, the largest rank of
``J``; with ``c ≥ S``) keeps every direction and is exact RTRL. SK-RTRL is also exact for every
``r`` where SnAp-1 is (element-wise recurrences: ``D̂_t = 0``). It is deterministic.

Cost per step, for ``E`` pattern entries (``P`` for a dense RNN): ``D_t`` by ``S`` JVPs of the cell,
``O(S³)`` for the small eigen/singular value problems, ``O((r + c) E)`` for the contractions and
``O(P (r + c)²)`` for the QR and the new ``R``: ``O(n³ + n² r²)`` for a dense ``n``-unit RNN.
Memory: SnAp-1's trace plus ``r (S + P)``. The LAPACK calls of a step (eigh, SVD, QR, SVD, then
the SVD for ``‖D_t‖_2``) run one after the other, by their data or by :func:`~rtrl_jax._src.base.after`,
so they never run concurrently (see :mod:`rtrl_jax._src.kronecker` on CPU
deadlocks).

Reference: the SK-RTRL method (sketched RTRL, 2026); public code at GitHub
``sonaradarcn/sketched-rtrl`` (``skrtrl/algos.py``). SnAp-1: Menick et al., ICLR 2021,
arXiv:2006.07232.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from rtrl_jax._src.base import Estimator, after
from rtrl_jax._src.registry import register
from rtrl_jax._src.snap import (
    SnapLayout,
    SnapState,
    compressed_values,
    find_units,
    snap,
    snap_is_exact,
    snap_layout,
    snap_unsupported_reason,
    sparsity_patterns,
)


class SketchedState(NamedTuple):
    """Trace of SK-RTRL: ``Ĵ = S + L Rᵀ``.

    Attributes:
      snap: SnAp-1's trace of ``S`` (:class:`~rtrl_jax.SnapState`).
      left: ``(S, r)`` the carry-side factor ``L``.
      right: ``(r, P)`` the parameter-side factor ``Rᵀ`` (flat parameters, ``ravel_pytree``
        order); its rows are orthonormal or zero.
      bound: ``()`` the running bound ``e_t ≥ ‖J_t − Ĵ_t‖_F``.
    """

    snap: SnapState
    left: jax.Array
    right: jax.Array
    bound: jax.Array


class _Pattern(NamedTuple):
    """Static index arrays of SnAp-1's compressed trace that SK-RTRL needs (NumPy)."""

    rows: np.ndarray  # (E,) carry entry of each kept entry
    cols: np.ndarray  # (E,) parameter of each kept entry
    gram_first: np.ndarray  # pairs of entries in one column, for K = S Sᵀ
    gram_second: np.ndarray
    gram_index: np.ndarray  # flat index i * S + j of K for each pair
    off_unit: np.ndarray  # (S, S) 1 where the two carry entries are in different units
    num_params: int


def _pattern(layout: SnapLayout, units: np.ndarray) -> _Pattern:
    size = layout.num_carry
    counts = np.bincount(layout.cols, minlength=layout.num_params)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    first_parts, second_parts = [], []
    for count in np.unique(counts[counts > 0]):
        entries = starts[counts == count][:, None] + np.arange(count)[None]  # (columns, count)
        first_parts.append(np.repeat(entries, count, axis=1).ravel())
        second_parts.append(np.tile(entries, (1, count)).ravel())
    first = np.concatenate(first_parts) if first_parts else np.zeros(0, np.int64)
    second = np.concatenate(second_parts) if second_parts else np.zeros(0, np.int64)
    return _Pattern(
        rows=layout.rows,
        cols=layout.cols,
        gram_first=first,
        gram_second=second,
        gram_index=layout.rows[first] * size + layout.rows[second],
        off_unit=(units[:, None] != units[None, :]).astype(np.float64),
        num_params=layout.num_params,
    )


def _contract(pattern: _Pattern, values: jax.Array, carry_vector: jax.Array) -> jax.Array:
    """``wᵀ S`` (``(P,)``) for ``S`` given by its compressed ``values`` and a carry vector ``w``."""
    return jax.ops.segment_sum(
        carry_vector[pattern.rows] * values,
        pattern.cols,
        num_segments=pattern.num_params,
        indices_are_sorted=True,
    )


def _gram(pattern: _Pattern, values: jax.Array, size: int) -> jax.Array:
    """``K = S Sᵀ`` (``S × S``, block-diagonal over units) from the compressed ``values``."""
    products = values[pattern.gram_first] * values[pattern.gram_second]
    return jax.ops.segment_sum(products, pattern.gram_index, num_segments=size * size).reshape(size, size)


def _dynamics(core: Any, params: Any, carry: Any, x: Any) -> jax.Array:
    """``D_t = ∂h_t/∂h_{t-1}`` (``S × S``) by one JVP per carry entry."""
    flat, unravel = ravel_pytree(carry)
    _, jvp = jax.linearize(lambda h: ravel_pytree(core(params, unravel(h), x)[0])[0], flat)
    return jax.vmap(jvp, out_axes=1)(jnp.eye(flat.size, dtype=flat.dtype))


def _spectral_norm(dynamics: jax.Array, dependencies: Any) -> jax.Array:
    """``‖D‖_2``, the largest singular value, computed once ``dependencies`` are (its SVD must not
    run concurrently with the step's other LAPACK calls)."""
    return jnp.linalg.svd(after(dynamics, dependencies), compute_uv=False)[0]


def _top_directions(off: jax.Array, gram: jax.Array, c: int) -> tuple[jax.Array, jax.Array]:
    """``(U_c, τ_c)``: the top ``c`` left singular vectors of ``N = D̂ S`` (from ``D̂`` and
    ``K = S Sᵀ``) and the Frobenius norm of the rest of ``N``."""
    eigenvalues, vectors = jnp.linalg.eigh(gram)
    b0 = off @ (vectors * jnp.sqrt(jnp.clip(eigenvalues, 0.0)))  # B_0 B_0ᵀ = N Nᵀ
    u, sigma, _ = jnp.linalg.svd(b0, full_matrices=False)
    return u[:, :c], jnp.sqrt(jnp.sum(sigma[c:] ** 2))


def sketch_truncate(
    moved: jax.Array, right: jax.Array, left_new: jax.Array, y: jax.Array, rank: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The best rank-``rank`` approximation of ``moved @ right + left_new @ y``, in factors.

    Args:
      moved: ``(S, r)`` ``D_t L``.
      right: ``(r, P)`` ``Rᵀ``, rows orthonormal or zero.
      left_new: ``(S, c)`` left factor of the new mass.
      y: ``(c, P)`` right factor of the new mass (any rows).
      rank: the rank ``r`` to keep (``≤ S``).

    Returns:
      ``(L, Rᵀ, τ_r)``: ``(S, r)``, ``(r, P)`` with orthonormal or zero rows, and the Frobenius
      norm of what was discarded.
    """
    g = right @ y.T  # (r, c)
    q, t = jnp.linalg.qr(y.T - right.T @ g)  # (P, c), (c, c)
    core = jnp.concatenate([moved + left_new @ g.T, left_new @ t.T], axis=1)  # (S, r + c)
    w, sigma, v_t = jnp.linalg.svd(core, full_matrices=False)
    index = jnp.arange(sigma.shape[0])
    # Singular values at rounding level are dropped (and counted in τ_r): their right vectors
    # may be any unit vectors, which would break the orthonormality of R.
    keep = (index < rank) & (sigma > sigma.shape[0] * jnp.finfo(sigma.dtype).eps * sigma[0])
    tau = jnp.sqrt(jnp.sum(jnp.where(keep, 0.0, sigma**2)))
    left = (w * jnp.where(keep, sigma, 0.0))[:, :rank]
    new_right = (v_t * keep[:, None])[:rank] @ jnp.concatenate([right, q.T], axis=0)
    return left, new_right, tau


def _grown_bound(norm: jax.Array, bound: jax.Array, discarded: jax.Array) -> jax.Array:
    """``e_t = ‖D_t‖_2 e_{t-1} + η_t``, saturating at the largest finite value of its dtype."""
    return jnp.minimum(norm * bound + discarded, jnp.finfo(bound.dtype).max)


def sketched_rtrl(core: Any, rank: int = 1, *, append: int | None = None) -> Estimator:
    """SK-RTRL: SnAp-1 plus a rank-``rank`` factorisation of the rest of the influence, with a bound.

    See the module docstring for the maths: ``Ĵ = S + L Rᵀ``, ``S`` SnAp-1's trace, ``L Rᵀ`` the
    best rank-``r`` approximation of what SnAp-1 drops, truncated every step, and
    ``trace.bound ≥ ‖J_t − Ĵ_t‖_F``.

    Args:
      core: an :class:`~rtrl_jax.Core` (its specs give SnAp-1's pattern, as for
        :func:`~rtrl_jax.snap`).
      rank: ``r ≥ 0``; ``0`` is SnAp-1, ``r ≥ S`` (the carry size) exact RTRL.
      append: ``c ≥ 1``, how many directions of the new off-pattern mass ``N_t`` enter the
        truncation (its top ``c``; ``None``: ``c = r``; ``c ≥ S``: all of it).

    Returns:
      An :class:`~rtrl_jax.Estimator` whose trace is :class:`SketchedState`.

    Raises:
      ValueError: for a negative ``rank`` or an ``append`` below 1.

    Example:
      >>> est = sketched_rtrl(core, rank=4)
      >>> trace = est.init(params, carry)
      >>> carry, out, trace = est.step(trace, params, carry, x)
      >>> grads = est.grad(trace, params, carry_bar)
      >>> trace.bound   # ≥ ‖J_t − Ĵ_t‖_F
    """
    size = int(core.carry_size)
    r, c = _effective_sizes(size, rank, append)
    inner = snap(core, 1)
    layout = snap_layout(core, 1)
    pattern = _pattern(layout, find_units(sparsity_patterns(core).immediate))
    num_params = layout.num_params

    def init(params, carry, *, key=None):
        del key
        trace = inner.init(params, carry)
        dtype = jax.tree.leaves(trace.values)[0].dtype if jax.tree.leaves(trace.values) else jnp.float32
        zeros = jnp.zeros((), dtype)
        return SketchedState(trace, jnp.zeros((size, r), dtype), jnp.zeros((r, num_params), dtype), zeros)

    def step(trace, params, carry, x, *, key=None):
        del key
        dtype = trace.bound.dtype
        values = compressed_values(trace.snap.values, params)  # S_{t-1}, compressed
        dynamics = _dynamics(core, params, carry, x).astype(dtype)
        new_carry, out, snap_trace = inner.step(trace.snap, params, carry, x)
        off = dynamics * jnp.asarray(pattern.off_unit, dtype)  # D̂_t
        gram = _gram(pattern, values, size)
        if r == 0:  # SnAp-1: all of N_t = D̂ S_{t-1} is dropped
            eta = jnp.sqrt(jnp.clip(jnp.sum((off @ gram) * off), 0.0))
            return (
                new_carry,
                out,
                trace._replace(
                    snap=snap_trace, bound=_grown_bound(_spectral_norm(dynamics, ()), trace.bound, eta)
                ),
            )
        if c >= size:  # no pre-projection: N_t = D̂ S_{t-1} as it is
            left_new, tau_c = off, jnp.zeros((), dtype)
            y = jax.vmap(lambda w: _contract(pattern, values, w))(jnp.eye(size, dtype=dtype))
        else:
            left_new, tau_c = _top_directions(off, gram, c)
            y = jax.vmap(lambda w: _contract(pattern, values, w))((off.T @ left_new).T)
        left, right, tau_r = sketch_truncate(dynamics @ trace.left, trace.right, left_new, y, r)
        bound = _grown_bound(_spectral_norm(dynamics, (left, right)), trace.bound, tau_c + tau_r)
        return new_carry, out, SketchedState(snap_trace, left, right, bound)

    def grad(trace, params, carry_bar):
        flat_params, unravel = ravel_pytree(params)
        flat_bar = ravel_pytree(carry_bar)[0].astype(trace.bound.dtype)
        low_rank = unravel(((flat_bar @ trace.left) @ trace.right).astype(flat_params.dtype))
        return jax.tree.map(jnp.add, inner.grad(trace.snap, params, carry_bar), low_rank)

    return Estimator(init, step, grad)


def _effective_sizes(size: int, rank: Any, append: Any) -> tuple[int, int]:
    """``(r, c)`` as used: ``r = min(rank, S)``, ``c = min(append or r, S)``."""
    if isinstance(rank, bool) or not isinstance(rank, int | np.integer) or rank < 0:
        raise ValueError(f"SK-RTRL rank must be an integer >= 0, got {rank!r}.")
    if append is not None and (
        isinstance(append, bool) or not isinstance(append, int | np.integer) or append < 1
    ):
        raise ValueError(f"SK-RTRL append must be None or an integer >= 1, got {append!r}.")
    r = min(int(rank), size)
    return r, min(r if append is None else int(append), size)


def sketched_is_exact(core: Any, rank: int = 1, *, append: int | None = None) -> bool:
    """Whether ``sketched_rtrl(core, rank, append=append)`` is exact RTRL: SnAp-1 is (element-wise
    recurrences), or ``rank`` and the pre-projection ``append`` reach the carry size ``S`` (the
    largest rank of ``J``), so nothing is ever discarded."""
    size = int(core.carry_size)
    r, c = _effective_sizes(size, rank, append)
    return (r >= size and c >= size) or snap_is_exact(core, 1)


register(
    "sketched",
    sketched_rtrl,
    summary="SK-RTRL: SnAp-1 + rank-r truncated factorisation of the rest, with an error bound",
    unsupported_reason=snap_unsupported_reason,
    exact_for=sketched_is_exact,
)

"""SnAp-n: RTRL restricted to the influence entries that a parameter reaches within ``n`` steps.

Menick et al. (2020) keep, of the influence matrix ``J_t = dh_t/dθ``, only a fixed sparsity
pattern ``M_n`` and propagate

    J_t = (I_t + D_t J_{t-1}) ⊙ M_n,        I_t = ∂F/∂θ,  D_t = ∂F/∂h.

**Patterns, found from the cell.** The structural non-zero patterns of ``I`` (``S × P``) and ``D``
(``S × S``) are read off the cell itself, not written per cell type: both Jacobians are evaluated
at a few random points (parameters, carry and input drawn from a normal distribution) and the union
of their non-zeros is taken (:func:`sparsity_patterns`). Entries that are zero by construction
(a masked recurrent weight, a unit that does not read another) are zero at every point; an entry
that is non-zero somewhere is non-zero at a random point with probability one for smooth cells.
(Cells with exact zero regions, such as ReLU, need more probes: ``num_probes``.)

**Units.** SnAp is defined on units. A unit may hold several carry entries: the ``(c_k, h_k)`` of
an LSTM, or the real and imaginary parts of a complex LRU state. Units are found automatically as
the groups of carry entries linked by a shared parameter in ``I``'s pattern (``units="auto"``):
for a GRU or a vanilla RNN every entry is its own unit, for an LSTM the pair ``(c_k, h_k)`` is,
for a complex diagonal recurrence ``(Re h_k, Im h_k)`` is. ``units="entries"`` keeps every carry
entry separate, or pass an integer array of unit ids per flat carry entry.

**Masks.** On units, ``M_1`` is the pattern of ``I`` (unit ``k`` kept for parameter ``θ`` when
``θ`` moves unit ``k`` immediately) and ``M_n = M_1 ∪ D̂ M_{n-1}`` (``D̂`` the unit-level pattern of
``D``: unit ``k`` reads unit ``l``), i.e. the units ``θ`` reaches within ``n`` steps of the recurrent
graph; the carry-level mask gives every entry of a kept unit. ``M_n`` stops growing once ``n - 1``
reaches the recurrent graph's diameter, and then SnAp-n *is* exact RTRL. For element-wise
(diagonal) recurrences, ``D̂`` is the identity, so SnAp-1 is exact (Zucchet et al. 2023,
Irie et al. 2023) and costs about a forward pass.

**Compressed trace.** The trace stores only the ``E = nnz(M_n)`` kept entries, as a flat vector in
column-major order (parameter by parameter; the static row and column indices live in the
estimator, not in the trace). SnAp-1 of a cell whose parameters each move one unit of one carry
entry (a dense GRU) stores exactly ``P`` numbers, never an ``S × P`` array. One step computes

- ``I_t`` on the pattern with one ``vjp`` per colour of a row colouring of ``I``'s pattern (rows
  that share no parameter are summed into one cotangent): one ``vjp`` for a GRU, two for a complex
  LRU;
- the entries of ``D_t`` that the propagation needs (``D[i, j]`` with ``(i, θ)`` and ``(j, θ)``
  both kept for some ``θ``) with one ``jvp`` per colour of a column colouring (Curtis-Powell-Reid
  compression): one or two for element-wise cells, up to ``S`` for a dense cell;
- ``D_t J_{t-1}`` on the pattern as a sparse product over the static list of contributing entry
  pairs (a segment sum).

Reference: J. Menick, E. Elsen, U. Evci, S. Osindero, K. Simonyan and A. Graves, "Practical real
time recurrent learning with a sparse approximation", ICLR 2021, arXiv:2006.07232.
"""

from __future__ import annotations

import contextvars
import weakref
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from jax.flatten_util import ravel_pytree
from scipy.sparse.csgraph import connected_components

from rtrl_jax._src.base import Estimator
from rtrl_jax._src.registry import register

_ROW_CHUNK_ELEMENTS = 1 << 24


class SnapState(NamedTuple):
    """Trace of SnAp-n.

    Attributes:
      values: ``(E,)`` the kept entries of ``J_t``, column-major (by parameter, then by carry
        entry) as listed by :func:`snap_layout`; when every parameter keeps exactly one entry
        (SnAp-1 and RFLO of cells whose parameters each move one carry entry: vanilla, leaky and
        gated RNNs), a pytree shaped like the parameters holding ``J[row(θ), θ]``; when every
        parameter keeps the ``k ≥ 2`` entries of its own unit (SnAp-1 of a complex LRU), that
        pytree with a leading axis ``k`` (the unit's entries in ascending carry order;
        :func:`compressed_values` gives the column-major ``(E,)`` vector of any of the three).
    """

    values: jax.Array


class SparsityPatterns(NamedTuple):
    """Structural non-zero patterns of a core's Jacobians (``scipy.sparse`` CSR, boolean).

    Attributes:
      immediate: ``S × P``, ``∂h_t/∂θ`` (flat carry × flat params, ``ravel_pytree`` order).
      dynamics: ``S × S``, ``∂h_t/∂h_{t-1}``; entry ``[i, j]`` means entry ``i`` reads entry ``j``.
    """

    immediate: sp.csr_matrix
    dynamics: sp.csr_matrix


def _core_specs(core: Any) -> tuple[Any, Any, tuple[int, ...]]:
    for name in ("params_spec", "carry_spec", "input_shape"):
        if not hasattr(core, name):
            raise TypeError(
                "SnAp finds its sparsity pattern from the core's specs: pass an rtrl_jax.Core "
                f"(from_linen, from_nnx or from_function), got {type(core).__name__}."
            )
    return core.params_spec, core.carry_spec, tuple(core.input_shape)


_PATTERN_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PROBING = contextvars.ContextVar("rtrl_jax_probing_structure", default=False)


def probing_structure() -> bool:
    """Whether the core is being traced by the sparsity probes of :func:`sparsity_patterns`.

    A cell whose derivatives vanish on whole regions of its state (a spike's pseudo-derivative
    outside its support, a refractory gate: :mod:`rtrl_jax._src.spiking`) reads this when it is
    traced and then returns derivatives that are non-zero wherever they can be, so that the probes
    find its structural pattern rather than the zeros of a random point. It changes the patterns
    only, never a value an estimator computes (they trace the cell outside the probes).
    """
    return _PROBING.get()


def sparsity_patterns(core: Any, *, num_probes: int = 3, seed: int = 0) -> SparsityPatterns:
    """The structural patterns of ``I = ∂F/∂θ`` and ``D = ∂F/∂h`` of ``core``.

    The union of the non-zeros of both Jacobians at ``num_probes`` random points (carry and input
    drawn from a standard normal, parameters too but scaled by ``1/sqrt(leading dim)`` for
    matrices, so that pre-activations stay of order one and no unit saturates). ``I`` is built
    ``S`` rows at a time by reverse mode, in chunks, and kept sparse.

    Args:
      core: an :class:`~rtrl_jax.Core` (its specs give the shapes).
      num_probes: random points to evaluate the Jacobians at.
      seed: NumPy seed of the probe points (drawn on the host, so probing compiles one function).

    Returns:
      :class:`SparsityPatterns`. The result is cached per core (weakly), ``num_probes`` and
      ``seed``, so building several estimators for one core probes it once.
    """
    cache_key = (num_probes, int(seed))
    try:
        cached = _PATTERN_CACHE.setdefault(core, {})
    except TypeError:  # not weakly referenceable: no caching
        cached = {}
    if cache_key not in cached:
        cached[cache_key] = _probe_patterns(core, num_probes, int(seed))
    return cached[cache_key]


def _probe_patterns(core: Any, num_probes: int, seed: int) -> SparsityPatterns:
    params_spec, carry_spec, input_shape = _core_specs(core)
    if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"num_probes must be a positive integer, got {num_probes!r}.")
    rng = np.random.default_rng(seed)
    dtype = jnp.result_type(*jax.tree.leaves(carry_spec))
    zeros_params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), params_spec)
    zeros_carry = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), carry_spec)
    flat_params, unravel_params = ravel_pytree(zeros_params)
    flat_carry, unravel_carry = ravel_pytree(zeros_carry)
    p, s = flat_params.size, flat_carry.size
    # Parameters scaled by 1/sqrt(leading dim) (the fan-in of a Dense kernel) keep pre-activations
    # of order one, so no unit saturates into an exact zero derivative.
    scales = ravel_pytree(
        jax.tree.map(
            lambda a: np.full(a.shape, 1.0 / np.sqrt(a.shape[0]) if len(a.shape) > 1 else 1.0),
            params_spec,
        )
    )[0]
    ps = (rng.standard_normal((num_probes, p)) * np.asarray(scales)).astype(flat_params.dtype)
    hs = rng.standard_normal((num_probes, s)).astype(flat_carry.dtype)
    xs = rng.standard_normal((num_probes, *input_shape)).astype(dtype)

    def apply(p, h, x):
        return ravel_pytree(core(unravel_params(p), unravel_carry(h), x)[0])[0]

    @jax.jit
    def probe(ps, hs, xs, cotangents):
        def one(p, h, x):
            out, vjp = jax.vjp(lambda q, r: apply(q, r, x), p, h)
            immediate, dynamics = jax.vmap(vjp)(cotangents.astype(out.dtype))
            return immediate != 0, dynamics != 0

        immediate, dynamics = jax.vmap(one)(ps, hs, xs)
        return jnp.any(immediate, axis=0), jnp.any(dynamics, axis=0)

    chunk = max(1, min(s, _ROW_CHUNK_ELEMENTS // max((p + s) * num_probes, 1)))
    blocks, dyn_blocks = [], []
    eye = np.eye(s)
    probing = _PROBING.set(True)  # `probe` is traced on its first call, inside
    try:
        for start in range(0, s, chunk):
            rows = eye[start : start + chunk]
            if rows.shape[0] < chunk:  # one compiled shape for every chunk
                rows = np.concatenate([rows, np.zeros((chunk - rows.shape[0], s))])
            block, dyn_block = probe(ps, hs, xs, rows)
            keep = min(chunk, s - start)
            blocks.append(sp.csr_matrix(np.asarray(block)[:keep]))
            dyn_blocks.append(sp.csr_matrix(np.asarray(dyn_block)[:keep]))
    finally:
        _PROBING.reset(probing)
    dynamics = sp.vstack(dyn_blocks, format="csr") if dyn_blocks else sp.csr_matrix((s, s), dtype=bool)
    immediate = sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((s, p), dtype=bool)
    return SparsityPatterns(immediate.astype(bool).tocsr(), dynamics.astype(bool).tocsr())


def find_units(immediate: sp.spmatrix) -> np.ndarray:
    """Unit ids of the carry entries: entries linked by a shared parameter in ``I``'s pattern.

    Args:
      immediate: ``S × P`` pattern of ``I``.

    Returns:
      ``(S,)`` integer unit id per flat carry entry (connected components of ``I Iᵀ``).
    """
    immediate = sp.csr_matrix(immediate, dtype=np.int8)
    linked = (immediate @ immediate.T) != 0
    _, labels = connected_components(linked, directed=False)
    return labels.astype(np.int64)


def _unit_matrix(units: Any, size: int) -> sp.csr_matrix:
    units = np.asarray(units)
    if units.shape != (size,):
        raise ValueError(f"units must have one id per carry entry ({size}), got {units.shape}.")
    _, ids = np.unique(units, return_inverse=True)
    return sp.csr_matrix(
        (np.ones(size, np.int8), (np.arange(size), ids)), shape=(size, int(ids.max(initial=-1)) + 1)
    )


def snap_mask_from_patterns(
    immediate: Any, dynamics: Any, n: int = 1, *, units: Any = "auto"
) -> sp.csr_matrix:
    """SnAp-n's mask ``M_n`` (``S × P``, boolean, sparse) from the patterns of ``I`` and ``D``.

    On units, ``M_1 = I``'s pattern and ``M_n = M_1 ∪ D̂ M_{n-1}``; a kept unit keeps all its carry
    entries.

    Args:
      immediate: ``S × P`` pattern of ``I`` (dense or ``scipy.sparse``; non-zero = structural).
      dynamics: ``S × S`` pattern of ``D`` (``[i, j]``: entry ``i`` reads entry ``j``).
      n: SnAp order ``n ≥ 1``.
      units: ``"auto"`` (:func:`find_units`), ``"entries"`` (every carry entry its own unit) or
        an ``(S,)`` array of unit ids.

    Returns:
      ``M_n`` as a ``scipy.sparse.csr_matrix`` of booleans (``.toarray()`` for a dense array).
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"SnAp order n must be an integer >= 1, got {n!r}.")
    immediate = sp.csr_matrix(immediate, dtype=bool)
    dynamics = sp.csr_matrix(dynamics, dtype=bool)
    size = immediate.shape[0]
    if isinstance(units, str):
        if units == "auto":
            units = find_units(immediate)
        elif units == "entries":
            units = np.arange(size)
        else:
            raise ValueError(f"units must be 'auto', 'entries' or an array, got {units!r}.")
    u = _unit_matrix(units, size).astype(np.int32)
    unit_immediate = ((u.T @ immediate.astype(np.int32)) != 0).astype(np.int32)
    unit_dynamics = ((u.T @ dynamics.astype(np.int32) @ u) != 0).astype(np.int32)
    mask = unit_immediate
    for _ in range(n - 1):
        grown = ((mask + unit_dynamics @ mask) != 0).astype(np.int32)
        if (grown != mask).nnz == 0:
            break
        mask = grown
    return ((u @ mask) != 0).tocsr()


def snap_mask(
    core: Any,
    n: int = 1,
    *,
    units: Any = "auto",
    num_probes: int = 3,
    seed: int = 0,
) -> sp.csr_matrix:
    """SnAp-n's mask for ``core``: :func:`sparsity_patterns` then :func:`snap_mask_from_patterns`.

    Returns:
      ``S × P`` boolean ``scipy.sparse.csr_matrix``; rows are flat carry entries, columns flat
      parameters (``ravel_pytree`` order).
    """
    patterns = sparsity_patterns(core, num_probes=num_probes, seed=seed)
    return snap_mask_from_patterns(patterns.immediate, patterns.dynamics, n, units=units)


def _greedy_colouring(conflicts: sp.spmatrix, size: int) -> np.ndarray:
    """Greedy colouring of a symmetric conflict graph (largest degree first)."""
    conflicts = sp.csr_matrix(conflicts, dtype=bool)
    conflicts = ((conflicts + conflicts.T) != 0).tocsr()
    conflicts.setdiag(False)
    conflicts.eliminate_zeros()
    colour = np.full(size, -1, np.int64)
    degree = np.diff(conflicts.indptr)
    for node in np.argsort(-degree, kind="stable"):
        neighbours = conflicts.indices[conflicts.indptr[node] : conflicts.indptr[node + 1]]
        used = set(colour[neighbours][colour[neighbours] >= 0].tolist())
        c = 0
        while c in used:
            c += 1
        colour[node] = c
    return colour


class SnapLayout(NamedTuple):
    """The static structure of a compressed SnAp trace (NumPy arrays).

    Attributes:
      rows, cols: ``(E,)`` carry entry and parameter of each kept entry, column-major.
      immediate: ``(E,)`` bool, whether the entry is in ``I``'s pattern.
      row_colour: ``(S,)`` colour of each carry entry for the compressed ``vjp`` of ``I``.
      d_rows, d_cols: ``(K,)`` the entries of ``D`` the propagation reads.
      d_colour: ``(S,)`` colour of each carry entry for the compressed ``jvp`` of ``D``.
      pair_out, pair_in, pair_d: contributions ``values[pair_out] += D[pair_d] * values[pair_in]``,
        sorted by ``pair_out``.
      num_carry, num_params: ``S`` and ``P``.
    """

    rows: np.ndarray
    cols: np.ndarray
    immediate: np.ndarray
    row_colour: np.ndarray
    d_rows: np.ndarray
    d_cols: np.ndarray
    d_colour: np.ndarray
    pair_out: np.ndarray
    pair_in: np.ndarray
    pair_d: np.ndarray
    num_carry: int
    num_params: int


def layout_from_mask(mask: Any, immediate: Any, dynamics: Any, *, propagate: bool = True) -> SnapLayout:
    """The compressed-trace layout of a mask ``M ⊇ pattern(I)`` (see :class:`SnapLayout`).

    Args:
      mask: ``S × P`` mask.
      immediate: ``S × P`` pattern of ``I``.
      dynamics: ``S × S`` pattern of ``D``.
      propagate: build the ``D J`` contribution lists (``False`` for RFLO, which replaces ``D``).
    """
    mask = sp.csc_matrix(mask, dtype=bool)
    mask.sort_indices()
    immediate = sp.csr_matrix(immediate, dtype=bool)
    dynamics = sp.csr_matrix(dynamics, dtype=bool)
    s, p = mask.shape
    counts = np.diff(mask.indptr)
    rows = mask.indices.astype(np.int64)
    cols = np.repeat(np.arange(p), counts)
    in_immediate = np.asarray(immediate[rows, cols]).ravel().astype(bool) if rows.size else rows > 0
    extra = sp.csr_matrix(immediate, dtype=np.int8) - sp.csr_matrix(
        immediate.multiply(mask.tocsr()), dtype=np.int8
    )
    if extra.count_nonzero():
        raise ValueError("the mask must contain the immediate pattern.")
    i8 = sp.csr_matrix(immediate, dtype=np.int8)
    row_colour = _greedy_colouring(i8 @ i8.T, s)

    empty = np.zeros(0, np.int64)
    if not propagate or rows.size == 0:
        return SnapLayout(
            rows, cols, in_immediate, row_colour, empty, empty, np.zeros(s, np.int64),
            empty, empty, empty, s, p,
        )  # fmt: skip

    # Group parameters by their kept row set; each group shares the same D pairs.
    starts = mask.indptr[:-1]
    groups: dict[bytes, list[int]] = {}
    for col in range(p):
        if counts[col]:
            groups.setdefault(rows[starts[col] : starts[col] + counts[col]].tobytes(), []).append(col)
    dense_dyn = None
    if s * s <= 1 << 26:
        dense_dyn = dynamics.toarray()
    out_parts, in_parts, lin_parts = [], [], []
    for key, members in groups.items():
        row_set = np.frombuffer(key, np.int64)
        sub = (
            dense_dyn[np.ix_(row_set, row_set)]
            if dense_dyn is not None
            else dynamics[row_set][:, row_set].toarray()
        )
        a, b = np.nonzero(sub)
        if a.size == 0:
            continue
        offsets = starts[np.asarray(members)][:, None]
        out_parts.append((offsets + a[None]).ravel())
        in_parts.append((offsets + b[None]).ravel())
        lin_parts.append(np.tile(row_set[a] * s + row_set[b], len(members)))
    if not out_parts:
        return SnapLayout(
            rows, cols, in_immediate, row_colour, empty, empty, np.zeros(s, np.int64),
            empty, empty, empty, s, p,
        )  # fmt: skip
    pair_out = np.concatenate(out_parts)
    pair_in = np.concatenate(in_parts)
    linear = np.concatenate(lin_parts)
    d_linear, pair_d = np.unique(linear, return_inverse=True)
    d_rows, d_cols = d_linear // s, d_linear % s
    order = np.argsort(pair_out, kind="stable")
    needed = sp.csr_matrix((np.ones(d_rows.size, np.int8), (d_rows, d_cols)), shape=(s, s))
    # Columns j, j' of D clash when some needed D[i, j] shares row i with a non-zero D[i, j'].
    d_colour = _greedy_colouring(needed.T @ sp.csr_matrix(dynamics, dtype=np.int8), s)
    return SnapLayout(
        rows,
        cols,
        in_immediate,
        row_colour,
        d_rows,
        d_cols,
        d_colour,
        pair_out[order],
        pair_in[order],
        pair_d.ravel()[order],
        s,
        p,
    )


def _indicators(colour: np.ndarray, dtype: Any) -> jax.Array:
    """``(C, S)`` 0/1 rows, one per colour."""
    num = int(colour.max(initial=-1)) + 1
    out = np.zeros((num, colour.size))
    out[colour, np.arange(colour.size)] = 1.0
    return jnp.asarray(out, dtype)


def _flat_apply(core: Any, params: Any, carry: Any, x: Any):
    flat_params, unravel_params = ravel_pytree(params)
    flat_carry, unravel_carry = ravel_pytree(carry)

    def apply(p, h):
        new_carry, out = core(unravel_params(p), unravel_carry(h), x)
        return ravel_pytree(new_carry)[0], out

    return apply, flat_params, flat_carry, unravel_carry


def immediate_on_layout(layout: SnapLayout, vjp_fn: Any, dtype: Any) -> jax.Array:
    """``I_t`` at the layout's entries from compressed ``vjp`` calls (zero off ``I``'s pattern)."""
    if layout.rows.size == 0:
        return jnp.zeros((0,), dtype)
    (compressed,) = jax.vmap(vjp_fn)(_indicators(layout.row_colour, dtype))  # (C, P)
    values = compressed[layout.row_colour[layout.rows], layout.cols]
    return jnp.where(jnp.asarray(layout.immediate), values, jnp.zeros((), values.dtype))


def snap(
    core: Any,
    n: int = 1,
    *,
    units: Any = "auto",
    num_probes: int = 3,
    seed: int = 0,
) -> Estimator:
    """SnAp-n (Menick et al. 2020) for any core: sparse RTRL on the pattern ``θ`` reaches in ``n`` steps.

    The patterns of ``I`` and ``D`` are found once, when the estimator is built, by
    :func:`sparsity_patterns` (``num_probes`` random points drawn from ``seed``); see the module docstring for
    the mask, the units and the compressed trace.

    Args:
      core: an :class:`~rtrl_jax.Core` (its specs are needed to probe the patterns).
      n: the order; ``n = 1`` keeps ``I``'s pattern (exact for element-wise recurrences), ``n``
        at least the recurrent graph's diameter + 1 gives exact RTRL.
      units: ``"auto"``, ``"entries"`` or unit ids per carry entry (see :func:`snap_mask`).
      num_probes: random points for the pattern probes.
      seed: NumPy seed of the pattern probes.

    Returns:
      An :class:`~rtrl_jax.Estimator` whose trace is :class:`SnapState`.

    Example:
      >>> est = snap(core, n=1)
      >>> trace = est.init(params, carry)
      >>> carry, out, trace = est.step(trace, params, carry, x)
      >>> grads = est.grad(trace, params, carry_bar)
    """
    layout = snap_layout(core, n, units=units, num_probes=num_probes, seed=seed)
    return _sparse_trace_estimator(core, layout, leak=None)


def snap_layout(
    core: Any,
    n: int = 1,
    *,
    units: Any = "auto",
    num_probes: int = 3,
    seed: int = 0,
) -> SnapLayout:
    """The :class:`SnapLayout` that ``snap(core, n, ...)`` uses (for inspection and tests)."""
    patterns = sparsity_patterns(core, num_probes=num_probes, seed=seed)
    mask = snap_mask_from_patterns(patterns.immediate, patterns.dynamics, n, units=units)
    return layout_from_mask(mask, patterns.immediate, patterns.dynamics)


def _sparse_trace_estimator(core: Any, layout: SnapLayout, leak: Any) -> Estimator:
    """The estimator over a compressed trace: SnAp when ``leak is None``, else RFLO's leak."""
    if _one_entry_per_parameter(layout, leak):
        return _per_parameter_trace_estimator(core, layout, leak)
    unit_rows = None if leak is not None else _unit_blocks(layout)
    if unit_rows is not None:
        return _unit_block_trace_estimator(core, layout, unit_rows)
    rows = layout.rows
    num_entries = rows.size

    def init(params, carry, *, key=None):
        del key
        flat_params, _ = ravel_pytree(params)
        flat_carry, _ = ravel_pytree(carry)
        dtype = jnp.result_type(flat_params, flat_carry)
        return SnapState(jnp.zeros((num_entries,), dtype))

    def step(trace, params, carry, x, *, key=None):
        del key
        apply, flat_params, flat_carry, unravel_carry = _flat_apply(core, params, carry, x)
        dtype = trace.values.dtype
        (new_flat, out), vjp_fn = _vjp_with_out(apply, flat_params, flat_carry)
        values = immediate_on_layout(layout, vjp_fn, new_flat.dtype).astype(dtype)
        if leak is not None:
            leak_values = jnp.asarray(leak, dtype)
            if leak_values.ndim:
                leak_values = leak_values[rows]
            values = values + leak_values * trace.values
        elif layout.pair_out.size:
            _, jvp_fn = jax.linearize(lambda h: apply(flat_params, h)[0], flat_carry)
            tangents = _indicators(layout.d_colour, flat_carry.dtype)
            compressed = jax.vmap(jvp_fn)(tangents)  # (C, S): column sums of D per colour
            d_values = compressed[layout.d_colour[layout.d_cols], layout.d_rows].astype(dtype)
            contributions = d_values[layout.pair_d] * trace.values[layout.pair_in]
            values = values + jax.ops.segment_sum(
                contributions, layout.pair_out, num_segments=num_entries, indices_are_sorted=True
            )
        return unravel_carry(new_flat), out, SnapState(values)

    def grad(trace, params, carry_bar):
        flat_params, unravel_params = ravel_pytree(params)
        flat_bar, _ = ravel_pytree(carry_bar)
        weighted = flat_bar.astype(trace.values.dtype)[rows] * trace.values
        flat = jax.ops.segment_sum(
            weighted, layout.cols, num_segments=layout.num_params, indices_are_sorted=True
        )
        return unravel_params(flat.astype(flat_params.dtype))

    return Estimator(init, step, grad)


def _one_entry_per_parameter(layout: SnapLayout, leak: Any) -> bool:
    """Whether every parameter keeps exactly one entry, in ``I``'s pattern, and the propagation
    (for SnAp) reads only ``D[i, i]`` at that entry's own row ``i``."""
    num = layout.num_params
    if layout.rows.size != num or not np.array_equal(layout.cols, np.arange(num)):
        return False
    if not layout.immediate.all():
        return False
    if leak is not None or not layout.pair_out.size:  # RFLO, or SnAp with nothing to propagate
        return True
    every = np.arange(num)
    return (
        np.array_equal(layout.pair_out, every)
        and np.array_equal(layout.pair_in, every)
        and np.array_equal(layout.d_rows[layout.pair_d], layout.rows)
        and np.array_equal(layout.d_cols[layout.pair_d], layout.rows)
    )


def _rows_per_leaf(rows: np.ndarray, params: Any) -> Any:
    """The static carry row of every parameter, as a pytree shaped like ``params`` whose leaves keep
    size 1 along every axis the row does not vary on (a kernel's rows depend on its output axis only):
    reading a carry vector at them then costs a small gather and a broadcast, not a gather of ``P``."""
    leaves, treedef = jax.tree.flatten(params)
    offsets = np.cumsum([0] + [int(np.size(leaf)) for leaf in leaves])
    compact = []
    for leaf, lo, hi in zip(leaves, offsets[:-1], offsets[1:], strict=True):
        leaf_rows = rows[lo:hi].reshape(np.shape(leaf))
        for axis in range(leaf_rows.ndim):
            first = np.take(leaf_rows, [0], axis=axis)
            if np.array_equal(leaf_rows, np.broadcast_to(first, leaf_rows.shape)):
                leaf_rows = first
        compact.append(leaf_rows)
    return jax.tree.unflatten(treedef, compact)


def _read_rows(vector: jax.Array, leaf_rows: np.ndarray) -> jax.Array:
    """``vector[..., leaf_rows]`` for static rows: a slice when they are consecutive, else a gather."""
    flat = leaf_rows.ravel()
    if flat.size and np.array_equal(flat, np.arange(flat[0], flat[0] + flat.size)):
        return vector[..., flat[0] : flat[0] + flat.size].reshape(vector.shape[:-1] + leaf_rows.shape)
    return vector[..., leaf_rows]


def _flat_step_jacobians(core: Any, params: Any, carry: Any, x: Any):
    """One step on the flat carry: ``(new_flat, out, unravel_carry, vjp in params, dynamics_jvp)``,
    ``dynamics_jvp(tangents)`` being ``D_t`` applied to each row of ``tangents`` (linearised on call)."""
    flat_carry, unravel_carry = ravel_pytree(carry)

    def flat_step(p, h):
        new_carry, out = core(p, unravel_carry(h), x)
        return ravel_pytree(new_carry)[0], out

    new_flat, immediate_vjp, out = jax.vjp(lambda p: flat_step(p, flat_carry), params, has_aux=True)

    def dynamics_jvp(tangents):
        _, jvp_fn = jax.linearize(lambda h: flat_step(params, h)[0], flat_carry)
        return jax.vmap(jvp_fn)(tangents.astype(flat_carry.dtype))

    return new_flat, out, unravel_carry, immediate_vjp, dynamics_jvp


def _per_parameter_trace_estimator(core: Any, layout: SnapLayout, leak: Any) -> Estimator:
    """SnAp / RFLO when every parameter keeps one entry, ``J[row(θ), θ]``: the trace is a pytree
    shaped like the parameters and one step is

        e_θ ← I[row(θ), θ] + d_row(θ) e_θ,      d = diag(D_t) (SnAp) or the leak (RFLO),

    with ``I``'s entries from one ``vjp`` of the all-ones cotangent (no two carry entries share a
    parameter) and the gradient ``c[row(θ)] e_θ``. Nothing is flattened or scattered: XLA:CPU spends
    a pass over ``P`` numbers on every concatenation or scatter, several times a cell's own cost.
    """
    rows = layout.rows
    d_colour = jnp.asarray(layout.d_colour)

    def init(params, carry, *, key=None):
        del key
        flat_carry, _ = ravel_pytree(carry)
        dtype = jnp.result_type(*jax.tree.leaves(params), flat_carry)
        return SnapState(jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), dtype), params))

    def step(trace, params, carry, x, *, key=None):
        del key
        new_flat, out, unravel_carry, immediate_vjp, dynamics_jvp = _flat_step_jacobians(
            core, params, carry, x
        )
        (immediate,) = immediate_vjp(jnp.ones_like(new_flat))
        row_of = _rows_per_leaf(rows, params)
        if leak is not None:
            decay = jnp.asarray(leak, new_flat.dtype)
            decay_of = jax.tree.map(lambda r: _read_rows(decay, r) if decay.ndim else decay, row_of)
        elif layout.pair_out.size:
            compressed = dynamics_jvp(_indicators(layout.d_colour, new_flat.dtype))  # (C, S)
            diagonal = compressed[d_colour, jnp.arange(new_flat.size)]
            decay_of = jax.tree.map(lambda r: _read_rows(diagonal, r), row_of)
        else:
            decay_of = jax.tree.map(lambda r: jnp.zeros((), new_flat.dtype), row_of)
        values = jax.tree.map(lambda e, i, d: (i + d * e).astype(e.dtype), trace.values, immediate, decay_of)
        return unravel_carry(new_flat), out, SnapState(values)

    def grad(trace, params, carry_bar):
        flat_bar, _ = ravel_pytree(carry_bar)
        return jax.tree.map(
            lambda e, r, p: (_read_rows(flat_bar.astype(e.dtype), r) * e).astype(jnp.result_type(p)),
            trace.values,
            _rows_per_leaf(rows, params),
            params,
        )

    return Estimator(init, step, grad)


def _unit_blocks(layout: SnapLayout) -> np.ndarray | None:
    """``(U, k)`` carry rows of the units, ascending, when every parameter keeps exactly the ``k ≥ 2``
    entries of one unit and the units are disjoint (SnAp-1 of an element-wise recurrence whose units
    hold several carry entries, such as a complex LRU's ``(Re h_k, Im h_k)``); else ``None``."""
    num = layout.num_params
    if num == 0 or layout.rows.size % num:
        return None
    k = layout.rows.size // num
    if k < 2 or not np.array_equal(layout.cols, np.repeat(np.arange(num), k)):
        return None
    unit_rows = np.unique(layout.rows.reshape(num, k), axis=0)
    return unit_rows if np.unique(unit_rows).size == unit_rows.size else None


def _unit_block_trace_estimator(core: Any, layout: SnapLayout, unit_rows: np.ndarray) -> Estimator:
    """SnAp when every parameter ``θ`` keeps the ``k`` entries ``J[r_m(u), θ]``, ``m < k``, of its own
    unit ``u = u(θ)`` (rows ``r_0(u) < … < r_{k-1}(u)``, disjoint units): the trace is a pytree shaped
    like the parameters with a leading axis ``k`` and one step is

        e_m(θ) ← I[r_m(u), θ] + Σ_m' D[r_m(u), r_m'(u)] e_m'(θ),

    with ``I``'s entries from ``k`` ``vjp`` calls (cotangent: entry ``m`` of every unit; a parameter
    moves its own unit only), ``D``'s ``k × k`` unit blocks read from the ``jvp`` calls of ``D``'s
    column colouring, and the gradient ``Σ_m c[r_m(u)] e_m(θ)``. For a complex LRU this is the
    per-parameter complex trace of Zucchet et al. 2023 (arXiv:2305.15947) held as its real and
    imaginary parts; nothing is gathered or scattered over the ``kP`` entries, only over units.
    (The leading axis keeps every update a contiguous element-wise pass: with a trailing axis of
    size ``k`` the same step of a 64-unit complex LRU was several times slower on XLA:CPU.)
    """
    num_units, k = unit_rows.shape
    unit_of_row = np.zeros(layout.num_carry, np.int64)
    unit_of_row[unit_rows] = np.arange(num_units)[:, None]
    param_units = unit_of_row[layout.rows[::k]]
    slots = np.zeros((k, layout.num_carry))
    slots[np.arange(k)[:, None], unit_rows.T] = 1.0
    # D[r_m(u), r_m'(u)] sits in the jvp of the colour of column r_m'(u), at row r_m(u)
    block_rows = np.broadcast_to(unit_rows.T[:, None, :], (k, k, num_units))
    block_cols = np.broadcast_to(unit_rows.T[None, :, :], (k, k, num_units))
    block_colours = layout.d_colour[block_cols]
    kept = set(zip(layout.d_rows.tolist(), layout.d_cols.tolist(), strict=True))
    in_pattern = np.vectorize(lambda i, j: (int(i), int(j)) in kept)(block_rows, block_cols)

    def init(params, carry, *, key=None):
        del key
        flat_carry, _ = ravel_pytree(carry)
        dtype = jnp.result_type(*jax.tree.leaves(params), flat_carry)
        return SnapState(jax.tree.map(lambda p: jnp.zeros((k, *jnp.shape(p)), dtype), params))

    def step(trace, params, carry, x, *, key=None):
        del key
        new_flat, out, unravel_carry, immediate_vjp, dynamics_jvp = _flat_step_jacobians(
            core, params, carry, x
        )
        (immediate,) = jax.vmap(immediate_vjp)(jnp.asarray(slots, new_flat.dtype))  # (*θ_l, k)
        compressed = dynamics_jvp(_indicators(layout.d_colour, new_flat.dtype))  # (C, S)
        blocks = jnp.where(in_pattern, compressed[block_colours, block_rows], 0)  # (k, k, U)

        def propagate(e, i, units):
            d = _read_rows(blocks, units).astype(e.dtype)  # (k, k, *units.shape)
            return (i.astype(e.dtype) + sum(d[:, m] * e[m] for m in range(k))).astype(e.dtype)

        values = jax.tree.map(propagate, trace.values, immediate, _rows_per_leaf(param_units, params))
        return unravel_carry(new_flat), out, SnapState(values)

    def grad(trace, params, carry_bar):
        flat_bar, _ = ravel_pytree(carry_bar)
        unit_bar = flat_bar[unit_rows.T]  # (k, U)
        return jax.tree.map(
            lambda e, units, p: jnp.sum(_read_rows(unit_bar.astype(e.dtype), units) * e, axis=0).astype(
                jnp.result_type(p)
            ),
            trace.values,
            _rows_per_leaf(param_units, params),
            params,
        )

    return Estimator(init, step, grad)


def compressed_values(values: Any, params: Any) -> jax.Array:
    """A SnAp trace's ``values`` as the ``(E,)`` column-major vector of its :class:`SnapLayout`.

    Args:
      values: :attr:`SnapState.values` of any of its three storages.
      params: the parameters (their shapes tell the storages apart).
    """
    if jax.tree.structure(values) != jax.tree.structure(params):  # type: ignore[operator]  # jaxlib: no stub
        return values  # already the (E,) vector
    by_parameter = jax.tree.map(
        lambda v, p: jnp.moveaxis(v, 0, -1) if v.ndim > jnp.ndim(p) else v, values, params
    )
    return ravel_pytree(by_parameter)[0]


def _vjp_with_out(apply, flat_params, flat_carry):
    """``((new_flat_carry, out), vjp)`` of ``p -> new_flat_carry`` at ``flat_params``."""

    def f(p):
        new_flat, out = apply(p, flat_carry)
        return new_flat, out

    new_flat, vjp_fn, out = jax.vjp(f, flat_params, has_aux=True)
    return (new_flat, out), vjp_fn


def snap_unsupported_reason(core: Any) -> str | None:
    """Why SnAp/RFLO cannot serve ``core`` (they need its specs to probe the patterns), or ``None``."""
    if all(hasattr(core, name) for name in ("params_spec", "carry_spec", "input_shape")):
        return None
    return "it needs an rtrl_jax.Core (its specs give the sparsity pattern)"


def snap_is_exact(
    core: Any,
    n: int = 1,
    *,
    units: Any = "auto",
    num_probes: int = 3,
    seed: int = 0,
) -> bool:
    """Whether ``snap(core, n, ...)`` is exact RTRL: its mask ``M_n`` already holds every entry
    that parameters reach in any number of steps (``M_n`` has stopped growing).

    True for SnAp-1 of element-wise recurrences and for ``n`` past the recurrent graph's diameter.
    """
    patterns = sparsity_patterns(core, num_probes=num_probes, seed=seed)
    mask = snap_mask_from_patterns(patterns.immediate, patterns.dynamics, n, units=units)
    closure = snap_mask_from_patterns(
        patterns.immediate, patterns.dynamics, patterns.immediate.shape[0] + 1, units=units
    )
    return (closure != mask).nnz == 0


register(
    "snap",
    snap,
    summary="SnAp-n: RTRL on the entries a parameter reaches in n steps (SnAp-1: O(P) trace)",
    unsupported_reason=snap_unsupported_reason,
    exact_for=snap_is_exact,
)

"""e-prop: eligibility traces of each neuron's own dynamics times a learning signal (Bellec et al. 2020).

For a network whose neuron ``j`` has a hidden state ``h^j`` (LIF: the membrane ``v_j``; ALIF:
``(v_j, a_j)``) and emits ``z_j``, e-prop writes the gradient of a loss ``E`` as

    dE/dW_ji ≈ Σ_t L^t_j e^t_ji,        e^t_ji = ∂z^t_j/∂h^t_j · ε^t_ji,
    ε^t_ji = ∂h^t_j/∂h^{t-1}_j · ε^{t-1}_ji + ∂h^t_j/∂W_ji,

where the eligibility vector ``ε_ji`` follows the neuron's OWN dynamics only (the paths through the
other neurons' spikes are dropped) and the learning signal ``L^t_j = ∂E_t/∂z^t_j`` is the loss's
direct dependence on the neuron's output at step ``t``. For ALIF neurons
(``A = v_th + β a``, ``ψ`` the pseudo-derivative) this is

    ε^v_{t+1} = α ε^v_t + z^t_i,     ε^a_{t+1} = ψ^t_j ε^v_t + (ρ − ψ^t_j β) ε^a_t,
    e^t_ji = ψ^t_j (ε^v_t − β ε^a_t)

(``x^{t+1}_i`` in place of ``z^t_i`` for input weights; LIF drops ``ε^a``).

**As a SnAp-1 trace.** This is SnAp-1 (:func:`rtrl_jax.snap`) with the units taken to be the
neurons: keep, of the influence ``J_t = dh_t/dθ``, the rows of the neuron each parameter moves
directly, and propagate them with the dynamics restricted to within that neuron,

    J_t = (I_t + D_t J_{t-1}) ⊙ M_1,     M_1: (neuron of θ's immediate pattern) × θ.

With the spikes in the carry (:class:`~rtrl_jax.LIFCell`, :class:`~rtrl_jax.ALIFCell`: carry
``(v, a, z)``), the within-neuron rows of ``J`` are ``(ε^v, ε^a, e)``: the ``z`` row of neuron ``j``
is ``∂z_j/∂h_j · ε = e_ji``, because the cell computes ``z' = H(v' − v_th − β a')`` from the new
``(v', a')``, and the ``a`` row is ``ε^a`` even though no parameter moves ``a`` immediately. The
gradient ``c_t · J_t`` with the carry cotangent ``c_t`` (zero on ``v`` and ``a`` for a loss on the
spikes) is ``Σ_j L^t_j e^t_ji``: e-prop with symmetric feedback. For cells with autapses
(``self_connections=True``) the neuron's own dynamics includes ``W_jj ψ_j``; for leaky rate units
(:class:`~rtrl_jax.LeakyRNNCell`) and other cells whose carry entries are each their own neuron,
e-prop here is SnAp-1 (:func:`rtrl_jax.rflo` is the variant that keeps the leak only).

**Neurons.** ``units="neurons"`` (the default) takes neuron ``k`` to be index ``k`` along the last
(feature) axis of every carry leaf (the Flax convention for recurrent cells), joined with the
entries that a parameter moves together (:func:`rtrl_jax.find_units`: an LSTM's ``(c_k, h_k)``,
a complex LRU's ``(Re h_k, Im h_k)``). Entries that nothing moves (no parameter, no carry entry:
a refractory buffer under ``stop_gradient``) stay out. For a carry that stacks several layers of
equal width, pass the units (``units=`` an array with one id per flat carry entry) or
``units="auto"`` / ``"entries"`` as for SnAp.

**Feedback.** The estimator's ``grad`` contracts whatever cotangent it is given: the true
``c_t = ∂L_t/∂h_t`` (:func:`rtrl_jax.online_grad`) is symmetric e-prop. Random and adaptive e-prop
replace the readout's transpose in the learning signal by a feedback matrix ``B``,
``L_t = B (∂L_t/∂y_t)``; that belongs to the readout, not to the trace:
:func:`rtrl_jax.feedback_head` (``"random"``: ``B`` fixed; ``"adaptive"``: ``B`` takes the
readout's update), which serves every estimator alike. The readout's own low-pass filter (``κ``)
of the paper is likewise the head's business and is not modelled.

**Cost.** A step is one forward pass, one ``vjp`` per colour of ``I``'s rows and one ``jvp`` per
colour of the within-neuron entries of ``D`` (one for LIF without autapses; up to ``n`` for ALIF,
whose spike row reads every neuron's spike); the trace holds ``nnz(M_1)`` numbers, the number of
synapses times the neuron's state size.

Reference: G. Bellec, F. Scherr, A. Subramoney, E. Hajek, D. Salaj, R. Legenstein and W. Maass,
"A solution to the learning dilemma for recurrent networks of spiking neurons", Nature
Communications 11:3625, 2020, arXiv:1901.09049.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from rtrl_jax._src.base import Estimator
from rtrl_jax._src.registry import register
from rtrl_jax._src.snap import SnapState, snap, snap_is_exact, snap_unsupported_reason, sparsity_patterns

EpropState = SnapState


def neuron_units(core: Any, *, num_probes: int = 3, seed: int = 0) -> np.ndarray:
    """The neuron of every flat carry entry: e-prop's units (see the module docstring).

    Entries at the same index of the last axis of carry leaves whose last axes have the same size
    belong to one neuron, and so do entries that a parameter moves together (:func:`find_units`);
    an entry that no parameter and no carry entry moves is a unit of its own.

    Args:
      core: an :class:`~rtrl_jax.Core`.
      num_probes, seed: of the pattern probes (:func:`rtrl_jax.sparsity_patterns`).

    Returns:
      ``(S,)`` integer unit ids, in ``ravel_pytree`` order of the carry.
    """
    patterns = sparsity_patterns(core, num_probes=num_probes, seed=seed)
    size = patterns.immediate.shape[0]
    moved = (np.diff(patterns.immediate.indptr) > 0) | (np.diff(patterns.dynamics.indptr) > 0)
    key_rows = []
    for leaf in jax.tree.leaves(core.carry_spec):
        shape = tuple(leaf.shape)
        if not shape:
            key_rows.append(np.full((1, 2), -1, np.int64))
            continue
        index = np.broadcast_to(np.arange(shape[-1]), shape).ravel()
        key_rows.append(np.stack([np.full(index.size, shape[-1]), index], axis=1))
    keys = np.concatenate(key_rows) if key_rows else np.zeros((0, 2), np.int64)
    _, feature = np.unique(keys, axis=0, return_inverse=True)
    feature = np.where(moved & (keys[:, 0] >= 0), feature.ravel(), -1)
    # entries of one feature are linked to its first entry; entries that a parameter moves together too
    members = np.flatnonzero(feature >= 0)
    first = np.full(int(feature.max(initial=-1)) + 1, -1, np.int64)
    for entry in members[::-1]:
        first[feature[entry]] = entry
    links = sp.csr_matrix(
        (np.ones(members.size, np.int8), (members, first[feature[members]])), shape=(size, size)
    )
    immediate = sp.csr_matrix(patterns.immediate, dtype=np.int8)
    linked = (immediate @ immediate.T) + links
    _, labels = connected_components(linked, directed=False)
    return labels.astype(np.int64)


def _resolve_units(core: Any, units: Any, num_probes: int, seed: int) -> Any:
    if isinstance(units, str) and units == "neurons":
        return neuron_units(core, num_probes=num_probes, seed=seed)
    return units


def eprop(core: Any, *, units: Any = "neurons", num_probes: int = 3, seed: int = 0) -> Estimator:
    """e-prop (Bellec et al. 2020) with symmetric feedback: SnAp-1 on the neurons.

    Args:
      core: an :class:`~rtrl_jax.Core` (its specs are needed to probe the patterns); the cells of
        the paper are :class:`~rtrl_jax.LIFCell` and :class:`~rtrl_jax.ALIFCell`.
      units: ``"neurons"`` (:func:`neuron_units`), or as for :func:`rtrl_jax.snap`: ``"auto"``,
        ``"entries"`` or one unit id per flat carry entry.
      num_probes: random points for the pattern probes.
      seed: NumPy seed of the pattern probes.

    Returns:
      An :class:`~rtrl_jax.Estimator` whose trace is :class:`EpropState` (SnAp's compressed trace:
      the eligibility vectors and traces of every synapse, column-major).

    Example:
      >>> core = from_linen(ALIFCell(64, refractory=2, self_connections=False), input_size=3)
      >>> est = eprop(core)
      >>> carry, out, trace = est.step(est.init(params, carry), params, carry, x)
      >>> grads = online_grad(core, est, trace, params, carry, jax.grad(loss)(out))
    """
    return snap(
        core, 1, units=_resolve_units(core, units, num_probes, seed), num_probes=num_probes, seed=seed
    )


def eprop_is_exact(core: Any, *, units: Any = "neurons", num_probes: int = 3, seed: int = 0) -> bool:
    """Whether ``eprop(core, ...)`` is exact RTRL: no neuron reaches another through the recurrent
    graph (no recurrent coupling, e.g. element-wise recurrences), so the dropped paths are empty."""
    units = _resolve_units(core, units, num_probes, seed)
    return snap_is_exact(core, 1, units=units, num_probes=num_probes, seed=seed)


register(
    "eprop",
    eprop,
    summary="e-prop: eligibility traces of each neuron's own dynamics x the learning signal (symmetric)",
    unsupported_reason=snap_unsupported_reason,
    exact_for=eprop_is_exact,
)

"""Readouts whose learning signal travels through a feedback matrix instead of the readout's transpose.

With a linear readout ``y_t = W^T out_t + b`` (``W`` of shape ``(n, K)``) and a step loss
``L_t(y_t)``, the cotangent that the trainer hands to the recurrent estimator is

    c_t = ∂L_t/∂out_t = W (∂L_t/∂y_t)                                    (symmetric feedback)

and the estimator's gradient is ``c_t · J_t``. For e-prop with spikes as outputs,
``c_t`` is the learning signal ``L^t_j = Σ_k W_jk (y^t_k − y^{*,t}_k)`` of Bellec et al. 2020.
A feedback head keeps the forward pass and the readout's own gradient
(``∂L_t/∂W = out_t ⊗ ∂L_t/∂y_t``, ``∂L_t/∂b = ∂L_t/∂y_t``) and replaces ``W`` by a feedback matrix
``B`` of the same shape in the learning signal only:

    c_t = B (∂L_t/∂y_t).

Because the change is in the head, it applies to every estimator (exact RTRL, SnAp, RFLO, TBPTT's
window, ...), not only e-prop; with ``B = W`` it is the ordinary readout, bit for bit.

- ``"random"`` (random e-prop; feedback alignment, Lillicrap et al. 2016): ``B`` is drawn once and
  fixed. It is stored in the head parameters under ``"feedback"`` with a zero gradient, so any
  optimizer whose update of a zero gradient is zero (SGD, Adam, RMSProp, ...) leaves it unchanged;
  with weight decay in the optimizer, mask ``"feedback"`` out of the decay.
- ``"adaptive"`` (adaptive e-prop; Kolen & Pollack 1994, Akrout et al. 2019): ``B``'s gradient is
  the readout kernel's, ``∂L_t/∂W``, so an element-wise optimizer gives ``B`` the update of ``W``:
  under SGD with rate ``η`` and weight decay ``λ`` on both (``optax.add_decayed_weights(λ)``
  before ``optax.sgd(η)``),

      B ← B − η (∂L_t/∂W + λ B),    W ← W − η (∂L_t/∂W + λ W),    so    B − W ← (1 − ηλ)(B − W),

  and the feedback aligns with the readout geometrically.

What this does not model: the paper's low-pass filtered readout (``κ``) and filtered eligibility
traces; the head reads the output of the current step.

Reference: G. Bellec et al., "A solution to the learning dilemma for recurrent networks of spiking
neurons", Nature Communications 11:3625, 2020, arXiv:1901.09049 (random and adaptive e-prop).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rtrl_jax._src.trainer import Head, linear_head

FEEDBACK_KINDS = ("random", "adaptive")
"""The kinds of :func:`feedback_head`."""


def _readout_with_feedback(adaptive: bool):
    """``out @ W`` whose cotangent on ``out`` goes through ``B`` (see the module docstring)."""

    @jax.custom_vjp
    def readout(out, kernel, feedback):
        del feedback
        return out @ kernel

    def forward(out, kernel, feedback):
        return out @ kernel, (out, feedback)

    def backward(residuals, logits_bar):
        out, feedback = residuals
        kernel_bar = jnp.einsum("...n,...k->nk", out, logits_bar)
        feedback_bar = kernel_bar if adaptive else jnp.zeros_like(feedback)
        return logits_bar @ feedback.T, kernel_bar, feedback_bar

    readout.defvjp(forward, backward)
    return readout


def feedback_head(kind: str = "random") -> Head:
    """A linear readout whose learning signal goes through a feedback matrix ``B``.

    Args:
      kind: ``"random"`` (``B`` fixed) or ``"adaptive"`` (``B`` receives the readout kernel's
        gradient), see the module docstring.

    Returns:
      A :class:`~rtrl_jax.Head` with parameters ``{"kernel": W, "bias": b, "feedback": B}``; ``W`` and
      ``b`` as :func:`~rtrl_jax.linear_head`, ``B`` drawn independently with the kernel's scale.

    Example:
      >>> head = feedback_head("random")
      >>> head_params = head.init(key, core.output_shape[-1], num_classes)
      >>> step = make_train_step(core, eprop(core), optax.adam(1e-3), head=head)   # random e-prop
    """
    if kind not in FEEDBACK_KINDS:
        raise ValueError(f"feedback kind must be one of {', '.join(FEEDBACK_KINDS)}, got {kind!r}.")
    linear = linear_head()
    readout = _readout_with_feedback(kind == "adaptive")

    def init(key, out_size, num_classes, dtype=jnp.float32):
        key_readout, key_feedback = jax.random.split(key)
        params = linear.init(key_readout, out_size, num_classes, dtype)
        feedback = linear.init(key_feedback, out_size, num_classes, dtype)["kernel"]
        return {**params, "feedback": feedback}

    def apply(head_params, out):
        return readout(out, head_params["kernel"], head_params["feedback"]) + head_params["bias"]

    return Head(init, apply)

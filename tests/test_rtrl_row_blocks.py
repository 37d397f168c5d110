"""Exact RTRL's default row blocks: a large trace is held in row chunks updated one at a time, which
keeps a step's peak memory at most 1.5× the trace (XLA's memory analysis of the compiled, donated
step); small traces stay whole."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rtrl_jax as rj
from rtrl_jax._src.rtrl import (
    CHUNKED_TRACE_BYTES,
    DEFAULT_ROW_BLOCKS,
    RowChunks,
    _propagate,
    default_row_blocks,
)


def test_default_row_blocks_chunk_only_large_traces():
    small = [jax.ShapeDtypeStruct((100, 32), jnp.float32)]
    large = [jax.ShapeDtypeStruct((CHUNKED_TRACE_BYTES // 128, 32), jnp.float32)]
    assert default_row_blocks(small) == 1
    assert default_row_blocks(large) == DEFAULT_ROW_BLOCKS


@pytest.mark.x64
@pytest.mark.parametrize("ordered", [False, True])
def test_ordered_updates_equal_independent_ones_even_past_a_non_finite_entry(ordered):
    # A NaN or inf in one block (or part) reaches the next product only through the ordering's data
    # dependence, and must not turn that block's entries into NaN.
    keys = jax.random.split(jax.random.PRNGKey(0), 7)
    shapes = [(12, 5), (7, 5), (20, 5)]
    dense = [jax.random.normal(k, s, jnp.float64) for k, s in zip(keys[:3], shapes, strict=True)]
    dense[0] = dense[0].at[0, 0].set(jnp.nan)
    dense[1] = dense[1].at[0, 0].set(jnp.inf)
    blocks = [RowChunks((dense[0][:5], dense[0][5:])), dense[1], RowChunks((dense[2][:7], dense[2][7:]))]
    immediates = [jax.random.normal(k, s, jnp.float64) for k, s in zip(keys[3:6], shapes, strict=True)]
    dynamics_t = jax.random.normal(keys[6], (5, 5), jnp.float64)
    updated = jax.jit(_propagate, static_argnums=3)(blocks, immediates, dynamics_t, ordered)
    assert isinstance(updated[0], RowChunks) and [p.shape[0] for p in updated[0].parts] == [5, 7]
    for new, block, imm in zip(updated, dense, immediates, strict=True):
        new = new.dense() if isinstance(new, RowChunks) else new
        np.testing.assert_allclose(new, block @ dynamics_t + imm, rtol=1e-13, atol=1e-13)
    assert np.isfinite(updated[2].dense()).all()


def test_a_dominant_block_is_held_in_near_equal_row_chunks():
    core = rj.from_linen(nn.SimpleCell(features=32), 8)
    params, carry = core.init(jax.random.PRNGKey(0))
    trace = jax.eval_shape(rj.rtrl(core, row_blocks=3).init, params, carry)
    # The recurrent kernel's 1024 rows are more than a third of the 1312 rows: parts of <= 438.
    recurrent = trace.influence["h"]["kernel"]
    assert isinstance(recurrent, RowChunks)
    assert [p.shape for p in recurrent.parts] == [(341, 32), (341, 32), (342, 32)]
    assert trace.influence["i"]["kernel"].shape == (256, 32)


def _peak_over_trace(estimator, core, params, carry):
    trace = estimator.init(params, carry)
    x = jnp.ones((8,), jnp.float32)
    step = jax.jit(lambda t, c, x: estimator.step(t, params, c, x), donate_argnums=0)
    analysis = step.lower(trace, carry, x).compile().memory_analysis()
    peak = (
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes
    )
    return peak / sum(leaf.nbytes for leaf in jax.tree.leaves(trace))


@pytest.mark.parametrize(("cell", "features"), [(nn.SimpleCell, 192), (nn.GRUCell, 128), (nn.LSTMCell, 96)])
def test_default_peak_is_at_most_one_and_a_half_traces_for_a_large_trace(cell, features):
    core = rj.from_linen(cell(features=features), 8)
    params, carry = core.init(jax.random.PRNGKey(0))
    assert rj.trace_bytes(rj.rtrl(core), params, carry) >= CHUNKED_TRACE_BYTES
    assert _peak_over_trace(rj.rtrl(core), core, params, carry) <= 1.5

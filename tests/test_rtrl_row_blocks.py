"""Exact RTRL's default row blocks: chunked updates for large traces keep a step's peak memory at
most 1.5× the trace (XLA's memory analysis of the compiled, donated step), small traces stay whole."""

import flax.linen as nn
import jax
import jax.numpy as jnp

import rtrl_jax as rj
from rtrl_jax._src.rtrl import CHUNKED_TRACE_BYTES, DEFAULT_ROW_BLOCKS, default_row_blocks


def test_default_row_blocks_chunk_only_large_traces():
    small = [jax.ShapeDtypeStruct((100, 32), jnp.float32)]
    large = [jax.ShapeDtypeStruct((CHUNKED_TRACE_BYTES // 128, 32), jnp.float32)]
    assert default_row_blocks(small) == 1
    assert default_row_blocks(large) == DEFAULT_ROW_BLOCKS


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


def test_default_peak_is_at_most_one_and_a_half_traces_for_a_megabyte_trace():
    core = rj.from_linen(nn.SimpleCell(features=64), 8)
    params, carry = core.init(jax.random.PRNGKey(0))
    assert rj.trace_bytes(rj.rtrl(core), params, carry) >= CHUNKED_TRACE_BYTES
    assert _peak_over_trace(rj.rtrl(core), core, params, carry) <= 1.5

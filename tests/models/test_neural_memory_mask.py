"""NeuralMemory (models/neural_memory.py): masked tokens inside a row leave the memory and its momentum bitwise
unchanged, with momentum on (eta > 0) and a nonzero carried surprise S, on the chunked XLA path and on the TPU
kernel in interpret mode. Padding gates alone would keep S but move M by it (eq. 13: M_t = M_{t-1} + S_{t-1})."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from looped_jax.models.neural_memory import MemoryCarry, NeuralMemory
from pallas_kernels.memory_update import MemoryState, memory_update


def memory(impl: str) -> NeuralMemory:
    kw = dict(num_heads=2, head_dim=16, chunk_size=4, max_lr=0.1, init_std=1.0, out_init_std=0.1)
    return NeuralMemory(32, **kw, memory="mlp", eta_bias=3.0, impl=impl, rngs=nnx.Rngs(0))


def assert_state_bitwise(got: MemoryState, want: MemoryState) -> None:
    for g, w in zip(got.weights + got.momentum, want.weights + want.momentum, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@nnx.jit
def run(mem, x, carry, valid):
    return mem(x, carry, valid)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_masked_tokens_in_a_row_leave_memory_and_momentum_unchanged(impl):
    mem = memory(impl)
    B, C = 2, 4
    x = jax.random.normal(jax.random.key(1), (B, 3 * C, 32))
    # a first segment of 4 tokens gives a nonzero surprise S to carry
    _, carry = run(mem, x[:, :C], mem.initial_carry(B), jnp.ones((B, C), bool))
    s_norm = float(jnp.max(jnp.abs(carry.state.momentum[0])))
    assert s_norm > 1e-4
    # the next segment: 3 valid tokens, 5 masked ones (across a chunk boundary), 4 valid ones
    valid = jnp.asarray([True] * 3 + [False] * 5 + [True] * 4)[None].repeat(B, 0)
    x2 = jax.random.normal(jax.random.key(2), (B, 3 * C, 32))
    # the state after the 3 valid tokens ...
    _, after_valid = run(mem, x2[:, :3], carry, jnp.ones((B, 3), bool))
    # ... is the state after those 3 tokens plus the 5 masked ones
    _, after_masked = run(mem, x2[:, :8], carry, valid[:, :8])
    assert_state_bitwise(after_masked.state, after_valid.state)
    # and the valid tokens after the masked ones do write into the memory again
    _, after_row = run(mem, x2, carry, valid)
    assert float(jnp.max(jnp.abs(after_row.state.weights[0] - after_valid.state.weights[0]))) > 1e-4


def test_masked_tokens_match_the_row_without_them_through_the_op():
    """Masked whole chunks in the middle of a row (the convolution history aside): the memory state equals that of
    feeding the same q/k/v/gates with those tokens cut out."""
    mem = memory("xla")
    B, C = 2, 4
    x = jax.random.normal(jax.random.key(3), (B, 4 * C, 32))
    keep = np.array([True] * C + [False] * (2 * C) + [True] * C)
    valid = jnp.asarray(keep)[None].repeat(B, 0)
    carry0 = mem.initial_carry(B)

    @nnx.jit
    def both(mem, x, carry0, valid):
        q, k, v, _ = mem.features(x, carry0.conv_BL3HK)
        gates = mem.gates(x, valid)
        _, masked = mem(x, carry0, valid)
        idx = np.flatnonzero(keep)
        cut = tuple(a[:, :, idx] for a in (q, k, v, *gates))
        _, st = memory_update(*cut, carry0.state, chunk_size=mem.chunk_size, memory=mem.memory, impl="xla")
        return masked, st

    masked, st_cut = both(mem, x, carry0, valid)
    assert isinstance(masked, MemoryCarry)
    assert_state_bitwise(masked.state, st_cut)

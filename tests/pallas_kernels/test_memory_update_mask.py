"""Masked tokens inside a row leave the Titans memory untouched (``valid_BHT`` of ``memory_update``).

With momentum on, gates alone (alpha = 0, eta = 1, theta = 0) keep the surprise, ``S_t = S_{t-1}``, but still move
the memory by it, ``M_t = M_{t-1} + S_{t-1}`` (eq. 13). With the mask in the op, a masked token carries both:
``M_t = M_{t-1}``, ``S_t = S_{t-1}``. Checked bitwise (``array_equal``) on every path: a row with masked tokens in
its middle gives the state and valid-token outputs of the same row with those tokens cut out, whenever the masked
tokens fill whole chunks (chunk_size 1: any position); masks inside a chunk are checked against the reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.memory_update import (
    MemoryState,
    memory_update,
    memory_update_per_token_exact,
    memory_update_reference,
)
from tests.pallas_kernels.test_memory_update import check_against_reference, fast_jit, make_inputs

PATHS = {  # name -> (fn(chunk_size) -> partial of a memory-update function)
    "reference": lambda c: functools.partial(memory_update_reference, chunk_size=c),
    "xla": lambda c: functools.partial(memory_update, chunk_size=c, impl="xla"),
    "pallas_interpret": lambda c: functools.partial(memory_update, chunk_size=c, impl="pallas", interpret=True),
}


def momentum_inputs(T, seed=0):
    """Random inputs with momentum on: eta near 1 and a nonzero starting surprise S0."""
    q, k, v, alpha, eta, theta, state = make_inputs(B=2, H=2, T=T, seed=seed)
    eta = 0.5 + 0.5 * eta  # in (0.5, 1): a strong momentum term
    assert float(jnp.min(jnp.abs(state.momentum[0]))) > 0.0
    return q, k, v, alpha, eta, theta, state


def take(args, idx):
    """Tokens ``idx`` of every per-token input; the state is passed through."""
    *per_token, state = args
    return tuple(x[:, :, idx] for x in per_token) + (state,)


def assert_bitwise(got, want):
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def assert_state_bitwise(got, want):
    assert_bitwise(got.weights + got.momentum, want.weights + want.momentum)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("chunk_size,masked", [(4, range(4, 12)), (1, (2, 3, 6, 9, 10))])
def test_masked_tokens_leave_memory_and_momentum_unchanged(path, chunk_size, masked):
    """A row with masked tokens in the middle equals the row without them: state and outputs, bitwise."""
    T = 16
    args = momentum_inputs(T)
    keep = np.array([t not in masked for t in range(T)])
    assert keep[0] and keep[-1] and not keep.all()  # masked tokens strictly inside the row
    valid = jnp.broadcast_to(jnp.asarray(keep), (2, 2, T))
    fn = PATHS[path](chunk_size)
    y_masked, st_masked = fast_jit(lambda *a: fn(*a, valid_BHT=valid))(*args)
    y_cut, st_cut = fast_jit(fn)(*take(args, np.flatnonzero(keep)))
    assert_state_bitwise(st_masked, st_cut)
    assert_bitwise([y_masked[:, :, keep]], [y_cut])
    # the masked tokens did see a memory that the valid tokens moved: the test is not vacuous
    assert float(jnp.max(jnp.abs(st_cut.weights[0] - args[-1].weights[0]))) > 1e-3


@pytest.mark.parametrize("path", list(PATHS))
def test_masked_run_carries_state_across_masked_tokens(path):
    """The state after the valid prefix is the state after prefix + masked tokens, and masked tokens read it."""
    C, T = 4, 12
    args = momentum_inputs(T, seed=1)
    valid = jnp.broadcast_to(jnp.arange(T) < C, (2, 2, T))  # the first chunk valid, then 8 masked tokens
    fn = PATHS[path](C)
    y, st = fast_jit(lambda *a: fn(*a, valid_BHT=valid))(*args)
    _, st_prefix = fast_jit(fn)(*take(args, np.arange(C)))
    assert_state_bitwise(st, st_prefix)
    w = st_prefix.weights[0]
    want = jnp.einsum("bhtk,bhkv->bhtv", args[0][:, :, C:], w, precision="highest")  # y_t = M_{t-1}(q_t)
    np.testing.assert_allclose(np.asarray(y[:, :, C:]), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_per_token_exact_skips_masked_tokens():
    T = 10
    args = momentum_inputs(T, seed=2)
    keep = np.ones(T, bool)
    keep[[3, 4, 7]] = False
    valid = jnp.broadcast_to(jnp.asarray(keep), (2, 2, T))
    y_masked, st_masked = fast_jit(lambda *a: memory_update_per_token_exact(*a, valid_BHT=valid))(*args)
    y_cut, st_cut = fast_jit(memory_update_per_token_exact)(*take(args, np.flatnonzero(keep)))
    assert_state_bitwise(st_masked, st_cut)
    assert_bitwise([y_masked[:, :, keep]], [y_cut])


def test_gates_alone_move_the_memory_by_the_surprise():
    """Why the mask enters the op: padding gates without it keep S but add S to M at every masked token."""
    C, T = 4, 12
    q, k, v, alpha, eta, theta, state = momentum_inputs(T, seed=1)
    pad = jnp.arange(T) >= C
    gated = (q, k, v, jnp.where(pad, 0.0, alpha), jnp.where(pad, 1.0, eta), jnp.where(pad, 0.0, theta), state)
    _, st_gates = fast_jit(functools.partial(memory_update, chunk_size=C, impl="xla"))(*gated)
    _, st_prefix = fast_jit(functools.partial(memory_update, chunk_size=C, impl="xla"))(*take(gated, np.arange(C)))
    assert_bitwise(st_gates.momentum, st_prefix.momentum)  # S_t = S_{t-1}
    moved = st_prefix.weights[0] + (T - C) * st_prefix.momentum[0]  # M_t = M_{t-1} + S_{t-1}, 8 times
    np.testing.assert_allclose(np.asarray(st_gates.weights[0]), np.asarray(moved), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "impl,memory,max_norm", [("xla", "linear", None), ("xla", "mlp", 0.5), ("pallas", "linear", 0.4)]
)
def test_masks_inside_chunks_match_reference(impl, memory, max_norm):
    """Masks that cut chunks: values and gradients of the op against the reference (same tolerances as the
    unmasked parity tests)."""
    T, C = 13, 4
    q, k, v, alpha, eta, theta, state = make_inputs(B=1, H=2, T=T, memory=memory, seed=3)
    keep = np.ones((1, 2, T), bool)
    keep[0, 0, [1, 5, 6, 11]] = False
    keep[0, 1, [4, 7, 12]] = False
    args = (q, k, v, alpha, eta, theta, state)
    check_against_reference(
        args, chunk_size=C, memory=memory, impl=impl, interpret=True, max_norm=max_norm, valid=jnp.asarray(keep)
    )


def test_valid_validation():
    q, k, v, alpha, eta, theta, state = make_inputs(T=6)
    call = functools.partial(memory_update, q, k, v, alpha, eta, theta, state, chunk_size=4)
    with pytest.raises(ValueError, match="valid_BHT dtype must be bool"):
        call(valid_BHT=jnp.ones((1, 2, 6), jnp.float32))
    with pytest.raises(ValueError, match=r"valid_BHT must be \[B, H, T\]"):
        call(valid_BHT=jnp.ones((1, 2, 5), bool))
    with pytest.raises(ValueError, match="valid_BHT must be a bool array"):
        call(valid_BHT=[[True] * 6] * 2)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_export_lowering_with_mask(platform):
    """The mask changes only the XLA around the kernels: forward and gradient still lower with the kernel."""
    B, H, T, K = 2, 2, 200, 64
    sds = lambda *s, dtype=jnp.float32: jax.ShapeDtypeStruct(s, dtype)  # noqa: E731
    w = sds(B, H, K, K)
    args = (sds(B, H, T, K), sds(B, H, T, K), sds(B, H, T, K), sds(B, H, T), sds(B, H, T), sds(B, H, T))
    state, valid = MemoryState((w,), (w,)), sds(B, H, T, dtype=jnp.bool_)
    fwd = functools.partial(
        memory_update, chunk_size=64, impl="pallas", interpret=False, max_surprise_norm=1.0, platform=platform
    )
    run = lambda *a: fwd(*a[:7], valid_BHT=a[7])  # noqa: E731
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    kernel_tag = "tpu_custom_call" if platform == "tpu" else "__gpu$xla.gpu.triton"
    for f in (run, jax.grad(lambda *a: jnp.sum(run(*a)[0]), argnums=tuple(range(7)))):
        exp = jax.export.export(jax.jit(f), platforms=[platform], disabled_checks=checks)(*args, state, valid)
        assert kernel_tag in exp.mlir_module()

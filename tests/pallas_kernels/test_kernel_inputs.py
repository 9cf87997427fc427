"""Input checks of both Pallas ops (issue 18): every bad input is a ValueError whose message names the argument; valid
but unusual inputs (numpy scalars and arrays, gates on the edges of their ranges, traced gates) are accepted.

Valid ranges (``memory_update``): alpha_BHT and eta_BHT in [0, 1], theta_BHT >= 0, all finite; read only when the
gates are concrete (under jit they are tracers and reading them would need a device-to-host sync)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.feedback_attention import feedback_attention
from pallas_kernels.memory_update import MemoryState, memory_retrieve, memory_update


def fam_arrays(B=1, T=32, H=2, G=1, K=8, S=16, F=2, dtype=jnp.float32):
    """q_BTHK, k_BTGK, v_BTGK, famk_BNFGK, famv_BNFGK (numpy random, then jax)."""
    rng = np.random.default_rng(0)
    N = -(-T // S)
    shapes = [(B, T, H, K), (B, T, G, K), (B, T, G, K), (B, N, F, G, K), (B, N, F, G, K)]
    return [jnp.asarray(rng.standard_normal(s).astype(np.float32)).astype(dtype) for s in shapes]


def mem_arrays(B=1, H=2, T=6, K=8, V=8, hidden=None):
    """q, k, v, alpha, eta, theta (gates in (0.05, 0.5)) and a float32 MemoryState."""
    rng = np.random.default_rng(0)
    n = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32))
    gate = lambda: jnp.asarray(rng.uniform(0.05, 0.5, (B, H, T)).astype(np.float32))
    dims = [K, V] if hidden is None else [K, hidden, V]
    ws = tuple(n(B, H, a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))
    return [n(B, H, T, K), n(B, H, T, K), n(B, H, T, V), gate(), gate(), gate(), MemoryState(ws, ws)]


FAM_ARGS = ("q", "k", "v", "famk", "famv")
MEM_ARGS = ("q", "k", "v", "alpha", "eta", "theta", "state")


def fam_call(**over):
    """feedback_attention on small valid inputs with some arguments replaced: an array argument by ``fn(array)``
    (or by a value that is not callable), a keyword by its value."""
    a = dict(zip(FAM_ARGS, fam_arrays(), strict=True))
    kw = dict(block_size=16, memory_segments=1)
    for name, val in over.items():
        if name in a:
            a[name] = val(a[name]) if callable(val) else val
        else:
            kw[name] = val
    return lambda: feedback_attention(*a.values(), **kw)


def mem_call(fn=memory_update, **over):
    """memory_update (or ``fn``) on small valid inputs with some arguments replaced, as in fam_call."""
    a = dict(zip(MEM_ARGS, mem_arrays(), strict=True))
    kw = dict(chunk_size=4)
    for name, val in over.items():
        if name in a:
            a[name] = val(a[name]) if callable(val) else val
        else:
            kw[name] = val
    return lambda: fn(*a.values(), **kw)


def retrieve_call(state=None, q=None, memory="linear"):
    st, q0 = mem_arrays()[-1], mem_arrays()[0]
    return lambda: memory_retrieve(st if state is None else state, q0 if q is None else q, memory=memory)


f16 = lambda x: x.astype(jnp.float16)
i32 = lambda x: x.astype(jnp.int32)
empty_batch = lambda x: x[:0]
empty_head_dim = lambda x: x[..., :0]
empty_time = lambda x: x[:, :, :0]
to_list = lambda x: np.asarray(x).tolist()
fam_all = lambda f: {name: f for name in FAM_ARGS}
inf, nan = float("inf"), float("nan")

# name -> (call, pattern of the message; every message starts with or names the bad argument)
BAD_INPUTS = {
    # feedback attention
    "fam_sm_scale_inf": (fam_call(sm_scale=inf), r"sm_scale must be a finite float > 0 or None, got inf"),
    "fam_sm_scale_nan": (fam_call(sm_scale=nan), r"sm_scale must be a finite float > 0 or None, got nan"),
    "fam_sm_scale_zero": (fam_call(sm_scale=0.0), r"sm_scale must be a finite float > 0"),
    "fam_sm_scale_string": (fam_call(sm_scale="0.5"), r"sm_scale must be a finite float > 0"),
    "fam_batch_0": (fam_call(**fam_all(empty_batch)), r"q_BTHK must have B, T, H, K >= 1, got shape \(0, 32, 2, 8\)"),
    "fam_head_dim_0": (fam_call(**fam_all(empty_head_dim)), r"q_BTHK must have B, T, H, K >= 1"),
    "fam_famk_none": (fam_call(famk=None), r"famk_BNFGK must be an array \[B,N,F,G,K\]"),
    "fam_famv_none": (fam_call(famv=None), r"famv_BNFGK must be an array"),
    "fam_q_list": (fam_call(q=to_list), r"q_BTHK must be an array .* got list"),
    "fam_k_scalar": (fam_call(k=1.0), r"k_BTGK must be an array .* got float"),
    "fam_float16": (fam_call(**fam_all(f16)), r"q_BTHK dtype must be one of float32/bfloat16, got float16"),
    "fam_int32": (fam_call(**fam_all(i32)), r"q_BTHK dtype must be one of float32/bfloat16, got int32"),
    "fam_v_dtype_mismatch": (fam_call(v=f16), r"v_BTGK dtype must equal q_BTHK dtype float32, got float16"),
    "fam_interpret_yes": (fam_call(impl="pallas", interpret="yes"), r"interpret must be True, False or None"),
    "fam_interpret_yes_xla": (fam_call(impl="xla", interpret="yes"), r"interpret must be True, False or None"),
    "fam_block_q_with_xla": (fam_call(impl="xla", block_q=12), r"block_q must be a multiple of 8 dividing"),
    "fam_block_k_with_xla": (fam_call(impl="xla", block_k=32), r"block_k must be a multiple of 8 dividing"),
    "fam_block_size_float": (fam_call(block_size=16.0), r"block_size must be an int >= 1, got 16.0"),
    "fam_platform_unknown": (fam_call(platform="metal"), r"platform must be one of"),
    # memory update
    "mem_int32_qkv": (mem_call(q=i32, k=i32, v=i32), r"q_BHTK dtype must be float32 or bfloat16, got int32"),
    "mem_int32_v": (mem_call(v=i32), r"v_BHTV dtype must be float32 or bfloat16, got int32"),
    "mem_float16_q": (mem_call(q=f16), r"q_BHTK dtype must be float32 or bfloat16, got float16"),
    "mem_float16_k": (mem_call(k=f16), r"k_BHTK dtype must be float32 or bfloat16, got float16"),
    "mem_float16_alpha": (mem_call(alpha=f16), r"alpha_BHT dtype must be float32 or bfloat16, got float16"),
    "mem_float16_state": (
        mem_call(state=lambda s: MemoryState(tuple(map(f16, s.weights)), s.momentum)),
        r"state0.weights\[0\] dtype must be float32 or bfloat16, got float16",
    ),
    "mem_state_tuple": (mem_call(state=lambda s: tuple(s)), r"state0 must be a MemoryState, got tuple"),
    "mem_max_norm_inf": (mem_call(max_surprise_norm=inf), r"max_surprise_norm must be a finite float > 0 or None"),
    "mem_max_norm_nan": (mem_call(max_surprise_norm=nan), r"max_surprise_norm must be a finite float > 0 or None"),
    "mem_chunk_size_float": (mem_call(chunk_size=4.0), r"chunk_size must be a positive int, got 4.0"),
    "mem_batch_0": (mem_call(q=empty_batch, k=empty_batch), r"q_BHTK must have B, H, d_k >= 1, got shape \(0, "),
    "mem_head_dim_0": (mem_call(q=empty_head_dim, k=empty_head_dim), r"q_BHTK must have B, H, d_k >= 1"),
    "mem_time_0": (
        mem_call(q=empty_time, k=empty_time, v=empty_time, alpha=empty_time, eta=empty_time, theta=empty_time),
        r"q_BHTK must have a sequence length T >= 1",
    ),
    "mem_scalar_alpha": (mem_call(alpha=0.1), r"alpha_BHT must be an array \[B, H, T\] .* got float"),
    "mem_scalar_theta": (mem_call(theta=np.float32(0.1)), r"theta_BHT must be 3-D \[B, H, T\], got shape \(\)"),
    "mem_list_q": (mem_call(q=to_list), r"q_BHTK must be an array .* got list"),
    "mem_alpha_above_1": (
        mem_call(alpha=lambda x: x.at[0, 0, 0].set(1.5)),
        r"alpha_BHT must be finite and in \[0, 1\], got values in \[.*, 1.5\]",
    ),
    "mem_alpha_negative": (mem_call(alpha=lambda x: x.at[0, 0, 0].set(-0.5)), r"alpha_BHT must be finite and in"),
    "mem_eta_nan": (mem_call(eta=lambda x: x.at[0, 0, 0].set(nan)), r"eta_BHT must be finite and in \[0, 1\], got 1 "),
    "mem_theta_negative": (mem_call(theta=lambda x: x.at[0, 1, 2].set(-0.1)), r"theta_BHT must be finite and >= 0"),
    "mem_theta_inf": (mem_call(theta=lambda x: x.at[0, 1, 2].set(inf)), r"theta_BHT must be finite and >= 0"),
    "mem_interpret_yes": (mem_call(impl="pallas", interpret="yes"), r"interpret must be True, False or None"),
    "mem_interpret_yes_xla": (mem_call(impl="xla", interpret="yes"), r"interpret must be True, False or None"),
    "mem_platform_unknown": (mem_call(platform="metal"), r"platform must be one of"),
    # memory retrieve
    "retrieve_mlp_on_linear": (
        retrieve_call(memory="mlp"),
        r"memory='mlp' needs >= 2 weight matrices in state.weights, got 1",
    ),
    "retrieve_linear_on_mlp": (
        retrieve_call(state=mem_arrays(hidden=4)[-1]),
        r"memory='linear' needs 1 weight matrix in state.weights, got 2",
    ),
    "retrieve_int32_q": (retrieve_call(q=i32(mem_arrays()[0])), r"q_BHTK dtype must be float32 or bfloat16"),
    "retrieve_list_q": (retrieve_call(q=to_list(mem_arrays()[0])), r"q_BHTK must be an array"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_a_clear_error(name):
    call, message = BAD_INPUTS[name]
    with pytest.raises(ValueError, match=message):
        call()


def assert_same(got, want):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


ACCEPTED = {  # name -> (call, the call it must equal exactly)
    "fam_numpy_scalars": (
        fam_call(block_size=np.int64(16), memory_segments=np.int32(1), sm_scale=np.float32(0.25), impl="xla"),
        fam_call(sm_scale=0.25, impl="xla"),
    ),
    "fam_numpy_arrays": (fam_call(**fam_all(np.asarray), impl="xla"), fam_call(impl="xla")),
    "mem_numpy_scalars": (
        mem_call(chunk_size=np.int64(4), max_surprise_norm=np.float32(0.5), impl="xla"),
        mem_call(max_surprise_norm=0.5, impl="xla"),
    ),
    "mem_numpy_arrays": (
        mem_call(**{name: np.asarray for name in MEM_ARGS[:-1]}, impl="xla"),
        mem_call(impl="xla"),
    ),
}


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_valid_unusual_input_is_accepted(name):
    got, want = ACCEPTED[name]
    assert_same(got(), want())


def test_gates_on_the_edges_of_their_ranges_are_accepted():
    """alpha = 1 (forget everything), eta = 0 (no momentum), theta = 0 (no write) are valid and stay finite."""
    q, k, v, alpha, eta, theta, st = mem_arrays()
    y, _ = memory_update(q, k, v, jnp.ones_like(alpha), jnp.zeros_like(eta), jnp.zeros_like(theta), st, chunk_size=4)
    assert bool(jnp.all(jnp.isfinite(y)))


def test_gate_ranges_are_not_read_under_jit():
    """Under jit the gates are tracers: no host sync, so out-of-range values pass unchecked there (documented)."""
    q, k, v, alpha, eta, theta, st = mem_arrays()
    y, _ = jax.jit(lambda a: memory_update(q, k, v, a, eta, theta, st, chunk_size=4, impl="xla"))(alpha + 1.0)
    assert y.shape == q.shape

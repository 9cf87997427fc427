"""Titans memory update: chunked XLA form and Pallas kernels (interpret mode) against the token-by-token reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from pallas_kernels.memory_update import (
    MemoryState,
    chunked,
    gpu,
    init_memory_state,
    memory_retrieve,
    memory_update,
    memory_update_per_token_exact,
    memory_update_reference,
    tpu,
)

GRAD_ARGS = tuple(range(7))  # q, k, v, alpha, eta, theta, state0
# LLVM optimisation is most of the CPU compile time of these small programs; level 0 halves it
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def make_inputs(B=1, H=2, T=13, K=8, V=8, *, memory="linear", hidden=16, num_layers=2, gates="full", seed=0):
    """Random inputs from numpy (no per-op XLA compiles); k is scaled to unit norm on average."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    sigmoid = lambda x: 1.0 / (1.0 + np.exp(-x))
    q, k, v = normal(B, H, T, K), normal(B, H, T, K) / np.sqrt(K), normal(B, H, T, V)
    alpha = sigmoid(normal(B, H, T) - 1.5)
    eta = sigmoid(normal(B, H, T) + 1.0)
    theta = 0.2 * sigmoid(normal(B, H, T))
    if gates == "delta":  # eta = 0: gated delta rule
        eta = np.zeros_like(eta)
    elif gates == "ttt":  # alpha = eta = 0: TTT
        alpha, eta = np.zeros_like(alpha), np.zeros_like(eta)
    dims = [K, V] if memory == "linear" else [K] + [hidden] * (num_layers - 1) + [V]
    weights = tuple(normal(B, H, a, b) / np.sqrt(a) for a, b in zip(dims[:-1], dims[1:], strict=True))
    momentum = tuple(0.1 * normal(*w.shape) for w in weights)
    to_jax = lambda x: jnp.asarray(x)
    state = MemoryState(tuple(map(to_jax, weights)), tuple(map(to_jax, momentum)))
    return tuple(map(to_jax, (q, k, v, alpha, eta, theta))) + (state,)


def scalar_loss(fn):
    """A loss touching every output, so gradients reach all inputs through y and the final state; aux = outputs."""

    def loss(*args):
        y, st = fn(*args)
        return jnp.sum(y * jnp.cos(y)) + sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(st)), (y, st)

    return loss


def assert_trees_close(got, want, rtol):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape
        assert np.all(np.isfinite(g))
        scale = float(np.max(np.abs(w))) + 1e-6
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * scale)


def check_against_reference(args, *, chunk_size, memory, impl, max_norm=None, grads=True, interpret=None, valid=None):
    fn = functools.partial(
        memory_update,
        chunk_size=chunk_size,
        memory=memory,
        impl=impl,
        interpret=interpret,
        max_surprise_norm=max_norm,
        valid_BHT=valid,
    )
    ref = functools.partial(
        memory_update_reference, chunk_size=chunk_size, memory=memory, max_surprise_norm=max_norm, valid_BHT=valid
    )
    if not grads:
        assert_trees_close(fast_jit(fn)(*args), fast_jit(ref)(*args), rtol=1e-4)
        return
    (_, out), g = fast_jit(jax.value_and_grad(scalar_loss(fn), argnums=GRAD_ARGS, has_aux=True))(*args)
    (_, out_ref), g_ref = fast_jit(jax.value_and_grad(scalar_loss(ref), argnums=GRAD_ARGS, has_aux=True))(*args)
    assert_trees_close(out, out_ref, rtol=1e-4)
    assert_trees_close(g, g_ref, rtol=2e-4)


CASES = [  # (memory, chunk_size, T, gates, max_surprise_norm, d_v)
    ("linear", 4, 13, "full", None, 8),  # ragged: 13 = 3 * 4 + 1
    ("linear", 8, 5, "ttt", 0.3, 8),  # T < chunk, alpha = eta = 0, clipped
    ("mlp", 4, 11, "delta", 0.5, 8),  # residual MLP, eta = 0, clipped
    ("mlp", 5, 9, "full", None, 6),  # d_k != d_v: no residual
]


@pytest.mark.parametrize("memory,chunk_size,T,gates,max_norm,V", CASES)
def test_chunked_matches_reference(memory, chunk_size, T, gates, max_norm, V):
    args = make_inputs(T=T, V=V, memory=memory, gates=gates)
    check_against_reference(args, chunk_size=chunk_size, memory=memory, impl="xla", max_norm=max_norm)


@pytest.mark.parametrize("memory,chunk_size,T,max_norm", [("linear", 4, 10, 0.4), ("mlp", 8, 13, None)])
def test_tpu_kernel_interpret_matches_reference(memory, chunk_size, T, max_norm):
    args = make_inputs(T=T, memory=memory)
    check_against_reference(
        args, chunk_size=chunk_size, memory=memory, impl="pallas", interpret=True, max_norm=max_norm
    )


@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_gpu_kernel_interpret_matches_chunked(memory):
    B, H, N, C, K = 1, 2, 3, 16, 16
    q, k, v, alpha, eta, theta, state = make_inputs(B, H, N * C, K, K, memory=memory, hidden=32)
    split = lambda x: x.reshape(B, H, N, C, *x.shape[3:])
    residual = memory == "mlp"

    @fast_jit
    def run(q, k, v, alpha, eta, theta, state):
        coeffs = chunked.chunk_coefficients(split(alpha), split(eta), split(theta), jnp.ones((B, H, N, C)))
        xs = (split(q), split(k), split(v), coeffs.gt, coeffs.vec, state.weights, state.momentum)
        got = gpu.memory_update_gpu(*xs, residual=residual, max_surprise_norm=0.5, interpret=True)
        want = chunked.scan_chunks(
            *xs[:3], coeffs, state, residual=residual, max_surprise_norm=0.5, return_boundaries=True
        )
        return got, want

    got, want = run(q, k, v, alpha, eta, theta, state)
    assert_trees_close(got[0], want[0], rtol=1e-5)
    assert_trees_close((got[1], got[2]), tuple(want[1]), rtol=1e-5)
    assert_trees_close((got[3], got[4]), tuple(want[2]), rtol=1e-5)


ZERO_SURPRISE_IMPLS = {
    "reference": functools.partial(memory_update_reference, chunk_size=4),
    "xla": functools.partial(memory_update, chunk_size=4, impl="xla"),
    "pallas": functools.partial(memory_update, chunk_size=4, impl="pallas", interpret=True),
}


@pytest.mark.parametrize("memory", ["linear", "mlp"])
@pytest.mark.parametrize("impl", list(ZERO_SURPRISE_IMPLS))
def test_zero_surprise_chunk_with_clipping_has_finite_gradients(impl, memory):
    """theta = 0 on a whole chunk makes that chunk's summed surprise exactly 0; with clipping on, sqrt(0) used to
    turn every gradient NaN (issue 18). Now: with the clip inactive everywhere the gradients equal the unclipped
    ones, and with it active on the other chunks they stay finite and match the reference."""
    q, k, v, alpha, eta, theta, state = make_inputs(T=12, memory=memory)
    args = (q, k, v, alpha, eta, theta.at[:, :, 4:8].set(0.0), state)  # chunk 1 of 3 (chunk_size 4)
    fn = functools.partial(ZERO_SURPRISE_IMPLS[impl], memory=memory)
    grads = lambda max_norm: fast_jit(
        jax.grad(lambda *a: scalar_loss(functools.partial(fn, max_surprise_norm=max_norm))(*a)[0], argnums=GRAD_ARGS)
    )(*args)
    g_inactive, g_unclipped = grads(1e3), grads(None)
    assert_trees_close(g_inactive, g_unclipped, rtol=1e-6)  # also asserts every entry is finite
    g_active = grads(0.05)  # clips chunks 0 and 2 (their surprise norm is ~0.1-1)
    for g in jax.tree.leaves(g_active):
        assert bool(jnp.all(jnp.isfinite(g)))
    pairs = zip(jax.tree.leaves(g_active), jax.tree.leaves(g_unclipped), strict=True)
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in pairs) > 1e-3  # the clip is really active there
    if impl != "reference":
        ref = functools.partial(memory_update_reference, chunk_size=4, memory=memory, max_surprise_norm=0.05)
        g_ref = fast_jit(jax.grad(lambda *a: scalar_loss(ref)(*a)[0], argnums=GRAD_ARGS))(*args)
        assert_trees_close(g_active, g_ref, rtol=2e-4)


def test_chunking_changes_the_result():
    """Sanity for the parity tests above: chunk-start gradients really differ from per-token gradients here."""
    args = make_inputs(T=12)
    y1, _ = fast_jit(functools.partial(memory_update_reference, chunk_size=1))(*args)
    y4, _ = fast_jit(functools.partial(memory_update_reference, chunk_size=4))(*args)
    assert float(jnp.max(jnp.abs(y1 - y4))) > 1e-2


@pytest.mark.parametrize("memory,max_norm", [("linear", None), ("mlp", 0.4)])
def test_chunk_size_one_is_exact_recurrence(memory, max_norm):
    args = make_inputs(T=9, memory=memory)
    got = fast_jit(
        functools.partial(memory_update, chunk_size=1, memory=memory, impl="xla", max_surprise_norm=max_norm)
    )(*args)
    want = fast_jit(functools.partial(memory_update_per_token_exact, memory=memory, max_surprise_norm=max_norm))(*args)
    assert_trees_close(got, want, rtol=1e-4)


def test_short_sequence_updates_memory_and_padding_does_not():
    args = make_inputs(T=3)
    y, st = fast_jit(functools.partial(memory_update, chunk_size=8, impl="xla"))(*args)
    assert float(jnp.max(jnp.abs(st.weights[0] - args[-1].weights[0]))) > 1e-3
    _, st_exact = fast_jit(functools.partial(memory_update_reference, chunk_size=8))(*args)  # never pads
    assert_trees_close(st, st_exact, rtol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_alpha_near_one_and_eta_zero_stay_finite(impl):
    q, k, v, alpha, eta, theta, state = make_inputs(T=10)
    alpha = alpha.at[:, :, 3].set(0.999999).at[:, :, 7].set(1.0)
    eta = eta.at[:, :, 5].set(0.0)
    args = (q, k, v, alpha, eta, theta, state)
    check_against_reference(args, chunk_size=4, memory="linear", impl=impl, interpret=True)


def test_long_sequence_no_nan():
    T = 16384
    q, k, v, alpha, eta, theta, state = make_inputs(B=1, H=1, T=T, K=8, V=8)
    alpha = jnp.full_like(alpha, 1e-3)  # long memory: decay 0.999^16384 ~ 7e-8 across the sequence
    eta = jnp.full_like(eta, 0.99)
    # within a chunk the momentum integrates C gradients taken at one point (~C^2/2 * theta per chunk), so a stable
    # learning rate for C = 64 is ~1e-3; larger theta makes the memory itself diverge (the reference too)
    theta = 2e-3 * theta
    fn = lambda th: scalar_loss(functools.partial(memory_update, chunk_size=64, impl="xla"))(
        q, k, v, alpha, eta, th, state
    )
    (loss, (y, _)), g = fast_jit(jax.value_and_grad(fn, has_aux=True))(theta)
    assert np.isfinite(float(loss)) and bool(jnp.all(jnp.isfinite(g)))
    assert bool(jnp.all(jnp.isfinite(y))) and 0.1 < float(jnp.std(y)) < 100.0


def test_init_memory_state():
    st = init_memory_state(2, 3, 4, 5)
    assert [w.shape for w in st.weights] == [(2, 3, 4, 5)] and float(jnp.abs(st.weights[0]).max()) == 0.0
    key = jax.random.key(0, impl="rbg")  # threefry takes seconds to compile on CPU
    st = init_memory_state(2, 3, 4, 5, memory="mlp", hidden=7, num_layers=3, key=key)
    assert [w.shape for w in st.weights] == [(2, 3, 4, 7), (2, 3, 7, 7), (2, 3, 7, 5)]
    for m, w in zip(st.momentum, st.weights, strict=True):
        assert m.shape == w.shape and float(jnp.abs(m).max()) == 0.0
    w0 = jnp.arange(3 * 4 * 5, dtype=jnp.float32).reshape(3, 4, 5)
    st = init_memory_state(2, 3, 4, 5, weights=(w0,))
    np.testing.assert_array_equal(st.weights[0][1], w0)
    with pytest.raises(ValueError, match="needs `key` or `weights`"):
        init_memory_state(2, 3, 4, 5, memory="mlp")
    with pytest.raises(ValueError, match=r"weights\[0\]"):
        init_memory_state(2, 3, 4, 5, weights=(w0[:, :2],))


def test_retrieve_reads_the_final_memory():
    """memory_retrieve(final_state, q) is the update's own y at the last token (eq. 15 reads the updated memory)."""
    args = make_inputs(T=6, memory="mlp")
    y, st = fast_jit(functools.partial(memory_update, chunk_size=4, memory="mlp", impl="xla"))(*args)
    y_last = memory_retrieve(st, args[0][:, :, -1:], memory="mlp")
    assert_trees_close(y_last, y[:, :, -1:], rtol=1e-5)
    with pytest.raises(ValueError, match="d_k"):
        memory_retrieve(st, args[0][..., :3], memory="mlp")


def test_three_layer_mlp_chunked_matches_reference():
    args = make_inputs(T=7, memory="mlp", num_layers=3)
    check_against_reference(args, chunk_size=3, memory="mlp", impl="xla", grads=False)


def test_validation_errors():
    q, k, v, alpha, eta, theta, state = make_inputs(T=6)
    call = functools.partial(memory_update, chunk_size=4)
    with pytest.raises(ValueError, match="chunk_size"):
        memory_update(q, k, v, alpha, eta, theta, state, chunk_size=0)
    with pytest.raises(ValueError, match="memory must be"):
        call(q, k, v, alpha, eta, theta, state, memory="deep")
    with pytest.raises(ValueError, match="impl must be"):
        call(q, k, v, alpha, eta, theta, state, impl="cuda")
    with pytest.raises(ValueError, match="k_BHTK"):
        call(q, k[..., :4], v, alpha, eta, theta, state)
    with pytest.raises(ValueError, match="v_BHTV"):
        call(q, k, v[:, :, :5], alpha, eta, theta, state)
    with pytest.raises(ValueError, match="eta_BHT"):
        call(q, k, v, alpha, eta[..., :5], theta, state)
    with pytest.raises(ValueError, match="needs >= 2 weight"):
        call(q, k, v, alpha, eta, theta, state, memory="mlp")
    bad = MemoryState((state.weights[0][..., :3],), (state.momentum[0][..., :3],))
    with pytest.raises(ValueError, match="d_v"):
        call(q, k, v, alpha, eta, theta, bad)
    with pytest.raises(ValueError, match="max_surprise_norm"):
        call(q, k, v, alpha, eta, theta, state, max_surprise_norm=0.0)


def _abstract_args(memory, B=2, H=2, T=200, K=64, V=64, sharding=None):
    sds = lambda s: jax.ShapeDtypeStruct(s, jnp.float32, sharding=sharding)
    dims = [K, V] if memory == "linear" else [K, 64, V]
    ws = tuple(sds((B, H, a, b)) for a, b in zip(dims[:-1], dims[1:], strict=True))
    st = MemoryState(ws, ws)
    return (sds((B, H, T, K)), sds((B, H, T, K)), sds((B, H, T, V)), sds((B, H, T)), sds((B, H, T)), sds((B, H, T)), st)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_export_lowering(platform, memory):
    fwd = functools.partial(
        memory_update,
        chunk_size=64,
        memory=memory,
        impl="pallas",
        interpret=False,
        max_surprise_norm=1.0,
        platform=platform,
    )
    args = _abstract_args(memory)
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]  # Triton IR has no stability promise
    kernel_tag = "tpu_custom_call" if platform == "tpu" else "__gpu$xla.gpu.triton"
    for f in (fwd, jax.grad(lambda *a: jnp.sum(fwd(*a)[0]), argnums=GRAD_ARGS)):
        exp = jax.export.export(jax.jit(f), platforms=[platform], disabled_checks=checks)(*args)
        assert kernel_tag in exp.mlir_module()


def test_aot_compile_tpu_v5e():
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")
    except Exception as e:  # no libtpu
        pytest.skip(f"TPU topology unavailable: {e}")
    mesh = Mesh(np.array(topo.devices).reshape(4), ("data",))
    args = _abstract_args("linear", B=4, T=256, sharding=NamedSharding(mesh, P("data")))
    inner = functools.partial(memory_update, chunk_size=64, impl="pallas", interpret=False, platform="tpu")
    fwd = jax.shard_map(inner, mesh=mesh, in_specs=P("data"), out_specs=P("data"))
    jax.jit(fwd).lower(*args).compile()
    jax.jit(jax.grad(lambda *a: jnp.sum(fwd(*a)[0]), argnums=GRAD_ARGS)).lower(*args).compile()


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_bfloat16_inputs(impl):
    """bf16 q/k/v: all memory math runs in f32, so y equals the f32 reference on the same (rounded) inputs up to the
    final bf16 rounding of y; gradients come back in the input dtypes."""
    q, k, v, alpha, eta, theta, state = make_inputs(T=10, memory="mlp")
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    fn = functools.partial(memory_update, chunk_size=4, memory="mlp", impl=impl, interpret=True)
    y, st = fast_jit(fn)(q, k, v, alpha, eta, theta, state)
    assert y.dtype == jnp.bfloat16 and all(w.dtype == jnp.float32 for w in jax.tree.leaves(st))
    up = lambda x: x.astype(jnp.float32)
    y_ref, st_ref = fast_jit(functools.partial(memory_update_reference, chunk_size=4, memory="mlp"))(
        up(q), up(k), up(v), alpha, eta, theta, state
    )
    assert_trees_close(up(y), y_ref, rtol=1e-2)
    assert_trees_close(st, st_ref, rtol=1e-4)
    g = fast_jit(jax.grad(lambda *a: jnp.sum(up(fn(*a)[0])), argnums=(0, 1, 2)))(q, k, v, alpha, eta, theta, state)
    assert all(x.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(up(x)))) for x in g)


def test_tpu_gate_coefficients_match_chunked():
    """The TPU kernel builds the C x C gate matrices in VMEM from the per-token gates (issue 18); in the Pallas
    interpreter they equal chunked.chunk_coefficients, including alpha = 1, eta = 0 and padded tokens."""
    C = 16
    rng = np.random.default_rng(3)
    alpha, eta, theta = (rng.uniform(0.0, 1.0, C).astype(np.float32) for _ in range(3))
    alpha[[3, 11]], eta[[5, 6]] = 1.0, 0.0
    valid = (np.arange(C) < 13).astype(np.float32)
    alpha[13:], eta[13:], theta[13:] = 0.0, 1.0, 0.0  # padding, as ops.py fills it
    gates_4C = jnp.asarray(np.stack([alpha, eta, theta, valid]))

    def kernel(g_ref, gt_ref, vec_ref):
        gt, cols, lasts = tpu.gate_coefficients(g_ref[...])
        gt_ref[...] = gt
        vec_ref[...] = jnp.concatenate(cols + [jnp.broadcast_to(x, (C, 1)) for x in lasts], axis=1)

    gt, vec = pl.pallas_call(
        kernel, out_shape=[jax.ShapeDtypeStruct((C, C), jnp.float32), jax.ShapeDtypeStruct((C, 8), jnp.float32)],
        interpret=True,
    )(gates_4C)  # fmt: skip
    want = chunked.chunk_coefficients(*(gates_4C[r] for r in range(4)))
    np.testing.assert_allclose(gt, want.gt, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(vec, want.vec, rtol=1e-6, atol=1e-7)
    assert np.all(np.asarray(vec)[11:, 0] == 0.0)  # A_i = prod_{l<=i} (1 - alpha_l) is exactly 0 after alpha = 1


def test_tpu_kernel_operands_are_lane_dense():
    """TPU lowering (forward and gradient): the gates enter the kernel as [B, H, N, 4, C] (tokens on lanes); no
    [.., C, C] gate matrix and no trailing axis of 8 coefficients (128-lane padding on TPU) crosses HBM, and y
    leaves the kernel in q's dtype (bf16 here), not f32."""
    B, H, T, C, K = 1, 2, 128, 32, 64
    args = list(_abstract_args("mlp", B=B, H=H, T=T, K=K, V=K))
    args[:3] = [jax.ShapeDtypeStruct(a.shape, jnp.bfloat16) for a in args[:3]]
    fwd = functools.partial(
        memory_update, chunk_size=C, memory="mlp", impl="pallas", interpret=False, platform="tpu", max_surprise_norm=1.0
    )
    grad = jax.grad(lambda *a: jnp.sum(fwd(*a)[0].astype(jnp.float32)), argnums=GRAD_ARGS)
    for name, fn in (("fwd", fwd), ("grad", grad)):
        text = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()
        calls = "".join(line for line in text.splitlines() if "@tpu_custom_call(" in line)
        assert f"{B}x{H}x{T // C}x4x{C}xf32>" in calls, name
        assert f"x{C}x{C}xf32>" not in calls and "x8xf32>" not in calls, name
        assert f"-> (tensor<{B}x{H}x{T // C}x{C}x{K}xbf16>" in calls, name

"""Dispatch of both Pallas ops (issue 18): which_impl, loud impl="pallas" and logged impl="auto" fallbacks
(input checks: test_kernel_inputs.py). The target platform is passed explicitly, so the CUDA / TPU decisions are
checked on a CPU host."""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dispatch
from pallas_kernels.feedback_attention import feedback_attention
from pallas_kernels.feedback_attention import ops as fam_ops
from pallas_kernels.memory_update import MemoryState, memory_update
from pallas_kernels.memory_update import ops as mem_ops


@pytest.fixture(autouse=True)
def fresh_fallback_log():
    """Each test sees the once-per-reason fallback warnings afresh."""
    dispatch._warned.clear()
    yield
    dispatch._warned.clear()


def fam_structs(B=1, T=128, H=2, G=1, K=64, S=64, F=64, dtype=jnp.bfloat16):
    N = math.ceil(T / S)
    shapes = [(B, T, H, K), (B, T, G, K), (B, T, G, K), (B, N, F, G, K), (B, N, F, G, K)]
    return [jax.ShapeDtypeStruct(s, dtype) for s in shapes]


def fam_arrays(B=1, T=32, H=2, G=1, K=8, S=16, F=2, dtype=jnp.float32):
    rng = np.random.default_rng(0)
    return [
        jnp.asarray(rng.standard_normal(s.shape, np.float32)).astype(dtype) for s in fam_structs(B, T, H, G, K, S, F)
    ]


def mem_arrays(B=1, H=2, T=6, K=8, V=8, hidden=None, dtype=jnp.float32):
    rng = np.random.default_rng(0)
    n = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32)).astype(dtype)
    gate = lambda: jnp.asarray(rng.uniform(0.05, 0.5, (B, H, T)).astype(np.float32))
    dims = [K, V] if hidden is None else [K, hidden, V]
    ws = tuple(n(B, H, a, b).astype(jnp.float32) for a, b in zip(dims[:-1], dims[1:], strict=True))
    return [n(B, H, T, K), n(B, H, T, K), n(B, H, T, V), gate(), gate(), gate(), MemoryState(ws, ws)]


def mem_structs(chunk_size_dims=(64, 64), T=128, B=1, H=2):
    K, V = chunk_size_dims
    sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    st = MemoryState((sds(B, H, K, V),), (sds(B, H, K, V),))
    return [sds(B, H, T, K), sds(B, H, T, K), sds(B, H, T, V), sds(B, H, T), sds(B, H, T), sds(B, H, T), st]


# ------------------------------------------------------------------------------------ feedback attention
# (name, struct kwargs, call kwargs, expected impl/backward for "auto", the property the error must name)
FAM_CASES = [
    ("cuda_f32", dict(dtype=jnp.float32), dict(platform="cuda"), ("xla", "xla"), "dtype float32"),
    ("cuda_head_dim_32", dict(K=32), dict(platform="cuda"), ("xla", "xla"), "head dim K=32"),
    ("cuda_fam_length_8", dict(F=8), dict(platform="cuda"), ("xla", "xla"), "FAM length F=8"),
    ("cuda_tile_32", dict(), dict(platform="cuda", block_q=32), ("xla", "xla"), "tile size block_q=32"),
    ("cuda_smem_fwd", dict(K=128, F=128, S=128), dict(platform="cuda"), ("xla", "xla"), "shared-memory budget"),
    ("cpu_compiled", dict(), dict(platform="cpu", interpret=False), ("xla", "xla"), "platform 'cpu'"),
    ("rocm", dict(), dict(platform="rocm"), ("xla", "xla"), "platform 'rocm'"),
    ("tpu_block_size_12", dict(S=12, T=24), dict(platform="tpu"), ("xla", "xla"), "block_size=12"),
]


@pytest.mark.parametrize("case", FAM_CASES, ids=[c[0] for c in FAM_CASES])
def test_fam_unsupported_pallas_raises_and_auto_falls_back(case):
    _, shape_kw, call_kw, want_auto, prop = case
    structs = fam_structs(**shape_kw)
    kw = dict(block_size=shape_kw.get("S", 64), memory_segments=1, **call_kw)
    with pytest.raises(ValueError, match=prop):
        fam_ops.which_impl(*structs, impl="pallas", **kw)
    with pytest.raises(ValueError, match=prop):  # the call itself raises the same, before any kernel runs
        jax.eval_shape(lambda *a: feedback_attention(*a, impl="pallas", **kw), *structs)
    choice = fam_ops.which_impl(*structs, impl="auto", **kw)
    assert (choice.impl, choice.backward) == want_auto and prop in choice.reason, choice


def test_fam_supported_configurations_choose_the_kernels():
    s = fam_structs()
    kw = dict(block_size=64, memory_segments=1)
    for platform, impl in (("tpu", "pallas_tpu"), ("cuda", "pallas_gpu")):
        for mode in ("pallas", "auto"):
            c = fam_ops.which_impl(*s, impl=mode, platform=platform, **kw)
            assert (c.impl, c.backward, c.platform) == (impl, impl, platform)
    assert fam_ops.which_impl(*s, impl="pallas", platform="cpu", **kw).impl == "pallas_interpret"
    assert fam_ops.which_impl(*s, impl="auto", platform="cpu", **kw).impl == "xla"
    assert fam_ops.which_impl(*s, impl="xla", platform="tpu", **kw).impl == "xla"
    assert fam_ops.which_impl(*s, impl="auto", interpret=True, platform="tpu", **kw).impl == "pallas_interpret"
    assert fam_ops.which_impl(*s, **kw).platform == dispatch.resolve_platform(None)


def test_fam_backward_beyond_smem_raises_for_pallas_and_uses_reference_vjp_for_auto(caplog):
    """K = 256: the 64-tile forward fits in SMEM, the backward does not. impl="pallas" exports the forward kernel but
    raises when the gradient is taken; impl="auto" exports the forward kernel and the reference VJP, and logs it."""
    structs = fam_structs(K=256, F=0)
    kw = dict(block_size=64, memory_segments=1, block_q=64, block_k=64, platform="cuda")
    assert fam_ops.which_impl(*structs, impl="pallas", **kw)[:2] == ("pallas_gpu", "unsupported")
    assert fam_ops.which_impl(*structs, impl="auto", **kw)[:2] == ("pallas_gpu", "xla")

    def grad(impl):  # a loss whose cotangent needs the forward's output, so the forward kernel is not dead code
        loss = lambda *a: jnp.sum(jnp.square(feedback_attention(*a, impl=impl, **kw).astype(jnp.float32)))
        return jax.grad(loss, argnums=(0, 1, 2))

    with pytest.raises(ValueError, match="backward kernels do not support shared-memory budget"):
        jax.export.export(jax.jit(grad("pallas")), platforms=["cuda"])(*structs)
    with caplog.at_level(logging.WARNING, logger="pallas_kernels"):
        text = jax.export.export(jax.jit(grad("auto")), platforms=["cuda"])(*structs).mlir_module()
    assert text.count("@mosaic_gpu") == 1  # the forward kernel only
    assert [r.getMessage().count("shared-memory budget") for r in caplog.records] == [1]


def test_fam_auto_fallback_runs_the_reference_and_logs_once_per_reason(caplog):
    args = fam_arrays()  # f32, K = 8: nothing the GPU kernel supports
    kw = dict(block_size=16, memory_segments=1)
    want = feedback_attention(*args, impl="xla", **kw)
    with caplog.at_level(logging.WARNING, logger="pallas_kernels"):
        for _ in range(3):
            np.testing.assert_array_equal(feedback_attention(*args, impl="auto", platform="cuda", **kw), want)
        assert len(caplog.records) == 1 and "dtype float32" in caplog.records[0].getMessage()
        feedback_attention(*args, impl="auto", platform="rocm", **kw)  # a second reason: a second line
        assert len(caplog.records) == 2 and "platform 'rocm'" in caplog.records[1].getMessage()
        feedback_attention(*args, impl="auto", **kw)  # CPU: XLA is auto's documented choice, not a fallback
        assert len(caplog.records) == 2


# ------------------------------------------------------------------------------------------ memory update
def test_memory_update_which_impl_and_loud_pallas():
    s = mem_structs()
    kw = dict(chunk_size=64)
    assert mem_ops.which_impl(*s, impl="pallas", platform="tpu", **kw)[:2] == ("pallas_tpu", "xla")
    assert mem_ops.which_impl(*s, impl="auto", platform="cuda", **kw).impl == "pallas_gpu"
    assert mem_ops.which_impl(*s, impl="auto", platform="rocm", **kw).impl == "pallas_gpu"
    assert mem_ops.which_impl(*s, impl="pallas", platform="cpu", **kw).impl == "pallas_interpret"
    assert mem_ops.which_impl(*s, impl="auto", platform="cpu", **kw).impl == "xla"
    # previously silent: CPU with interpret=False ran chunked XLA
    with pytest.raises(ValueError, match="no compiled memory-update kernel for platform 'cpu'"):
        mem_ops.which_impl(*s, impl="pallas", interpret=False, platform="cpu", **kw)
    with pytest.raises(ValueError, match="no compiled memory-update kernel for platform 'cpu'"):
        jax.eval_shape(lambda *a: memory_update(*a, impl="pallas", interpret=False, platform="cpu", **kw), *s)
    # previously silent when lowering for CUDA from another host: sizes the Triton kernel cannot take
    for struct_kw, chunk in ((dict(), 12), (dict(chunk_size_dims=(64, 24)), 64)):
        s2 = mem_structs(**struct_kw)
        with pytest.raises(ValueError, match="powers of two >= 16"):
            jax.eval_shape(lambda *a: memory_update(*a, chunk_size=chunk, impl="pallas", platform="cuda"), *s2)
        c = mem_ops.which_impl(*s2, chunk_size=chunk, impl="auto", platform="cuda")
        assert c.impl == "xla" and "powers of two" in c.reason


def test_memory_update_auto_fallback_runs_xla_and_logs_once(caplog):
    args = mem_arrays()
    want = memory_update(*args, chunk_size=3, impl="xla")
    with caplog.at_level(logging.WARNING, logger="pallas_kernels"):
        for _ in range(2):
            got = memory_update(*args, chunk_size=3, impl="auto", platform="cuda")  # chunk 3: no Triton kernel
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
                np.testing.assert_array_equal(a, b)
        memory_update(*args, chunk_size=3, impl="auto")  # CPU: no fallback line
    assert len(caplog.records) == 1 and "chunk_size=3" in caplog.records[0].getMessage()

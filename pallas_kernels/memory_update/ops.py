"""Public entry of the Titans memory update (Behrouz et al. 2024, arXiv 2501.00663, secs. 3.1-3.2).

``memory_update`` validates shapes, pads ragged sequences to whole chunks (padded tokens do not touch the memory),
builds the per-chunk gate matrices (chunked.chunk_coefficients, plain XLA, differentiable) and runs the chunk
recurrence either as XLA (``impl="xla"``, chunked.scan_chunks) or as a Pallas kernel (``impl="pallas"``: Mosaic TPU
in tpu.py, the Pallas Triton backend on GPU in gpu.py), whose ``custom_vjp`` recomputes each chunk in XLA from the
chunk-boundary states the kernel saved (a reverse ``lax.scan`` over chunks).

Sharding: like every Pallas kernel, the kernel path cannot be partitioned automatically by XLA; under a mesh with a
sharded batch call it inside ``jax.shard_map`` (batch and heads are independent) or use ``impl="xla"``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.memory_update import chunked
from pallas_kernels.memory_update.reference import MEMORY_KINDS, MemoryState, memory_apply

IMPLS = ("auto", "xla", "pallas")


def init_memory_state(
    batch: int,
    heads: int,
    d_k: int,
    d_v: int,
    *,
    memory: str = "linear",
    hidden: int | None = None,
    num_layers: int = 2,
    key: jax.Array | None = None,
    weights: tuple[jax.Array, ...] | None = None,
) -> MemoryState:
    """Initial memory state with leading ``[B, H]`` axes and zero momentum, float32.

    ``weights`` (per-layer arrays shaped ``[H, ...]`` or ``[B, H, ...]``, e.g. learned initial memories) are broadcast
    over the batch; otherwise ``key`` draws N(0, 1/fan_in) weights, and a linear memory without key starts at zero.
    MLP layers: ``[d_k, hidden], [hidden, hidden] * (num_layers - 2), [hidden, d_v]`` (hidden defaults to d_k).
    """
    if memory not in MEMORY_KINDS:
        raise ValueError(f"memory must be one of {MEMORY_KINDS}, got {memory!r}")
    if memory == "linear":
        shapes = [(d_k, d_v)]
    else:
        if num_layers < 2:
            raise ValueError(f"num_layers must be >= 2 for memory='mlp', got {num_layers}")
        h = d_k if hidden is None else hidden
        if h <= 0:
            raise ValueError(f"hidden must be positive, got {hidden}")
        dims = [d_k] + [h] * (num_layers - 1) + [d_v]
        shapes = list(zip(dims[:-1], dims[1:], strict=True))
    if weights is not None:
        if len(weights) != len(shapes):
            raise ValueError(f"weights must have {len(shapes)} layers for memory={memory!r}, got {len(weights)}")
        ws = []
        for i, (w, shp) in enumerate(zip(weights, shapes, strict=True)):
            if w.shape[-2:] != shp or w.ndim not in (3, 4) or w.shape[-3] != heads:
                raise ValueError(f"weights[{i}] must be [H={heads}, {shp[0]}, {shp[1]}] or [B, H, ...], got {w.shape}")
            ws.append(jnp.broadcast_to(w.astype(jnp.float32), (batch, heads, *shp)))
    elif key is not None:
        ws = list(_random_weights(key, tuple((batch, heads, *s) for s in shapes)))
    elif memory == "linear":
        ws = [jnp.zeros((batch, heads, d_k, d_v), jnp.float32)]
    else:
        raise ValueError("memory='mlp' needs `key` or `weights` (an all-zero MLP memory has zero gradients)")
    return MemoryState(tuple(ws), tuple(jnp.zeros_like(w) for w in ws))


def memory_retrieve(state: MemoryState, q_BHTK: jax.Array, *, memory: str = "linear") -> jax.Array:
    """``M(q)`` with the state's weights, no update (e.g. Titans MAC reads ``M_{t-1}`` before the segment)."""
    if memory not in MEMORY_KINDS:
        raise ValueError(f"memory must be one of {MEMORY_KINDS}, got {memory!r}")
    if q_BHTK.ndim != 4 or q_BHTK.shape[:2] != state.weights[0].shape[:2]:
        raise ValueError(
            f"q_BHTK must be [B, H, T, d_k] with [B, H] = {state.weights[0].shape[:2]}, got {q_BHTK.shape}"
        )
    if q_BHTK.shape[-1] != state.weights[0].shape[2]:
        raise ValueError(f"q_BHTK's last axis must be d_k={state.weights[0].shape[2]}, got {q_BHTK.shape[-1]}")
    q = q_BHTK.astype(jnp.float32)
    ws = tuple(w.astype(jnp.float32) for w in state.weights)
    y = jax.vmap(jax.vmap(lambda w, x: memory_apply(w, x, memory)))(ws, q)
    return y.astype(q_BHTK.dtype)


@functools.partial(jax.jit, static_argnums=1)
def _random_weights(key, shapes):
    keys = jax.random.split(key, len(shapes))
    return tuple(jax.random.normal(k, s, jnp.float32) / jnp.sqrt(s[-2]) for k, s in zip(keys, shapes, strict=True))


def _validate(q, k, v, alpha, eta, theta, state0, chunk_size, memory, impl, max_surprise_norm):
    if memory not in MEMORY_KINDS:
        raise ValueError(f"memory must be one of {MEMORY_KINDS}, got {memory!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if max_surprise_norm is not None and not max_surprise_norm > 0:
        raise ValueError(f"max_surprise_norm must be > 0 or None, got {max_surprise_norm}")
    if q.ndim != 4:
        raise ValueError(f"q_BHTK must be 4-D [B, H, T, d_k], got shape {q.shape}")
    B, H, T, K = q.shape
    if T < 1:
        raise ValueError("sequence length T must be >= 1")
    if k.shape != q.shape:
        raise ValueError(f"k_BHTK must have the shape of q {q.shape}, got {k.shape}")
    if v.ndim != 4 or v.shape[:3] != (B, H, T):
        raise ValueError(f"v_BHTV must be [B={B}, H={H}, T={T}, d_v], got {v.shape}")
    V = v.shape[-1]
    for name, g in (("alpha_BHT", alpha), ("eta_BHT", eta), ("theta_BHT", theta)):
        if g.shape != (B, H, T):
            raise ValueError(f"{name} must be [B, H, T] = {(B, H, T)}, got {g.shape}")
    if not isinstance(state0, MemoryState):
        raise ValueError(f"state0 must be a MemoryState, got {type(state0).__name__}")
    ws, ss = state0.weights, state0.momentum
    n = len(ws)
    if memory == "linear" and n != 1:
        raise ValueError(f"memory='linear' needs 1 weight matrix in state0.weights, got {n}")
    if memory == "mlp" and n < 2:
        raise ValueError(f"memory='mlp' needs >= 2 weight matrices in state0.weights, got {n}")
    if len(ss) != n:
        raise ValueError(f"state0.momentum must have {n} arrays like state0.weights, got {len(ss)}")
    d_in = K
    for i, (w, s) in enumerate(zip(ws, ss, strict=True)):
        if w.ndim != 4 or w.shape[:3] != (B, H, d_in):
            raise ValueError(f"state0.weights[{i}] must be [B={B}, H={H}, {d_in}, d_out], got {w.shape}")
        if s.shape != w.shape:
            raise ValueError(f"state0.momentum[{i}] must have shape {w.shape}, got {s.shape}")
        d_in = w.shape[-1]
    if d_in != V:
        raise ValueError(f"the last memory layer must output d_v={V}, got {d_in}")


def _default_impl() -> str:
    return "pallas" if jax.default_backend() in ("tpu", "gpu", "cuda", "rocm") else "xla"


def memory_update(
    q_BHTK: jax.Array,
    k_BHTK: jax.Array,
    v_BHTV: jax.Array,
    alpha_BHT: jax.Array,
    eta_BHT: jax.Array,
    theta_BHT: jax.Array,
    state0: MemoryState,
    *,
    chunk_size: int,
    memory: str = "linear",
    impl: str = "auto",
    interpret: bool | None = None,
    max_surprise_norm: float | None = None,
) -> tuple[jax.Array, MemoryState]:
    """Titans neural memory over a sequence: returns ``(y_BHTV, final_state)``.

    ``y_t = M_t(q_t)`` is read from the memory AFTER the update with token t (eq. 15). Gates per token:
    ``alpha`` forgetting in [0, 1], ``eta`` momentum decay in [0, 1], ``theta`` learning rate >= 0 (eta = 0: gated
    delta rule; alpha = eta = 0: TTT). Inside a chunk all gradients are taken at the chunk-start memory (eq. 16);
    ``chunk_size=1`` is the exact per-token recurrence. ``y`` has q's dtype, the state is float32.
    ``impl``: "xla" (chunked.py), "pallas" (kernel; ``interpret`` defaults to True off TPU/GPU; with
    ``interpret=False`` the kernel is chosen by the lowering platform and a platform without one runs chunked.py),
    "auto" (pallas on TPU/GPU, xla on CPU; on GPU xla when the sizes do not fit the kernel, see gpu.supports).
    ``max_surprise_norm`` rescales each chunk's summed gradient contribution to at most that global norm.
    """
    _validate(
        q_BHTK, k_BHTK, v_BHTV, alpha_BHT, eta_BHT, theta_BHT, state0, chunk_size, memory, impl, max_surprise_norm
    )
    B, H, T, K = q_BHTK.shape
    V = v_BHTV.shape[-1]
    C = chunk_size
    N = -(-T // C)
    pad = N * C - T
    residual = memory == "mlp" and K == V

    def chunks(x, fill):
        x = jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3), constant_values=fill)
        return x.reshape(B, H, N, C, *x.shape[3:])

    valid = jnp.broadcast_to(jnp.arange(N * C) < T, (B, H, N * C)).reshape(B, H, N, C)
    # padded tokens: alpha = 0, eta = 1, theta = 0, valid = 0 -> (W, S) unchanged
    coeffs = chunked.chunk_coefficients(chunks(alpha_BHT, 0.0), chunks(eta_BHT, 1.0), chunks(theta_BHT, 0.0), valid)
    q, k, v = chunks(q_BHTK, 0.0), chunks(k_BHTK, 0.0), chunks(v_BHTV, 0.0)
    state0 = MemoryState(
        tuple(w.astype(jnp.float32) for w in state0.weights), tuple(s.astype(jnp.float32) for s in state0.momentum)
    )
    impl_requested = impl
    if impl == "auto":
        impl = _default_impl()
    if impl == "pallas":
        if interpret is None:
            interpret = _default_impl() == "xla"
        if not interpret and jax.default_backend() in ("gpu", "cuda", "rocm"):
            from pallas_kernels.memory_update import gpu

            dims = tuple(d for w in state0.weights for d in w.shape[2:])
            if not gpu.supports(C, dims):
                if impl_requested == "pallas":
                    raise ValueError(
                        f"impl='pallas' on GPU needs chunk_size and memory dims that are powers of two >= 16, got "
                        f"chunk_size={C}, layer shapes={[w.shape[2:] for w in state0.weights]}; use impl='xla'"
                    )
                impl = "xla"
    if impl == "xla":
        y, final = chunked.scan_chunks(q, k, v, coeffs, state0, residual=residual, max_surprise_norm=max_surprise_norm)
    else:
        y, w, s = _pallas_memory(
            q, k, v, coeffs.gt, coeffs.vec, state0.weights, state0.momentum, residual, max_surprise_norm, interpret
        )
        final = MemoryState(w, s)
    y = y.reshape(B, H, N * C, V)[:, :, :T]
    return y.astype(q_BHTK.dtype), final


def _run_kernel(q, k, v, gt, vec, weights, momentum, residual, max_norm, interpret, save_boundaries):
    """Kernel by lowering platform: Mosaic TPU on "tpu", the GPU kernel on "cuda"/"rocm" (chunked XLA there when
    the sizes do not fit it, see gpu.supports), chunked XLA elsewhere; ``interpret`` runs the TPU kernel body in the
    Pallas interpreter on any backend. Returns ``(y, w_end, s_end, w_chunk_starts, s_chunk_starts)``."""
    from pallas_kernels.memory_update import gpu, tpu

    weights, momentum = tuple(weights), tuple(momentum)
    kw = dict(residual=residual, max_surprise_norm=max_norm, save_boundaries=save_boundaries)
    args = (q, k, v, gt, vec, weights, momentum)
    if interpret:
        return tpu.memory_update_tpu(*args, interpret=True, **kw)

    def xla(*a):
        out = chunked.scan_chunks(
            *a[:3],
            chunked.ChunkCoeffs(*a[3:5]),
            MemoryState(*a[5:]),
            residual=residual,
            max_surprise_norm=max_norm,
            return_boundaries=save_boundaries,
        )
        if not save_boundaries:
            return out[0], out[1].weights, out[1].momentum, (), ()
        return out[0], out[1].weights, out[1].momentum, out[2].weights, out[2].momentum

    C = q.shape[3]
    dims = tuple(d for w in weights for d in w.shape[2:])
    gpu_fn = (lambda *a: gpu.memory_update_gpu(*a, **kw)) if gpu.supports(C, dims) else xla
    return lax.platform_dependent(
        *args, tpu=lambda *a: tpu.memory_update_tpu(*a, **kw), cuda=gpu_fn, rocm=gpu_fn, default=xla
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _pallas_memory(q, k, v, gt, vec, weights, momentum, residual, max_norm, interpret):
    y, w, s, _, _ = _run_kernel(q, k, v, gt, vec, weights, momentum, residual, max_norm, interpret, False)
    return y, w, s


def _pallas_fwd(q, k, v, gt, vec, weights, momentum, residual, max_norm, interpret):
    y, w, s, w_bounds, s_bounds = _run_kernel(q, k, v, gt, vec, weights, momentum, residual, max_norm, interpret, True)
    return (y, w, s), (q, k, v, gt, vec, w_bounds, s_bounds)


def _pallas_bwd(residual, max_norm, interpret, res, cts):
    """Reverse scan over chunks: re-run each chunk in XLA from its saved start state and pull the cotangents back."""
    del interpret
    q, k, v, gt, vec, w_bounds, s_bounds = res
    dy, dw, ds = cts
    to_n = lambda x: jnp.moveaxis(x, 2, 0)
    xs = tuple(map(to_n, (q, k, v, gt, vec, dy))) + (tuple(map(to_n, w_bounds)), tuple(map(to_n, s_bounds)))

    def step(carry, x):
        dw_next, ds_next = carry
        q_c, k_c, v_c, gt_c, vec_c, dy_c, w_c, s_c = x
        fn = lambda w, s, qq, kk, vv, g, ve: chunked.batched_chunk_math(
            w, s, qq, kk, vv, g, ve, residual=residual, max_surprise_norm=max_norm
        )
        _, vjp = jax.vjp(fn, w_c, s_c, q_c, k_c, v_c, gt_c, vec_c)
        dw_c, ds_c, dq, dk, dv, dgt, dvec = vjp((dy_c, list(dw_next), list(ds_next)))
        return (tuple(dw_c), tuple(ds_c)), (dq, dk, dv, dgt, dvec)

    (dw0, ds0), grads = lax.scan(step, (tuple(dw), tuple(ds)), xs, reverse=True)
    dq, dk, dv, dgt, dvec = (jnp.moveaxis(g, 0, 2) for g in grads)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dgt, dvec, dw0, ds0)


_pallas_memory.defvjp(_pallas_fwd, _pallas_bwd)

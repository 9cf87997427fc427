"""Public entry of the Titans memory update (Behrouz et al. 2024, arXiv 2501.00663, secs. 3.1-3.2).

``memory_update`` validates shapes, pads ragged sequences to whole chunks (padded tokens do not touch the memory)
and runs the chunk recurrence either as XLA (``impl="xla"``: the per-chunk gate matrices of
chunked.chunk_coefficients, then chunked.scan_chunks) or as a Pallas kernel (``impl="pallas"``: Mosaic TPU in
tpu.py, which builds the C x C gate matrices in VMEM from the per-token gates; the Pallas Triton backend on GPU in
gpu.py), whose ``custom_vjp`` recomputes each chunk, gate matrices included, in XLA from the chunk-boundary states
the kernel saved (a reverse ``lax.scan`` over chunks). ``impl="pallas"`` is the kernel or a
ValueError naming what it does not support; ``impl="auto"`` falls back to XLA there and logs it once per reason;
``which_impl`` says which without running. The kernel is chosen for ``platform`` (default
``jax.default_backend()``): pass ``platform="tpu"`` / ``"cuda"`` to export or AOT-compile from a CPU host.

Validity: ``valid_BHT`` (bool, optional) marks tokens that must not touch the memory, e.g. padding inside a row.
At such a token the state is carried, ``S_t = S_{t-1}`` and ``M_t = M_{t-1}``. Gates alone cannot express that: with
alpha = 0, eta = 1, theta = 0 eq. 14 gives ``S_t = S_{t-1}`` but eq. 13 still gives ``M_t = M_{t-1} + S_{t-1}``. The
chunked form and both kernels already take a per-token ``valid`` row, which removes token t's ``S_t`` from the sum
that builds ``M`` (``G = D diag(valid) P``, ``c = D (valid * E)``, chunked.py); the mask given here joins the
ragged-end padding mask there, and invalid tokens also get alpha = 0, eta = 1, theta = 0 so that the recurrence is
``M_t = (1 - 0) M_{t-1} + 0 * S_t = M_{t-1}``, ``S_t = 1 * S_{t-1} - 0 * grad = S_{t-1}``, with no gradient reaching
their gates. No kernel code depends on where the invalid tokens sit.

Sharding: like every Pallas kernel, the kernel path cannot be partitioned automatically by XLA; under a mesh with a
sharded batch call it inside ``jax.shard_map`` (batch and heads are independent) or use ``impl="xla"``.
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.dispatch import ImplChoice, check_interpret, resolve_platform, warn_fallback_once
from pallas_kernels.memory_update import chunked
from pallas_kernels.memory_update.reference import MEMORY_KINDS, MemoryState, memory_apply

IMPLS = ("auto", "xla", "pallas")
FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))  # float16: no Mosaic TPU kernels for it


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
    if not isinstance(state, MemoryState):
        raise ValueError(f"state must be a MemoryState, got {type(state).__name__}")
    _check_layers(state.weights, memory, "state.weights")
    _check_float_array("q_BHTK", q_BHTK, 4, "B, H, T, d_k")
    if q_BHTK.shape[:2] != state.weights[0].shape[:2]:
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


def _check_float_array(name: str, x, ndim: int, dims: str) -> None:
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise ValueError(f"{name} must be an array [{dims}] (jax.Array or numpy.ndarray), got {type(x).__name__}")
    if len(x.shape) != ndim:
        raise ValueError(f"{name} must be {ndim}-D [{dims}], got shape {tuple(x.shape)}")
    if jnp.dtype(x.dtype) not in FLOAT_DTYPES:
        raise ValueError(f"{name} dtype must be float32 or bfloat16, got {jnp.dtype(x.dtype)}")


def _check_layers(weights, memory: str, name: str) -> None:
    n = len(weights)
    if memory == "linear" and n != 1:
        raise ValueError(f"memory='linear' needs 1 weight matrix in {name}, got {n}")
    if memory == "mlp" and n < 2:
        raise ValueError(f"memory='mlp' needs >= 2 weight matrices in {name}, got {n}")


def _check_gate_ranges(alpha, eta, theta) -> None:
    """alpha, eta in [0, 1], theta >= 0 (all finite): checked on concrete values (eager calls); under jit the gates
    are tracers and reading them would need a device-to-host sync, so they pass unchecked there."""
    for name, g, lo, hi in (
        ("alpha_BHT", alpha, 0.0, 1.0),
        ("eta_BHT", eta, 0.0, 1.0),
        ("theta_BHT", theta, 0.0, None),
    ):
        if isinstance(g, jax.core.Tracer) or not isinstance(g, (jax.Array, np.ndarray)) or not g.size:
            continue  # traced (jit) or abstract (ShapeDtypeStruct): values unknown here
        x = np.asarray(jax.device_get(g), np.float32)
        bad = int(np.sum(~np.isfinite(x)))
        if bad or x.min() < lo or (hi is not None and x.max() > hi):
            want = f"in [{lo:g}, {hi:g}]" if hi is not None else f">= {lo:g}"
            got = f"{bad} non-finite values" if bad else f"values in [{x.min():g}, {x.max():g}]"
            raise ValueError(f"{name} must be finite and {want}, got {got}")


def _check_chunk_size(chunk_size) -> int:
    if isinstance(chunk_size, (bool, np.bool_)) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return int(chunk_size)


def _check_max_norm(max_surprise_norm) -> float | None:
    if max_surprise_norm is None:
        return None
    ok = isinstance(max_surprise_norm, numbers.Real) and not isinstance(max_surprise_norm, (bool, np.bool_))
    if not ok or not math.isfinite(float(max_surprise_norm)) or not float(max_surprise_norm) > 0:
        raise ValueError(f"max_surprise_norm must be a finite float > 0 or None, got {max_surprise_norm!r}")
    return float(max_surprise_norm)


def _check_valid(valid_BHT, shape) -> None:
    if valid_BHT is None:
        return
    if not (hasattr(valid_BHT, "shape") and hasattr(valid_BHT, "dtype")):
        raise ValueError(f"valid_BHT must be a bool array [B, H, T] or None, got {type(valid_BHT).__name__}")
    if jnp.dtype(valid_BHT.dtype) != jnp.dtype(bool):
        raise ValueError(f"valid_BHT dtype must be bool, got {jnp.dtype(valid_BHT.dtype)}")
    if tuple(valid_BHT.shape) != tuple(shape):
        raise ValueError(f"valid_BHT must be [B, H, T] = {tuple(shape)}, got {tuple(valid_BHT.shape)}")


def _validate(q, k, v, alpha, eta, theta, state0, chunk_size, memory, impl, max_surprise_norm, interpret, valid=None):
    """Raises ValueError naming the bad argument; returns ``(chunk_size, max_surprise_norm)`` as Python numbers."""
    if memory not in MEMORY_KINDS:
        raise ValueError(f"memory must be one of {MEMORY_KINDS}, got {memory!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    check_interpret(interpret)
    chunk_size = _check_chunk_size(chunk_size)
    max_surprise_norm = _check_max_norm(max_surprise_norm)
    _check_float_array("q_BHTK", q, 4, "B, H, T, d_k")
    B, H, T, K = q.shape
    if B < 1 or H < 1 or K < 1:
        raise ValueError(f"q_BHTK must have B, H, d_k >= 1, got shape {q.shape}")
    if T < 1:
        raise ValueError(f"q_BHTK must have a sequence length T >= 1, got shape {q.shape}")
    _check_float_array("k_BHTK", k, 4, "B, H, T, d_k")
    if k.shape != q.shape:
        raise ValueError(f"k_BHTK must have the shape of q {q.shape}, got {k.shape}")
    _check_float_array("v_BHTV", v, 4, "B, H, T, d_v")
    if v.shape[:3] != (B, H, T) or v.shape[3] < 1:
        raise ValueError(f"v_BHTV must be [B={B}, H={H}, T={T}, d_v >= 1], got {v.shape}")
    V = v.shape[-1]
    for name, g in (("alpha_BHT", alpha), ("eta_BHT", eta), ("theta_BHT", theta)):
        _check_float_array(name, g, 3, "B, H, T")
        if g.shape != (B, H, T):
            raise ValueError(f"{name} must be [B, H, T] = {(B, H, T)}, got {g.shape}")
    if not isinstance(state0, MemoryState):
        raise ValueError(f"state0 must be a MemoryState, got {type(state0).__name__}")
    ws, ss = state0.weights, state0.momentum
    _check_layers(ws, memory, "state0.weights")
    n = len(ws)
    if len(ss) != n:
        raise ValueError(f"state0.momentum must have {n} arrays like state0.weights, got {len(ss)}")
    d_in = K
    for i, (w, s) in enumerate(zip(ws, ss, strict=True)):
        _check_float_array(f"state0.weights[{i}]", w, 4, "B, H, d_in, d_out")
        _check_float_array(f"state0.momentum[{i}]", s, 4, "B, H, d_in, d_out")
        if w.shape[:3] != (B, H, d_in) or w.shape[3] < 1:
            raise ValueError(f"state0.weights[{i}] must be [B={B}, H={H}, {d_in}, d_out >= 1], got {w.shape}")
        if s.shape != w.shape:
            raise ValueError(f"state0.momentum[{i}] must have shape {w.shape}, got {s.shape}")
        d_in = w.shape[-1]
    if d_in != V:
        raise ValueError(f"the last memory layer must output d_v={V}, got {d_in}")
    _check_valid(valid, (B, H, T))
    _check_gate_ranges(alpha, eta, theta)
    return chunk_size, max_surprise_norm


def _choose(impl: str, platform: str | None, interpret: bool | None, chunk_size: int, layer_shapes) -> tuple:
    """(ImplChoice, fallback reason or None). Raises for ``impl="pallas"`` when no kernel can run the call."""
    p = resolve_platform(platform)
    recompute = "the gradient re-runs each chunk in XLA from the kernel's saved chunk-start states"
    if impl == "xla":
        return ImplChoice("xla", "xla", p, "impl='xla' requested"), None
    if impl == "pallas" and interpret is None:
        interpret = p == "cpu"  # no compiled kernel on a CPU: the interpreter (tests, debugging)
    if interpret:
        return ImplChoice(
            "pallas_interpret", "xla", p, f"interpret=True: TPU kernel code interpreted; {recompute}"
        ), None
    if p == "tpu":
        return ImplChoice("pallas_tpu", "xla", p, f"Mosaic TPU kernel; {recompute}"), None
    if p in ("cuda", "rocm"):
        from pallas_kernels.memory_update import gpu

        dims = tuple(d for shp in layer_shapes for d in shp)
        if gpu.supports(chunk_size, dims):
            return ImplChoice("pallas_gpu", "xla", p, f"Triton GPU kernel; {recompute}"), None
        why = (
            f"the Triton GPU kernel needs chunk_size and every memory dim to be powers of two >= 16, got "
            f"chunk_size={chunk_size}, layer shapes={[tuple(s) for s in layer_shapes]}"
        )
    else:
        why = f"no compiled memory-update kernel for platform {p!r} (kernels: tpu, cuda, rocm)"
    if impl == "pallas":
        hint = " (pass platform='tpu' or 'cuda' to lower for another platform)" if p == "cpu" else ""
        raise ValueError(
            f"impl='pallas' on platform {p!r}: {why}{hint}; use impl='xla', impl='auto' (falls back with a warning) "
            "or interpret=True"
        )
    return ImplChoice("xla", "xla", p, why), (why if p != "cpu" else None)


def which_impl(
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
    platform: str | None = None,
    valid_BHT: jax.Array | None = None,
) -> ImplChoice:
    """Which implementation ``memory_update`` with these arguments (arrays or ``jax.ShapeDtypeStruct``) uses on
    ``platform`` (default ``jax.default_backend()``), and why; raises as the call would."""
    args = (q_BHTK, k_BHTK, v_BHTV, alpha_BHT, eta_BHT, theta_BHT, state0)
    chunk_size, _ = _validate(*args, chunk_size, memory, impl, max_surprise_norm, interpret, valid_BHT)
    return _choose(impl, platform, interpret, chunk_size, [w.shape[2:] for w in state0.weights])[0]


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
    platform: str | None = None,
    valid_BHT: jax.Array | None = None,
) -> tuple[jax.Array, MemoryState]:
    """Titans neural memory over a sequence: returns ``(y_BHTV, final_state)``.

    ``y_t = M_t(q_t)`` is read from the memory AFTER the update with token t (eq. 15). Gates per token:
    ``alpha`` forgetting in [0, 1], ``eta`` momentum decay in [0, 1], ``theta`` learning rate >= 0 (eta = 0: gated
    delta rule; alpha = eta = 0: TTT); their ranges are checked when they are concrete (not under jit). Inside a
    chunk all gradients are taken at the chunk-start memory (eq. 16); ``chunk_size=1`` is the exact per-token
    recurrence. q/k/v/gates float32 or bfloat16; ``y`` has q's dtype, the state is float32.
    ``impl``: "xla" (chunked.py), "pallas" (the kernel for ``platform``, or a ValueError naming what it does not
    support; ``interpret`` defaults to True on CPU), "auto" (the kernel on TPU/GPU where it fits, else XLA with a
    one-time log line; XLA on CPU). ``which_impl`` tells which without running. ``platform``: the lowering target
    (default ``jax.default_backend()``), e.g. "tpu" / "cuda" to export or AOT-compile from a CPU host.
    ``max_surprise_norm`` rescales each chunk's summed gradient contribution to at most that global norm.
    ``valid_BHT`` (bool ``[B, H, T]``, default all True): a token marked False leaves the memory and its momentum
    exactly as they were (``M_t = M_{t-1}``, ``S_t = S_{t-1}``, its gates ignored) and reads ``y_t = M_{t-1}(q_t)``.
    """
    chunk_size, max_surprise_norm = _validate(
        q_BHTK, k_BHTK, v_BHTV, alpha_BHT, eta_BHT, theta_BHT, state0, chunk_size, memory, impl, max_surprise_norm,
        interpret, valid_BHT,
    )  # fmt: skip
    choice, fallback = _choose(impl, platform, interpret, chunk_size, [w.shape[2:] for w in state0.weights])
    if fallback is not None:
        warn_fallback_once("memory_update", fallback)
    B, H, T, K = q_BHTK.shape
    V = v_BHTV.shape[-1]
    C = chunk_size
    N = -(-T // C)
    pad = N * C - T
    residual = memory == "mlp" and K == V

    def chunks(x, fill):
        x = jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3), constant_values=fill)
        return x.reshape(B, H, N, C, *x.shape[3:])

    if valid_BHT is None:
        valid = jnp.broadcast_to(jnp.arange(N * C) < T, (B, H, N * C)).reshape(B, H, N, C).astype(jnp.float32)
    else:  # masked tokens get the gates of padding; the mask (padding appended) joins the kernels' valid row
        alpha_BHT = jnp.where(valid_BHT, alpha_BHT, jnp.zeros((), alpha_BHT.dtype))
        eta_BHT = jnp.where(valid_BHT, eta_BHT, jnp.ones((), eta_BHT.dtype))
        theta_BHT = jnp.where(valid_BHT, theta_BHT, jnp.zeros((), theta_BHT.dtype))
        valid = chunks(valid_BHT.astype(jnp.float32), 0.0)
    # padded and masked tokens: alpha = 0, eta = 1, theta = 0, valid = 0 -> (W, S) unchanged
    alpha, eta, theta = chunks(alpha_BHT, 0.0), chunks(eta_BHT, 1.0), chunks(theta_BHT, 0.0)
    q, k, v = chunks(q_BHTK, 0.0), chunks(k_BHTK, 0.0), chunks(v_BHTV, 0.0)
    state0 = MemoryState(
        tuple(w.astype(jnp.float32) for w in state0.weights), tuple(s.astype(jnp.float32) for s in state0.momentum)
    )
    if choice.impl == "xla":
        coeffs = chunked.chunk_coefficients(alpha, eta, theta, valid)
        y, final = chunked.scan_chunks(q, k, v, coeffs, state0, residual=residual, max_surprise_norm=max_surprise_norm)
    else:
        # per-token gates, tokens on the last axis: [B, H, N, 4, C]; the TPU kernel builds the C x C matrices from
        # them in VMEM, the GPU path gets them from chunked.chunk_coefficients (_run_kernel)
        gates = jnp.stack([x.astype(jnp.float32) for x in (alpha, eta, theta, valid)], axis=-2)
        y, w, s = _pallas_memory(
            q, k, v, gates, state0.weights, state0.momentum, residual, max_surprise_norm, choice.impl
        )
        final = MemoryState(w, s)
    y = y.reshape(B, H, N * C, V)[:, :, :T]
    return y.astype(q_BHTK.dtype), final


def _coefficients(gates_BHN4C):
    """chunked.chunk_coefficients of the kernels' gate array (rows alpha, eta, theta, valid)."""
    return chunked.chunk_coefficients(*(gates_BHN4C[..., r, :] for r in range(4)))


def _run_kernel(q, k, v, gates, weights, momentum, residual, max_norm, kernel, save_boundaries):
    """The kernel chosen at trace time (``_choose``): the TPU kernel code compiled by Mosaic ("pallas_tpu") or run
    in the Pallas interpreter ("pallas_interpret"), which builds the gate matrices in VMEM from the per-token gates,
    or the Triton GPU kernel ("pallas_gpu"), which reads them precomputed by XLA.
    Returns ``(y, w_end, s_end, w_chunk_starts, s_chunk_starts)``."""
    from pallas_kernels.memory_update import gpu, tpu

    kw = dict(residual=residual, max_surprise_norm=max_norm, save_boundaries=save_boundaries)
    state = (tuple(weights), tuple(momentum))
    if kernel == "pallas_gpu":
        coeffs = _coefficients(gates)
        return gpu.memory_update_gpu(q, k, v, coeffs.gt, coeffs.vec, *state, **kw)
    if kernel in ("pallas_tpu", "pallas_interpret"):
        return tpu.memory_update_tpu(q, k, v, gates, *state, interpret=kernel == "pallas_interpret", **kw)
    raise AssertionError(f"unknown kernel {kernel!r}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _pallas_memory(q, k, v, gates, weights, momentum, residual, max_norm, kernel):
    y, w, s, _, _ = _run_kernel(q, k, v, gates, weights, momentum, residual, max_norm, kernel, False)
    return y, w, s


def _pallas_fwd(q, k, v, gates, weights, momentum, residual, max_norm, kernel):
    y, w, s, w_bounds, s_bounds = _run_kernel(q, k, v, gates, weights, momentum, residual, max_norm, kernel, True)
    return (y, w, s), (q, k, v, gates, w_bounds, s_bounds)


def _pallas_bwd(residual, max_norm, kernel, res, cts):
    """Reverse scan over chunks: re-run each chunk in XLA (its gate matrices included, so no [B, H, N, C, C] array
    is kept) from its saved start state and pull the cotangents back."""
    del kernel
    q, k, v, gates, w_bounds, s_bounds = res
    dy, dw, ds = cts
    dy = dy.astype(jnp.float32)  # the TPU kernel writes y in q's dtype; chunk_math's y is f32
    to_n = lambda x: jnp.moveaxis(x, 2, 0)
    xs = tuple(map(to_n, (q, k, v, gates, dy))) + (tuple(map(to_n, w_bounds)), tuple(map(to_n, s_bounds)))

    def chunk(w, s, qq, kk, vv, g):
        gt, vec = _coefficients(g)
        return chunked.batched_chunk_math(w, s, qq, kk, vv, gt, vec, residual=residual, max_surprise_norm=max_norm)

    def step(carry, x):
        dw_next, ds_next = carry
        q_c, k_c, v_c, g_c, dy_c, w_c, s_c = x
        _, vjp = jax.vjp(chunk, w_c, s_c, q_c, k_c, v_c, g_c)
        dw_c, ds_c, dq, dk, dv, dg = vjp((dy_c, list(dw_next), list(ds_next)))
        return (tuple(dw_c), tuple(ds_c)), (dq, dk, dv, dg)

    (dw0, ds0), grads = lax.scan(step, (tuple(dw), tuple(ds)), xs, reverse=True)
    dq, dk, dv, dg = (jnp.moveaxis(g, 0, 2) for g in grads)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg, dw0, ds0)


_pallas_memory.defvjp(_pallas_fwd, _pallas_bwd)

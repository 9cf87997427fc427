"""Public entry for TransformerFAM feedback attention (Hwang et al. 2024, arXiv 2404.09173, Sec. 3.2).

``feedback_attention`` validates shapes, dtypes and tile sizes, then dispatches (``which_impl`` says how, without
running anything): ``impl="xla"`` runs the pure-JAX reference (``reference.py``); ``impl="pallas"`` runs the
flash-style kernels (``tpu.py`` on TPU and in CPU interpret mode, ``gpu.py`` on CUDA) under a ``jax.custom_vjp``
whose backward is the Pallas dq / dk,dv / dFAM kernels, or raises naming what the kernel does not support;
``impl="auto"`` falls back to the reference where no kernel fits and logs that once per reason.
The kernel is chosen for ``platform`` (default ``jax.default_backend()``): export or AOT-compile for another
platform from a CPU host by passing ``platform="tpu"`` / ``"cuda"``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.dispatch import ImplChoice, check_interpret, resolve_platform, warn_fallback_once
from pallas_kernels.feedback_attention.reference import (
    feedback_attention_reference,
    feedback_attention_reference_with_lse,
    num_blocks,
)

IMPLS = ("xla", "pallas", "auto")
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
TILE_CANDIDATES = (512, 256, 128, 64, 32, 16, 8)
MIN_TILE = 8  # TPU sublane granularity: Pallas tiles (block_q, block_k) must be multiples of 8
TPU_TILE_CAP = 512  # default tiles: VMEM holds 512-row q/k/v tiles easily
GPU_TILE_CAP = 128  # default tiles: the Mosaic-GPU forward keeps q plus two k/v slots in SMEM


def _check_int(name: str, value, minimum: int) -> int:
    """A Python or numpy integer >= minimum (bools refused), returned as a Python int."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_array(name: str, x, ndim: int, dims: str) -> None:
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise ValueError(f"{name} must be an array [{dims}] (jax.Array or numpy.ndarray), got {type(x).__name__}")
    if len(x.shape) != ndim:
        raise ValueError(f"{name} must have {ndim} dims [{dims}], got shape {tuple(x.shape)}")


def default_tile(block_size: int, cap: int = 512) -> int:
    """Largest tile in TILE_CANDIDATES (<= cap) dividing block_size; block_size itself if none does."""
    for t in TILE_CANDIDATES:
        if t <= cap and block_size % t == 0:
            return t
    return block_size


def validate(q_BTHK, k_BTGK, v_BTGK, famk_BNFGK, famv_BNFGK, *, block_size: int, memory_segments: int, sm_scale):
    """Checks shapes/dtypes; returns (B, T, H, G, K, N, F, scale). Raises ValueError naming the bad argument."""
    block_size = _check_int("block_size", block_size, 1)
    _check_int("memory_segments", memory_segments, 0)
    for name, x in (("q_BTHK", q_BTHK), ("k_BTGK", k_BTGK), ("v_BTGK", v_BTGK)):
        _check_array(name, x, 4, "B,T,H|G,K")
    for name, x in (("famk_BNFGK", famk_BNFGK), ("famv_BNFGK", famv_BNFGK)):
        _check_array(name, x, 5, "B,N,F,G,K")
    B, T, H, K = q_BTHK.shape
    if B < 1 or T < 1 or H < 1 or K < 1:
        raise ValueError(f"q_BTHK must have B, T, H, K >= 1, got shape {tuple(q_BTHK.shape)}")
    G = k_BTGK.shape[2]
    if k_BTGK.shape != (B, T, G, K):
        raise ValueError(f"k_BTGK must have shape [B={B}, T={T}, G, K={K}], got {k_BTGK.shape}")
    if v_BTGK.shape != k_BTGK.shape:
        raise ValueError(f"v_BTGK must have shape {k_BTGK.shape} (same as k_BTGK), got {v_BTGK.shape}")
    if G < 1 or H % G:
        raise ValueError(f"query heads H={H} must be a multiple of kv heads G={G} (k_BTGK.shape[2])")
    N = num_blocks(T, block_size)
    F = famk_BNFGK.shape[2]
    if famk_BNFGK.shape != (B, N, F, G, K):
        raise ValueError(
            f"famk_BNFGK must have shape [B={B}, N=ceil(T/block_size)={N}, F, G={G}, K={K}], got {famk_BNFGK.shape}"
        )
    if famv_BNFGK.shape != famk_BNFGK.shape:
        raise ValueError(f"famv_BNFGK must have shape {famk_BNFGK.shape} (same as famk_BNFGK), got {famv_BNFGK.shape}")
    dtype = jnp.dtype(q_BTHK.dtype)
    if dtype not in DTYPES:
        raise ValueError(f"q_BTHK dtype must be one of float32/bfloat16, got {dtype}")
    for name, x in (("k_BTGK", k_BTGK), ("v_BTGK", v_BTGK), ("famk_BNFGK", famk_BNFGK), ("famv_BNFGK", famv_BNFGK)):
        if jnp.dtype(x.dtype) != dtype:
            raise ValueError(f"{name} dtype must equal q_BTHK dtype {dtype}, got {x.dtype}")
    if sm_scale is None:
        scale = 1.0 / math.sqrt(K)
    else:
        ok = isinstance(sm_scale, numbers.Real) and not isinstance(sm_scale, (bool, np.bool_))
        if not ok or not math.isfinite(float(sm_scale)) or not float(sm_scale) > 0:
            raise ValueError(f"sm_scale must be a finite float > 0 or None, got {sm_scale!r}")
        scale = float(sm_scale)
    return B, T, H, G, K, N, F, scale


def resolve_tiles(block_size: int, block_q: int | None, block_k: int | None) -> tuple[int | None, int | None]:
    """Validates the Pallas tile sizes (multiples of 8 dividing block_size); None stays None and is resolved per
    platform at dispatch (TPU / interpret: up to 512; GPU: up to 128, see ``_platform_tiles``). Checked for every
    ``impl`` (a tile given with ``impl="xla"`` is an error, not ignored); block_size % 8 is checked by the dispatch."""
    tiles = []
    for name, t in (("block_q", block_q), ("block_k", block_k)):
        if t is None:
            tiles.append(None)
            continue
        t = _check_int(name, t, MIN_TILE)
        if t % MIN_TILE or block_size % t:
            raise ValueError(f"{name} must be a multiple of {MIN_TILE} dividing block_size={block_size}, got {t}")
        tiles.append(t)
    return tiles[0], tiles[1]


def _choose(impl, platform, interpret, *, block_size, block_q, block_k, K, F, dtype):
    """(ImplChoice, fallback reason or None). Raises for ``impl="pallas"`` when no kernel can run the call."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    check_interpret(interpret)
    p = resolve_platform(platform)
    if impl == "xla":
        return ImplChoice("xla", "xla", p, "impl='xla' requested"), None
    why = [] if block_size % MIN_TILE == 0 else [f"block_size={block_size} is not a multiple of {MIN_TILE}"]
    if impl == "pallas" and interpret is None:
        interpret = p == "cpu"  # no compiled kernel on a CPU: the interpreter (tests, debugging)
    if interpret:
        if why:
            raise ValueError(
                f"block_size must be a multiple of {MIN_TILE} for the Pallas kernels, got {block_size}; "
                "use impl='xla' for other block sizes"
            )
        reason = "interpret=True: the TPU kernel code in the Pallas interpreter"
        return ImplChoice("pallas_interpret", "pallas_interpret", p, reason), None
    if p == "tpu":
        if not why:
            return ImplChoice("pallas_tpu", "pallas_tpu", p, "Mosaic TPU kernels"), None
    elif p == "cuda":
        if not why:
            cfg = _TileView(block_size, block_q or default_tile(block_size, GPU_TILE_CAP),
                            block_k or default_tile(block_size, GPU_TILE_CAP))  # fmt: skip
            why = [f"the Mosaic-GPU forward kernel does not support {w}" for w in _gpu_unsupported(cfg, K, F, dtype)]
            if not why:
                bwd_why = _gpu_unsupported(cfg, K, F, dtype, backward=True)
                if not bwd_why:
                    return ImplChoice("pallas_gpu", "pallas_gpu", p, "Mosaic GPU forward and backward kernels"), None
                bwd = "; ".join(f"the Mosaic-GPU backward kernels do not support {w}" for w in bwd_why)
                if impl == "pallas":  # inference may still use the kernel: the error comes when a gradient is taken
                    return ImplChoice("pallas_gpu", "unsupported", p, bwd), None
                # logged when a gradient is taken (_dispatch), not on inference-only calls
                return ImplChoice("pallas_gpu", "xla", p, f"gradient by the reference VJP: {bwd}"), None
    else:
        why.append(f"no compiled feedback-attention kernel for platform {p!r} (kernels: tpu, cuda)")
    reason = "; ".join(why)
    if impl == "pallas":
        hint = " (pass platform='tpu' or 'cuda' to lower for another platform)" if p == "cpu" else ""
        raise ValueError(f"impl='pallas' on platform {p!r}: {reason}{hint}; use impl='xla', or impl='auto' to fall "
                         "back with a warning, or interpret=True")  # fmt: skip
    return ImplChoice("xla", "xla", p, reason), (reason if p != "cpu" else None)


@dataclasses.dataclass(frozen=True)
class _TileView:
    """The tiles the GPU forward would use, for gpu.unsupported before a _KernelConfig exists."""

    block_size: int
    block_q: int
    block_k: int


def _gpu_unsupported(cfg, K, F, dtype, backward=False) -> list[str]:
    from pallas_kernels.feedback_attention import gpu

    return gpu.unsupported(cfg, K, F, dtype, backward=backward)


def which_impl(
    q_BTHK, k_BTGK, v_BTGK, famk_BNFGK, famv_BNFGK, *, block_size: int, memory_segments: int,
    sm_scale: float | None = None, impl: str = "auto", block_q: int | None = None, block_k: int | None = None,
    interpret: bool | None = None, platform: str | None = None,
) -> ImplChoice:  # fmt: skip
    """Which implementation ``feedback_attention`` with these arguments (arrays or ``jax.ShapeDtypeStruct``) uses
    for its forward and its gradient on ``platform`` (default ``jax.default_backend()``), and why. Raises as the call
    would (bad arguments, or ``impl="pallas"`` without a kernel for them)."""
    B, T, H, G, K, N, F, scale = validate(
        q_BTHK, k_BTGK, v_BTGK, famk_BNFGK, famv_BNFGK,
        block_size=block_size, memory_segments=memory_segments, sm_scale=sm_scale,
    )  # fmt: skip
    bq, bk = resolve_tiles(block_size, block_q, block_k)
    choice, _ = _choose(impl, platform, interpret, block_size=int(block_size), block_q=bq, block_k=bk, K=K, F=F,
                        dtype=q_BTHK.dtype)  # fmt: skip
    return choice


def feedback_attention(
    q_BTHK: jax.Array,
    k_BTGK: jax.Array,
    v_BTGK: jax.Array,
    famk_BNFGK: jax.Array,
    famv_BNFGK: jax.Array,
    *,
    block_size: int,
    memory_segments: int,
    sm_scale: float | None = None,
    impl: str = "auto",
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: bool | None = None,
    platform: str | None = None,
) -> jax.Array:
    """TransformerFAM block sliding window attention with feedback memory (arXiv 2404.09173, Sec. 3.2, Fig. 2).

    Token t of block n = t // block_size attends causally within block n, fully to blocks n-memory_segments..n-1,
    and fully to famk/famv[:, n] (F keys; F may be 0). Shapes: q [B,T,H,K]; k, v [B,T,G,K] (GQA, H % G == 0);
    famk, famv [B,N,F,G,K] with N = ceil(T / block_size). Softmax in f32; returns [B,T,H,K] in q's dtype.

    impl: "xla" (reference), "pallas" (the kernels for ``platform``, or a ValueError naming what they do not
    support), "auto" (the kernels where they fit on TPU / CUDA, else the reference with a one-time log line; the
    reference on CPU). ``which_impl`` tells which without running. block_q / block_k: Pallas tile sizes (multiples
    of 8 dividing block_size; default the largest of 512..8 that divides it on TPU, of 128..8 on GPU).
    interpret: run the TPU kernel code in interpret mode (``impl="pallas"`` defaults to it on CPU). The GPU kernels
    need bfloat16, K, F, tiles all multiples of 64 and SMEM to spare (``gpu.unsupported``). platform: the lowering
    target (default ``jax.default_backend()``), e.g. "tpu" or "cuda" to export / AOT-compile from a CPU host.
    """
    B, T, H, G, K, N, F, scale = validate(
        q_BTHK, k_BTGK, v_BTGK, famk_BNFGK, famv_BNFGK,
        block_size=block_size, memory_segments=memory_segments, sm_scale=sm_scale,
    )  # fmt: skip
    block_size, memory_segments = int(block_size), int(memory_segments)
    bq, bk = resolve_tiles(block_size, block_q, block_k)
    choice, fallback = _choose(impl, platform, interpret, block_size=block_size, block_q=bq, block_k=bk, K=K, F=F,
                               dtype=q_BTHK.dtype)  # fmt: skip
    if fallback is not None:
        warn_fallback_once("feedback_attention", fallback)
    if choice.impl == "xla":
        return feedback_attention_reference(
            q_BTHK, k_BTGK, v_BTGK, famk_BNFGK, famv_BNFGK,
            block_size=block_size, memory_segments=memory_segments, sm_scale=scale,
        )  # fmt: skip
    return _pallas_forward(
        q_BTHK, k_BTGK, v_BTGK, famk_BNFGK, famv_BNFGK, choice,
        block_size=block_size, memory_segments=memory_segments, scale=scale, block_q=bq, block_k=bk,
    )  # fmt: skip


def feedback_attention_sharded(
    q_BTHK: jax.Array,
    k_BTGK: jax.Array,
    v_BTGK: jax.Array,
    famk_BNFGK: jax.Array,
    famv_BNFGK: jax.Array,
    *,
    mesh: jax.sharding.Mesh,
    batch_axes: tuple[str, ...] = ("data", "fsdp"),
    head_axis: str | None = "tensor",
    **kwargs,
) -> jax.Array:
    """``feedback_attention`` under ``jax.shard_map``: batch split over ``batch_axes``, heads (and kv heads, which
    keeps each query head with its kv head) over ``head_axis``. Mesh axes of size 1, or that do not divide the
    dimension, are left out. Pallas kernels are opaque to the SPMD partitioner, so sharded callers use this."""
    B, H, G = q_BTHK.shape[0], q_BTHK.shape[2], k_BTGK.shape[2]
    batch = tuple(a for a in batch_axes if a in mesh.shape and mesh.shape[a] > 1)
    if batch and B % math.prod(mesh.shape[a] for a in batch):
        batch = ()
    b = batch if len(batch) > 1 else (batch[0] if batch else None)
    h = head_axis if head_axis in mesh.shape and mesh.shape[head_axis] > 1 else None
    if h is not None and (H % mesh.shape[h] or G % mesh.shape[h]):
        h = None
    P = jax.sharding.PartitionSpec
    qkv, fam = P(b, None, h, None), P(b, None, None, h, None)
    fn = partial(feedback_attention, **kwargs)
    return jax.shard_map(fn, mesh=mesh, in_specs=(qkv, qkv, qkv, fam, fam), out_specs=qkv, check_vma=False)(
        q_BTHK, k_BTGK, v_BTGK, famk_BNFGK, famv_BNFGK
    )


def _pallas_forward(q_BTHK, k_BTGK, v_BTGK, famk_BNFGK, famv_BNFGK, choice, *, block_size, memory_segments, scale,
                    block_q, block_k):  # fmt: skip
    """Pads T to N*block_size, moves heads before time ([B,H,T,K]) and calls the custom-vjp kernel."""
    B, T, H, K = q_BTHK.shape
    N = num_blocks(T, block_size)
    pad = N * block_size - T
    to_bhtk = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    q_BHTK, k_BGTK, v_BGTK = to_bhtk(q_BTHK), to_bhtk(k_BTGK), to_bhtk(v_BTGK)
    famk_BGNFK = famk_BNFGK.transpose(0, 3, 1, 2, 4)
    famv_BGNFK = famv_BNFGK.transpose(0, 3, 1, 2, 4)
    cfg = _KernelConfig(
        block_size=block_size,
        memory_segments=min(memory_segments, N - 1),  # blocks before the sequence start do not exist
        scale=scale,
        block_q=block_q,
        block_k=block_k,
        kernel=choice.impl,
        backward=choice.backward,
        backward_reason=choice.reason if choice.backward in ("xla", "unsupported") else "",
        interpret=choice.impl == "pallas_interpret",
    )
    o_BHTK = _flash(cfg, q_BHTK, k_BGTK, v_BGTK, famk_BGNFK, famv_BGNFK)
    return o_BHTK.transpose(0, 2, 1, 3)[:, :T]


@dataclasses.dataclass(frozen=True)
class _KernelConfig:
    """Static kernel configuration (hashable: a nondiff argument of the custom_vjp). memory_segments is clamped to
    N - 1; kernel / backward are ImplChoice names ("pallas_interpret", "pallas_tpu", "pallas_gpu"; the backward
    also "xla" = the reference VJP, or "unsupported" = raise ``backward_reason`` when a gradient is taken)."""

    block_size: int
    memory_segments: int
    scale: float
    block_q: int | None
    block_k: int | None
    kernel: str
    backward: str
    backward_reason: str
    interpret: bool

    def replace(self, **kw) -> _KernelConfig:
        return dataclasses.replace(self, **kw)


def _reference_lse(cfg, q_BHTK, k_BGTK, v_BGTK, famk_BGNFK, famv_BGNFK):
    """Pure-JAX (o, lse) on the padded kernel layout: padded keys sit after every real query, so they stay masked."""
    to_bthk = lambda x: x.transpose(0, 2, 1, 3)
    o_BTHK, lse_BTH = feedback_attention_reference_with_lse(
        to_bthk(q_BHTK), to_bthk(k_BGTK), to_bthk(v_BGTK),
        famk_BGNFK.transpose(0, 2, 3, 1, 4), famv_BGNFK.transpose(0, 2, 3, 1, 4),
        block_size=cfg.block_size, memory_segments=cfg.memory_segments, sm_scale=cfg.scale,
    )  # fmt: skip
    return to_bthk(o_BTHK), lse_BTH.transpose(0, 2, 1)


def _dispatch(cfg: _KernelConfig, fn_name: str, *args):
    """Runs ``<kernel module>.<fn_name>`` for the implementation chosen at trace time (``_choose``): the TPU kernel
    code (compiled for TPU or interpreted), the Mosaic-GPU kernels, or (backward only) the reference VJP."""
    from pallas_kernels.feedback_attention import tpu

    which = cfg.kernel if fn_name == "forward" else cfg.backward
    if which == "unsupported":
        raise ValueError(f"impl='pallas': cannot take the gradient of feedback_attention here: {cfg.backward_reason}; "
                         "use impl='auto' (reference VJP for the gradient) or impl='xla'")  # fmt: skip
    if which == "xla":  # auto on CUDA when only the forward kernel fits
        warn_fallback_once("feedback_attention (gradient)", cfg.backward_reason)
        *inputs, do_BHTK, _, _ = args
        _, vjp = jax.vjp(lambda *a: _reference_lse(cfg, *a)[0], *inputs)
        return vjp(do_BHTK)
    if which == "pallas_gpu":
        from pallas_kernels.feedback_attention import gpu

        return getattr(gpu, fn_name)(_platform_tiles(cfg, GPU_TILE_CAP), *args)
    if which in ("pallas_tpu", "pallas_interpret"):
        return getattr(tpu, fn_name)(_platform_tiles(cfg, TPU_TILE_CAP), *args)
    raise AssertionError(f"unknown kernel {which!r}")


def _platform_tiles(cfg: _KernelConfig, cap: int) -> _KernelConfig:
    """Fills unset tiles with the largest of 512..8 (<= cap) dividing block_size."""
    return cfg.replace(
        block_q=cfg.block_q or default_tile(cfg.block_size, cap),
        block_k=cfg.block_k or default_tile(cfg.block_size, cap),
    )


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q_BHTK, k_BGTK, v_BGTK, famk_BGNFK, famv_BGNFK):
    o_BHTK, _ = _dispatch(cfg, "forward", q_BHTK, k_BGTK, v_BGTK, famk_BGNFK, famv_BGNFK)
    return o_BHTK


def _flash_fwd(cfg, q_BHTK, k_BGTK, v_BGTK, famk_BGNFK, famv_BGNFK):
    o_BHTK, lse_BHT = _dispatch(cfg, "forward", q_BHTK, k_BGTK, v_BGTK, famk_BGNFK, famv_BGNFK)
    return o_BHTK, (q_BHTK, k_BGTK, v_BGTK, famk_BGNFK, famv_BGNFK, o_BHTK, lse_BHT)


def _flash_bwd(cfg, res, do_BHTK):
    q_BHTK, k_BGTK, v_BGTK, famk_BGNFK, famv_BGNFK, o_BHTK, lse_BHT = res
    # D_i = sum_k dO_ik O_ik (the softmax-backward row term), f32; lse and delta stay [B,H,Tp] (T on lanes: no
    # 128-lane padding of a trailing unit axis on TPU).
    delta_BHT = jnp.sum(do_BHTK.astype(jnp.float32) * o_BHTK.astype(jnp.float32), axis=-1)
    return _dispatch(
        cfg,
        "backward",
        q_BHTK,
        k_BGTK,
        v_BGTK,
        famk_BGNFK,
        famv_BGNFK,
        do_BHTK.astype(q_BHTK.dtype),
        lse_BHT,
        delta_BHT,
    )


_flash.defvjp(_flash_fwd, _flash_bwd)

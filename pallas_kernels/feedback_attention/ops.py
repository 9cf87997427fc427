"""Public entry for TransformerFAM feedback attention (Hwang et al. 2024, arXiv 2404.09173, Sec. 3.2).

``feedback_attention`` validates shapes, dtypes and tile sizes, then dispatches: ``impl="xla"`` runs the pure-JAX
reference (``reference.py``); ``impl="pallas"`` runs the flash-style kernels (``tpu.py`` on TPU and in CPU interpret
mode, ``gpu.py`` on CUDA) under a ``jax.custom_vjp`` whose backward is the Pallas dq / dk,dv / dFAM kernels.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp

from pallas_kernels.feedback_attention.reference import feedback_attention_reference, num_blocks

IMPLS = ("xla", "pallas", "auto")
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
TILE_CANDIDATES = (512, 256, 128, 64, 32, 16, 8)
MIN_TILE = 8  # TPU sublane granularity: Pallas tiles (block_q, block_k) must be multiples of 8
TPU_TILE_CAP = 512  # default tiles: VMEM holds 512-row q/k/v tiles easily
GPU_TILE_CAP = 128  # default tiles: the Mosaic-GPU forward keeps q plus two k/v slots in SMEM


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def default_tile(block_size: int, cap: int = 512) -> int:
    """Largest tile in TILE_CANDIDATES (<= cap) dividing block_size; block_size itself if none does."""
    for t in TILE_CANDIDATES:
        if t <= cap and block_size % t == 0:
            return t
    return block_size


def validate(q_BTHK, k_BTGK, v_BTGK, famk_BNFGK, famv_BNFGK, *, block_size: int, memory_segments: int, sm_scale):
    """Checks shapes/dtypes; returns (B, T, H, G, K, N, F, scale). Raises ValueError naming the bad argument."""
    _check_int("block_size", block_size, 1)
    _check_int("memory_segments", memory_segments, 0)
    for name, x, nd in (("q_BTHK", q_BTHK, 4), ("k_BTGK", k_BTGK, 4), ("v_BTGK", v_BTGK, 4)):
        if x.ndim != nd:
            raise ValueError(f"{name} must have {nd} dims [B,T,H|G,K], got shape {x.shape}")
    for name, x in (("famk_BNFGK", famk_BNFGK), ("famv_BNFGK", famv_BNFGK)):
        if x.ndim != 5:
            raise ValueError(f"{name} must have 5 dims [B,N,F,G,K], got shape {x.shape}")
    B, T, H, K = q_BTHK.shape
    if T < 1:
        raise ValueError(f"q_BTHK must have T >= 1, got shape {q_BTHK.shape}")
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
        if isinstance(sm_scale, bool) or not isinstance(sm_scale, (int, float)) or not sm_scale > 0:
            raise ValueError(f"sm_scale must be a positive float or None, got {sm_scale!r}")
        scale = float(sm_scale)
    return B, T, H, G, K, N, F, scale


def resolve_tiles(block_size: int, block_q: int | None, block_k: int | None) -> tuple[int | None, int | None]:
    """Validates the Pallas tile sizes (multiples of 8 dividing block_size); None stays None and is resolved per
    platform at dispatch (TPU / interpret: up to 512; GPU: up to 128, see ``_platform_tiles``)."""
    if block_size % MIN_TILE:
        raise ValueError(
            f"block_size must be a multiple of {MIN_TILE} for impl='pallas' (tiles are multiples of {MIN_TILE}), "
            f"got {block_size}; use impl='xla' for other block sizes"
        )
    tiles = []
    for name, t in (("block_q", block_q), ("block_k", block_k)):
        if t is None:
            tiles.append(None)
            continue
        _check_int(name, t, MIN_TILE)
        if t % MIN_TILE or block_size % t:
            raise ValueError(f"{name} must be a multiple of {MIN_TILE} dividing block_size={block_size}, got {t}")
        tiles.append(t)
    return tiles[0], tiles[1]


def _resolve_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "pallas" if jax.default_backend() in ("tpu", "gpu") else "xla"
    return impl


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
) -> jax.Array:
    """TransformerFAM block sliding window attention with feedback memory (arXiv 2404.09173, Sec. 3.2, Fig. 2).

    Token t of block n = t // block_size attends causally within block n, fully to blocks n-memory_segments..n-1,
    and fully to famk/famv[:, n] (F keys; F may be 0). Shapes: q [B,T,H,K]; k, v [B,T,G,K] (GQA, H % G == 0);
    famk, famv [B,N,F,G,K] with N = ceil(T / block_size). Softmax in f32; returns [B,T,H,K] in q's dtype.

    impl: "xla" (reference), "pallas" (kernels; TPU, CUDA, or CPU with interpret), "auto" (pallas on TPU/GPU,
    xla on CPU). block_q / block_k: Pallas tile sizes (multiples of 8 dividing block_size; default the largest
    of 512..8 that divides it on TPU, of 128..8 on GPU). interpret: run the TPU kernel code in interpret mode
    (default: True on CPU). The GPU kernels need bfloat16, K, F, tiles all multiples of 64 and SMEM to spare
    (``gpu.supported``); other configurations run the reference (and its VJP) on CUDA.
    """
    validate(
        q_BTHK, k_BTGK, v_BTGK, famk_BNFGK, famv_BNFGK,
        block_size=block_size, memory_segments=memory_segments, sm_scale=sm_scale,
    )  # fmt: skip
    impl = _resolve_impl(impl)
    if impl == "xla":
        return feedback_attention_reference(
            q_BTHK, k_BTGK, v_BTGK, famk_BNFGK, famv_BNFGK,
            block_size=block_size, memory_segments=memory_segments, sm_scale=sm_scale,
        )  # fmt: skip
    bq, bk = resolve_tiles(block_size, block_q, block_k)
    return _pallas_forward(
        q_BTHK, k_BTGK, v_BTGK, famk_BNFGK, famv_BNFGK,
        block_size=block_size, memory_segments=memory_segments, sm_scale=sm_scale,
        block_q=bq, block_k=bk, interpret=interpret,
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


def _pallas_forward(q_BTHK, k_BTGK, v_BTGK, famk_BNFGK, famv_BNFGK, *, block_size, memory_segments, sm_scale,
                    block_q, block_k, interpret):  # fmt: skip
    """Pads T to N*block_size, moves heads before time ([B,H,T,K]) and calls the custom-vjp kernel."""
    B, T, H, G, K, N, F, scale = validate(
        q_BTHK, k_BTGK, v_BTGK, famk_BNFGK, famv_BNFGK,
        block_size=block_size, memory_segments=memory_segments, sm_scale=sm_scale,
    )  # fmt: skip
    platform = _kernel_platform(interpret)
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
        platform=platform,
        interpret=platform == "interpret",
    )
    o_BHTK = _flash(cfg, q_BHTK, k_BGTK, v_BGTK, famk_BGNFK, famv_BGNFK)
    return o_BHTK.transpose(0, 2, 1, 3)[:, :T]


def _kernel_platform(interpret: bool | None) -> str:
    """'interpret' (the TPU kernel code in Pallas interpret mode) or 'compiled' (per-platform kernels)."""
    if interpret is None:
        interpret = jax.default_backend() not in ("tpu", "gpu")
    return "interpret" if interpret else "compiled"


@dataclasses.dataclass(frozen=True)
class _KernelConfig:
    """Static kernel configuration (hashable: a nondiff argument of the custom_vjp). memory_segments is clamped to
    N - 1; platform is "interpret" (TPU kernel code in interpret mode) or "compiled" (chosen at lowering)."""

    block_size: int
    memory_segments: int
    scale: float
    block_q: int | None
    block_k: int | None
    platform: str
    interpret: bool

    def replace(self, **kw) -> _KernelConfig:
        return dataclasses.replace(self, **kw)


def _dispatch(cfg: _KernelConfig, fn_name: str, *args):
    """Runs ``tpu.<fn_name>`` in interpret mode, or picks the TPU / CUDA kernel when lowering for that platform.

    ``lax.platform_dependent`` resolves the branch at lowering time, so ``jax.export(..., platforms=["cuda"])`` on a
    CPU host lowers the Mosaic-GPU kernel and ``platforms=["tpu"]`` the Mosaic-TPU kernel; other platforms (CPU)
    fall back to the interpret-mode TPU kernel.
    """
    from pallas_kernels.feedback_attention import tpu

    tpu_cfg = _platform_tiles(cfg, TPU_TILE_CAP)
    interp = tpu_cfg.replace(platform="interpret", interpret=True)
    if cfg.platform == "interpret":
        return getattr(tpu, fn_name)(interp, *args)

    def on_gpu(*a):
        from pallas_kernels.feedback_attention import gpu

        return getattr(gpu, fn_name)(_platform_tiles(cfg, GPU_TILE_CAP), *a)

    return jax.lax.platform_dependent(
        *args,
        tpu=lambda *a: getattr(tpu, fn_name)(tpu_cfg, *a),
        cuda=on_gpu,
        default=lambda *a: getattr(tpu, fn_name)(interp, *a),
    )


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
    o_BHTK, lse_BHT1 = _dispatch(cfg, "forward", q_BHTK, k_BGTK, v_BGTK, famk_BGNFK, famv_BGNFK)
    return o_BHTK, (q_BHTK, k_BGTK, v_BGTK, famk_BGNFK, famv_BGNFK, o_BHTK, lse_BHT1)


def _flash_bwd(cfg, res, do_BHTK):
    q_BHTK, k_BGTK, v_BGTK, famk_BGNFK, famv_BGNFK, o_BHTK, lse_BHT1 = res
    # D_i = sum_k dO_ik O_ik (the softmax-backward row term), f32.
    delta_BHT1 = jnp.sum(do_BHTK.astype(jnp.float32) * o_BHTK.astype(jnp.float32), axis=-1, keepdims=True)
    return _dispatch(
        cfg,
        "backward",
        q_BHTK,
        k_BGTK,
        v_BGTK,
        famk_BGNFK,
        famv_BGNFK,
        do_BHTK.astype(q_BHTK.dtype),
        lse_BHT1,
        delta_BHT1,
    )


_flash.defvjp(_flash_fwd, _flash_bwd)

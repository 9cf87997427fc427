"""Flash attention for self-attention over one packed sequence per row: the kernels behind ``nn/attention.py``.

- TPU: Pallas splash attention shipped with JAX (``jax.experimental.pallas.ops.tpu.splash_attention``): the
  FlashAttention tiling (Dao et al. 2022, arXiv 2205.14135, Alg. 1) with block-sparse static masks, so causal and
  sliding-window tiles above the diagonal / outside the window are skipped and no [heads, T, T] scores exist.
  Segment ids (packed documents) are the kernel's ``SegmentIds``; grouped-query heads are native (MHA mode with
  fewer k/v heads). The same kernel code runs in the Pallas interpreter on a CPU (``interpret=True``, tests).
- GPU: cuDNN flash attention through ``jax.nn.dot_product_attention(implementation="cudnn")`` for causal and
  sliding-window masks without segment ids (bf16 / fp16, head dim a multiple of 8 up to 128).
- Everything else stays on the XLA path of ``nn/attention.py``, which is also the reference these are tested
  against (``tests/nn/test_attention_flash.py``).

Masks here are by index inside a row: key s is visible from query t iff seg[s] == seg[t] and (causal) s <= t
(sliding: t - s < window). ``attention_mask`` of nn/attention.py masks by *positions*; the two agree when positions
count up by one inside each segment, which is how the data pipeline packs rows (``data/pipeline.py``). One
difference is deliberate: a padding query (segment id 0) attends to padding keys here, while the reference gives it
uniform weights over all keys; padding rows carry no loss and reach no real token, so losses and every gradient of a
loss weighted by the pipeline's ``weights`` are the same.

Precision: the splash kernels' matmuls follow ``jax_default_matmul_precision``; "highest" with bf16 inputs asks
Mosaic for an fp32 contraction of bf16 tiles, which it refuses ("Mosaic failed to compile TPU kernel: Bad lhs
type"). Keep the default precision for bf16 models on TPU (bf16 operands are exact in one pass either way).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from looped_jax.nn.platform import target_platform
from pallas_kernels.dispatch import resolve_platform

FLASH_IMPLS = ("auto", "xla", "splash", "cudnn")
SPLASH_BLOCKS = (512, 256, 128)  # candidate tiles; Mosaic needs k/v tiles that are multiples of 128 lanes
CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
CUDNN_MAX_HEAD_DIM = 128  # pre-Hopper limit; Hopper allows 256, but the host cannot tell when cross-lowering
logger = logging.getLogger("looped_jax.attention")
_warned: set[str] = set()


class FlashChoice(NamedTuple):
    """What ``flash_attention`` runs: ``impl`` is "xla", "splash", "splash_interpret" or "cudnn"."""

    impl: str
    platform: str
    reason: str


def splash_block(seq_len: int) -> int | None:
    """The largest tile in SPLASH_BLOCKS dividing ``seq_len``; None when none does (the kernel cannot run)."""
    for b in SPLASH_BLOCKS:
        if seq_len % b == 0:
            return b
    return None


def _cudnn_unsupported(head_dim: int, dtype, segmented: bool) -> list[str]:
    why = []
    if jnp.dtype(dtype) not in CUDNN_DTYPES:
        why.append(f"dtype {jnp.dtype(dtype)} (cuDNN flash attention takes bfloat16 / float16)")
    if head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM:
        why.append(f"head_dim={head_dim} (cuDNN needs a multiple of 8 <= {CUDNN_MAX_HEAD_DIM})")
    if segmented:
        why.append("segment ids (packed rows; the cuDNN path here takes causal / window masks only)")
    return why


def which_flash(
    q_shape: tuple[int, ...],
    k_shape: tuple[int, ...],
    dtype,
    *,
    mask_kind: str,
    window: int = 0,
    segmented: bool = False,
    impl: str = "auto",
    platform: str | None = None,
    interpret: bool | None = None,
) -> FlashChoice:
    """Which implementation self-attention with q [B,T,N,H], k/v [B,T,K,H] uses on ``platform`` (default: the
    traced-for platform, ``target_platform()``) and why, without running anything.

    ``impl="xla"``: the reference path. ``impl="splash"``: the Pallas kernel (compiled on TPU, interpreted on a CPU
    target or with ``interpret=True``), else a ValueError naming what it does not support. ``impl="cudnn"``: cuDNN on
    CUDA, else a ValueError. ``impl="auto"``: splash on TPU, cuDNN on CUDA where they apply, XLA otherwise (a
    warning once per reason when an accelerator falls back)."""
    if impl not in FLASH_IMPLS:
        raise ValueError(f"attention impl must be one of {FLASH_IMPLS}, got {impl!r}")
    if interpret is not None and not isinstance(interpret, bool):
        raise ValueError(f"interpret must be True, False or None, got {interpret!r}")
    if len(q_shape) != 4 or len(k_shape) != 4:
        raise ValueError(f"q must be [B,T,N,H] and k [B,T,K,H], got shapes {q_shape} and {k_shape}")
    p = target_platform() if platform is None else resolve_platform(platform)
    _, t, n, h = q_shape
    if k_shape[1] != t or k_shape[3] != h or n % k_shape[2]:
        raise ValueError(f"self-attention needs k [B,T={t},K,H={h}] with N={n} a multiple of K, got {k_shape}")
    if impl == "xla":
        return FlashChoice("xla", p, "impl='xla' requested")
    if impl == "splash" or (impl == "auto" and p == "tpu"):
        why = []
        if splash_block(t) is None:
            why.append(f"sequence length T={t} is not a multiple of 128 (splash tiles are 128-lane multiples)")
        if mask_kind == "sliding" and window < 1:
            why.append(f"sliding window={window} < 1")
        interp = (p == "cpu") if interpret is None else interpret
        if impl == "splash" and p in ("cuda", "rocm") and not interp:
            why.append(f"splash attention is a TPU kernel, not for platform {p!r} (use impl='cudnn' or 'auto')")
        if not why:
            return FlashChoice("splash_interpret" if interp else "splash", p, "Pallas splash attention")
        if impl == "splash":
            raise ValueError(f"attention impl='splash' on platform {p!r}: {'; '.join(why)}; use impl='xla' or 'auto'")
        return _fallback(p, "; ".join(why))
    if impl == "cudnn" or (impl == "auto" and p == "cuda"):
        why = [] if p == "cuda" else [f"cuDNN runs on platform 'cuda', not {p!r}"]
        why += _cudnn_unsupported(h, dtype, segmented)
        if not why:
            return FlashChoice("cudnn", p, "cuDNN flash attention")
        if impl == "cudnn":
            raise ValueError(f"attention impl='cudnn' on platform {p!r}: {'; '.join(why)}; use impl='xla' or 'auto'")
        return _fallback(p, "; ".join(why))
    return FlashChoice("xla", p, f"no flash kernel for platform {p!r}" if p != "cpu" else "CPU: the XLA path")


def _fallback(platform: str, reason: str) -> FlashChoice:
    key = f"{platform}: {reason}"
    if key not in _warned:
        _warned.add(key)
        logger.warning("attention impl='auto' on %s runs the XLA path: %s", platform, reason)
    return FlashChoice("xla", platform, reason)


@functools.lru_cache(maxsize=64)
def _splash_kernel(mask_kind: str, seq_len: int, window: int, num_heads: int, interpret: bool):
    """A splash kernel for one static mask (built once per shape: the block-sparsity tables are numpy work)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    shape = (seq_len, seq_len)
    if mask_kind == "causal":
        mask = sa.CausalMask(shape)
    elif mask_kind == "sliding":
        mask = sa.LocalMask(shape, window_size=(window - 1, 0), offset=0)  # keys t - window + 1 .. t
    else:
        mask = sa.FullMask(shape)
    b = splash_block(seq_len)
    blocks = sa.BlockSizes(
        block_q=b, block_kv=b, block_kv_compute=b,
        block_q_dkv=b, block_kv_dkv=b, block_kv_dkv_compute=b,
        block_q_dq=b, block_kv_dq=b,
    )  # fmt: skip
    multi = sa.MultiHeadMask([mask] * num_heads)
    return sa.make_splash_mha(multi, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(
    q_BTNH: jax.Array,
    k_BTKH: jax.Array,
    v_BTKH: jax.Array,
    segment_ids_BT: jax.Array | None,
    *,
    mask_kind: str,
    window: int = 0,
    interpret: bool = False,
) -> jax.Array:
    """Splash attention on local (unsharded) arrays; returns [B,T,N,H] in q's dtype. Scale 1/sqrt(H) on q."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    _, t, n, h = q_BTNH.shape
    kernel = _splash_kernel(mask_kind, t, window if mask_kind == "sliding" else 0, n, interpret)
    scale = 1.0 / math.sqrt(h)
    q_BNTH = jnp.swapaxes(q_BTNH * jnp.asarray(scale, q_BTNH.dtype), 1, 2)
    k_BKTH, v_BKTH = jnp.swapaxes(k_BTKH, 1, 2), jnp.swapaxes(v_BTKH, 1, 2)
    if segment_ids_BT is None:
        o_BNTH = jax.vmap(kernel)(q_BNTH, k_BKTH, v_BKTH)
    else:
        seg_BT = segment_ids_BT.astype(jnp.int32)
        o_BNTH = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=SegmentIds(q=s, kv=s)))(
            q_BNTH, k_BKTH, v_BKTH, seg_BT
        )
    return jnp.swapaxes(o_BNTH, 1, 2).astype(q_BTNH.dtype)


def cudnn_attention(q_BTNH, k_BTKH, v_BTKH, *, mask_kind: str, window: int = 0) -> jax.Array:
    """cuDNN flash attention (causal / sliding / bidirectional over whole rows, no segment ids)."""
    local = (window - 1, 0) if mask_kind == "sliding" else None
    return jax.nn.dot_product_attention(
        q_BTNH, k_BTKH, v_BTKH, is_causal=mask_kind != "bidirectional", local_window_size=local,
        implementation="cudnn",
    )  # fmt: skip


def flash_attention(
    choice: FlashChoice,
    q_BTNH: jax.Array,
    k_BTKH: jax.Array,
    v_BTKH: jax.Array,
    segment_ids_BT: jax.Array | None,
    *,
    mask_kind: str,
    window: int = 0,
) -> jax.Array:
    """Runs ``choice`` (from ``which_flash``; not "xla") under ``jax.shard_map`` over batch and heads when traced
    under a mesh (Mosaic and cuDNN calls cannot be partitioned automatically), else as a plain call."""
    from looped_jax import sharding as shd

    if choice.impl in ("splash", "splash_interpret"):
        fn = functools.partial(
            splash_attention, mask_kind=mask_kind, window=window, interpret=choice.impl == "splash_interpret"
        )
    elif choice.impl == "cudnn":

        def fn(q, k, v, s):  # noqa: ARG001 (no segment ids on the cuDNN path)
            return cudnn_attention(q, k, v, mask_kind=mask_kind, window=window)

    else:
        raise ValueError(f"flash_attention runs a kernel choice, got impl={choice.impl!r} (use the XLA path)")
    qkv = ("batch", None, "heads", None)
    seg = ("batch", None)
    if segment_ids_BT is None:
        return shd.shard_kernel(
            lambda q, k, v: fn(q, k, v, None), (q_BTNH, k_BTKH, v_BTKH), (qkv, qkv, qkv), qkv,
            batch=q_BTNH.shape[0], heads=(q_BTNH.shape[2], k_BTKH.shape[2]),
        )  # fmt: skip
    return shd.shard_kernel(
        fn, (q_BTNH, k_BTKH, v_BTKH, segment_ids_BT), (qkv, qkv, qkv, seg), qkv,
        batch=q_BTNH.shape[0], heads=(q_BTNH.shape[2], k_BTKH.shape[2]),
    )  # fmt: skip

"""Transformer blocks with pre-norm, "sandwich" norm or post-norm residual layouts.

- pre:      x = x + Attn(n1(x));        x = x + MLP(n3(x))
- sandwich: x = n2(x + Attn(n1(x)));    x = n4(x + MLP(n3(x)))   (recurrent-depth, Geiping et al. 2025)
- post:     x = n2(x + Attn(x));        x = n4(x + MLP(x))       (HRM, Wang et al. 2025)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from looped_jax.nn.attention import MASK_KINDS, Attention, KVCache
from looped_jax.nn.init import resolve_dtype
from looped_jax.nn.mlp import SwiGLU
from looped_jax.nn.norms import RMSNorm

NORM_STYLES = ("pre", "sandwich", "post")


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Static shape and layout of one transformer block."""

    d_model: int = 128
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 32
    mlp_dim: int = 512
    norm_style: str = "pre"
    norm_eps: float = 1e-6
    norm_scale: bool = True
    mask_kind: str = "causal"
    window: int = 0
    qk_bias: bool = False
    rope_theta: float = 10_000.0
    dtype: str = "float32"

    def __post_init__(self):
        if self.norm_style not in NORM_STYLES:
            raise ValueError(f"norm_style={self.norm_style!r}; expected one of {NORM_STYLES}")
        if self.mask_kind not in MASK_KINDS:
            raise ValueError(f"mask_kind={self.mask_kind!r}; expected one of {MASK_KINDS}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        resolve_dtype(self.dtype)


class Block(nnx.Module):
    def __init__(self, cfg: BlockConfig, *, init_std: float, out_init_std: float, rngs: nnx.Rngs):
        self.norm_style = cfg.norm_style
        dtype = resolve_dtype(cfg.dtype)
        self.attn = Attention(
            cfg.d_model,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            init_std=init_std,
            out_init_std=out_init_std,
            mask_kind=cfg.mask_kind,
            window=cfg.window,
            qk_bias=cfg.qk_bias,
            rope_theta=cfg.rope_theta,
            dtype=dtype,
            rngs=rngs,
        )
        self.mlp = SwiGLU(
            cfg.d_model, cfg.mlp_dim, init_std=init_std, out_init_std=out_init_std, dtype=dtype, rngs=rngs
        )
        norm = lambda: RMSNorm(cfg.d_model, eps=cfg.norm_eps, use_scale=cfg.norm_scale)
        self.norm_attn_in = norm() if cfg.norm_style in ("pre", "sandwich") else None
        self.norm_attn_out = norm() if cfg.norm_style in ("sandwich", "post") else None
        self.norm_mlp_in = norm() if cfg.norm_style in ("pre", "sandwich") else None
        self.norm_mlp_out = norm() if cfg.norm_style in ("sandwich", "post") else None

    def __call__(
        self,
        x_BTD: jax.Array,
        positions_BT: jax.Array,
        segment_ids_BT: jax.Array | None = None,
        *,
        cache: KVCache | None = None,
        cache_index: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        maybe = lambda norm, x: x if norm is None else norm(x)
        residual_dtype = x_BTD.dtype
        h_BTD, cache = self.attn(
            maybe(self.norm_attn_in, x_BTD), positions_BT, segment_ids_BT, cache=cache, cache_index=cache_index
        )
        x_BTD = maybe(self.norm_attn_out, x_BTD + h_BTD.astype(residual_dtype))
        h_BTD = self.mlp(maybe(self.norm_mlp_in, x_BTD))
        x_BTD = maybe(self.norm_mlp_out, x_BTD + h_BTD.astype(residual_dtype))
        return x_BTD, cache


def apply_stack(
    blocks: nnx.List | list,
    x_BTD: jax.Array,
    positions_BT: jax.Array,
    segment_ids_BT: jax.Array | None = None,
    *,
    caches: list[KVCache] | None = None,
    cache_index: jax.Array | None = None,
) -> tuple[jax.Array, list[KVCache] | None]:
    """Applies blocks in order; threads one KV cache per block when ``caches`` is given."""
    new_caches = [] if caches is not None else None
    for i, block in enumerate(blocks):
        x_BTD, c = block(
            x_BTD, positions_BT, segment_ids_BT, cache=None if caches is None else caches[i], cache_index=cache_index
        )
        if new_caches is not None:
            new_caches.append(c)
    return x_BTD, new_caches


def as_residual_dtype(x: jax.Array) -> jax.Array:
    """The residual stream stays in float32 under mixed precision (bf16 compute, f32 accumulate)."""
    return x.astype(jnp.float32)

"""Building blocks (Flax NNX) shared by every family."""

from looped_jax.nn.attention import MASK_KINDS, Attention, KVCache, attention_mask
from looped_jax.nn.blocks import NORM_STYLES, Block, BlockConfig, apply_stack
from looped_jax.nn.embed import Embed, Unembed
from looped_jax.nn.init import lecun_truncated, param, resolve_dtype, takase_std, truncated_normal
from looped_jax.nn.linear import dense, dense_t
from looped_jax.nn.mlp import SwiGLU
from looped_jax.nn.norms import RMSNorm
from looped_jax.nn.rotary import apply_rope, rope_frequencies

__all__ = [
    "MASK_KINDS",
    "NORM_STYLES",
    "Attention",
    "Block",
    "BlockConfig",
    "Embed",
    "KVCache",
    "RMSNorm",
    "SwiGLU",
    "Unembed",
    "apply_rope",
    "apply_stack",
    "attention_mask",
    "dense",
    "dense_t",
    "lecun_truncated",
    "param",
    "resolve_dtype",
    "rope_frequencies",
    "takase_std",
    "truncated_normal",
]

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from looped_jax.nn import Attention, Block, BlockConfig, Embed, KVCache, RMSNorm, apply_rope, attention_mask


def _naive_attention(q, k, v, mask):
    # q [B,T,N,H], k/v [B,S,K,H], mask [B,1,T,S]; repeat kv heads for GQA.
    rep = q.shape[2] // k.shape[2]
    k = jnp.repeat(k, rep, axis=2)
    v = jnp.repeat(v, rep, axis=2)
    s = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    s = jnp.where(mask, s, -1e30)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s, -1), v)


def test_rmsnorm_unit_rms_and_f32():
    x = jax.random.normal(jax.random.key(0), (2, 3, 16), jnp.bfloat16) * 5
    y = RMSNorm(16)(x)
    assert y.dtype == jnp.bfloat16
    rms = jnp.sqrt(jnp.mean(y.astype(jnp.float32) ** 2, -1))
    np.testing.assert_allclose(rms, 1.0, atol=1e-2)


def test_rope_preserves_norm_and_is_relative():
    x = jax.random.normal(jax.random.key(0), (1, 4, 2, 8))
    pos = jnp.arange(4)[None]
    y = apply_rope(x, pos, 1e4)
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    # <R_m q, R_n k> depends only on m - n.
    q, k = x[:, :1], x[:, 1:2]
    dot = lambda m, n: jnp.sum(apply_rope(q, jnp.array([[m]]), 1e4) * apply_rope(k, jnp.array([[n]]), 1e4))
    np.testing.assert_allclose(dot(5, 2), dot(13, 10), rtol=1e-4)


@pytest.mark.parametrize("kind,window", [("causal", 0), ("bidirectional", 0), ("sliding", 3)])
def test_attention_matches_naive(kind, window):
    attn = Attention(32, 4, 2, 8, init_std=0.2, out_init_std=0.2, mask_kind=kind, window=window, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 7, 32))
    pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
    seg = jnp.ones((2, 7), jnp.int32)
    out, _ = attn(x, pos, seg)
    q, k, v = attn.project(x, pos)
    mask = attention_mask(pos, pos, seg, seg, kind=kind, window=window)
    ref = attn.output(_naive_attention(q, k, v, mask))
    np.testing.assert_allclose(out, ref, atol=1e-5)
    if kind != "bidirectional":  # the fused causal path (no segment ids) agrees too
        fast, _ = attn(x, pos)
        np.testing.assert_allclose(fast, ref, atol=1e-5)


def test_packed_segments_do_not_attend_across_documents():
    attn = Attention(16, 2, 2, 8, init_std=0.2, out_init_std=0.2, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, 6, 16))
    seg = jnp.array([[1, 1, 1, 2, 2, 0]])
    pos = jnp.array([[0, 1, 2, 0, 1, 0]])
    out, _ = attn(x, pos, seg)
    alone, _ = attn(x[:, 3:5], pos[:, 3:5])
    np.testing.assert_allclose(out[:, 3:5], alone, atol=1e-5)


@pytest.mark.parametrize("norm_style", ["pre", "sandwich", "post"])
def test_block_kv_cache_decoding_matches_full_pass(norm_style):
    cfg = BlockConfig(
        d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64, norm_style=norm_style, qk_bias=True
    )
    block = Block(cfg, init_std=0.1, out_init_std=0.05, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (2, 6, 32))
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    full, _ = block(x, pos)
    cache = KVCache.empty(2, 8, 2, 8)
    outs = []
    # Prefill two tokens, then decode one at a time.
    y, cache = block(x[:, :2], pos[:, :2], cache=cache, cache_index=jnp.int32(0))
    outs.append(y)
    for t in range(2, 6):
        y, cache = block(x[:, t : t + 1], pos[:, t : t + 1], cache=cache, cache_index=jnp.int32(t))
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5)


def test_embed_tied_head_and_logical_axes():
    emb = Embed(11, 8, init_std=0.1, rngs=nnx.Rngs(0))
    x = emb(jnp.array([[1, 2]]))
    logits = emb.attend(x)
    assert logits.shape == (1, 2, 11) and logits.dtype == jnp.float32
    assert emb.table_VD.get_metadata()["logical_axes"] == ("vocab", "embed")


def test_bad_block_config_names_the_field():
    with pytest.raises(ValueError, match="norm_style"):
        BlockConfig(norm_style="middle")
    with pytest.raises(ValueError, match="num_kv_heads"):
        BlockConfig(num_heads=4, num_kv_heads=3)


@pytest.mark.parametrize("head_dim", [16, 8])  # 16: the scale is a power of two and goes on q; 8: on the logits
@pytest.mark.parametrize("causal_window", [None, 0, 3])  # None: segment mask only; else is_causal (+ window)
def test_einsum_attention_matches_jax_dot_product_attention(head_dim, causal_window):
    """The CPU path (heads-major matmuls, additive mask bias) is jax.nn.dot_product_attention, values and
    gradients, for grouped-query heads and packed segments with a padding row."""
    from looped_jax.nn.attention import einsum_attention

    b, t, n, kv = 2, 9, 6, 2
    ks = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(ks[0], (b, t, n, head_dim))
    k, v = (jax.random.normal(kk, (b, t, kv, head_dim)) for kk in ks[1:3])
    seg = jnp.array([[1, 1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1]])
    pos = jnp.array([[0, 1, 2, 3, 0, 1, 2, 3, 0], list(range(9))])
    mask = attention_mask(pos, pos, seg, seg, kind="bidirectional")
    is_causal = causal_window is not None
    window = causal_window or 0

    def ours(q, k, v):
        return einsum_attention(q, k, v, mask, is_causal=is_causal, window=window)

    def ref(q, k, v):
        m = mask
        if is_causal:
            d = jnp.arange(t)[:, None] - jnp.arange(t)[None, :]
            m = m & (d >= 0) & ((d < window) if window else True)
        return jax.nn.dot_product_attention(q, k, v, mask=m, implementation="xla")

    # a row with no visible key: uniform weights here (a select's large negative), zeros in jax's; neither
    # reaches a loss (the row is padding and every query masks it out), so only real rows are compared
    real = (seg > 0)[:, :, None, None]
    np.testing.assert_allclose(ours(q, k, v) * real, ref(q, k, v) * real, atol=1e-6)
    w = jax.random.normal(ks[3], (b, t, n, head_dim)) * real
    g_ours = jax.grad(lambda *a: jnp.sum(ours(*a) * w), argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(lambda *a: jnp.sum(ref(*a) * w), argnums=(0, 1, 2))(q, k, v)
    for a, r in zip(g_ours, g_ref, strict=True):
        np.testing.assert_allclose(a, r, atol=1e-5)

"""Flash attention dispatch (nn/flash.py): splash attention in Pallas interpret mode against the XLA reference
(values and gradients, packed rows with segment ids and padding, GQA), the platform choice, and TPU lowering."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from looped_jax.nn.attention import attention_mask, einsum_attention
from looped_jax.nn.flash import splash_attention, which_flash

B, T, N, K, H = 2, 256, 4, 2, 64  # two 128-tiles per side: block skipping is exercised; 2 q heads per kv head


def _packed():
    """Segment ids (two documents + padding in row 0, two documents in row 1) and per-segment positions."""
    seg = np.zeros((B, T), np.int32)
    seg[0, :100], seg[0, 100:230] = 1, 2
    seg[1, :50], seg[1, 50:] = 1, 2
    pos = np.zeros((B, T), np.int32)
    for b in range(B):
        for t in range(1, T):
            pos[b, t] = 0 if seg[b, t] != seg[b, t - 1] else pos[b, t - 1] + 1
    return jnp.asarray(seg), jnp.asarray(pos * (seg > 0))


def _vjp(fn, args, ct):
    o, vjp = jax.vjp(fn, *args)
    return o, vjp(ct)


@pytest.mark.parametrize(
    "kind,window",
    [("causal", 0), pytest.param("sliding", 100, marks=pytest.mark.slow),
     pytest.param("bidirectional", 0, marks=pytest.mark.slow)],
)  # fmt: skip
def test_splash_interpret_matches_reference(kind, window):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((B, T, N, H), np.float32))
    k, v = (jnp.asarray(rng.standard_normal((B, T, K, H), np.float32)) for _ in range(2))
    seg, pos = _packed()
    real = (seg > 0)[:, :, None, None]
    ct = jnp.asarray(rng.standard_normal((B, T, N, H), np.float32)) * real  # padding rows carry no loss
    ref = lambda *a: einsum_attention(*a, attention_mask(pos, pos, seg, seg, kind=kind, window=window))  # noqa: E731
    fl = lambda *a: splash_attention(*a, seg, mask_kind=kind, window=window, interpret=True)  # noqa: E731
    o_ref, g_ref = jax.jit(_vjp, static_argnums=0)(ref, (q, k, v), ct)
    o_fl, g_fl = jax.jit(_vjp, static_argnums=0)(fl, (q, k, v), ct)
    np.testing.assert_allclose(o_fl * real, o_ref * real, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_fl, g_ref, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)


def test_which_flash_by_platform():
    qs, ks = (B, T, N, H), (B, T, K, H)
    kw = dict(mask_kind="causal")
    assert which_flash(qs, ks, jnp.float32, platform="cpu", **kw).impl == "xla"
    assert which_flash(qs, ks, jnp.bfloat16, platform="tpu", segmented=True, **kw).impl == "splash"
    assert which_flash(qs, ks, jnp.float32, platform="cpu", impl="splash", **kw).impl == "splash_interpret"
    assert which_flash((B, 100, N, H), (B, 100, K, H), jnp.float32, platform="tpu", **kw).impl == "xla"
    assert which_flash(qs, ks, jnp.bfloat16, platform="cuda", **kw).impl == "cudnn"
    assert which_flash(qs, ks, jnp.float32, platform="cuda", **kw).impl == "xla"
    assert which_flash(qs, ks, jnp.bfloat16, platform="cuda", segmented=True, **kw).impl == "xla"
    with pytest.raises(ValueError, match="multiple of 128"):
        which_flash((B, 100, N, H), (B, 100, K, H), jnp.float32, platform="tpu", impl="splash", **kw)
    with pytest.raises(ValueError, match="cuDNN runs on platform 'cuda'"):
        which_flash(qs, ks, jnp.bfloat16, platform="cpu", impl="cudnn", **kw)
    with pytest.raises(ValueError, match="impl must be one of"):
        which_flash(qs, ks, jnp.float32, platform="cpu", impl="flash", **kw)


def test_splash_exports_for_tpu():
    seg, _ = _packed()
    s = jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16)
    skv = jax.ShapeDtypeStruct((B, T, K, H), jnp.bfloat16)
    f = lambda q, k, v: splash_attention(q, k, v, seg, mask_kind="causal").astype(jnp.float32).sum()  # noqa: E731
    exp = jax.export.export(jax.jit(jax.grad(f, argnums=(0, 1, 2))), platforms=["tpu"])(s, skv, skv)
    assert exp.mlir_module().count("tpu_custom_call") >= 2  # forward + backward kernels

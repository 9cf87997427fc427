"""Titans options that follow the paper (Behrouz et al. 2024, arXiv 2501.00663): the normalised and gated memory
output (sec. 4.4), MAG's normalised branches and persistent tokens read by the memory (eqs. 26-29), the deep
``mlp_ln`` memory and the channel-wise forgetting gate on the pure-JAX chunked path (memory_update_dual), which
must equal the memory-update op where both apply and a token-by-token reference everywhere."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from looped_jax.models.neural_memory import NeuralMemory, memory_update_dual
from looped_jax.models.titans import TitansConfig, TitansModel
from pallas_kernels.memory_update import init_memory_state, memory_update

B, H, T, K = 2, 2, 11, 8  # T not a multiple of the chunk: the ragged tail is padded with no-op tokens


def _inputs(key=0, hidden=12, memory="mlp"):
    ks = jax.random.split(jax.random.key(key), 8)
    q, k = (jax.random.normal(ks[i], (B, H, T, K)) / np.sqrt(K) for i in range(2))
    v = jax.random.normal(ks[2], (B, H, T, K))
    eta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, H, T)))
    theta = 0.05 * jax.nn.sigmoid(jax.random.normal(ks[5], (B, H, T)))
    valid = jax.random.uniform(ks[6], (B, H, T)) > 0.3
    state = init_memory_state(B, H, K, K, memory="mlp", hidden=hidden, key=ks[7])
    if memory == "linear":
        state = init_memory_state(B, H, K, K, memory="linear", key=ks[7])
    return ks[3], q, k, v, eta, theta, valid, state


@pytest.mark.parametrize("memory", ["linear", "mlp"])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_dual_form_equals_the_memory_update_op(memory, clip):
    """Scalar forgetting on the kernel's memories: memory_update_dual == memory_update (chunked XLA form), masks,
    a ragged tail and surprise clipping included."""
    ka, q, k, v, eta, theta, valid, state = _inputs(memory=memory)
    alpha = jax.nn.sigmoid(jax.random.normal(ka, (B, H, T)) - 1.0)
    kw = dict(chunk_size=4, memory=memory, max_surprise_norm=clip)

    @jax.jit
    def both(q, k, v, alpha, eta, theta, state, valid):
        with jax.default_matmul_precision("highest"):
            op = memory_update(q, k, v, alpha, eta, theta, state, impl="xla", valid_BHT=valid, **kw)
            dual = memory_update_dual(q, k, v, alpha[..., None], eta, theta, state, valid_BHT=valid, **kw)
        return op, dual

    (y1, s1), (y2, s2) = both(q, k, v, alpha, eta, theta, state, valid)
    np.testing.assert_allclose(np.asarray(y2), np.asarray(y1), rtol=1e-5, atol=1e-5)
    for a, b in zip(s2.weights + s2.momentum, s1.weights + s1.momentum, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def _mlp_ln(ws, x):
    """The deep memory written out independently: x + LN(gelu(x W1) W2), LN without affine weights."""
    h = jax.nn.gelu(x @ ws[0]) @ ws[1]
    mu = h.mean(-1, keepdims=True)
    return x + (h - mu) / jnp.sqrt(((h - mu) ** 2).mean(-1, keepdims=True) + 1e-5)


def _token_reference(q, k, v, alpha_split, eta, theta, valid, ws, ss, chunk):
    """One (batch, head), token by token: gradients at the chunk-start memory (eq. 16), then
    S_t = eta_t S_{t-1} - theta_t g_t, M_t[:, c] = (1 - alpha_t[c]) M_{t-1}[:, c] + S_t[:, c], y_t = M_t(q_t);
    invalid tokens keep (M, S)."""
    loss = lambda w, kk, vv: jnp.sum((_mlp_ln(w, kk) - vv) ** 2)
    ys, w0 = [], ws
    for t in range(q.shape[0]):  # unrolled under jit
        if t % chunk == 0:
            w0 = ws
        g = jax.grad(loss)(w0, k[t], v[t])
        s_new = tuple(eta[t] * s - theta[t] * gl for s, gl in zip(ss, g, strict=True))
        w_new = tuple((1 - a[t]) * w + s for w, s, a in zip(ws, s_new, alpha_split, strict=True))
        ss = tuple(jnp.where(valid[t], n, o) for n, o in zip(s_new, ss, strict=True))
        ws = tuple(jnp.where(valid[t], n, o) for n, o in zip(w_new, ws, strict=True))
        ys.append(_mlp_ln(ws, q[t]))
    return jnp.stack(ys), ws, ss


def test_deep_memory_with_channel_forgetting_equals_token_by_token_reference():
    """mlp_ln memory (GELU, 4x hidden, residual LayerNorm) with one forgetting rate per output channel."""
    ka, q, k, v, eta, theta, valid, _ = _inputs()
    hidden = 4 * K
    kw1, kw2 = jax.random.split(jax.random.key(9))
    ws = (jax.random.normal(kw1, (B, H, K, hidden)) / np.sqrt(K), jax.random.normal(kw2, (B, H, hidden, K)) / 6)
    state = init_memory_state(B, H, K, K, memory="mlp", hidden=hidden, weights=ws)
    alpha = jax.nn.sigmoid(jax.random.normal(ka, (B, H, T, hidden + K)) - 1.0)  # very different rates per channel

    @jax.jit
    def both(q, k, v, alpha, eta, theta, state, valid):
        with jax.default_matmul_precision("highest"):
            dual = memory_update_dual(q, k, v, alpha, eta, theta, state, chunk_size=4, memory="mlp_ln", valid_BHT=valid)

            def ref(q, k, v, a, e, th, ok, w1, w2):
                s0 = (jnp.zeros_like(w1), jnp.zeros_like(w2))
                return _token_reference(q, k, v, (a[:, :hidden], a[:, hidden:]), e, th, ok, (w1, w2), s0, 4)

            return dual, jax.vmap(jax.vmap(ref))(q, k, v, alpha, eta, theta, valid, *state.weights)

    (y, st), (yr, wr, sr) = both(q, k, v, alpha, eta, theta, state, valid)
    np.testing.assert_allclose(np.asarray(y), np.asarray(yr), rtol=1e-5, atol=1e-5)
    for got, want in zip(st.weights + st.momentum, wr + sr, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


MEM_KW = dict(num_heads=2, head_dim=16, chunk_size=4, max_lr=0.1, init_std=1.0, out_init_std=0.1)


def test_output_is_normalised_and_gated_by_the_input():
    """sec. 4.4: out = (RMSNorm(M(q)) * sigmoid(x W_g)) W_o, the default; output_gate=False projects M(q) as is."""
    mem = NeuralMemory(32, **MEM_KW, rngs=nnx.Rngs(0))
    assert mem.output_gate and mem.out_gate_DHK is not None
    mem.out_norm_HK[...] = 1.0 + jax.random.uniform(jax.random.key(3), (2, 16))
    y = 5.0 * jax.random.normal(jax.random.key(1), (2, 2, 6, 16))
    x = jax.random.normal(jax.random.key(2), (2, 6, 32))
    got = nnx.jit(lambda m, y, x: m.output(y, x))(mem, y, x)
    yn = y / jnp.sqrt(jnp.mean(y * y, -1, keepdims=True) + 1e-6) * mem.out_norm_HK[...][:, None]
    gate = jax.nn.sigmoid(jnp.einsum("btd,dhk->bhtk", x, mem.out_gate_DHK[...]))
    want = jnp.einsum("bhtk,hkd->btd", yn * gate, mem.out_HKD[...])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    plain = NeuralMemory(32, **MEM_KW, output_gate=False, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(
        np.asarray(plain.output(y, x)), np.asarray(jnp.einsum("bhtk,hkd->btd", y, plain.out_HKD[...])), rtol=1e-6
    )
    assert TitansConfig().memory_output_gate  # the paper's behaviour is the default


def tiny(variant: str, **kw) -> TitansConfig:
    base = dict(
        variant=variant, vocab_size=32, d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
        mlp_dim=64, window=8, segment_len=8, num_persistent=2, memory_heads=2, memory_head_dim=16,
        memory_chunk_size=4, memory_max_lr=0.1, alpha_bias=-4.0,
    )  # fmt: skip
    base.update(kw)
    return TitansConfig(**base)


@pytest.mark.parametrize("branch_norm", [True, False])
def test_mag_normalises_both_branches(branch_norm):
    """eq. 28: o = RMSNorm(y) * sigmoid(RMSNorm(M(x))): scaling the attention output projection or the memory
    output projection leaves the layer unchanged with the branch norms (and changes it without them)."""
    cfg = tiny("mag", mag_branch_norm=branch_norm)
    model = TitansModel(cfg, rngs=nnx.Rngs(0))
    x = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
    fwd = nnx.jit(lambda m, x: m(x))
    base = fwd(model, x)
    layer = model.layers[0]
    layer.attn.o_NHD[...] = 3.0 * layer.attn.o_NHD[...]
    layer.memory.out_HKD[...] = 0.25 * layer.memory.out_HKD[...]
    diff = float(jnp.max(jnp.abs(fwd(model, x) - base)))
    if branch_norm:
        assert diff < 1e-4, diff
    else:
        assert diff > 1e-3, diff


@pytest.mark.parametrize("variant", ["mag", "mal", "mac"])
def test_memory_reads_the_persistent_tokens_first(variant):
    """MAG / MAL (eqs. 26, 29): the memory sees [persistent; x], so a fresh state already holds the persistent
    tokens: init_state's memory is M_0 after writing norm(persistent); MAC's memory does not read them."""
    cfg = tiny(variant)
    model = TitansModel(cfg, rngs=nnx.Rngs(0))
    layer = model.layers[0]
    got = nnx.jit(lambda m: m.init_state(2))(model).layers[0].memory
    fresh = layer.memory.initial_carry(2)
    if variant == "mac":
        np.testing.assert_array_equal(np.asarray(got.state.weights[0]), np.asarray(fresh.state.weights[0]))
        return
    p = jnp.broadcast_to(layer.persistent_PD[...][None], (2, *layer.persistent_PD.shape))
    _, want = nnx.jit(lambda layer, p, c: layer.memory(layer.norm_mix(p), c))(layer, p, fresh)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(jnp.max(jnp.abs(got.state.weights[0] - fresh.state.weights[0]))) > 0.0
    # and the logits depend on the persistent tokens through the memory (switch it off: they no longer do)
    x = jax.random.randint(jax.random.key(1), (1, 8), 0, cfg.vocab_size)
    off = TitansModel(tiny(variant, memory_reads_persistent=False), rngs=nnx.Rngs(0))
    fwd = nnx.jit(lambda m, x: m(x))
    assert float(jnp.max(jnp.abs(fwd(model, x) - fwd(off, x)))) > 1e-5
    off_state = nnx.jit(lambda m: m.init_state(2))(off).layers[0].memory
    np.testing.assert_array_equal(np.asarray(off_state.state.weights[0]), np.asarray(fresh.state.weights[0]))


def test_deep_memory_and_channel_gate_shapes_and_gradients():
    """mlp_ln defaults to a 4x hidden layer; the channel gate gives one rate in [0, 1] per output channel of every
    memory matrix; the learned M_0, the channel gate and the output gate all receive gradient."""
    cfg = tiny("lmm", memory_kind="mlp_ln", memory_forget_gate="channel")
    model = TitansModel(cfg, rngs=nnx.Rngs(0))
    mem = model.layers[0].memory
    assert [w.shape for w in mem.init_weights] == [(2, 16, 64), (2, 64, 16)]
    x = jax.random.normal(jax.random.key(0), (2, 6, 32))
    valid = jnp.arange(6)[None].repeat(2, 0) < 4
    alpha, _, _ = nnx.jit(lambda m, x, v: m.gates(x, v))(mem, x, valid)
    assert alpha.shape == (2, 2, 6, 64 + 16)
    assert float(alpha.min()) >= 0.0 and float(alpha.max()) <= 1.0 and float(jnp.std(alpha[..., :4, :])) > 0
    np.testing.assert_array_equal(np.asarray(alpha[:, :, 4:]), 0.0)
    batch = {k: jnp.ones((2, 8), jnp.int32) for k in ("inputs", "targets")}
    batch["weights"] = jnp.ones((2, 8))
    graphdef, params = nnx.split(model, nnx.Param)
    grads = jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p).loss(batch, rng=jax.random.key(0))[0]))(params)
    norms = {jax.tree_util.keystr(k): float(jnp.linalg.norm(g)) for k, g in jax.tree_util.tree_leaves_with_path(grads)}
    assert all(np.isfinite(v) for v in norms.values())
    for name in ("init_weights", "forget_DHA", "out_gate_DHK", "out_norm_HK"):
        assert any(name in k and v > 0 for k, v in norms.items()), name


def test_kernel_cannot_be_forced_for_what_it_cannot_express():
    with pytest.raises(ValueError, match="model.memory_impl"):
        tiny("mac", memory_kind="mlp_ln", memory_impl="pallas")
    with pytest.raises(ValueError, match="model.memory_impl"):
        tiny("mac", memory_forget_gate="channel", memory_impl="pallas")
    with pytest.raises(ValueError, match="model.memory_forget_gate"):
        tiny("mac", memory_forget_gate="vector")
    with pytest.raises(ValueError, match="impl='pallas' cannot run memory='mlp_ln'"):
        NeuralMemory(32, **MEM_KW, memory="mlp_ln", impl="pallas", rngs=nnx.Rngs(0))
    assert not NeuralMemory(32, **MEM_KW, forget_gate="channel", rngs=nnx.Rngs(0)).uses_kernel_op

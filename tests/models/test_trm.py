"""TRM: parameter counts, the engine's deep recursion against a plain-loop reference, the MLP-mixer
block's formula, simplified ACT, a short training run that lowers the loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from looped_jax.models import count_params
from looped_jax.models.protocol import LossOutput
from looped_jax.models.trm import SeqMixerBlock, TRMConfig, TRMModel
from looped_jax.nn import apply_stack

SEQ, VOCAB, B, D = 16, 6, 3, 32
sg = jax.lax.stop_gradient


def tiny_cfg(**kw) -> TRMConfig:
    base = dict(
        vocab_size=VOCAB,
        seq_len=SEQ,
        d_model=D,
        num_heads=2,
        head_dim=16,
        mlp_dim=64,
        puzzle_emb_dim=D,
        puzzle_emb_len=4,
        latent_steps=2,
        recursions=3,
        halt_max_steps=4,
        halt_exploration_prob=0.0,
    )
    base.update(kw)
    return TRMConfig(**base)


def make_batch(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "inputs": rng.integers(1, VOCAB, (B, SEQ)).astype(np.int32),
        "targets": rng.integers(2, VOCAB, (B, SEQ)).astype(np.int32),
        "weights": np.ones((B, SEQ), np.float32),
        "puzzle_ids": np.zeros((B,), np.int32),
    }


def test_published_parameter_counts():
    """TRM Sudoku (Jolicoeur-Martineau 2025): attention ~7M, MLP-mixer ~5M (puzzle embedding excluded)."""
    att = nnx.eval_shape(lambda: TRMModel(TRMConfig(), rngs=nnx.Rngs(0)))
    mlp = nnx.eval_shape(lambda: TRMModel(TRMConfig(mixer="mlp"), rngs=nnx.Rngs(0)))
    # 2 blocks x (4 * 512^2 attention + 3 * 512 * 1536 SwiGLU) + embed/head 2 * 11 * 512 + q head 1026.
    assert count_params(att) - 512 == 6_828_034
    # Sequence SwiGLU over P + T = 97 positions, width 512: 3 * 97 * 512 per block replaces attention.
    assert mlp.cfg.resolved_seq_mlp_dim == 512
    assert count_params(mlp) - 512 == 5_028_866


# -- plain-loop reference (Python for loops, explicit stop_gradient on parameters) ---------------


def reference_segment(model: TRMModel, zs, data, *, live_recursions: int = 1, latent_steps: int | None = None):
    """Deep recursion as Python loops: T latent recursions (n times z <- net(z + (y + x)), then
    y <- net(y + z)); the last ``live_recursions`` use the live parameters, embedding and
    (detached-at-entry) carry, the earlier ones frozen parameters and sg(x). ``latent_steps``
    (default n) is for the controls."""
    cfg = model.cfg
    graphdef, params = nnx.split(model)
    frozen = nnx.merge(graphdef, jax.tree.map(sg, params))
    n = cfg.latent_steps if latent_steps is None else latent_steps
    x = model.embed_inputs(data)
    pos = model.positions(x.shape[0])
    y, z = (sg(s.astype(jnp.float32)) for s in zs)
    for r in range(cfg.recursions):
        live = r >= cfg.recursions - live_recursions
        m, x_r = (model, x) if live else (frozen, sg(x))
        if r == cfg.recursions - live_recursions:
            y, z = sg(y), sg(z)
        for _ in range(n):
            z = apply_stack(m.blocks, z + (y + x_r), pos)[0]
        y = apply_stack(m.blocks, y + z, pos)[0]
    logits, q_halt, q_cont = model.heads(y)
    return (sg(y), sg(z)), logits, q_halt, q_cont


def _max_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(p - q))) for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _assert_close(a, b, tol: float = 1e-6):
    """Every leaf agrees to ``tol`` (absolute, or relative for entries above 1)."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


# Exact parity runs eagerly (jax.disable_jit(): the engine's scans are Python loops over the same
# primitives); compiled code rounds differently (see COMPILED_TOL in test_hrm.py).
COMPILED_TOL = 1e-4


@pytest.mark.parametrize("variant", [dict(recursions=3), dict(recursions=1, mixer="mlp", latent_steps=3)])
def test_segment_matches_plain_loop_reference(variant):
    """Forward and last-recursion gradient of the engine segment == the Python-loop reference (1e-6);
    backprop through one more recursion, or one z update more per recursion, is visibly different."""
    model = TRMModel(tiny_cfg(**variant), rngs=nnx.Rngs(1))
    model.puzzle_emb[...] = jax.random.normal(jax.random.key(4), model.puzzle_emb.shape)
    model.q_head_D2[...] = 0.3 * jax.random.normal(jax.random.key(6), model.q_head_D2.shape)
    data = {k: jnp.asarray(v) for k, v in make_batch(0).items() if k in ("inputs", "puzzle_ids")}
    zs = tuple(jax.random.normal(k, (B, model.total_len, D)) for k in jax.random.split(jax.random.key(2)))
    w = jax.random.normal(jax.random.key(5), (B, SEQ, VOCAB))
    graphdef, params = nnx.split(model)

    def value_and_grads(segment_fn):
        def f(p, zs_):
            new_zs, logits, q_halt, q_cont = segment_fn(nnx.merge(graphdef, p), zs_)
            return jnp.sum(logits * w) + jnp.sum(q_halt) + 2.0 * jnp.sum(q_cont), (new_zs, logits, q_halt, q_cont)

        (_, out), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, zs)
        return out, grads

    cfg = model.cfg
    with jax.disable_jit():
        out, (g, g_zs) = value_and_grads(lambda m, zs_: m.segment(zs_, data))
        ref, (g_ref, _) = value_and_grads(lambda m, zs_: reference_segment(m, zs_, data))
        # Controls (the comparison can fail): backprop through one more recursion; one z update more.
        g2 = None
        if cfg.recursions > 1:
            g2 = value_and_grads(lambda m, zs_: reference_segment(m, zs_, data, live_recursions=2))[1][0]
        longer = reference_segment(model, zs, data, latent_steps=cfg.latent_steps + 1)
    _assert_close(out, ref)
    _assert_close(g, g_ref)
    assert all(float(jnp.abs(t).max()) == 0.0 for t in jax.tree.leaves(g_zs))  # carry detached
    grads = nnx.to_pure_dict(g)
    assert float(jnp.abs(grads["q_head_D2"]).sum()) > 0 and float(jnp.abs(grads["embed_VD"]).sum()) > 0
    if g2 is not None:
        assert _max_diff(g, g2) > 1e-2
    assert _max_diff(out[1], longer[1]) > 1e-1
    # The compiled engine computes the same forward (to float32 rounding).
    _assert_close(nnx.jit(lambda m: m.segment(zs, data))(model), ref, tol=COMPILED_TOL)


def test_seq_mixer_block_formula():
    """h = rms_L(h + SwiGLU_L(h)) along the sequence axis, then rms_D(h + SwiGLU_D(h)) along
    channels (RMSNorm without scale, eps = norm_eps), written out in float64 numpy."""
    cfg = tiny_cfg(mixer="mlp", seq_mlp_dim=24, norm_eps=1e-5)
    block = SeqMixerBlock(cfg, rngs=nnx.Rngs(0))
    h = np.asarray(jax.random.normal(jax.random.key(1), (B, cfg.total_len, D)), np.float64)
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), nnx.to_pure_dict(nnx.state(block)))
    silu = lambda a: a / (1.0 + np.exp(-a))
    rms = lambda a, axis: a / np.sqrt(np.mean(a * a, axis=axis, keepdims=True) + 1e-5)
    h_BDL = h.transpose(0, 2, 1)  # the sequence SwiGLU acts on each channel's length-L column
    seq_BDL = (silu(h_BDL @ p["seq_gate_LF"]) * (h_BDL @ p["seq_up_LF"])) @ p["seq_down_FL"]
    h1 = rms(h + seq_BDL.transpose(0, 2, 1), axis=1)
    mlp = p["mlp"]
    swiglu_D = lambda a: (silu(a @ mlp["gate_DF"]) * (a @ mlp["up_DF"])) @ mlp["down_FD"]
    expected = rms(h1 + swiglu_D(h1), axis=-1)
    got, cache = block(jnp.asarray(h, jnp.float32), positions_BL=None)
    assert cache is None
    np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-5, atol=2e-5)
    # The channel half alone (no sequence mixing) is far off: the sequence path matters.
    assert np.abs(np.asarray(got) - rms(h + swiglu_D(h), axis=-1)).max() > 0.1
    with pytest.raises(ValueError, match="cache"):
        block(jnp.asarray(h, jnp.float32), cache=object())


def test_simplified_act_halts_on_q_halt_sign():
    model = TRMModel(tiny_cfg(), rngs=nnx.Rngs(2))
    batch = make_batch(3)
    step = nnx.jit(lambda m, b, c: m.loss(b, rng=jax.random.key(0), train=True, carry=c))
    model.q_bias_2[...] = jnp.array([-1.0, 5.0])  # q_continue > q_halt but q_halt < 0: continue
    out = step(model, batch, model.initial_carry(B))
    assert isinstance(out, LossOutput)
    np.testing.assert_array_equal(out.carry["halted"], [False] * B)
    assert "q_continue_loss" not in out.metrics
    expected = float(out.metrics["lm_loss"]) + 0.5 * float(out.metrics["q_halt_loss"])
    np.testing.assert_allclose(float(out.loss), expected, rtol=1e-6)
    model.q_bias_2[...] = jnp.array([0.5, 5.0])  # q_halt > 0 halts even though q_continue is larger
    c2 = step(model, batch, out.carry).carry
    np.testing.assert_array_equal(c2["halted"], [True] * B)
    np.testing.assert_array_equal(c2["steps"], [2] * B)
    # q_continue is not trained by TRM: its bias gets no gradient through the loss.
    graphdef, params = nnx.split(model)
    g = jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p).loss(make_batch(1), rng=jax.random.key(0)).loss))(params)
    g = nnx.to_pure_dict(g)
    assert float(g["q_bias_2"][1]) == 0.0 and float(g["q_bias_2"][0]) != 0.0


@pytest.mark.parametrize("mixer", ["mlp", "attention"])
def test_adam_steps_lower_the_loss(mixer):
    """40 Adam steps on one fixed batch of a learnable task (target = input + 1 mod V), every step the
    first ACT segment from the initial state (deep recursion T = 2: one no-grad recursion, one with
    backprop), bring the token loss to under a third of its start.

    The token loss (``lm_loss``) is tracked, not the total: the Q-halt BCE jumps up by design when a
    row first becomes exactly right (its target flips from 0 to 1 while q_halt is still ~ -5)."""
    model = TRMModel(tiny_cfg(mixer=mixer, recursions=2, latent_steps=2), rngs=nnx.Rngs(3))
    graphdef, params = nnx.split(model)
    batch = {k: jnp.asarray(v) for k, v in make_batch(4).items()}
    batch["targets"] = (batch["inputs"] + 1) % VOCAB
    tx = optax.adam(3e-3)

    def loss_fn(p):
        out = nnx.merge(graphdef, p).loss(batch, rng=None)
        return out.loss, out.metrics["lm_loss"]

    @jax.jit
    def train(params):
        def step(carry, _):
            params, opt_state = carry
            (_, lm_loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), lm_loss

        (params, _), lm_losses = jax.lax.scan(step, (params, tx.init(params)), None, length=40)
        return lm_losses, loss_fn(params)[1]

    lm_losses, final = train(params)
    assert np.all(np.isfinite(np.asarray(lm_losses)))
    assert float(final) < float(lm_losses[0]) / 3, (float(lm_losses[0]), float(final))


def test_mlp_mixer_call_and_evaluate():
    model = TRMModel(tiny_cfg(mixer="mlp", recursions=2), rngs=nnx.Rngs(3))
    batch = make_batch(4)
    logits = nnx.jit(lambda m, x: m(x, num_loops=2))(model, batch["inputs"])
    assert logits.shape == (B, SEQ, VOCAB)
    ev = nnx.jit(lambda m, b: m.evaluate(b, num_loops=jnp.int32(2)))(model, batch)
    assert float(ev["num_tokens"]) == B * SEQ and float(ev["num_rows"]) == B
    correct = (np.asarray(jnp.argmax(logits, -1)) == batch["targets"]).sum()
    assert float(ev["correct"]) == float(correct)

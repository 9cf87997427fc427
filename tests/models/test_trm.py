"""TRM: parameter counts, last-recursion gradient, simplified ACT, MLP-mixer variant."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from looped_jax.models import count_params
from looped_jax.models.trm import TRMConfig, TRMModel

SEQ, VOCAB, B, D = 16, 6, 3, 32


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


def _manual_segment(model: TRMModel, zs, data, *, full_backprop: bool = False, extra_latent: int = 0):
    """Hand-unrolled deep recursion: T - 1 latent recursions without gradient, then one with."""
    cfg = model.cfg
    y, z = zs
    x = model.embed_inputs(data)
    pos = model.positions(x.shape[0])
    sg = (lambda t: t) if full_backprop else jax.lax.stop_gradient
    for r in range(cfg.recursions):
        last = r == cfg.recursions - 1
        xi = x if last else sg(x)
        if last:
            y, z = sg(y), sg(z)
        for _ in range(cfg.latent_steps + extra_latent):
            z = model.net(z, y + xi, pos)
        y = model.net(y, z, pos)
    return model.heads(y)


def _last_recursion(model: TRMModel, zs, data):
    """Full backprop through the n + 1 calls of the last recursion, from the model's own no-grad part."""
    x = model.embed_inputs(data)
    pos = model.positions(x.shape[0])
    y, z = jax.lax.stop_gradient(model.no_grad_recursions(*zs, x, pos))
    y, z = model.latent_recursion(y, z, x, pos)
    return model.heads(y)


def _max_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(p - q))) for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_last_recursion_gradient():
    model = TRMModel(tiny_cfg(), rngs=nnx.Rngs(1))
    model.puzzle_emb[...] = jax.random.normal(jax.random.key(4), model.puzzle_emb.shape)
    data = {k: jnp.asarray(v) for k, v in make_batch(0).items() if k in ("inputs", "puzzle_ids")}
    zs = tuple(jax.random.normal(k, (B, model.total_len, D)) for k in jax.random.split(jax.random.key(2)))
    w = jax.random.normal(jax.random.key(5), (B, SEQ, VOCAB))
    objective = lambda outs: jnp.sum(outs[0] * w) + jnp.sum(outs[1])

    seg, manual, longer = jax.jit(
        lambda: (
            model.segment(zs, data)[1:],
            _manual_segment(model, zs, data),
            _manual_segment(model, zs, data, extra_latent=1),
        )
    )()
    assert _max_diff(seg, manual) < 1e-4  # scan vs Python loop: float32 rounding only
    assert _max_diff(seg, longer) > 1e-1  # one extra z update per recursion is visible

    graphdef, params = nnx.split(model)

    def grads_of(fn):
        return nnx.to_pure_dict(jax.jit(jax.grad(lambda p: objective(fn(nnx.merge(graphdef, p)))))(params))

    grads = grads_of(lambda m: m.segment(zs, data)[1:])
    last = grads_of(lambda m: _last_recursion(m, zs, data))
    for g, g1 in zip(jax.tree.leaves(grads), jax.tree.leaves(last), strict=True):
        np.testing.assert_allclose(g, g1, rtol=1e-6, atol=1e-7)
    full = grads_of(lambda m: _manual_segment(m, zs, data, full_backprop=True))
    assert _max_diff(grads, full) > 1e-1  # backprop through all T recursions would differ
    # q_continue is not trained by TRM: its bias gets no gradient through the loss.
    g_loss = nnx.to_pure_dict(
        jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p).loss(make_batch(1), rng=jax.random.key(0))[0]))(params)
    )
    assert float(g_loss["q_bias_2"][1]) == 0.0 and float(g_loss["q_bias_2"][0]) != 0.0


def test_simplified_act_halts_on_q_halt_sign():
    model = TRMModel(tiny_cfg(), rngs=nnx.Rngs(2))
    batch = make_batch(3)
    step = nnx.jit(lambda m, b, c: m.loss(b, rng=jax.random.key(0), train=True, carry=c))
    model.q_bias_2[...] = jnp.array([-1.0, 5.0])  # q_continue > q_halt but q_halt < 0: continue
    loss, (metrics, c1) = step(model, batch, model.initial_carry(B))
    np.testing.assert_array_equal(c1["halted"], [False] * B)
    assert "q_continue_loss" not in metrics
    np.testing.assert_allclose(float(loss), float(metrics["lm_loss"]) + 0.5 * float(metrics["q_halt_loss"]), rtol=1e-6)
    model.q_bias_2[...] = jnp.array([0.5, 5.0])  # q_halt > 0 halts even though q_continue is larger
    _, (_, c2) = step(model, batch, c1)
    np.testing.assert_array_equal(c2["halted"], [True] * B)
    np.testing.assert_array_equal(c2["steps"], [2] * B)


def test_mlp_mixer_trains_one_step():
    model = TRMModel(tiny_cfg(mixer="mlp", recursions=2), rngs=nnx.Rngs(3))
    graphdef, params = nnx.split(model)
    batch = make_batch(4)
    (loss, (metrics, _)), grads = jax.jit(
        jax.value_and_grad(lambda p: nnx.merge(graphdef, p).loss(batch, rng=jax.random.key(0)), has_aux=True)
    )(params)
    assert np.isfinite(float(loss))
    g = nnx.to_pure_dict(grads)["blocks"][0]
    assert float(jnp.abs(g["seq_gate_LF"]).sum()) > 0 and float(jnp.abs(g["mlp"]["down_FD"]).sum()) > 0
    logits = nnx.jit(lambda m, x: m(x))(model, batch["inputs"])
    assert logits.shape == (B, SEQ, VOCAB)

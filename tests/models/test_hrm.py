"""HRM: published parameter count, one-step gradient, ACT halting / resets / deep supervision."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from looped_jax.models import count_params
from looped_jax.models.hrm import HRMConfig, HRMModel, swiglu_hidden

SEQ, VOCAB, B = 16, 6, 4


def tiny_cfg(**kw) -> HRMConfig:
    base = dict(
        vocab_size=VOCAB,
        seq_len=SEQ,
        d_model=32,
        num_heads=2,
        head_dim=16,
        mlp_dim=64,
        num_h_layers=1,
        num_l_layers=1,
        puzzle_emb_dim=32,
        num_puzzle_ids=3,
        halt_max_steps=16,
    )
    base.update(kw)
    return HRMConfig(**base)


def make_batch(seed: int, b: int = B) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "inputs": rng.integers(1, VOCAB, (b, SEQ)).astype(np.int32),
        "targets": rng.integers(2, VOCAB, (b, SEQ)).astype(np.int32),
        "weights": np.ones((b, SEQ), np.float32),
        "segment_ids": np.ones((b, SEQ), np.int32),
        "positions": np.tile(np.arange(SEQ, dtype=np.int32), (b, 1)),
        "puzzle_ids": rng.integers(0, 3, (b,)).astype(np.int32),
    }


def test_published_parameter_count():
    """HRM Sudoku: 27,275,266 without the puzzle embedding (Wang et al. 2025), no allocation."""
    assert swiglu_hidden(512, 4) == 1536
    model = nnx.eval_shape(lambda: HRMModel(HRMConfig(), rngs=nnx.Rngs(0)))
    n = count_params(model)
    assert n - model.puzzle_emb.size == 27_275_266
    assert model.puzzle_emb.shape == (1, 512) and model.puzzle_emb_len == 1


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="model.h_cycles"):
        tiny_cfg(h_cycles=0)
    with pytest.raises(ValueError, match="model.pos_encoding"):
        tiny_cfg(pos_encoding="alibi")


def _manual_segment(model: HRMModel, z, data, *, full_backprop: bool = False, skip_last_low: bool = False):
    """Hand-unrolled HRM segment (Python loops): N cycles of T low steps; explicit stop_gradient on
    everything the last f_L / f_H receive, or none for the full-backprop control."""
    cfg = model.cfg
    z_H, z_L = z
    x = model.embed_inputs(data)
    pos = model.positions(x.shape[0])
    sg = (lambda t: t) if full_backprop else jax.lax.stop_gradient
    for h in range(cfg.h_cycles):
        for t in range(cfg.l_cycles):
            last = h == cfg.h_cycles - 1 and t == cfg.l_cycles - 1
            if last:
                if skip_last_low:
                    break
                z_L, z_H = sg(z_L), sg(z_H)
            z_L = model.f_low(z_L, z_H, x if last else sg(x), pos)
        z_H = model.f_high(z_H, z_L, pos)
    return model.heads(z_H)


def _one_step(model: HRMModel, z, data):
    """The last f_L and f_H applied to the (detached) output of the model's own no-grad prefix."""
    x = model.embed_inputs(data)
    pos = model.positions(x.shape[0])
    z_H, z_L = jax.lax.stop_gradient(model.no_grad_prefix(*z, x, pos))
    z_L = model.f_low(z_L, z_H, x, pos)
    return model.heads(model.f_high(z_H, z_L, pos))


def _param_grads(model, fn):
    """Jitted gradient of fn(model) w.r.t. the parameters, as a pure dict."""
    graphdef, params = nnx.split(model)
    return nnx.to_pure_dict(jax.jit(jax.grad(lambda p: fn(nnx.merge(graphdef, p))))(params))


def _max_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_one_step_gradient():
    """The forward runs N*T f_L and N f_H calls (vs a hand-unrolled loop); gradients flow only
    through the last f_L and f_H (and the embeddings they read), never into the carry."""
    model = HRMModel(tiny_cfg(h_cycles=2, l_cycles=3), rngs=nnx.Rngs(1))
    batch = make_batch(0)
    data = {k: jnp.asarray(batch[k]) for k in ("inputs", "puzzle_ids")}
    z = tuple(jax.random.normal(k, (B, model.total_len, 32)) for k in jax.random.split(jax.random.key(3)))
    # Puzzle embedding is zero-initialised; make it non-zero so its gradient path is exercised.
    model.puzzle_emb[...] = jax.random.normal(jax.random.key(4), model.puzzle_emb.shape)
    w = jax.random.normal(jax.random.key(5), (B, SEQ, VOCAB))

    def objective(outs):
        logits, q_halt, q_cont = outs
        return jnp.sum(logits * w) + jnp.sum(q_halt) + 2.0 * jnp.sum(q_cont)

    # Forward: scan vs Python loop agree to float32 rounding (the scan is compiled differently);
    # one f_L call fewer changes the logits by orders of magnitude more.
    seg, manual, short = jax.jit(
        lambda: (
            model.segment(z, data)[1:],
            _manual_segment(model, z, data),
            _manual_segment(model, z, data, skip_last_low=True),
        )
    )()
    assert _max_diff(seg, manual) < 1e-4
    assert _max_diff(seg, short) > 1e-1

    graphdef, params = nnx.split(model)
    grads, grads_z = jax.jit(
        jax.grad(lambda p, z_: objective(nnx.merge(graphdef, p).segment(z_, data)[1:]), argnums=(0, 1))
    )(params, z)
    grads = nnx.to_pure_dict(grads)
    one_step = _param_grads(model, lambda m: objective(_one_step(m, z, data)))
    for g, g1 in zip(jax.tree.leaves(grads), jax.tree.leaves(one_step), strict=True):
        np.testing.assert_allclose(g, g1, rtol=1e-6, atol=1e-7)
    # Control: backprop through every call gives different gradients, so the comparison can fail.
    full = _param_grads(model, lambda m: objective(_manual_segment(m, z, data, full_backprop=True)))
    assert _max_diff(grads, full) > 1e-1
    assert float(jnp.abs(grads["l_blocks"][0]["attn"]["q_DNH"]).sum()) > 0
    # No gradient to the incoming carry (detached between segments).
    assert all(float(jnp.abs(g).max()) == 0.0 for g in grads_z)


@nnx.jit(static_argnames=("train",))
def _loss(model, batch, carry, rng, train=True):
    return model.loss(batch, rng=rng, train=train, carry=carry)


@nnx.jit
def _segment(model, z, data):
    return model.segment(z, data)


def _set_q_bias(model, halt: float, cont: float):
    model.q_bias_2[...] = jnp.array([halt, cont], jnp.float32)


def _rows_equal(a, b):
    return np.allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_act_resets_and_halting_on_hand_made_carry():
    model = HRMModel(tiny_cfg(halt_exploration_prob=0.0), rngs=nnx.Rngs(2))
    old, new = make_batch(1), make_batch(2)
    z_old = tuple(jax.random.normal(k, (B, model.total_len, 32)) for k in jax.random.split(jax.random.key(7)))
    carry = dict(
        model.initial_carry(B),
        z=z_old,
        steps=jnp.array([5, 3, 15, 9], jnp.int32),
        halted=jnp.array([True, False, False, True]),
        data={k: jnp.asarray(old[k]) for k in ("inputs", "targets", "weights", "puzzle_ids")},
    )
    key = jax.random.key(0)
    _set_q_bias(model, -5.0, -5.0)  # q_halt == q_continue: no learned halt
    _, (metrics, c1) = _loss(model, new, carry, key)
    np.testing.assert_array_equal(c1["steps"], [1, 4, 16, 1])
    np.testing.assert_array_equal(c1["halted"], [False, False, True, False])  # only the max-steps row
    fresh, kept = np.array([0, 3]), np.array([1, 2])
    for k in ("inputs", "targets", "puzzle_ids"):
        np.testing.assert_array_equal(c1["data"][k][fresh], new[k][fresh])
        np.testing.assert_array_equal(c1["data"][k][kept], old[k][kept])
    # Latents: halted rows restart from the fixed initial state, the others continue theirs.
    expected_fresh = _segment(model, model.initial_states(B), c1["data"])[0]
    expected_kept = _segment(model, z_old, c1["data"])[0]
    for zi in range(2):
        assert _rows_equal(c1["z"][zi][fresh], expected_fresh[zi][fresh])
        assert _rows_equal(c1["z"][zi][kept], expected_kept[zi][kept])
        assert not _rows_equal(c1["z"][zi][kept], expected_fresh[zi][kept])
    assert float(metrics["count"]) == 1.0 and float(metrics["steps"]) == 16.0

    # q_halt > q_continue: every row halts in training, none before max_steps at evaluation.
    _set_q_bias(model, 1.0, 0.0)
    _, (_, c2) = _loss(model, new, c1, key)
    np.testing.assert_array_equal(c2["halted"], [True] * B)
    np.testing.assert_array_equal(c2["steps"], [2, 5, 1, 2])  # row 2 halted at 16, so it restarted
    _, (_, c3) = _loss(model, new, c1, key, train=False)
    np.testing.assert_array_equal(c3["halted"], [False] * B)

    # Exploration with probability 1: min_steps >= 2, so rows at step 1 cannot halt yet.
    model_x = HRMModel(tiny_cfg(halt_exploration_prob=1.0), rngs=nnx.Rngs(2))
    _set_q_bias(model_x, 1.0, 0.0)
    _, (_, c4) = _loss(model_x, new, model_x.initial_carry(B), jax.random.key(1))
    np.testing.assert_array_equal(c4["steps"], [1] * B)
    np.testing.assert_array_equal(c4["halted"], [False] * B)


def test_q_learning_targets_and_loss():
    """Continue target = sigmoid(max(next q_halt, next q_cont)), sigmoid(next q_halt) at the last step;
    loss = token loss + 0.5 (BCE_halt + BCE_cont)."""
    from looped_jax.models import act

    model = HRMModel(tiny_cfg(halt_exploration_prob=0.0, halt_max_steps=3), rngs=nnx.Rngs(3))
    model.q_head_D2[...] = 0.1 * jax.random.normal(jax.random.key(0), model.q_head_D2.shape)
    batch = make_batch(5)
    carry = dict(model.initial_carry(B), halted=jnp.array([True, True, False, False]))
    carry["steps"] = jnp.array([0, 0, 2, 1], jnp.int32)

    @nnx.jit
    def step(model, carry, batch):
        new_carry, out = act.act_step(
            model.segment,
            carry,
            batch,
            model.z_init(),
            rng=jax.random.key(0),
            train=True,
            max_steps=3,
            exploration_prob=0.0,
            use_continue=True,
        )
        return new_carry, out, act.act_loss(new_carry, out, loss_type="stablemax")

    new_carry, out, (loss, m) = step(model, carry, batch)
    _, _, nh, nc = _segment(model, new_carry["z"], new_carry["data"])
    is_last = np.asarray(new_carry["steps"]) >= 3
    np.testing.assert_array_equal(is_last, [False, False, True, False])
    expected = jax.nn.sigmoid(jnp.where(is_last, nh, jnp.maximum(nh, nc)))
    np.testing.assert_allclose(out["target_q_continue"], expected, rtol=1e-5)
    bce = lambda x, y: np.mean(np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x))))
    _, _, exact = act.sequence_correct(out["logits"], new_carry["data"])
    q_h = bce(np.asarray(out["q_halt"]), np.asarray(exact, np.float32))
    q_c = bce(np.asarray(out["q_continue"]), np.asarray(expected))
    np.testing.assert_allclose(float(loss), float(m["lm_loss"]) + 0.5 * (q_h + q_c), rtol=1e-5)


def test_train_step_jits_once_and_eval_reports_every_step():
    model = HRMModel(tiny_cfg(halt_max_steps=3), rngs=nnx.Rngs(4))
    graphdef, params = nnx.split(model)

    @jax.jit
    def step(params, carry, batch, rng):
        return nnx.merge(graphdef, params).loss(batch, rng=rng, train=True, carry=carry)

    carry = model.initial_carry(B)
    for i in range(3):
        batch = {k: jnp.asarray(v) for k, v in make_batch(10 + i).items()}
        loss, (metrics, carry) = step(params, carry, batch, jax.random.key(i))
        assert np.isfinite(float(loss))
    assert step._cache_size() == 1
    batch = make_batch(20)
    ev = nnx.jit(lambda m, b: m.evaluate_steps(b))(model, batch)
    assert ev["exact_S_B"].shape == (3, B) and ev["halt_step_B"].shape == (B,)
    # Step k of the evaluation equals k ACT segments from the initial state.
    logits2 = nnx.jit(lambda m, x, p: m(x, num_loops=2, puzzle_ids_B=p))(model, batch["inputs"], batch["puzzle_ids"])
    tok = (np.asarray(jnp.argmax(logits2, -1)) == batch["targets"]).mean(-1)
    np.testing.assert_allclose(ev["token_acc_S_B"][1], tok, rtol=1e-6)

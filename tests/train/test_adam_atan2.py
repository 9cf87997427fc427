"""AdamATan2, sign-SGD for puzzle embeddings, HRM's warmup, stable-max cross-entropy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from looped_jax.losses import log_stablemax, stablemax_cross_entropy, stablemax_s
from looped_jax.train.adam_atan2 import adam_atan2, hrm_optimizer, linear_warmup, puzzle_labels, sign_sgd


def test_adam_atan2_matches_hand_computed_updates():
    lr, wd, b1, b2 = 0.1, 0.5, 0.9, 0.95
    p0 = np.array([1.0, -2.0, 0.5], np.float32)
    g1 = np.array([0.3, -0.1, 0.0], np.float32)
    g2 = np.array([-0.2, 0.4, 1e-3], np.float32)
    tx = adam_atan2(lr, b1=b1, b2=b2, weight_decay=wd)
    params = {"w": jnp.asarray(p0)}
    state = tx.init(params)
    # Hand computation in float64: p <- p (1 - lr wd) - lr / (1 - b1^t) * atan2(m, sqrt(v / (1 - b2^t))).
    p, m, v = p0.astype(np.float64), np.zeros(3), np.zeros(3)
    for t, g in enumerate((g1, g2), start=1):
        updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
        params = optax.apply_updates(params, updates)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g.astype(np.float64) ** 2
        p = p * (1 - lr * wd) - lr / (1 - b1**t) * np.arctan2(m, np.sqrt(v / (1 - b2**t)))
        np.testing.assert_allclose(params["w"], p, rtol=1e-6, atol=1e-7)
    assert int(state.count) == 2


def test_adam_atan2_is_scale_invariant_and_bounded():
    tx = adam_atan2(1.0, weight_decay=0.0)
    params = {"w": jnp.zeros(4)}
    g = jnp.array([1e-12, -3.0, 1e6, 0.0])
    u_small, _ = tx.update({"w": g}, tx.init(params), params)
    u_big, _ = tx.update({"w": 1e3 * g}, tx.init(params), params)
    np.testing.assert_allclose(u_small["w"], u_big["w"], rtol=1e-6)
    assert float(jnp.max(jnp.abs(u_small["w"]))) <= np.pi / 2 / (1 - 0.9) + 1e-6
    assert float(u_small["w"][3]) == 0.0  # atan2(0, 0) = 0: no epsilon needed


def test_linear_warmup_schedule():
    sched = linear_warmup(1e-4, 4)
    np.testing.assert_allclose([float(sched(c)) for c in range(6)], [2.5e-5, 5e-5, 7.5e-5, 1e-4, 1e-4, 1e-4])
    with pytest.raises(ValueError, match="warmup_steps"):
        linear_warmup(1e-4, -1)


def test_sign_sgd_moves_only_touched_rows_and_hrm_optimizer_routes_puzzle_emb():
    lr, wd = 0.01, 0.1
    table = jnp.array([[1.0, -1.0], [2.0, 0.5], [0.3, 0.3]])
    grads = jnp.array([[0.5, -2.0], [0.0, 0.0], [0.0, 1e-9]])
    tx = sign_sgd(lr, weight_decay=wd)
    updates, _ = tx.update(grads, tx.init(table), table)
    expected = np.array(
        [
            [1.0 * (1 - lr * wd) - lr, -1.0 * (1 - lr * wd) + lr],
            [2.0, 0.5],
            [0.3 * (1 - lr * wd), 0.3 * (1 - lr * wd) - lr],
        ]
    )
    np.testing.assert_allclose(table + updates, expected, rtol=1e-6)

    params = {"puzzle_emb": table, "blocks": {"w": jnp.ones((2, 2))}}
    assert puzzle_labels(params) == {"puzzle_emb": "puzzle", "blocks": {"w": "main"}}
    opt = hrm_optimizer(1e-3, weight_decay=1.0, puzzle_learning_rate=lr, puzzle_weight_decay=wd)
    g = {"puzzle_emb": grads, "blocks": {"w": jnp.full((2, 2), 0.1)}}
    upd, _ = opt.update(g, opt.init(params), params)
    np.testing.assert_allclose(params["puzzle_emb"] + upd["puzzle_emb"], expected, rtol=1e-6)
    # AdamATan2 first step: m = 0.1 g, sqrt(v / (1 - b2)) = |g|: -lr * (atan(0.1) / 0.1 + wd * p).
    np.testing.assert_allclose(upd["blocks"]["w"], -1e-3 * (np.arctan(0.1) / 0.1 + 1.0), rtol=1e-6)


def test_stablemax_cross_entropy():
    x = jnp.array([[-3.0, 0.0, 2.0, 1.0]])
    s = np.array([1 / 4, 1.0, 3.0, 2.0])
    np.testing.assert_allclose(stablemax_s(x)[0], s, rtol=1e-6)
    np.testing.assert_allclose(log_stablemax(x)[0], np.log(s / s.sum()), rtol=1e-6)
    ce = stablemax_cross_entropy(x[:, None, :], jnp.array([[2]]))
    np.testing.assert_allclose(ce[0, 0], -np.log(3.0 / s.sum()), rtol=1e-6)
    # Gradients are finite at the branch point and for large logits (no overflow in either branch).
    g = jax.grad(lambda z: stablemax_cross_entropy(z[None, None], jnp.array([[0]])).sum())(jnp.array([0.0, 1.0, 1e30]))
    assert bool(jnp.all(jnp.isfinite(g)))

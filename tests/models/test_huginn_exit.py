"""Exit criteria of the recurrent-depth model on hand-made latents / logits where the exit step is
known (the reference's evaluators: start values, thresholds, KL direction, min_steps)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from looped_jax.models.huginn_exit import DEFAULT_THRESHOLDS, ExitRule, adaptive_loop, resolve_exit_rule

V = 4


def run(rule, seq_logits=None, seq_latents=None, freeze=True):
    """Steps through a fixed sequence: step k returns latents[k] (and its readout logits[k])."""
    n = len(seq_logits if seq_logits is not None else seq_latents)
    default = np.arange(1, n + 1)[:, None, None, None] * np.ones((n, 1, 1, 2))
    lat = jnp.asarray(seq_latents if seq_latents is not None else default, jnp.float32)
    lg = jnp.asarray(seq_logits if seq_logits is not None else np.zeros((n, 1, 1, V)), jnp.float32)
    s0 = jnp.asarray([[[1.0, 0.0, 0.0]]])  # latent [1, 1, 3]: a 2-d value, then the step index

    def step(s, aux, k, active):
        return jnp.concatenate([lat[k][..., :2], jnp.full((1, 1, 1), (k + 1.0) * 1e-6)], -1), aux

    readout = lambda s: lg[jnp.round(s[0, 0, 2] * 1e6).astype(jnp.int32) - 1]  # step index, tiny in the latent
    rule = resolve_exit_rule(rule)
    res = jax.jit(lambda: adaptive_loop(step, readout, s0, rule, max_steps=n, vocab_size=V, freeze=freeze))()
    return int(res.steps[0, 0])


def test_reference_thresholds():
    assert DEFAULT_THRESHOLDS == {
        "entropy-diff": 1e-3,
        "latent-diff": 0.03,
        "kl": 1e-3,
        "minp-kl": 1e-5,
        "argmax-stability": 5,
        "cosine": 1e-3,
    }
    assert resolve_exit_rule(ExitRule("min-kl")).criterion == "minp-kl"
    assert resolve_exit_rule(ExitRule("none")) is None
    with pytest.raises(ValueError, match="ExitRule.criterion"):
        resolve_exit_rule(ExitRule("kl-and-latent"))


def test_argmax_counter_starts_at_minus_one():
    """Same argmax from step 1: the counter is 0 at step 1 (prev = -1), reaches 5 at step 6."""
    logits = np.zeros((10, 1, 1, V))
    logits[..., 0] = 3.0  # argmax 0 every step: a counter started from argmax(uniform) = 0 exits at 5
    assert run(ExitRule("argmax-stability"), logits) == 6
    logits[4, ..., 0], logits[4, ..., 1] = 0.0, 3.0  # change at step 5: the count restarts
    assert run(ExitRule("argmax-stability"), logits) == 10


def test_kl_from_uniform_and_direction():
    """KL(old || new), p_0 uniform: a sharp p_1 is far from uniform; p_2 = p_1 exits at step 2."""
    sharp = np.log(np.array([0.97, 0.01, 0.01, 0.01]))
    logits = np.stack([sharp, sharp, sharp])[:, None, None, :]
    assert run(ExitRule("kl"), logits) == 2
    # p_1 uniform-ish, p_2 puts almost no mass on token 3: KL(p1 || p2) is large, KL(p2 || p1) small.
    p1 = np.log(np.array([0.25, 0.25, 0.25, 0.25]))
    p2 = np.log(np.array([0.3333, 0.3333, 0.3333, 1e-4]))
    logits = np.stack([p1, p2, p2])[:, None, None, :]
    kl_old_new = np.sum(np.exp(p1) * (p1 - p2))
    kl_new_old = np.sum(np.exp(p2) * (p2 - p1))
    thr = float(np.sqrt(kl_old_new * kl_new_old))  # between the two directions
    assert kl_new_old < thr < kl_old_new
    assert run(ExitRule("kl", thr), logits) == 1  # p_1 uniform: KL to the uniform start is 0
    # From step 2 on (min_steps=1): KL(p_0 = uniform || p_2) is large, the reverse small: exit at 3.
    assert run(ExitRule("kl", thr, min_steps=1), logits) == 3


def test_entropy_latent_cosine_minsteps():
    logits = np.zeros((5, 1, 1, V))
    assert run(ExitRule("entropy-diff"), logits) == 2  # prev entropy starts at 100
    logits[..., 0] = 60.0  # entropy ~0 every step: a start at 0 would exit at step 1
    assert run(ExitRule("entropy-diff"), logits) == 2
    lat = np.array([[10.0, 0], [5, 0], [5.1, 0], [5.1, 0], [5.1, 0]])[:, None, None, :]
    assert run(ExitRule("latent-diff"), seq_latents=lat) == 3  # 0.9, 1.0, 0.0196 < 0.03
    # No check (and no update of the previous latent) before step min_steps + 1 = 4: step 4
    # compares with s_0 (0.8), step 5 with step 4 (0): exit at 5, not 4.
    assert run(ExitRule("latent-diff", min_steps=3), seq_latents=lat) == 5
    lat = np.array([[0.0, 1], [1, 1], [1, 1]])[:, None, None, :]  # s_0 = [1, 0]
    assert run(ExitRule("cosine"), seq_latents=lat) == 3

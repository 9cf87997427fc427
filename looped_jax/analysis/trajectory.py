"""Per-step summaries of a loop's trajectory, recorded through the engine's ``record_fn``.

`trajectory` runs ``spec.step`` for ``num_steps`` steps with `looped_jax.recurrence.unroll`
and records, after every step k and for every token, only small summaries -- never the
states themselves (except the few tokens named in ``track``):

* ``residual_RBT``: relative residual ||s_k - s_{k-1}|| / ||s_k|| (the engine's criterion);
* ``norm_RBT``: ||s_k||;
* ``recurrence_RPBT``: ||s_k - s_{k-p}|| / ||s_k|| for p = 1..P (NaN while k < p), the
  period-p test of `looped_jax.analysis.cycles`;
* ``distance_RBT``: ||s_k - s*|| / ||s*|| to a reference state s* (e.g. a long run);
* with a readout: ``kl_RBT`` = KL(p_k || p_{k-1}) (Geiping et al. 2025, Sec. 6),
  ``argmax_change_RBT`` (bool), ``entropy_RBT`` of p_k;
* ``log_growth_RB``: log ||J_k v_k|| of a unit tangent pushed along the trajectory with
  ``jax.jvp`` and renormalised every step (Benettin et al. 1980); its running mean is the
  finite-time Lyapunov exponent of each example;
* ``path_RND``: the latent of each tracked (example, token) pair, for PCA;
* ``acts``: per-layer activation / attention statistics from ``spec.probe``.

Memory is O(P * state) for the recurrence window plus O(R * B * T * (P + 6)) floats of
summaries, independent of the width D of the state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from looped_jax.analysis import activations as act_stats
from looped_jax.analysis.loop import (
    LoopSpec,
    example_norm,
    relative_distance,
    scale_examples,
    state_of,
    tangent_like,
    token_norm,
)


class Trajectory(NamedTuple):
    """Host-side (numpy) summaries; the leading axis R counts steps 1..R."""

    residual_RBT: np.ndarray
    norm_RBT: np.ndarray
    recurrence_RPBT: np.ndarray
    distance_RBT: np.ndarray | None
    kl_RBT: np.ndarray | None
    argmax_change_RBT: np.ndarray | None
    entropy_RBT: np.ndarray | None
    log_growth_RB: np.ndarray | None
    path_RND: np.ndarray | None
    acts: dict | None
    initial_norm_BT: np.ndarray
    token_mask_BT: np.ndarray
    final_carry: Any  # device pytree

    @property
    def num_steps(self) -> int:
        return self.residual_RBT.shape[0]

    @property
    def ftle_B(self) -> np.ndarray | None:
        """Finite-time Lyapunov exponent per example: mean log growth over the run (nats / step)."""
        return None if self.log_growth_RB is None else self.log_growth_RB.mean(axis=0)


def _entropy(logits_BTV: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.where(logp > -jnp.inf, jnp.exp(logp) * logp, 0.0), axis=-1)


def trajectory(
    spec: LoopSpec,
    num_steps: int,
    *,
    period_window: int = 8,
    reference_BTD: jax.Array | None = None,
    lyapunov: bool = True,
    track: Sequence[tuple[int, int]] = (),
    activations: bool = False,
    seed: int = 0,
) -> Trajectory:
    """Runs the loop ``num_steps`` times from ``spec.carry``, recording summaries (module doc).

    Args:
      spec: the loop.
      num_steps: R, a Python int >= 1.
      period_window: P, the largest period whose recurrence distance is recorded.
      reference_BTD: s* in the space of ``state_fn`` for ``distance_RBT`` (None: not recorded).
      lyapunov: push a tangent along the trajectory (one extra JVP per step).
      track: (example, token) pairs whose latent path is kept for PCA.
      activations: record per-layer activation statistics through ``spec.probe``.
      seed: seed of the Lyapunov tangent.
    """
    from looped_jax.recurrence import kl_divergence, unroll

    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a Python int >= 1, got {num_steps!r}")
    if not isinstance(period_window, int) or period_window < 1:
        raise ValueError(f"period_window must be a Python int >= 1, got {period_window!r}")
    if activations and spec.probe is None:
        raise ValueError(f"activations=True needs a LoopSpec.probe; the {spec.name!r} loop has none")
    x0 = state_of(spec, spec.carry)
    b, t, _ = x0.shape
    for eb, et in track:
        if not (0 <= eb < b and 0 <= et < t):
            raise ValueError(f"track pair {(eb, et)} is outside the [batch={b}, tokens={t}] latent")
    if reference_BTD is not None and reference_BTD.shape != x0.shape:
        raise ValueError(f"reference_BTD has shape {reference_BTD.shape}; expected the latent shape {x0.shape}")
    track_b = np.array([p[0] for p in track], np.int32)
    track_t = np.array([p[1] for p in track], np.int32)
    readout = spec.readout
    step = spec.step

    def advance(params, carry, inputs):
        if activations:
            return spec.probe(params, carry, inputs)
        return step(params, carry, inputs), None

    def aug_step(params, aug, inputs):
        carry = aug["carry"]
        new, acts = advance(params, carry, inputs)
        x = state_of(spec, new)
        hist = aug["hist"]  # [P, B, T, D]: s_{k-1}, ..., s_{k-P}
        k = aug["k"] + 1
        rec_P = jax.vmap(lambda h: relative_distance(x, h))(hist)
        valid_P = (jnp.arange(1, period_window + 1) <= k)[:, None, None]
        m = {
            "residual": rec_P[0],
            "norm": token_norm(x),
            "recurrence": jnp.where(valid_P, rec_P, jnp.nan),
        }
        out = {"carry": new, "k": k, "hist": jnp.concatenate([x[None], hist[:-1]], axis=0)}
        if reference_BTD is not None:
            m["distance"] = token_norm(x - reference_BTD) / jnp.maximum(token_norm(reference_BTD), 1e-30)
        if readout is not None:
            logits = readout(params, new).astype(jnp.float32)
            m["kl"] = kl_divergence(logits, aug["logits"])
            m["argmax_change"] = jnp.argmax(logits, -1) != jnp.argmax(aug["logits"], -1)
            m["entropy"] = _entropy(logits)
            out["logits"] = logits
        if lyapunov:
            _, jv = jax.jvp(lambda c: step(params, c, inputs), (carry,), (aug["tangent"],))
            g = example_norm(jv)
            m["log_growth"] = jnp.log(jnp.maximum(g, 1e-30))
            out["tangent"] = scale_examples(jv, 1.0 / jnp.maximum(g, 1e-30))
        if len(track):
            m["path"] = x[track_b, track_t]
        if activations:
            stats, attn = act_stats.step_statistics(acts, aug.get("attn"), spec.token_mask_BT)
            m["acts"] = stats
            if attn is not None:
                out["attn"] = attn
        out["metrics"] = m
        return out

    def go(params, carry, inputs):
        x = state_of(spec, carry)
        aug = {"carry": carry, "k": jnp.zeros((), jnp.int32), "hist": jnp.broadcast_to(x, (period_window, *x.shape))}
        if readout is not None:
            aug["logits"] = readout(params, carry).astype(jnp.float32)
        if lyapunov:
            aug["tangent"] = tangent_like(carry, jax.random.key(seed))
        if activations:
            _, acts0 = spec.probe(params, carry, inputs)
            if "attn_LBNTS" in acts0:
                aug["attn"] = acts0["attn_LBNTS"]
        # A metrics slot in the carry so record_fn can read this step's summaries.
        aug["metrics"] = jax.eval_shape(lambda a: aug_step(params, a, inputs)["metrics"], aug)
        aug["metrics"] = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aug["metrics"])
        final, rec = unroll(
            aug_step, params, aug, inputs, num_steps=num_steps, grad_steps=0, record_fn=lambda a: a["metrics"]
        )
        return final["carry"], rec, token_norm(x)

    final_carry, rec, norm0 = jax.jit(go)(spec.params, spec.carry, spec.inputs)
    rec = jax.device_get(rec)
    if activations and "attn_overlap_LN" in rec.get("acts", {}):
        # Step 1's maps are compared with the probe of the start carry, i.e. with themselves: no data.
        rec["acts"]["attn_overlap_LN"] = np.array(rec["acts"]["attn_overlap_LN"], np.float32)
        rec["acts"]["attn_overlap_LN"][0] = np.nan
    mask = np.ones((b, t), bool) if spec.token_mask_BT is None else np.asarray(spec.token_mask_BT, bool)
    return Trajectory(
        residual_RBT=rec["residual"],
        norm_RBT=rec["norm"],
        recurrence_RPBT=rec["recurrence"],
        distance_RBT=rec.get("distance"),
        kl_RBT=rec.get("kl"),
        argmax_change_RBT=rec.get("argmax_change"),
        entropy_RBT=rec.get("entropy"),
        log_growth_RB=rec.get("log_growth"),
        path_RND=rec.get("path"),
        acts=rec.get("acts"),
        initial_norm_BT=np.asarray(norm0),
        token_mask_BT=mask,
        final_carry=final_carry,
    )


def masked_mean_over_tokens(x_RBT: np.ndarray, mask_BT: np.ndarray) -> np.ndarray:
    """Mean over the counted tokens per step -> [R] (NaN-aware)."""
    sel = x_RBT[:, mask_BT]
    with np.errstate(invalid="ignore"):
        return np.nanmean(sel.astype(np.float64), axis=1)

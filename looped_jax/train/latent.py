"""Latent prediction (data2vec / JEPA style) as an extra objective of the trainer (``cfg.latent``).

An EMA *teacher* (a copy of the model's parameters, tau scheduled from ``tau_start`` to ``tau_end``)
reads the clean input; the *student* (the trained parameters) reads the same rows with random spans
of input tokens replaced by ``mask_token``; a small *predictor* maps the student's last hidden state
at every masked position to the teacher's target there:

    target_t = mean over the top K states h^(j) of  instance_norm(h^(j))_t

where the states are those a family's ``hidden_states`` returns: the outputs of the top K layers of
a transformer, or the states of the last K loop steps of a looped model (``teacher_extra_loops``
lets the teacher loop more than the student). Instance norm normalises each channel over the
row's valid positions (Baevski et al. 2022, data2vec). The loss, smooth-L1 (``beta``) or
``1 - cos``, is averaged over masked positions and added to the family's own loss:

    loss = loss_family(clean batch) + weight * loss_latent

Families opt in by implementing ``hidden_states(inputs_BT, *, positions_BT, segment_ids_BT,
num_loops, rng) -> [S, B, T, D]`` (see `looped_jax.models.protocol`); the trainer refuses
``latent.weight > 0`` for a family without it. The predictor's parameters live in the train
state's ``params`` under ``LATENT_KEY`` (trained by the same optimizer, never exported); the
teacher in ``TrainState.teacher_params``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from looped_jax.config import LatentConfig

LATENT_KEY = "latent_predictor"


class Predictor(nnx.Module):
    """Student latent -> teacher target: ``W2 gelu(W1 LN(x))`` (``hidden`` = 0: one linear map)."""

    def __init__(self, d_model: int, hidden: int, *, rngs: nnx.Rngs):
        self.hidden = hidden
        self.norm_scale = nnx.Param(jnp.ones((d_model,), jnp.float32))
        d_in = d_model
        if hidden:
            self.w1 = nnx.Param(jax.random.normal(rngs.params(), (d_model, hidden)) / math.sqrt(d_model))
            self.b1 = nnx.Param(jnp.zeros((hidden,), jnp.float32))
            d_in = hidden
        self.w2 = nnx.Param(jax.random.normal(rngs.params(), (d_in, d_model)) / math.sqrt(d_in))
        self.b2 = nnx.Param(jnp.zeros((d_model,), jnp.float32))

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        x = x_BTD.astype(jnp.float32)
        x = (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-6) * self.norm_scale[...]
        if self.hidden:
            x = jax.nn.gelu(x @ self.w1[...] + self.b1[...])
        return x @ self.w2[...] + self.b2[...]


def span_mask(rng: jax.Array, valid_BT: jax.Array, *, ratio: float, span: int) -> jax.Array:
    """bool [B, T]: spans of ``span`` tokens starting at valid positions with probability ratio / span
    (so about ``ratio`` of the tokens end up masked, overlaps aside), restricted to valid positions."""
    starts = jax.random.bernoulli(rng, min(ratio / span, 1.0), valid_BT.shape) & valid_BT
    covered = starts
    for shift in range(1, span):
        covered = covered | jnp.pad(starts, ((0, 0), (shift, 0)))[:, : starts.shape[1]]
    return covered & valid_BT


def instance_norm(x_BTD: jax.Array, valid_BT: jax.Array, eps: float = 1e-5) -> jax.Array:
    """Each channel normalised to zero mean, unit variance over the row's valid positions."""
    w = valid_BT[..., None].astype(jnp.float32)
    n = jnp.maximum(w.sum(1, keepdims=True), 1.0)
    mean = (x_BTD * w).sum(1, keepdims=True) / n
    var = (jnp.square(x_BTD - mean) * w).sum(1, keepdims=True) / n
    return (x_BTD - mean) * jax.lax.rsqrt(var + eps)


def teacher_targets(states_SBTD: jax.Array, valid_BT: jax.Array, top_k: int) -> jax.Array:
    """Mean of the instance-normalised last ``top_k`` states [B, T, D]."""
    if top_k > states_SBTD.shape[0]:
        raise ValueError(
            f"config field latent.top_k={top_k} is more than the {states_SBTD.shape[0]} hidden states the model has"
        )
    top = states_SBTD[-top_k:].astype(jnp.float32)
    return jnp.mean(jax.vmap(lambda h: instance_norm(h, valid_BT))(top), axis=0)


def regression_loss(pred_BTD: jax.Array, target_BTD: jax.Array, mask_BT: jax.Array, cfg: LatentConfig) -> jax.Array:
    """Mean over masked positions of smooth-L1 (mean over channels) or 1 - cosine."""
    if cfg.loss == "cosine":
        num = jnp.sum(pred_BTD * target_BTD, -1)
        den = jnp.linalg.norm(pred_BTD, axis=-1) * jnp.linalg.norm(target_BTD, axis=-1)
        per_token = 1.0 - num / jnp.maximum(den, 1e-6)
    else:
        diff = jnp.abs(pred_BTD - target_BTD)
        b = cfg.beta
        per_token = jnp.mean(jnp.where(diff < b, 0.5 * jnp.square(diff) / b, diff - 0.5 * b), -1)
    m = mask_BT.astype(jnp.float32)
    return jnp.sum(per_token * m) / jnp.maximum(m.sum(), 1.0)


def tau_at(step: jax.Array, cfg: LatentConfig, num_steps: int) -> jax.Array:
    """The teacher's EMA decay: linear from tau_start to tau_end over ``tau_steps`` (0 = the run), then constant."""
    total = cfg.tau_steps or num_steps
    frac = jnp.minimum(step.astype(jnp.float32) / max(total, 1), 1.0)
    return cfg.tau_start + (cfg.tau_end - cfg.tau_start) * frac


def model_params(params):
    """The model's parameters of a train state's ``params`` (drops the predictor's, if any)."""
    if isinstance(params, dict) and LATENT_KEY in params:
        return {k: v for k, v in params.items() if k != LATENT_KEY}
    return params


def teacher_update(teacher, params, tau: jax.Array):
    """tau * teacher + (1 - tau) * params (the predictor is not part of the teacher)."""
    return jax.tree.map(lambda t, p: tau * t + (1.0 - tau) * p, teacher, model_params(params))


def latent_loss(student, teacher, predictor: Predictor, batch: dict, rng: jax.Array, cfg: LatentConfig):
    """(loss, metrics) of one batch: the student reads masked rows, the teacher the clean ones."""
    inputs = batch["inputs"]
    seg = batch.get("segment_ids")
    valid = (seg > 0) if seg is not None else jnp.ones(inputs.shape, bool)
    mask_key, student_key, teacher_key = jax.random.split(rng, 3)
    mask = span_mask(mask_key, valid, ratio=cfg.mask_ratio, span=cfg.mask_span)
    masked_inputs = jnp.where(mask, jnp.int32(cfg.mask_token), inputs)
    kw = dict(positions_BT=batch.get("positions"), segment_ids_BT=seg)
    student_states = student.hidden_states(masked_inputs, rng=student_key, **kw)
    teacher_loops = None
    if cfg.teacher_extra_loops:
        teacher_loops = student_states.shape[0] + cfg.teacher_extra_loops
    teacher_states = teacher.hidden_states(inputs, rng=teacher_key, num_loops=teacher_loops, **kw)
    target = jax.lax.stop_gradient(teacher_targets(teacher_states, valid, cfg.top_k))
    pred = predictor(student_states[-1])
    loss = regression_loss(pred, target, mask, cfg)
    return loss, {"latent_loss": loss, "masked_fraction": mask.sum() / jnp.maximum(valid.sum(), 1)}

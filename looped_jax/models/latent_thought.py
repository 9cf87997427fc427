"""Latent-Thought Models (Kong et al. 2025, "Scalable Language Models with Posterior Inference of
Latent Thought Vectors", arXiv 2502.01567).

A decoder p(x | z) whose layer l cross-attends to its own bank z_l of ``num_latents`` vectors:

    h   = x + SelfAttn(n(x))              causal, sliding window: long range must pass through z
    h   = h + CrossAttn(n(h), z_l)        latent keys carry rotary positions spread over the sequence
    out = h + FFN(n(h))

Prior z ~ N(0, I). The posterior q(z | x) = N(mu, diag sigma^2) has per-sequence parameters and
no encoder: a fast inner loop maximises the ELBO (Eq. 3)

    ELBO(x) = E_q[log p(x | z)] - KL(q || N(0, I)),   z = mu + sigma * eps (eps fixed over the loop)

by ``inner_steps`` steps of Adam or AdamW (cosine learning rate) on (mu, log sigma^2)
(dual-rate learning, Sec. 3.2), then the slow outer step (the Trainer's AdamW) updates the
decoder on the final z. The inner loop is a
``jax.lax.scan`` run *inside* ``loss``, so the standard Trainer trains the model unchanged.

Batching: every sequence has its own (mu, log sigma^2) and the inner objective is the sum of the
per-sequence negative ELBOs, so the gradient w.r.t. one sequence's parameters is the gradient of
that sequence's own ELBO; Adam is element-wise, so one batched Adam is exactly a per-sequence Adam.

Gradients: by default the decoder gets gradients only through the final z (the inner trajectory
is stop-gradient'ed). ``inner_grads_to_decoder=True`` keeps the authors' released behaviour where
the decoder gradients of every inner step are added to the outer update.

Evaluation: (mu, sigma) fitted against one fixed eps can exploit that eps, so scoring z at the same
eps is optimistic and not a bound; ``elbo`` scores fresh eps. ``resample_eps=True`` draws a new eps
at every inner step (ordinary stochastic VI) instead of the paper's fixed one. ``elbo`` also returns
the paper's protocol (the authors' evaluation code): per-sequence exp(NELBO_i / T_i) at the fitted eps,
averaged over sequences (``scripts/ltm_eval.py --protocol paper``); it is reported beside the bound,
never instead of it.

Paper settings (the authors' training code; github:deqiankong/LTM holds only the project page, the
code was read in a public copy, github:ghidav/Latent-Thought-Language-Models, whose ``AdamVI`` strategy
is marked as the unchanged original) and our named alternatives, chosen per config (the published
``configs/ltm_s.py``, ``ltm_m.py`` and ``ltm_l.py`` use the paper's; the dataclass defaults are ours):

    latent_positions  "paper": bank l's k-th latent sits at k * (latent_span // (num_latents *
                      num_layers)) for every l (they size the position table for all M * L latents,
                      then every layer takes its first M) | "spread" (ours): evenly over the span
    inner_optimizer   "adamw": torch AdamW, weight decay ``inner_weight_decay`` = 0.01 on mu and
                      log sigma^2 | "adam" (ours): optax.adam, no decay
    inner_schedule    "paper": cosine with decay ratio t / inner_steps | "cosine" (ours): t / (inner_steps - 1)
    init_mu_std       0 in their code (mu_0 = 0); ours defaults to 0.01

Remaining departures from the paper and the authors' code:
  * the authors raise the inner learning rate linearly over outer training (0.3 -> 0.34 in their
    config); ``inner_lr`` is constant (the paper's 0.3);
  * initialisation: ours is Takase's small init scaled per residual branch; theirs is N(0, 0.02) with
    GPT-2's 0.02 / sqrt(2 L) on output projections;
  * their outer loss is the mean token cross-entropy at the final z; ours adds the (decoder-independent)
    KL / N, so the decoder gradient is the same and the logged loss is the negative ELBO per token;
  * data: the configs here train on bytes (259 symbols), not GPT-2 tokens of OpenWebText;
  * their data loader can seed mu_0 from a per-example stored z (``persistent_init``); we always start
    from ``init_posterior``;
  * the learned (DiT) prior of their follow-up code is not implemented: the prior is N(0, I);
  * their released code also lets every inner step's decoder gradient accumulate into the outer update;
    the published configs follow the paper's algorithm (decoder gradient at the final z only) and
    ``inner_grads_to_decoder=True`` reproduces the released behaviour.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from looped_jax.config import check_model_field as _check
from looped_jax.losses import gaussian_kl, softmax_cross_entropy
from looped_jax.models.protocol import LossOutput
from looped_jax.nn import Attention, Embed, RMSNorm, SwiGLU, Unembed, apply_rope, resolve_dtype, takase_std
from looped_jax.recurrence import is_static_int

LATENT_POSITIONS = ("spread", "paper")
INNER_OPTIMIZERS = ("adam", "adamw")
INNER_SCHEDULES = ("cosine", "paper")


@dataclasses.dataclass(frozen=True)
class LatentThoughtConfig:
    """Decoder shape, latent banks and the inner (fast) optimiser. Defaults: a small model."""

    name: str = "latent_thought"
    vocab_size: int = 259
    d_model: int = 128
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 32
    mlp_dim: int = 384
    num_layers: int = 2
    num_latents: int = 8  # latent vectors per layer (one bank per layer)
    window: int = 32  # sliding self-attention window (tokens, including the current one)
    latent_span: int = 128  # the token span the latent rotary positions are laid over (see latent_positions)
    tie_embeddings: bool = True
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    dtype: str = "float32"
    # Where the latents sit for the cross-attention rotary keys (see ``latent_positions``):
    # "spread" (ours): evenly over [0, latent_span - 1]; "paper" (the authors' code): k * interval,
    # interval = latent_span // (num_latents * num_layers), the same positions in every layer.
    latent_positions: str = "spread"
    # Fast inner loop on (mu, log sigma^2): "adam" (ours, optax.adam) or "adamw" (the authors':
    # torch.optim.AdamW, decoupled weight decay ``inner_weight_decay`` on mu and log sigma^2).
    inner_optimizer: str = "adam"
    inner_weight_decay: float = 0.01  # used by "adamw" only (torch's AdamW default)
    # Learning rate inner_lr -> inner_lr * end_ratio by a cosine: "cosine" (ours) reaches the end at the
    # last step (t / (inner_steps - 1)); "paper" (the authors') decays by t / inner_steps, so the
    # last step still runs above the end value.
    inner_schedule: str = "cosine"
    inner_steps: int = 16
    inner_lr: float = 0.3
    inner_lr_end_ratio: float = 0.1
    inner_b1: float = 0.9
    inner_b2: float = 0.999
    inner_eps: float = 1e-8
    init_mu_std: float = 0.01  # mu_0 = init_mu_std * N(0, 1)
    init_logvar: float = -5.0  # log sigma^2_0 = init_logvar + init_logvar_std * N(0, 1)
    init_logvar_std: float = 0.1
    kl_weight: float = 1.0  # 1 = the ELBO
    inner_grads_to_decoder: bool = False
    # False (the paper): one eps for all inner steps and the final z. True: a fresh eps every inner
    # step and for the final z (stochastic VI; the fitted q cannot exploit one particular eps).
    resample_eps: bool = False

    def __post_init__(self):
        _check(self.name == "latent_thought", "name", "'latent_thought'", self.name)
        for f in ("vocab_size", "d_model", "num_heads", "num_kv_heads", "head_dim", "mlp_dim", "num_layers"):
            _check(getattr(self, f) >= 1, f, ">= 1", getattr(self, f))
        _check(self.num_latents >= 1, "num_latents", ">= 1", self.num_latents)
        _check(self.window >= 1, "window", ">= 1", self.window)
        _check(self.latent_span >= 1, "latent_span", ">= 1", self.latent_span)
        _check(self.num_heads % self.num_kv_heads == 0, "num_heads", "a multiple of num_kv_heads", self.num_heads)
        _check(self.head_dim % 2 == 0, "head_dim", "even (rotary embeddings)", self.head_dim)
        _check(self.rope_theta > 0, "rope_theta", "> 0", self.rope_theta)
        _check(self.norm_eps > 0, "norm_eps", "> 0", self.norm_eps)
        _check(self.dtype in ("float32", "bfloat16"), "dtype", "'float32' or 'bfloat16'", self.dtype)
        _check(
            self.latent_positions in LATENT_POSITIONS,
            "latent_positions",
            f"one of {LATENT_POSITIONS}",
            self.latent_positions,
        )
        if self.latent_positions == "paper":
            total = self.num_latents * self.num_layers
            _check(
                self.latent_span >= total,
                "latent_span",
                f">= num_latents * num_layers = {total} (latent_positions='paper' spaces the latents "
                f"latent_span // {total} apart)",
                self.latent_span,
            )
        _check(
            self.inner_optimizer in INNER_OPTIMIZERS,
            "inner_optimizer",
            f"one of {INNER_OPTIMIZERS}",
            self.inner_optimizer,
        )
        _check(self.inner_weight_decay >= 0, "inner_weight_decay", ">= 0", self.inner_weight_decay)
        _check(
            self.inner_schedule in INNER_SCHEDULES, "inner_schedule", f"one of {INNER_SCHEDULES}", self.inner_schedule
        )
        _check(self.inner_steps >= 0, "inner_steps", ">= 0", self.inner_steps)
        _check(self.inner_lr > 0, "inner_lr", "> 0", self.inner_lr)
        _check(0 <= self.inner_lr_end_ratio <= 1, "inner_lr_end_ratio", "in [0, 1]", self.inner_lr_end_ratio)
        _check(0 <= self.inner_b1 < 1, "inner_b1", "in [0, 1)", self.inner_b1)
        _check(0 <= self.inner_b2 < 1, "inner_b2", "in [0, 1)", self.inner_b2)
        _check(self.inner_eps > 0, "inner_eps", "> 0", self.inner_eps)
        _check(self.init_mu_std >= 0, "init_mu_std", ">= 0", self.init_mu_std)
        _check(self.init_logvar_std >= 0, "init_logvar_std", ">= 0", self.init_logvar_std)
        _check(self.kl_weight >= 0, "kl_weight", ">= 0", self.kl_weight)

    def latent_shape(self, batch_size: int) -> tuple[int, int, int, int]:
        """[B, layers, num_latents, d_model]: one bank of latent vectors per layer."""
        return (batch_size, self.num_layers, self.num_latents, self.d_model)


# ---------------------------------------------------------------------------------------------
# Posterior pieces (pure functions)


class Posterior(NamedTuple):
    """Diagonal Gaussian q(z | x) per sequence; arrays [B, layers, num_latents, D]."""

    mu: jax.Array
    logvar: jax.Array


def kl_to_prior(post: Posterior) -> jax.Array:
    """KL(N(mu, sigma^2) || N(0, I)) per sequence [B]: 0.5 * sum(mu^2 + sigma^2 - log sigma^2 - 1)."""
    mu, lv = post.mu.astype(jnp.float32), post.logvar.astype(jnp.float32)
    return jnp.sum(gaussian_kl(mu, 0.5 * lv), axis=tuple(range(1, mu.ndim)))


def sample_latents(post: Posterior, eps: jax.Array) -> jax.Array:
    """Reparameterised z = mu + exp(log sigma^2 / 2) * eps."""
    return post.mu + jnp.exp(0.5 * post.logvar) * eps


def inner_schedule(cfg: LatentThoughtConfig, num_steps: int) -> optax.Schedule:
    """Cosine schedule over the inner steps from inner_lr towards inner_lr * end_ratio.

    "cosine": lr_t = end + (lr - end) (1 + cos(pi t / (num_steps - 1))) / 2, the end value at the last step.
    "paper" (the authors' code): the same with t / num_steps, so the last step runs above the end value.
    """
    span = num_steps if cfg.inner_schedule == "paper" else num_steps - 1
    return optax.cosine_decay_schedule(cfg.inner_lr, max(span, 1), alpha=cfg.inner_lr_end_ratio)


def inner_learning_rates(cfg: LatentThoughtConfig, num_steps: int) -> jax.Array:
    """The inner learning rate of each of ``num_steps`` steps [num_steps]."""
    return inner_schedule(cfg, num_steps)(jnp.arange(num_steps, dtype=jnp.int32))


def inner_optimizer(cfg: LatentThoughtConfig, num_steps: int) -> optax.GradientTransformation:
    """The fast optimiser on (mu, log sigma^2) with the inner schedule (Sec. 3.2): optax.adam ("adam"),
    or AdamW ("adamw", the authors' torch.optim.AdamW: x <- x - lr_t (adam_t + inner_weight_decay x))."""
    schedule = inner_schedule(cfg, num_steps)
    if cfg.inner_optimizer == "adamw":
        return optax.adamw(
            schedule, b1=cfg.inner_b1, b2=cfg.inner_b2, eps=cfg.inner_eps, weight_decay=cfg.inner_weight_decay
        )
    return optax.adam(schedule, b1=cfg.inner_b1, b2=cfg.inner_b2, eps=cfg.inner_eps)


def init_posterior(cfg: LatentThoughtConfig, batch_size: int, rng: jax.Array) -> Posterior:
    """mu = init_mu_std * N(0, 1), log sigma^2 = init_logvar + init_logvar_std * N(0, 1)."""
    k_mu, k_lv = jax.random.split(rng)
    shape = cfg.latent_shape(batch_size)
    mu = cfg.init_mu_std * jax.random.normal(k_mu, shape, jnp.float32)
    logvar = cfg.init_logvar + cfg.init_logvar_std * jax.random.normal(k_lv, shape, jnp.float32)
    return Posterior(mu, logvar)


def next_token_batch(inputs_BT: jax.Array, segment_ids_BT: jax.Array | None = None) -> dict:
    """Targets/weights for scoring ``inputs`` themselves: each token predicts the next one of its segment."""
    if segment_ids_BT is None:
        segment_ids_BT = jnp.ones(inputs_BT.shape, jnp.int32)
    targets_BT = jnp.concatenate([inputs_BT[:, 1:], jnp.zeros_like(inputs_BT[:, :1])], axis=1)
    next_seg_BT = jnp.concatenate([segment_ids_BT[:, 1:], jnp.zeros_like(segment_ids_BT[:, :1])], axis=1)
    same_BT = (segment_ids_BT > 0) & (next_seg_BT == segment_ids_BT)
    return {"inputs": inputs_BT, "targets": targets_BT * same_BT, "weights": same_BT.astype(jnp.float32)}


# ---------------------------------------------------------------------------------------------
# Decoder


def _token_positions(inputs_BT: jax.Array, positions_BT: jax.Array | None) -> jax.Array:
    """Checks that ``inputs`` are [batch, length] token ids; their positions, 0..T-1 per row when not given."""
    if inputs_BT.ndim != 2:
        raise ValueError(f"inputs must be [batch, length] token ids, got shape {inputs_BT.shape}")
    if positions_BT is None:
        positions_BT = jnp.broadcast_to(jnp.arange(inputs_BT.shape[1], dtype=jnp.int32), inputs_BT.shape)
    return positions_BT


class LatentBlock(nnx.Module):
    """Sliding-window causal self-attention, cross-attention to this layer's latent bank, SwiGLU."""

    def __init__(self, cfg: LatentThoughtConfig, *, init_std: float, out_init_std: float, rngs: nnx.Rngs):
        dtype = resolve_dtype(cfg.dtype)
        heads = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        common = dict(init_std=init_std, out_init_std=out_init_std, rope_theta=cfg.rope_theta, dtype=dtype)
        self.self_attn = Attention(*heads, mask_kind="sliding", window=cfg.window, rngs=rngs, **common)
        self.cross_attn = Attention(*heads, mask_kind="bidirectional", rngs=rngs, **common)
        self.mlp = SwiGLU(
            cfg.d_model, cfg.mlp_dim, init_std=init_std, out_init_std=out_init_std, dtype=dtype, rngs=rngs
        )
        self.norm_self = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.norm_cross = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.norm_mlp = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.rope_theta = cfg.rope_theta

    def cross(self, x_BTD: jax.Array, positions_BT: jax.Array, z_BMD: jax.Array, z_positions_1M: jax.Array):
        """Every token attends to all latents of the bank; RoPE on queries (token positions) and keys
        (latent positions), so a token prefers the latents placed near it."""
        attn = self.cross_attn
        dt = attn.dtype
        q_BTNH = jnp.einsum("btd,dnh->btnh", x_BTD.astype(dt), attn.q_DNH[...].astype(dt))
        k_BMKH = jnp.einsum("bmd,dkh->bmkh", z_BMD.astype(dt), attn.k_DKH[...].astype(dt))
        v_BMKH = jnp.einsum("bmd,dkh->bmkh", z_BMD.astype(dt), attn.v_DKH[...].astype(dt))
        q_BTNH = apply_rope(q_BTNH, positions_BT, self.rope_theta)
        k_BMKH = apply_rope(k_BMKH, z_positions_1M, self.rope_theta)
        return attn.output(attn.attend(q_BTNH, k_BMKH, v_BMKH, None))

    def tokens(self, x_BTD, positions_BT, segment_ids_BT) -> jax.Array:
        """The half no latent reaches: x + SelfAttn(n(x))."""
        h_BTD, _ = self.self_attn(self.norm_self(x_BTD), positions_BT, segment_ids_BT)
        return x_BTD + h_BTD.astype(x_BTD.dtype)

    def latents(self, x_BTD, z_BMD, positions_BT, z_positions_1M) -> jax.Array:
        """The half that reads the bank: x + CrossAttn(n(x), z), then the FFN."""
        h_BTD = self.cross(self.norm_cross(x_BTD), positions_BT, z_BMD, z_positions_1M)
        x_BTD = x_BTD + h_BTD.astype(x_BTD.dtype)
        return x_BTD + self.mlp(self.norm_mlp(x_BTD)).astype(x_BTD.dtype)

    def __call__(self, x_BTD, z_BMD, positions_BT, segment_ids_BT, z_positions_1M) -> jax.Array:
        return self.latents(self.tokens(x_BTD, positions_BT, segment_ids_BT), z_BMD, positions_BT, z_positions_1M)


class LatentThoughtModel(nnx.Module):
    """Decoder p(x | z) plus the inner-loop posterior inference; see the module docstring."""

    def __init__(self, cfg: LatentThoughtConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        std = takase_std(cfg.d_model)
        out_std = std / math.sqrt(3 * cfg.num_layers)  # three residual branches per layer
        dtype = resolve_dtype(cfg.dtype)
        self.embed = Embed(cfg.vocab_size, cfg.d_model, init_std=std, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List(
            [LatentBlock(cfg, init_std=std, out_init_std=out_std, rngs=rngs) for _ in range(cfg.num_layers)]
        )
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.unembed = (
            None if cfg.tie_embeddings else Unembed(cfg.d_model, cfg.vocab_size, init_std=std, dtype=dtype, rngs=rngs)
        )

    def latent_positions(self) -> jax.Array:
        """[1, M] rotary positions of the latents, the same for every layer's bank.

        "spread": evenly over [0, latent_span - 1]. "paper" (the authors' code): k * interval for
        k < num_latents, interval = latent_span // (num_latents * num_layers), so all banks sit in the
        first 1 / num_layers of the span.
        """
        cfg = self.cfg
        if cfg.latent_positions == "paper":
            interval = cfg.latent_span // (cfg.num_latents * cfg.num_layers)
            return (jnp.arange(cfg.num_latents, dtype=jnp.float32) * float(interval))[None]
        return jnp.linspace(0.0, float(cfg.latent_span - 1), cfg.num_latents, dtype=jnp.float32)[None]

    def decode_prefix(
        self, inputs_BT: jax.Array, positions_BT: jax.Array | None = None, segment_ids_BT: jax.Array | None = None
    ) -> jax.Array:
        """The part of ``decode`` no latent reaches, [B, T, D]: the embedding and the first layer's
        self-attention. The inner loop computes it once (``decode(..., prefix_BTD=...)``) instead of
        in every step: XLA hoists loop-invariant dots out of a loop itself, but not a Pallas kernel's
        custom call, so on TPU the first layer's splash attention would otherwise run every step."""
        positions_BT = _token_positions(inputs_BT, positions_BT)
        return self.blocks[0].tokens(self.embed(inputs_BT).astype(jnp.float32), positions_BT, segment_ids_BT)

    def decode(
        self,
        z_BLMD: jax.Array,
        inputs_BT: jax.Array,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        *,
        prefix_BTD: jax.Array | None = None,
    ) -> jax.Array:
        """Logits [B, T, V] of p(x | z); layer l reads only bank z[:, l]. ``prefix_BTD`` is
        ``decode_prefix`` of the same inputs, when already computed."""
        cfg = self.cfg
        positions_BT = _token_positions(inputs_BT, positions_BT)
        expected = cfg.latent_shape(inputs_BT.shape[0])
        if tuple(z_BLMD.shape) != expected:
            raise ValueError(
                f"latents must have shape [B, layers, num_latents, d_model]={expected}, got {z_BLMD.shape}"
            )
        if prefix_BTD is None:
            prefix_BTD = self.decode_prefix(inputs_BT, positions_BT, segment_ids_BT)
        elif prefix_BTD.shape != inputs_BT.shape + (cfg.d_model,):
            raise ValueError(f"prefix_BTD must have shape {inputs_BT.shape + (cfg.d_model,)}, got {prefix_BTD.shape}")
        z_pos_1M = self.latent_positions()
        x_BTD = self.blocks[0].latents(prefix_BTD, z_BLMD[:, 0], positions_BT, z_pos_1M)
        for l, block in enumerate(self.blocks[1:], start=1):
            x_BTD = block(x_BTD, z_BLMD[:, l], positions_BT, segment_ids_BT, z_pos_1M)
        x_BTD = self.final_norm(x_BTD)
        return self.embed.attend(x_BTD) if self.unembed is None else self.unembed(x_BTD)

    def row_nll(
        self, z_BLMD: jax.Array, batch: dict, *, prefix_BTD: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """(-log p(x | z) per sequence [B], correct next-token predictions per sequence [B])."""
        logits_BTV = self.decode(
            z_BLMD, batch["inputs"], batch.get("positions"), batch.get("segment_ids"), prefix_BTD=prefix_BTD
        )
        logits_BTV = logits_BTV.astype(jnp.float32)
        nll_BT = softmax_cross_entropy(logits_BTV, batch["targets"])
        w_BT = batch["weights"].astype(jnp.float32)
        correct_BT = (jnp.argmax(logits_BTV, axis=-1) == batch["targets"]).astype(jnp.float32)
        return (nll_BT * w_BT).sum(-1), (correct_BT * w_BT).sum(-1)

    # -- the fast inner loop -------------------------------------------------------------------

    def infer_posterior(
        self,
        batch: dict,
        post0: Posterior,
        eps_BLMD: jax.Array,
        num_steps: int,
        *,
        decoder_grads: bool = False,
        eps_key: jax.Array | None = None,
    ) -> tuple[Posterior, jax.Array, object]:
        """Runs ``num_steps`` batched Adam steps (``inner_optimizer``: optax.adam on the cosine inner
        schedule) on (mu, log sigma^2) maximising each sequence's ELBO.

        Returns (final posterior, negative ELBO summed over the batch before each step [num_steps],
        summed decoder gradients of the inner objectives, or None unless ``decoder_grads``). Nothing
        is differentiated through this loop: decoder params enter as constants (stop_gradient).
        With ``eps_key`` step t uses eps = N(0, I) drawn from fold_in(eps_key, t) instead of ``eps``.
        """
        cfg = self.cfg
        graphdef, params = nnx.split(self)
        params = jax.lax.stop_gradient(params)
        has_tokens_B = (batch["weights"].sum(-1) > 0).astype(jnp.float32)

        # The decoder is a constant here unless its gradients are wanted: then the latent-free prefix
        # is the same in every step and is computed once, outside the loop.
        prefix_BTD = None
        if not decoder_grads:
            prefix_BTD = nnx.merge(graphdef, params).decode_prefix(
                batch["inputs"], batch.get("positions"), batch.get("segment_ids")
            )

        def objective(p, post, eps):
            nll_B, _ = nnx.merge(graphdef, p).row_nll(sample_latents(post, eps), batch, prefix_BTD=prefix_BTD)
            return jnp.sum(nll_B + cfg.kl_weight * kl_to_prior(post) * has_tokens_B)

        grad_fn = jax.value_and_grad(objective, argnums=(0, 1) if decoder_grads else 1)
        tx = inner_optimizer(cfg, num_steps)

        def step(carry, t):
            post, opt_state, acc = carry
            eps = eps_BLMD if eps_key is None else jax.random.normal(jax.random.fold_in(eps_key, t), eps_BLMD.shape)
            value, grads = grad_fn(params, post, eps)
            if decoder_grads:
                acc = jax.tree.map(jnp.add, acc, grads[0])
                grads = grads[1]
            updates, opt_state = tx.update(grads, opt_state, post)
            return (optax.apply_updates(post, updates), opt_state, acc), value

        acc0 = jax.tree.map(jnp.zeros_like, params) if decoder_grads else None
        if num_steps == 0:
            return post0, jnp.zeros((0,), jnp.float32), acc0
        carry0 = (post0, tx.init(post0), acc0)
        (post, _, acc), trace = jax.lax.scan(step, carry0, jnp.arange(num_steps, dtype=jnp.int32))
        return post, trace, acc

    def _posterior_for(self, batch: dict, num_steps: int, rng: jax.Array, decoder_grads: bool = False):
        """(posterior after ``num_steps`` inner steps, the eps of the final z, trace, inner decoder grads)."""
        k_init, k_eps, k_steps = jax.random.split(rng, 3)
        batch_size = batch["inputs"].shape[0]
        post0 = init_posterior(self.cfg, batch_size, k_init)
        eps_BLMD = jax.random.normal(k_eps, self.cfg.latent_shape(batch_size), jnp.float32)
        eps_key = k_steps if self.cfg.resample_eps else None
        post, trace, acc = self.infer_posterior(
            batch, post0, eps_BLMD, num_steps, decoder_grads=decoder_grads, eps_key=eps_key
        )
        return jax.lax.stop_gradient(post), eps_BLMD, trace, acc

    # -- training and evaluation ---------------------------------------------------------------

    def initial_carry(self, batch_size: int) -> None:
        """Stateless across training steps: each step infers its posteriors from scratch."""
        del batch_size
        return None

    def loss(self, batch: dict, *, rng: jax.Array, train: bool = True, carry: None = None) -> LossOutput:
        """Negative ELBO per token at the posterior found by the inner loop (slow outer objective).

        The decoder gradient flows only through log p(x | z_final) (the KL does not depend on the
        decoder); with ``inner_grads_to_decoder`` the inner steps' decoder gradients are added via a
        zero-valued surrogate term sum <stop_grad(g), theta> - stop_grad(<g, theta>).
        """
        del train, carry
        cfg = self.cfg
        post, eps, trace, acc = self._posterior_for(batch, cfg.inner_steps, rng, cfg.inner_grads_to_decoder)
        nll_B, correct_B = self.row_nll(sample_latents(post, eps), batch)
        has_tokens_B = (batch["weights"].sum(-1) > 0).astype(jnp.float32)
        kl_B = kl_to_prior(post) * has_tokens_B
        n = jnp.maximum(batch["weights"].astype(jnp.float32).sum(), 1.0)
        loss = (nll_B.sum() + cfg.kl_weight * kl_B.sum()) / n
        if acc is not None:
            _, params = nnx.split(self)
            pairs = zip(jax.tree.leaves(acc), jax.tree.leaves(params), strict=True)
            surrogate = sum(jnp.vdot(jax.lax.stop_gradient(g) / n, p) for g, p in pairs)
            loss = loss + surrogate - jax.lax.stop_gradient(surrogate)
        metrics = {
            "loss": loss,
            "nll": nll_B.sum() / n,
            "kl": kl_B.sum() / n,
            "accuracy": correct_B.sum() / n,
            "num_tokens": batch["weights"].astype(jnp.float32).sum(),
            "elbo_ppl": jnp.exp((nll_B.sum() + kl_B.sum()) / n),
        }
        if cfg.inner_steps:
            metrics["inner_first"] = trace[0] / n
        return LossOutput(loss, metrics)

    def evaluate(self, batch: dict, *, num_loops: int | None = None, rng: jax.Array | None = None) -> dict:
        """Sums of the ELBO (a bound, NLL + KL) with the inner loop run on the evaluated text itself:
        {"loss_sum": nll_sum + kl_sum, "correct", "num_tokens"} (see ``elbo``).

        ``num_loops`` is the number of inner steps (a Python int; default ``inner_steps``); ``rng``
        seeds the posterior initialisation, eps and the scoring samples (default key 0).
        """
        if num_loops is None:
            steps = self.cfg.inner_steps
        elif is_static_int(num_loops) and num_loops >= 0:
            steps = int(num_loops)
        else:
            raise ValueError(
                "num_loops of a latent_thought model sets the inner step count, a scan length: it must be a "
                f"Python int >= 0 or None (inner_steps={self.cfg.inner_steps}), got {num_loops!r}"
            )
        o = self.elbo(batch, steps, jax.random.key(0) if rng is None else rng)
        return {"loss_sum": o["nll_sum"] + o["kl_sum"], "correct": o["correct"], "num_tokens": o["num_tokens"]}

    def elbo(self, batch: dict, num_inner_steps: int, rng: jax.Array, *, num_samples: int = 1) -> dict:
        """ELBO terms with the inner loop run ``num_inner_steps`` times on ``batch`` (sums over it):
        ``nll_sum``, ``kl_sum``, ``correct``, ``num_tokens``; ELBO perplexity = exp((nll + kl) / N).

        E_q log p(x | z) is estimated with ``num_samples`` fresh eps drawn independently of the eps the
        inner loop fitted (mu, sigma) to, so it is an unbiased estimate of a valid bound; reusing the
        fitted eps is optimistic and is reported separately as ``nll_sum_fitted_eps``.

        The paper's protocol (the authors' evaluation code) is returned beside it: each sequence's
        perplexity exp((NLL_i + KL_i) / T_i) at the *fitted* eps, summed over sequences as
        ``paper_ppl_sum`` with ``num_sequences`` (their reported number is the mean over sequences, a
        mean of exponentials rather than the exponential of the mean; not a bound, see the module docstring).
        """
        k_post, k_eval = jax.random.split(rng)
        post, eps, _, _ = self._posterior_for(batch, num_inner_steps, k_post)
        has_tokens_B = (batch["weights"].sum(-1) > 0).astype(jnp.float32)
        nll_fit_B, _ = self.row_nll(sample_latents(post, eps), batch)
        kl_B = kl_to_prior(post) * has_tokens_B
        tokens_B = batch["weights"].astype(jnp.float32).sum(-1)
        paper_ppl_B = jnp.exp((nll_fit_B + kl_B) / jnp.maximum(tokens_B, 1.0)) * has_tokens_B

        def one_sample(carry, key):
            nll_B, correct_B = self.row_nll(sample_latents(post, jax.random.normal(key, eps.shape)), batch)
            return carry, (nll_B.sum(), correct_B.sum())

        _, (nll_S, correct_S) = jax.lax.scan(one_sample, None, jax.random.split(k_eval, num_samples))
        return {
            "nll_sum": nll_S.mean(),
            "kl_sum": kl_B.sum(),
            "correct": correct_S.mean(),
            "num_tokens": batch["weights"].astype(jnp.float32).sum(),
            "nll_sum_fitted_eps": nll_fit_B.sum(),
            "paper_ppl_sum": paper_ppl_B.sum(),
            "num_sequences": has_tokens_B.sum(),
        }

    def __call__(
        self,
        inputs_BT: jax.Array,
        *,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        num_loops: int | None = None,
        rng: jax.Array | None = None,
        z_BLMD: jax.Array | None = None,
    ) -> jax.Array:
        """Logits [B, T, V]. Without ``z`` the posterior is inferred on ``inputs`` themselves with
        ``num_loops`` inner steps (default ``inner_steps``) and decoded at its sampled z. Note the
        cross-entropy of these logits is the reconstruction term only (no KL): not a likelihood
        bound; use ``elbo`` for the ELBO perplexity."""
        if z_BLMD is None:
            steps = self.cfg.inner_steps if num_loops is None else int(num_loops)
            batch = next_token_batch(inputs_BT, segment_ids_BT)
            batch.update(positions=positions_BT, segment_ids=segment_ids_BT)
            post, eps, _, _ = self._posterior_for(batch, steps, jax.random.key(0) if rng is None else rng)
            z_BLMD = sample_latents(post, eps)
        return self.decode(z_BLMD, inputs_BT, positions_BT, segment_ids_BT)


def generate(
    model: LatentThoughtModel,
    prompt_BP: jax.Array,
    *,
    num_new_tokens: int,
    rng: jax.Array,
    num_inner_steps: int | None = None,
    from_prior: bool = False,
    temperature: float = 1.0,
) -> jax.Array:
    """Samples ``num_new_tokens`` after ``prompt`` -> tokens [B, P + N].

    z is drawn from the prior N(0, I) (``from_prior``) or from the posterior inferred on the prompt
    with ``num_inner_steps`` inner steps (default ``inner_steps``). ``temperature=0`` is greedy.
    Each new token re-runs the decoder over the whole buffer (causal, so unfilled slots cannot leak
    into earlier logits); deterministic given ``rng``.
    """
    cfg = model.cfg
    batch_size, prompt_len = prompt_BP.shape
    if prompt_len < 1 or num_new_tokens < 1:
        raise ValueError(
            f"need a prompt of >= 1 token and num_new_tokens >= 1, got {prompt_BP.shape}, {num_new_tokens}"
        )
    k_z, k_sample = jax.random.split(rng)
    if from_prior:
        z_BLMD = jax.random.normal(k_z, cfg.latent_shape(batch_size), jnp.float32)
    else:
        steps = cfg.inner_steps if num_inner_steps is None else num_inner_steps
        post, eps, _, _ = model._posterior_for(next_token_batch(prompt_BP), steps, k_z)
        z_BLMD = sample_latents(post, eps)
    total = prompt_len + num_new_tokens
    buf_BS = jnp.zeros((batch_size, total), jnp.int32).at[:, :prompt_len].set(prompt_BP.astype(jnp.int32))
    graphdef, params = nnx.split(model)

    def body(i, buf_BS):
        logits_BV = nnx.merge(graphdef, params).decode(z_BLMD, buf_BS)[jnp.arange(batch_size), i - 1]
        if temperature == 0:
            tok_B = jnp.argmax(logits_BV, axis=-1)
        else:
            tok_B = jax.random.categorical(jax.random.fold_in(k_sample, i), logits_BV / temperature, axis=-1)
        return buf_BS.at[:, i].set(tok_B.astype(jnp.int32))

    return jax.lax.fori_loop(prompt_len, total, body, buf_BS)

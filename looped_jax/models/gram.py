"""GRAM: stochastic recursive reasoning that scales in width (Baek et al. 2026, arXiv 2605.19376).

A TRM/HRM-style two-level core (state z = (h, l)) made stochastic on h. One *transition*:

    l <- f_L(l, h + e_x)                      K times (deterministic)
    u  = f_H(h, l)
    h  = u + eps,  eps ~ p_theta(eps | u) = N(mu_theta(u), sigma_theta(u)^2)      (prior, inference)
                   eps ~ q_phi(eps | u, y) = N(mu_phi(u, e_y), sigma_phi(u, e_y)^2)  (posterior, training)

f_L(l, c) = Blocks_L(l + c) and f_H(h, l) = Blocks_H(h + l) are post-norm transformer stacks with
bidirectional attention (HRM's input injection by addition); mu/sigma are linear heads on u (and on the
embedded target e_y for the posterior), noise is sampled by reparameterisation. z_0 = (h_0, l_0) is drawn
once from a fixed seed and frozen: it is a *constant* recomputed from ``cfg.z0_seed`` inside the traced
function (XLA folds it), not an ``nnx.Param`` -- so the optimiser never sees it and the trainer's
"all state in nnx.Param" rule holds (there is no other state).

Training (``loss``): deep supervision unrolled inside the loss, no trainer carry. Each batch runs
``supervision_steps`` steps from z_0; each step runs ``num_transitions`` transitions, all but the last
under ``stop_gradient`` (the carry between steps is detached too), so gradients flow only through the
last transition of a step. The last transition is computed from the posterior (for CE and KL) and, from
the same u, with prior noise. The state carried on -- through the earlier transitions and into the next
step -- is the prior one (``carry_posterior=False``, default): carrying posterior samples, the literal
reading, lets y leak into the latent trajectory, and on 6x6 sudoku that model reached 100% (posterior)
training accuracy but 0.40 cell accuracy from prior rollouts on test. Per step:

    CE(out_head(h_q), y) + w_prior * CE(out_head(h_p), y) + beta * KL_bal
        + w_halt * BCE(q_halt(h_q[:, 0]), exact) + w_reward * BCE(v_psi(sg z_p), acc_p)
    KL_bal = alpha * KL(sg q || p) + (1 - alpha) * KL(q || sg p)        (KL balancing, alpha = 0.8)

h_q = u + eps_q (posterior), h_p = u + eps_p (prior, reparameterised), z_p = (h_p, l). The prior CE
(``prior_ce_weight``, 0 gives the literal loss) is our addition: with beta = 0.1 encoding y in eps_q
costs 0.1 * KL, far less than the CE it saves, and without it the posterior carried the answer (posterior
cell accuracy 0.90, prior 0.40, KL 2.9 nats/cell after 50 steps on 6x6) while the core never learnt.

The loss is averaged over steps. The halting logit (TRM) is read from the posterior state h[:, 0] and regresses
exact-correctness of the step's greedy grid. The latent process reward head v_psi is a *critic*: it sees
the prior-sampled last transition z_p under stop_gradient (the kind of state it will score at
inference) and is trained with BCE against that trajectory's cell accuracy (a soft target in [0, 1],
equal to 1 exactly when the grid is solved); it does not shape the latent.

Inference (``sample_trajectories``): N trajectories from the prior in parallel (``jax.vmap`` over
trajectory keys), each a rollout of ``depth`` transitions from z_0; ``select_majority`` picks the most
frequent whole grid, ``select_by_reward`` the trajectory with the highest v_psi.

Two objectives (``objective``). Everything above is ``"prior_carry"``, our documented variant and the
dataclass default (the CPU config and the parity fixture use it). ``"paper"`` is the paper's objective
and the default of the published ``configs/gram_sudoku.py``:

    * training trajectories are posterior-sampled: every transition, carried state included, uses
      q_phi's noise (``carry_posterior=True``), and there is no prior CE (``prior_ce_weight=0``);
    * the KL is scored at every transition: loss = CE(h_n) + beta * sum_t KL_bal,t + halt + reward terms
      (ELBO of the trajectory, Markov prior and posterior); transitions 1..n-1 run without gradient
      (truncated as in TRM), so their KL terms train the prior and posterior heads on stop_gradient(u_t);
    * deep supervision is TRM's: one supervision step per training step with a per-row trainer carry
      (`initial_carry`, `act.reset_rows`); a row halts after ``supervision_steps`` steps or when
      q_halt > 0 (with TRM's exploration, ``halt_exploration_prob``) and is replaced by a fresh example;
    * at test time the halting head stops each prior trajectory (`halting_rollout` / `sample_halting`:
      supervision steps of ``num_transitions`` transitions until q_halt > 0).

Remaining departures of ``"paper"`` from the paper: the critic v_psi is trained as in our variant (on a
prior resample of the last transition, BCE against its cell accuracy); the halting target is the exact
correctness of the posterior state's grid; the noise heads are linear in (u, e_y) and sigma is clipped to
[min_log_sigma, max_log_sigma]; z_0 is a fixed random constant.

Every loop runs on the engine (`looped_jax.recurrence.unroll`) over the pure `transition_step`: the
transitions of a trajectory (``with_index``), the gradient-free transitions of a supervision step
(``grad_steps=0``) and the supervision steps of the loss (``record_fn`` collects their losses). Noise
keys follow one rule: the t-th transition (or supervision step) under key k uses ``fold_in(k, t)``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from looped_jax.config import check_model_field
from looped_jax.losses import binary_cross_entropy_with_logits, cross_entropy, gaussian_kl
from looped_jax.models import act
from looped_jax.models.protocol import LossOutput, TokenModel
from looped_jax.nn.blocks import Block, BlockConfig, apply_stack
from looped_jax.nn.embed import Embed, Unembed
from looped_jax.nn.init import param, truncated_normal
from looped_jax.recurrence import is_static_int, unroll

REWARD_LOSSES = ("bce",)
OBJECTIVES = ("prior_carry", "paper")


@dataclasses.dataclass(frozen=True)
class GramConfig:
    """Static shape and training schedule of a GRAM model."""

    name: str = "gram"
    vocab_size: int = 6  # sudoku: size + 2
    seq_len: int = 16  # cells of the grid (positions 0..seq_len-1)
    d_model: int = 64
    num_heads: int = 4
    head_dim: int = 16
    mlp_dim: int = 256
    num_layers_l: int = 1  # blocks in f_L
    num_layers_h: int = 1  # blocks in f_H
    l_cycles: int = 2  # K: deterministic l updates per transition
    num_transitions: int = 2  # transitions per supervision step (gradient through the last only)
    supervision_steps: int = 4  # deep-supervision steps per batch in training
    eval_transitions: int = 8  # depth of __call__ (used by Trainer.evaluate)
    beta: float = 0.1  # KL weight (paper: 0.1 for Sudoku)
    kl_balance: float = 0.8  # alpha of KL balancing
    halt_weight: float = 0.5
    reward_weight: float = 0.5
    reward_loss: str = "bce"
    # "prior_carry" (our documented variant, the default): stateless loss unrolling supervision_steps
    # from z_0, prior-carried state, prior CE. "paper": the paper's objective (posterior trajectories,
    # KL at every transition, TRM deep supervision with a trainer carry and halting; needs
    # carry_posterior=True and prior_ce_weight=0). See the module docstring.
    objective: str = "prior_carry"
    halt_exploration_prob: float = 0.1  # "paper": TRM's random minimum of halting steps (probability)
    prior_ce_weight: float = 1.0  # CE also on the prior-sampled last transition (0: the literal loss)
    carry_posterior: bool = False  # True: the carried state uses posterior noise (leaks y; see module docstring)
    init_log_sigma: float = math.log(0.3)  # prior / posterior std at initialisation
    min_log_sigma: float = -7.0
    max_log_sigma: float = 2.0
    z0_seed: int = 0
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        check = check_model_field
        check(self.name == "gram", "name", "'gram'", self.name)
        for field in (
            "vocab_size",
            "seq_len",
            "d_model",
            "num_heads",
            "head_dim",
            "mlp_dim",
            "num_layers_l",
            "num_layers_h",
            "l_cycles",
            "num_transitions",
            "supervision_steps",
            "eval_transitions",
        ):
            check(getattr(self, field) >= 1, field, ">= 1", getattr(self, field))
        check(self.vocab_size >= 2, "vocab_size", ">= 2", self.vocab_size)
        check(self.beta >= 0, "beta", ">= 0", self.beta)
        check(0.0 <= self.kl_balance <= 1.0, "kl_balance", "in [0, 1]", self.kl_balance)
        check(self.halt_weight >= 0, "halt_weight", ">= 0", self.halt_weight)
        check(self.reward_weight >= 0, "reward_weight", ">= 0", self.reward_weight)
        check(self.prior_ce_weight >= 0, "prior_ce_weight", ">= 0", self.prior_ce_weight)
        check(self.reward_loss in REWARD_LOSSES, "reward_loss", f"one of {REWARD_LOSSES}", self.reward_loss)
        check(self.objective in OBJECTIVES, "objective", f"one of {OBJECTIVES}", self.objective)
        check(
            0.0 <= self.halt_exploration_prob <= 1.0,
            "halt_exploration_prob",
            "in [0, 1]",
            self.halt_exploration_prob,
        )
        if self.objective == "paper":
            check(
                self.carry_posterior,
                "carry_posterior",
                "True with objective='paper' (the paper trains on posterior-sampled trajectories)",
                self.carry_posterior,
            )
            check(
                self.prior_ce_weight == 0,
                "prior_ce_weight",
                "0 with objective='paper' (the prior CE is our variant's addition)",
                self.prior_ce_weight,
            )
        check(
            self.min_log_sigma < self.init_log_sigma < self.max_log_sigma,
            "init_log_sigma",
            f"in ({self.min_log_sigma}, {self.max_log_sigma})",
            self.init_log_sigma,
        )


# ----------------------------------------------------------------------------- pure pieces


def balanced_kl(mu_q, log_sigma_q, mu_p, log_sigma_p, alpha: float) -> jax.Array:
    """KL balancing (DreamerV2): alpha * KL(sg q || p) + (1 - alpha) * KL(q || sg p), elementwise.

    Its value equals KL(q || p) (`looped_jax.losses.gaussian_kl`); its gradient reaches p's parameters
    scaled by alpha and q's by 1 - alpha.
    """
    sg = jax.lax.stop_gradient
    to_prior = gaussian_kl(sg(mu_q), sg(log_sigma_q), mu_p, log_sigma_p)
    to_posterior = gaussian_kl(mu_q, log_sigma_q, sg(mu_p), sg(log_sigma_p))
    return alpha * to_prior + (1.0 - alpha) * to_posterior


def select_majority(preds_NBT: jax.Array, weights_BT: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Majority vote over whole grids: per row, the trajectory whose grid (weighted cells) is most frequent.

    Ties go to the lowest trajectory index. Returns (chosen index [B], votes of the chosen grid [B]).
    """
    same_NNBT = preds_NBT[:, None] == preds_NBT[None, :]
    if weights_BT is not None:
        same_NNBT = same_NNBT | (weights_BT[None, None] == 0)
    votes_NB = jnp.all(same_NNBT, axis=-1).sum(axis=1)
    index_B = jnp.argmax(votes_NB, axis=0)
    return index_B, jnp.take_along_axis(votes_NB, index_B[None], axis=0)[0]


def select_by_reward(reward_NB: jax.Array) -> jax.Array:
    """Per row, the trajectory with the highest latent process reward (ties: lowest index)."""
    return jnp.argmax(reward_NB, axis=0)


def gather_trajectory(x_NB: jax.Array, index_B: jax.Array) -> jax.Array:
    """x[index[b], b, ...] for every row b."""
    idx = index_B.reshape((1, -1) + (1,) * (x_NB.ndim - 2))
    return jnp.take_along_axis(x_NB, idx, axis=0)[0]


def exact_and_accuracy(pred_BT, targets_BT, weights_BT) -> tuple[jax.Array, jax.Array]:
    """Per row: 1.0 iff every weighted cell is right, and the weighted cell accuracy (float32 [B] each).

    Unlike `looped_jax.models.act.sequence_correct` (logits in, boolean mask of weights > 0), this takes
    predictions and averages with the (possibly fractional) weights: GRAM's reward target is this accuracy.
    """
    w = weights_BT.astype(jnp.float32)
    correct = (pred_BT == targets_BT).astype(jnp.float32) * w
    acc_B = correct.sum(-1) / jnp.maximum(w.sum(-1), 1.0)
    exact_B = jnp.all((pred_BT == targets_BT) | (w == 0), axis=-1).astype(jnp.float32)
    return exact_B, acc_B


# ----------------------------------------------------------------------------- modules


class _Dense(nnx.Module):
    """y = x W + b with logical axes on W."""

    def __init__(self, d_in: int, d_out: int, axes, *, std: float, bias: float = 0.0, rngs: nnx.Rngs):
        self.w = param(truncated_normal(rngs.params(), (d_in, d_out), std), axes)
        self.b = param(jnp.full((d_out,), bias, jnp.float32), (axes[1],))

    def __call__(self, x):
        return jnp.einsum("...i,io->...o", x, self.w[...]) + self.b[...]


class GramModel(TokenModel, nnx.Module):
    """GRAM on a TRM/HRM two-level core; see the module docstring."""

    def __init__(self, cfg: GramConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.d_model
        std = 1.0 / math.sqrt(d)
        block_cfg = BlockConfig(
            d_model=d,
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_heads,
            head_dim=cfg.head_dim,
            mlp_dim=cfg.mlp_dim,
            norm_style="post",
            norm_eps=cfg.norm_eps,
            norm_scale=False,
            mask_kind="bidirectional",
            rope_theta=cfg.rope_theta,
        )
        make = lambda n: nnx.List([Block(block_cfg, init_std=std, out_init_std=std, rngs=rngs) for _ in range(n)])
        self.f_l = make(cfg.num_layers_l)
        self.f_h = make(cfg.num_layers_h)
        self.embed = Embed(cfg.vocab_size, d, init_std=std, rngs=rngs)
        self.target_embed = Embed(cfg.vocab_size, d, init_std=std, rngs=rngs)
        self.out_head = Unembed(d, cfg.vocab_size, init_std=std, rngs=rngs)
        small = 0.01 * std  # noise heads start near N(0, init_sigma^2)
        self.prior_mu = _Dense(d, d, ("embed", None), std=small, rngs=rngs)
        self.prior_log_sigma = _Dense(d, d, ("embed", None), std=small, bias=cfg.init_log_sigma, rngs=rngs)
        self.post_mu = _Dense(2 * d, d, ("embed", None), std=small, rngs=rngs)
        self.post_log_sigma = _Dense(2 * d, d, ("embed", None), std=small, bias=cfg.init_log_sigma, rngs=rngs)
        self.halt_head = _Dense(d, 1, ("embed", None), std=std, bias=-3.0, rngs=rngs)
        self.reward_hidden = _Dense(2 * d, d, ("embed", "mlp"), std=1.0 / math.sqrt(2 * d), rngs=rngs)
        self.reward_out = _Dense(d, 1, ("mlp", None), std=std, rngs=rngs)

    # -- pieces -------------------------------------------------------------------------------

    def initial_state(self, batch: int) -> tuple[jax.Array, jax.Array]:
        """z_0 = (h_0, l_0) [B, T, D]: a constant drawn from cfg.z0_seed (frozen, never trained)."""
        cfg = self.cfg
        k_h, k_l = jax.random.split(jax.random.key(cfg.z0_seed))
        h_TD = jax.random.truncated_normal(k_h, -2.0, 2.0, (cfg.seq_len, cfg.d_model), jnp.float32)
        l_TD = jax.random.truncated_normal(k_l, -2.0, 2.0, (cfg.seq_len, cfg.d_model), jnp.float32)
        return jnp.broadcast_to(h_TD, (batch, *h_TD.shape)), jnp.broadcast_to(l_TD, (batch, *l_TD.shape))

    def _log_sigma(self, raw):
        return jnp.clip(raw, self.cfg.min_log_sigma, self.cfg.max_log_sigma)

    def prior(self, u_BTD):
        """p_theta(eps | u): (mu, log sigma)."""
        return self.prior_mu(u_BTD), self._log_sigma(self.prior_log_sigma(u_BTD))

    def posterior(self, u_BTD, targets_BT):
        """q_phi(eps | u, y): (mu, log sigma) from [u, embed(y)]."""
        x = jnp.concatenate([u_BTD, self.target_embed(targets_BT)], axis=-1)
        return self.post_mu(x), self._log_sigma(self.post_log_sigma(x))

    def deterministic_part(self, h_BTD, l_BTD, x_BTD, positions_BT, segment_ids_BT):
        """K updates l <- f_L(l, h + e_x), then u = f_H(h, l). Returns (u, l)."""
        for _ in range(self.cfg.l_cycles):  # K is small and static: unrolled inside the one transition step
            l_BTD, _ = apply_stack(self.f_l, l_BTD + h_BTD + x_BTD, positions_BT, segment_ids_BT)
        u_BTD, _ = apply_stack(self.f_h, h_BTD + l_BTD, positions_BT, segment_ids_BT)
        return u_BTD, l_BTD

    def transition(self, state, x_BTD, positions_BT, segment_ids_BT, key, targets_BT=None):
        """One stochastic transition; posterior noise when targets are given, else prior.

        Returns (new state, (u, posterior params or None, prior params)).
        """
        h_BTD, l_BTD = state
        u_BTD, l_BTD = self.deterministic_part(h_BTD, l_BTD, x_BTD, positions_BT, segment_ids_BT)
        prior = self.prior(u_BTD)
        post = None if targets_BT is None else self.posterior(u_BTD, targets_BT)
        mu, log_sigma = prior if post is None else post
        eps_BTD = mu + jnp.exp(log_sigma) * jax.random.normal(key, u_BTD.shape, jnp.float32)
        return (u_BTD + eps_BTD, l_BTD), (u_BTD, post, prior)

    def embed_inputs(self, inputs_BT):
        return self.embed(inputs_BT) * math.sqrt(self.cfg.d_model)

    def logits(self, h_BTD):
        return self.out_head(h_BTD)

    def halt_logit(self, h_BTD):
        """q_halt on the first position (TRM)."""
        return self.halt_head(h_BTD[:, 0])[..., 0]

    def reward(self, h_BTD, l_BTD, weights_BT):
        """v_psi(z): logit of the latent process reward (mean-pooled MLP over real cells)."""
        hid = jax.nn.gelu(self.reward_hidden(jnp.concatenate([h_BTD, l_BTD], axis=-1)))
        w = weights_BT.astype(jnp.float32)[..., None]
        pooled = (hid * w).sum(1) / jnp.maximum(w.sum(1), 1.0)
        return self.reward_out(pooled)[..., 0]

    def _check_inputs(self, inputs_BT):
        if inputs_BT.ndim != 2 or inputs_BT.shape[1] != self.cfg.seq_len:
            raise ValueError(
                f"inputs must be [batch, model.seq_len={self.cfg.seq_len}] token ids, got shape {inputs_BT.shape}"
            )

    def transition_step(self):
        """(step, params) for the loop engine: ``step(params, state, inputs, *, index) -> state``.

        ``inputs = (x_BTD, positions_BT, segment_ids_BT, noise_targets_BT or None, key)``; transition ``index``
        draws its noise from ``fold_in(key, index)`` (posterior noise when targets are given, else prior).
        Every differentiable value (weights, x) enters through ``params`` / ``inputs``, so the engine's
        gradient-free steps really are gradient free.
        """
        graphdef, params = nnx.split(self)

        def step(params, state, inputs, *, index):
            x_BTD, positions_BT, segment_ids_BT, targets_BT, key = inputs
            model = nnx.merge(graphdef, params)
            key_t = jax.random.fold_in(key, index)
            state, _ = model.transition(state, x_BTD, positions_BT, segment_ids_BT, key_t, targets_BT)
            return state

        return step, params

    def transition_step_with_u(self):
        """Like `transition_step`, with carry ``(state, u)``: u = f_H(h, l) of the transition just run
        (recorded by the paper objective to score the KL of every transition)."""
        graphdef, params = nnx.split(self)

        def step(params, carry, inputs, *, index):
            x_BTD, positions_BT, segment_ids_BT, targets_BT, key = inputs
            model = nnx.merge(graphdef, params)
            key_t = jax.random.fold_in(key, index)
            state, (u_BTD, _, _) = model.transition(carry[0], x_BTD, positions_BT, segment_ids_BT, key_t, targets_BT)
            return state, u_BTD

        return step, params

    # -- inference ----------------------------------------------------------------------------

    def prior_trajectory(self, inputs_BT, positions_BT, segment_ids_BT, key, num_steps):
        """Final state (h, l) of ``num_steps`` prior transitions from z_0; transition t uses fold_in(key, t).

        One noise stream for every depth: a trajectory of depth n is the first n transitions of any longer
        one with the same key, whether ``num_steps`` is a Python int or traced. (For JAX's default
        threefry keys, ``fold_in(key, t) == jax.random.split(key, n)[t]``, the keys this model used
        before its loops moved onto the engine, so its outputs are unchanged.) A static depth is
        differentiable; a traced one (test-time depth, ``Trainer.evaluate``) runs gradient-free.
        """
        self._check_inputs(inputs_BT)
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(inputs_BT.shape[1], dtype=jnp.int32), inputs_BT.shape)
        x_BTD = self.embed_inputs(inputs_BT)
        step, params = self.transition_step()
        state, _ = unroll(
            step,
            params,
            self.initial_state(inputs_BT.shape[0]),
            (x_BTD, positions_BT, segment_ids_BT, None, key),
            num_steps=num_steps,
            grad_steps=None if is_static_int(num_steps) else 0,
            with_index=True,
        )
        return state

    def rollout(self, inputs_BT, positions_BT, segment_ids_BT, weights_BT, key, depth: int):
        """One prior trajectory of ``depth`` transitions from z_0 -> (prediction [B, T], reward logit, halt logit)."""
        h, l = self.prior_trajectory(inputs_BT, positions_BT, segment_ids_BT, key, depth)
        pred_BT = jnp.argmax(self.logits(h), axis=-1).astype(jnp.int32)
        return pred_BT, self.reward(h, l, weights_BT), self.halt_logit(h)

    def sample_trajectories(self, batch: dict, key, *, num_samples: int, depth: int | None = None) -> dict:
        """N prior trajectories in parallel (vmap over per-trajectory keys split from ``key``).

        Returns preds [N, B, T], reward [N, B] (logits), halt [N, B] (logits).
        """
        depth = self.cfg.eval_transitions if depth is None else depth
        if num_samples < 1 or depth < 1:
            raise ValueError(f"num_samples and depth must be >= 1, got {num_samples} and {depth}")
        weights = batch.get("weights", jnp.ones(batch["inputs"].shape, jnp.float32))
        graphdef, params = nnx.split(self)

        def one(k):
            return nnx.merge(graphdef, params).rollout(
                batch["inputs"], batch["positions"], batch["segment_ids"], weights, k, depth
            )

        preds, reward, halt = jax.vmap(one)(jax.random.split(key, num_samples))
        return {"preds": preds, "reward": reward, "halt": halt}

    def __call__(self, inputs_BT, *, positions_BT=None, segment_ids_BT=None, num_loops=None, rng=None) -> jax.Array:
        """Logits [B, T, V] of one prior trajectory of ``num_loops`` (default eval_transitions) transitions.

        ``num_loops`` may be a traced int32 (one compile for every depth, gradient-free); ``rng`` None is
        ``jax.random.key(0)``; positions default to 0..T-1. See `prior_trajectory` for the noise stream.
        """
        depth = self.cfg.eval_transitions if num_loops is None else num_loops
        key = jax.random.key(0) if rng is None else rng
        h, _ = self.prior_trajectory(inputs_BT, positions_BT, segment_ids_BT, key, depth)
        return self.logits(h)

    # -- training -----------------------------------------------------------------------------

    def supervision_step(self, state, x_BTD, batch, key):
        """One deep-supervision step from a detached state -> (new detached state, loss, metrics).

        Transitions 0..n-2 run on the engine with no gradient (``grad_steps=0``); transition n-1 carries
        the gradient (`last_transition_loss`). Transition t draws from fold_in(key, t), its prior resample
        from fold_in(key, n) (n = num_transitions).
        """
        cfg = self.cfg
        n = cfg.num_transitions
        noise_targets = batch["targets"] if cfg.carry_posterior else None  # prior noise by default, as at inference
        step, params = self.transition_step()
        # The incoming state is detached here too: with n = 1 the engine's no-grad prefix is empty.
        state, _ = unroll(
            step,
            params,
            jax.lax.stop_gradient(state),
            (x_BTD, batch["positions"], batch["segment_ids"], noise_targets, key),
            num_steps=n - 1,
            grad_steps=0,
            with_index=True,
        )
        return self.last_transition_loss(
            state, x_BTD, batch, jax.random.fold_in(key, n - 1), jax.random.fold_in(key, n)
        )

    def last_transition_loss(self, state, x_BTD, batch, key, prior_key):
        """The transition that carries gradient, and the step's losses -> (detached new state, loss, metrics)."""
        cfg = self.cfg
        sg = jax.lax.stop_gradient
        positions, segment_ids = batch["positions"], batch["segment_ids"]
        targets, weights = batch["targets"], batch["weights"].astype(jnp.float32)
        (h, l), (u, (mu_q, ls_q), (mu_p, ls_p)) = self.transition(state, x_BTD, positions, segment_ids, key, targets)
        denom = jnp.maximum(weights.sum(), 1.0)
        logits = self.logits(h)
        ce_of = lambda logits_BTV: cross_entropy(logits_BTV, targets, weights)[0]  # weighted mean over cells
        ce = ce_of(logits)
        kl_BT = balanced_kl(mu_q, ls_q, mu_p, ls_p, cfg.kl_balance).sum(-1)
        kl = (kl_BT * weights).sum() / denom
        pred = jnp.argmax(logits, -1)
        exact_B, acc_B = exact_and_accuracy(pred, targets, weights)
        halt_B = self.halt_logit(h)
        halt_loss = binary_cross_entropy_with_logits(halt_B, exact_B).mean()
        # The prior-sampled last transition from the same u (the inference path): CE on it (weight
        # prior_ce_weight, reparameterised) and the critic, which scores it without shaping the latent.
        eps_p = mu_p + jnp.exp(ls_p) * jax.random.normal(prior_key, u.shape, jnp.float32)
        h_prior = u + eps_p
        logits_prior = self.logits(h_prior)
        ce_prior = ce_of(logits_prior)
        _, acc_prior_B = exact_and_accuracy(jnp.argmax(sg(logits_prior), -1), targets, weights)
        reward_B = self.reward(sg(h_prior), sg(l), weights)
        reward_loss = binary_cross_entropy_with_logits(reward_B, acc_prior_B).mean()
        loss = ce + cfg.beta * kl + cfg.halt_weight * halt_loss + cfg.reward_weight * reward_loss
        loss = loss + cfg.prior_ce_weight * ce_prior
        metrics = {
            "ce": ce,
            "ce_prior": ce_prior,
            "kl": kl,
            "halt_loss": halt_loss,
            "reward_loss": reward_loss,
            "accuracy": acc_B.mean(),
            "exact": exact_B.mean(),
            "prior_accuracy": acc_prior_B.mean(),
            "halt_accuracy": ((halt_B > 0) == (exact_B > 0.5)).astype(jnp.float32).mean(),
            "sigma_prior": jnp.exp(ls_p).mean(),
        }
        return sg((h if cfg.carry_posterior else h_prior, l)), loss, metrics

    def loss(self, batch: dict, *, rng, train: bool = True, carry: dict | None = None) -> LossOutput:
        """Deep supervision unrolled in the loss: mean over supervision steps (metrics of the last step).

        With ``objective="paper"`` this is `paper_loss` (one supervision step per call, a trainer carry).
        Otherwise stateless for the trainer (``carry`` is unused, `LossOutput.carry` is None): every batch starts
        from z_0. Supervision step m uses the key fold_in(rng, m); the engine records each step's loss and
        metrics, and the state passed between steps is detached by `last_transition_loss`.
        """
        if self.cfg.objective == "paper":
            return self.paper_loss(batch, rng=rng, train=train, carry=carry)
        del train, carry  # the posterior needs targets, which every batch has; evaluation uses __call__ / sampling
        inputs = batch["inputs"]
        self._check_inputs(inputs)
        x_BTD = self.embed_inputs(inputs)
        graphdef, params = nnx.split(self)

        def step(params, carry, step_inputs, *, index):  # one compiled body serves every supervision step
            x_BTD, batch = step_inputs
            model = nnx.merge(graphdef, params)
            return model.supervision_step(carry[0], x_BTD, batch, jax.random.fold_in(rng, index))

        state0 = self.initial_state(inputs.shape[0])
        shapes = jax.eval_shape(lambda: step(params, (state0, None, None), (x_BTD, batch), index=jnp.int32(0)))
        zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)
        _, (loss_M, metrics_M) = unroll(
            step,
            params,
            (state0, zeros(shapes[1]), zeros(shapes[2])),
            (x_BTD, batch),
            num_steps=self.cfg.supervision_steps,
            record_fn=lambda carry: carry[1:],
            with_index=True,
        )
        loss = loss_M.mean()
        metrics = {k: v[-1] for k, v in metrics_M.items()}  # the last supervision step
        metrics["first_step_exact"] = metrics_M["exact"][0]
        metrics["loss"] = loss
        return LossOutput(loss, metrics)

    # -- the paper's objective: TRM deep supervision with a carry ------------------------------

    def initial_carry(self, batch_size: int) -> dict | None:
        """``objective="paper"``: the per-row deep-supervision carry (`act.initial_act_carry` over
        z = (h, l); every row starts halted and loads an example at its first step). Else None."""
        if self.cfg.objective != "paper":
            return None
        return act.initial_act_carry(self.initial_state(batch_size), batch_size, self.cfg.seq_len)

    def paper_transitions(self, state, x_BTD, batch: dict, key):
        """One supervision step of the paper's objective -> (detached new state, loss, metrics, halt_B).

        Every transition samples the posterior (the training trajectory is posterior-sampled); the first
        n - 1 run on the engine without gradient and record u_t; the KL of each of them is scored by the
        heads on stop_gradient(u_t) (their gradient reaches the prior and posterior heads only: the
        trajectory itself is truncated as in TRM), and the last transition is `last_transition_loss`
        (CE, its KL, halting and reward heads). Loss = CE + beta * sum_t KL_t + halt + reward terms.
        Transition t draws from fold_in(key, t), the critic's prior resample from fold_in(key, n).
        """
        cfg = self.cfg
        n = cfg.num_transitions
        sg = jax.lax.stop_gradient
        targets, weights = batch["targets"], batch["weights"].astype(jnp.float32)
        step, params = self.transition_step_with_u()
        zero_u = jnp.zeros(x_BTD.shape, jnp.float32)
        (state, _), u_tBTD = unroll(
            step,
            params,
            (sg(state), zero_u),
            (x_BTD, batch["positions"], batch["segment_ids"], targets, key),
            num_steps=n - 1,
            grad_steps=0,
            with_index=True,
            record_fn=lambda carry: carry[1],
        )
        state, loss, metrics = self.last_transition_loss(
            state, x_BTD, batch, jax.random.fold_in(key, n - 1), jax.random.fold_in(key, n)
        )
        denom = jnp.maximum(weights.sum(), 1.0)
        kl_earlier = jnp.zeros((), jnp.float32)
        if n > 1:
            u_tBTD = sg(u_tBTD)
            mu_q, ls_q = self.posterior(u_tBTD, jnp.broadcast_to(targets, u_tBTD.shape[:-1]))
            mu_p, ls_p = self.prior(u_tBTD)
            kl_tBT = balanced_kl(mu_q, ls_q, mu_p, ls_p, cfg.kl_balance).sum(-1)
            kl_earlier = (kl_tBT * weights).sum() / denom  # summed over the n - 1 earlier transitions
        loss = loss + cfg.beta * kl_earlier
        metrics = dict(metrics, kl_all=metrics["kl"] + kl_earlier, loss=loss)
        return state, loss, metrics, self.halt_logit(state[0])

    def paper_loss(self, batch: dict, *, rng, train: bool = True, carry: dict | None = None) -> LossOutput:
        """The paper's objective: one supervision step per training step for every row of the carry.

        Rows that halted at the previous step restart from z_0 on the incoming batch's example
        (`act.reset_rows`); after the step a row halts when it has run ``supervision_steps`` steps or,
        in training, when q_halt > 0 and it has run at least a random minimum (with probability
        ``halt_exploration_prob`` a minimum drawn from U{2..supervision_steps}, else none; TRM Sec. 4.6).
        The step's noise key is fold_in(rng, 0), the exploration draw uses fold_in(rng, 1).
        """
        cfg = self.cfg
        inputs = batch["inputs"]
        self._check_inputs(inputs)
        batch_size = inputs.shape[0]
        if carry is None:
            carry = self.initial_carry(batch_size)
        state, steps_B, data = act.reset_rows(carry, batch, self.initial_state(batch_size))
        positions = jnp.broadcast_to(jnp.arange(cfg.seq_len, dtype=jnp.int32), inputs.shape)
        step_batch = dict(data, positions=positions, segment_ids=None)
        x_BTD = self.embed_inputs(data["inputs"])
        state, loss, metrics, halt_B = self.paper_transitions(state, x_BTD, step_batch, jax.random.fold_in(rng, 0))
        steps_B = steps_B + 1
        halted_B = steps_B >= cfg.supervision_steps
        if train and cfg.supervision_steps > 1:
            signal_B = jax.lax.stop_gradient(halt_B) > 0
            k_explore, k_min = jax.random.split(jax.random.fold_in(rng, 1))
            explore_B = jax.random.uniform(k_explore, steps_B.shape) < cfg.halt_exploration_prob
            min_B = jnp.where(explore_B, jax.random.randint(k_min, steps_B.shape, 2, cfg.supervision_steps + 1), 0)
            halted_B = halted_B | (signal_B & (steps_B >= min_B))
        new_carry = {"z": jax.lax.stop_gradient(state), "steps": steps_B, "halted": halted_B, "data": data}
        metrics = dict(metrics, steps=steps_B.astype(jnp.float32).mean(), halted=halted_B.astype(jnp.float32).mean())
        return LossOutput(loss, metrics, new_carry)

    def halting_rollout(self, inputs_BT, positions_BT, segment_ids_BT, weights_BT, key, max_segments: int) -> tuple:
        """One prior trajectory halted by the halting head, as at test time in the paper.

        Runs ``max_segments`` supervision steps of ``num_transitions`` prior transitions (transition t
        from fold_in(key, t): the same noise as `prior_trajectory`) and stops after the first step whose
        q_halt > 0 (the last if none). Returns (prediction [B, T], reward logit [B], halt logit [B] and
        transitions run [B], all at the halting step).
        """
        cfg = self.cfg
        self._check_inputs(inputs_BT)
        n = cfg.num_transitions
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(inputs_BT.shape[1], dtype=jnp.int32), inputs_BT.shape)
        x_BTD = self.embed_inputs(inputs_BT)
        step, params = self.transition_step()
        graphdef = nnx.graphdef(self)

        def record(state):
            model = nnx.merge(graphdef, params)
            h, l = state
            pred_BT = jnp.argmax(model.logits(h), axis=-1).astype(jnp.int32)
            return pred_BT, model.reward(h, l, weights_BT), model.halt_logit(h)

        _, (pred_tBT, reward_tB, halt_tB) = unroll(
            step,
            params,
            self.initial_state(inputs_BT.shape[0]),
            (x_BTD, positions_BT, segment_ids_BT, None, key),
            num_steps=max_segments * n,
            grad_steps=0,
            with_index=True,
            record_fn=record,
        )
        ends = slice(n - 1, None, n)  # the records after each supervision step
        pred_SBT, reward_SB, halt_SB = pred_tBT[ends], reward_tB[ends], halt_tB[ends]
        signal_SB = (halt_SB > 0).at[-1].set(True)
        index_B = jnp.argmax(signal_SB, axis=0)
        take = lambda x: jnp.take_along_axis(x, index_B.reshape((1, -1) + (1,) * (x.ndim - 2)), axis=0)[0]
        return take(pred_SBT), take(reward_SB), take(halt_SB), (index_B + 1) * n

    def sample_halting(self, batch: dict, key, *, num_samples: int, max_segments: int | None = None) -> dict:
        """N halted prior trajectories in parallel (vmap over keys split from ``key``, as `sample_trajectories`).

        Returns preds [N, B, T], reward [N, B], halt [N, B] and depth [N, B] (transitions run), at each
        trajectory's halting step; ``max_segments`` defaults to ``supervision_steps``.
        """
        max_segments = self.cfg.supervision_steps if max_segments is None else max_segments
        if num_samples < 1 or max_segments < 1:
            raise ValueError(f"num_samples and max_segments must be >= 1, got {num_samples} and {max_segments}")
        weights = batch.get("weights", jnp.ones(batch["inputs"].shape, jnp.float32))
        graphdef, params = nnx.split(self)

        def one(k):
            return nnx.merge(graphdef, params).halting_rollout(
                batch["inputs"], batch.get("positions"), batch.get("segment_ids"), weights, k, max_segments
            )

        preds, reward, halt, depth = jax.vmap(one)(jax.random.split(key, num_samples))
        return {"preds": preds, "reward": reward, "halt": halt, "depth": depth}

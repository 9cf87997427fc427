"""Recurrent-depth transformer (Geiping et al. 2025, "Scaling up Test-Time Compute with
Latent Reasoning: A Recurrent Depth Approach").

    e   = P(gamma * E(x))                        prelude, gamma = sqrt(d)          (Eq. 1)
    s_0 ~ TruncNormal(0, sigma^2 I_{n*h}), sigma = sqrt(2/5), cut at 3 sigma
    s_i = R(A([s_{i-1}; e]))   for i = 1..r      adapter A: 2d -> d, core R shared
    p   = H(n(C(n(s_r))))                        coda C, head H tied to E

Training samples the depth per step, tau ~ N(log max(r_bar, k) - sigma^2/2, sigma), r =
Poisson(e^tau) + 1 (Eq. 2 with the reference's max; E[r] = max(r_bar, k) + 1), and
backpropagates through only the last k iterations (truncated backprop, Sec. 3.3). The loop
runs through `looped_jax.recurrence.unroll` with a traced depth, so one compile serves every sampled r.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from looped_jax.config import check_model_field as _check
from looped_jax.losses import cross_entropy
from looped_jax.models.huginn_exit import ExitRule, adaptive_loop, resolve_exit_rule
from looped_jax.models.protocol import LossOutput, TokenModel
from looped_jax.nn import (
    Block,
    BlockConfig,
    Embed,
    KVCache,
    RMSNorm,
    Unembed,
    apply_stack,
    param,
    resolve_dtype,
    takase_std,
    truncated_normal,
)
from looped_jax.nn.linear import dense
from looped_jax.recurrence import REMAT_POLICIES, is_static_int, unroll

STATE_INIT_STD = math.sqrt(2.0 / 5.0)
_DEFAULT_RULE = ExitRule()  # latent-diff, threshold 0.03 (the reference's default criterion values)


@dataclasses.dataclass(frozen=True)
class RecurrentDepthConfig:
    """Recurrent-depth model. Defaults: a small model with the paper's 2/4/2 layout."""

    name: str = "recurrent_depth"
    vocab_size: int = 259
    d_model: int = 256
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 64
    mlp_dim: int = 768
    num_prelude_layers: int = 2
    num_core_layers: int = 4
    num_coda_layers: int = 2
    mean_loops: int = 32  # r_bar
    loop_sigma: float = 0.5  # sigma of the log-normal rate
    grad_steps: int = 8  # k: iterations with gradient
    max_train_loops: int = 0  # cap on the sampled r; 0 = none
    eval_loops: int = 0  # loop count for evaluation when none is given; 0 = mean_loops
    init_scale: float = 1.0  # scales the std of s_0; 0 = zero initial state
    rope_theta: float = 50_000.0
    norm_eps: float = 1e-6
    dtype: str = "float32"  # compute dtype; parameters stay float32
    remat_policy: str = ""  # "" = none, else a name in recurrence.REMAT_POLICIES
    # Parcae-style stable injection: x = a * s + B RMSNorm(e) with a = exp(-(exp(log_rate) + 1e-3)) in
    # (0, 0.999] per channel (a negative-exponential diagonal), so the adapter's state path has
    # spectral radius < 1 by construction. False: the paper's adapter A([s; e]) (bit-identical to
    # before the option existed).
    stable_injection: bool = False
    # Retrofitted-transformer layout (scripts/retrofit.py; McLeish et al. 2025): the defaults are the
    # Huginn layout above. "pre" blocks (x + Attn(n(x))), no q/k bias, no sqrt(d) embedding scale,
    # an untied output head, and no RMSNorm between the last core state and the coda.
    norm_style: str = "sandwich"
    qk_bias: bool = True
    scale_embeddings: bool = True
    tie_embeddings: bool = True
    coda_input_norm: bool = True

    def __post_init__(self):
        _check(self.name == "recurrent_depth", "name", "'recurrent_depth'", self.name)
        for f in ("vocab_size", "d_model", "num_heads", "num_kv_heads", "head_dim", "mlp_dim", "num_core_layers"):
            _check(getattr(self, f) >= 1, f, ">= 1", getattr(self, f))
        for f in ("num_prelude_layers", "num_coda_layers", "max_train_loops", "eval_loops"):
            _check(getattr(self, f) >= 0, f, ">= 0", getattr(self, f))
        _check(self.num_heads % self.num_kv_heads == 0, "num_heads", "a multiple of num_kv_heads", self.num_heads)
        _check(self.head_dim % 2 == 0, "head_dim", "even (rotary embeddings)", self.head_dim)
        _check(self.mean_loops >= 1, "mean_loops", ">= 1", self.mean_loops)
        _check(self.loop_sigma >= 0, "loop_sigma", ">= 0", self.loop_sigma)
        _check(self.grad_steps >= 1, "grad_steps", ">= 1", self.grad_steps)
        _check(self.init_scale >= 0, "init_scale", ">= 0", self.init_scale)
        _check(self.rope_theta > 0, "rope_theta", "> 0", self.rope_theta)
        _check(self.norm_eps > 0, "norm_eps", "> 0", self.norm_eps)
        _check(self.dtype in ("float32", "bfloat16"), "dtype", "'float32' or 'bfloat16'", self.dtype)
        _check(self.norm_style in ("sandwich", "pre"), "norm_style", "'sandwich' or 'pre'", self.norm_style)
        _check(
            self.remat_policy == "" or self.remat_policy in REMAT_POLICIES,
            "remat_policy",
            f"'' or one of {sorted(REMAT_POLICIES)}",
            self.remat_policy,
        )

    @property
    def effective_depth(self) -> int:
        """prelude + core * r_bar + coda: the depth used to scale output-projection init."""
        return self.num_prelude_layers + self.num_core_layers * self.mean_loops + self.num_coda_layers

    @property
    def default_eval_loops(self) -> int:
        return self.eval_loops or self.mean_loops

    def block_config(self) -> BlockConfig:
        return BlockConfig(
            d_model=self.d_model,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            mlp_dim=self.mlp_dim,
            norm_style=self.norm_style,
            norm_eps=self.norm_eps,
            mask_kind="causal",
            qk_bias=self.qk_bias,
            rope_theta=self.rope_theta,
            dtype=self.dtype,
        )


class RecurrentCore(nnx.Module):
    """Adapter (bias-free Linear 2d -> d on [s; e]) followed by the shared core blocks."""

    def __init__(self, cfg: RecurrentDepthConfig, *, init_std: float, out_init_std: float, rngs: nnx.Rngs):
        self.dtype = resolve_dtype(cfg.dtype)
        d = cfg.d_model
        self.stable_injection = cfg.stable_injection
        if cfg.stable_injection:
            # a = exp(-(exp(log_rate) + 1e-3)) = 1/2 at init; B on the normalised prelude output.
            self.log_rate_D = param(jnp.full((d,), math.log(math.log(2.0) - 1e-3), jnp.float32), ("embed",))
            self.inject_ED = param(truncated_normal(rngs.params(), (d, d), init_std), ("mlp", "embed"))
            self.inject_norm = RMSNorm(d, eps=cfg.norm_eps)
        else:
            self.adapter_ED = param(truncated_normal(rngs.params(), (2 * d, d), init_std), ("mlp", "embed"))
        bcfg = cfg.block_config()
        self.blocks = nnx.List(
            [Block(bcfg, init_std=init_std, out_init_std=out_init_std, rngs=rngs) for _ in range(cfg.num_core_layers)]
        )

    def __call__(
        self,
        s_BTD: jax.Array,
        e_BTD: jax.Array,
        positions_BT: jax.Array,
        segment_ids_BT: jax.Array | None = None,
        *,
        caches: KVCache | None = None,
        cache_index: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """One loop iteration. ``caches`` (optional) stacks one KVCache per core layer on axis 0."""
        x_BTD = self.inject(s_BTD, e_BTD)
        per_layer = None
        if caches is not None:
            per_layer = [jax.tree.map(lambda a, i=i: a[i], caches) for i in range(len(self.blocks))]
        x_BTD, new = apply_stack(
            self.blocks, x_BTD, positions_BT, segment_ids_BT, caches=per_layer, cache_index=cache_index
        )
        if new is not None:
            new = jax.tree.map(lambda *a: jnp.stack(a), *new)
        return x_BTD, new

    def inject(self, s_BTD: jax.Array, e_BTD: jax.Array) -> jax.Array:
        """The core's input: A([s; e]), or a * s + B RMSNorm(e) with stable injection (float32); the
        rate floor 1e-3 keeps a <= exp(-1e-3) < 1 in float32 however small log_rate gets."""
        if self.stable_injection:
            a_D = jnp.exp(-(jnp.exp(self.log_rate_D[...]) + 1e-3))
            inj_BTD = dense(self.inject_norm(e_BTD).astype(self.dtype), self.inject_ED[...].astype(self.dtype))
            return a_D * s_BTD.astype(jnp.float32) + inj_BTD.astype(jnp.float32)
        se_BTE = jnp.concatenate([s_BTD, e_BTD], axis=-1).astype(self.dtype)
        return dense(se_BTE, self.adapter_ED[...].astype(self.dtype)).astype(jnp.float32)


class AdaptiveOutput(NamedTuple):
    """Result of `RecurrentDepthModel.adaptive_forward`."""

    logits_BTV: jax.Array  # float32
    steps_BT: jax.Array  # int32 core iterations each token used
    converged_BT: jax.Array  # bool; False where max_loops ran out first


class RecurrentDepthModel(TokenModel, nnx.Module):
    """Prelude -> shared recurrent core (r iterations) -> coda -> tied head."""

    def __init__(self, cfg: RecurrentDepthConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        std = takase_std(cfg.d_model)
        out_std = std / math.sqrt(2 * cfg.effective_depth)
        bcfg = cfg.block_config()
        self.embed = Embed(cfg.vocab_size, cfg.d_model, init_std=std, dtype=resolve_dtype(cfg.dtype), rngs=rngs)
        make = lambda n: nnx.List([Block(bcfg, init_std=std, out_init_std=out_std, rngs=rngs) for _ in range(n)])
        self.prelude = make(cfg.num_prelude_layers)
        self.core = RecurrentCore(cfg, init_std=std, out_init_std=out_std, rngs=rngs)
        self.coda = make(cfg.num_coda_layers)
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.unembed = Unembed(cfg.d_model, cfg.vocab_size, init_std=std, dtype=resolve_dtype(cfg.dtype), rngs=rngs)

    # ----------------------------------------------------------------------------------------
    # Pieces, shared with cached generation.

    def embed_tokens(self, inputs_BT: jax.Array) -> jax.Array:
        """gamma * E(x) with gamma = sqrt(d) (1 without ``scale_embeddings``), in the float32 residual stream."""
        e_BTD = self.embed(inputs_BT).astype(jnp.float32)
        return e_BTD * math.sqrt(self.cfg.d_model) if self.cfg.scale_embeddings else e_BTD

    def initial_state(self, e_BTD: jax.Array, rng: jax.Array | None) -> jax.Array:
        """s_0: truncated normal with std sqrt(2/5) * init_scale (cut at 3 std); zeros when
        ``init_scale == 0`` or no rng is given (deterministic evaluation)."""
        if rng is None or self.cfg.init_scale == 0:
            return jnp.zeros(e_BTD.shape, jnp.float32)
        return truncated_normal(rng, e_BTD.shape, STATE_INIT_STD * self.cfg.init_scale)

    def head(self, x_BTD: jax.Array) -> jax.Array:
        x_BTD = self.final_norm(x_BTD)
        return self.embed.attend(x_BTD) if self.cfg.tie_embeddings else self.unembed(x_BTD)

    def core_step_fn(self):
        """(step, params): pure ``step(params, s_BTD, (e_BTD, positions_BT, segment_ids_BT))``."""
        graphdef, params = nnx.split(self.core)

        def step(params, s_BTD, inputs):
            e_BTD, positions_BT, segment_ids_BT = inputs
            s_BTD, _ = nnx.merge(graphdef, params)(s_BTD, e_BTD, positions_BT, segment_ids_BT)
            return s_BTD

        return step, params

    def readout_fn(self, positions_BT: jax.Array, segment_ids_BT: jax.Array | None):
        """(readout, params): pure ``readout(params, s_BTD) -> logits``: norm, coda, norm, tied head
        (without ``coda_input_norm`` the first norm is skipped; without ``tie_embeddings`` the head
        is the untied ``unembed``)."""
        cfg = self.cfg
        head = self.embed if cfg.tie_embeddings else self.unembed
        graphdefs, params = zip(*(nnx.split(m) for m in (self.coda, self.final_norm, head)), strict=True)

        def readout(params, s_BTD):
            coda, norm, head = (nnx.merge(g, p) for g, p in zip(graphdefs, params, strict=True))
            x_BTD, _ = apply_stack(coda, norm(s_BTD) if cfg.coda_input_norm else s_BTD, positions_BT, segment_ids_BT)
            x_BTD = norm(x_BTD)
            return head.attend(x_BTD) if cfg.tie_embeddings else head(x_BTD)

        return readout, params

    def _prepare(self, inputs_BT, positions_BT, segment_ids_BT):
        if inputs_BT.ndim != 2:
            raise ValueError(f"inputs must be [batch, length] token ids, got shape {inputs_BT.shape}")
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(inputs_BT.shape[1], dtype=jnp.int32), inputs_BT.shape)
        e_BTD, _ = apply_stack(self.prelude, self.embed_tokens(inputs_BT), positions_BT, segment_ids_BT)
        return e_BTD, positions_BT

    def _logits(self, s_BTD, positions_BT, segment_ids_BT):
        readout, params = self.readout_fn(positions_BT, segment_ids_BT)
        return readout(params, s_BTD)

    # ----------------------------------------------------------------------------------------
    # Public API.

    def __call__(
        self,
        inputs_BT: jax.Array,
        *,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        num_loops: int | jax.Array | None = None,
        rng: jax.Array | None = None,
    ) -> jax.Array:
        """Logits [B, T, V] (float32) after ``num_loops`` core iterations (default: eval_loops).

        Without ``rng`` the initial state is s_0 = 0 (deterministic); the reference always samples
        s_0 unless init_scale = 0, so pass an ``rng`` to match it.

        ``num_loops`` may be a traced int32: one compile then serves every value.
        """
        logits_BTV, _ = self.forward(
            inputs_BT, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT, num_loops=num_loops, rng=rng
        )
        return logits_BTV

    def forward(
        self,
        inputs_BT: jax.Array,
        *,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        num_loops: int | jax.Array | None = None,
        rng: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """(logits_BTV, final latent s_r [B, T, D]); truncated backprop through the last k steps."""
        cfg = self.cfg
        num_loops = cfg.default_eval_loops if num_loops is None else num_loops
        e_BTD, positions_BT = self._prepare(inputs_BT, positions_BT, segment_ids_BT)
        s_BTD = self.initial_state(e_BTD, rng)
        step, params = self.core_step_fn()
        s_BTD, _ = unroll(
            step,
            params,
            s_BTD,
            (e_BTD, positions_BT, segment_ids_BT),
            num_steps=num_loops,
            grad_steps=cfg.grad_steps,
            remat_policy=cfg.remat_policy or None,
        )
        return self._logits(s_BTD, positions_BT, segment_ids_BT), s_BTD

    def hidden_states(
        self,
        inputs_BT: jax.Array,
        *,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        num_loops: int | None = None,
        rng: jax.Array | None = None,
    ) -> jax.Array:
        """The core's latent after each of ``num_loops`` iterations (default eval_loops) [S, B, T, D],
        with truncated backprop as in training (``grad_steps``). Used by the latent-prediction objective."""
        cfg = self.cfg
        num_loops = cfg.default_eval_loops if num_loops is None else num_loops
        if not is_static_int(num_loops):
            raise ValueError(f"hidden_states needs a Python int num_loops, got {num_loops!r}")
        e_BTD, positions_BT = self._prepare(inputs_BT, positions_BT, segment_ids_BT)
        step, params = self.core_step_fn()
        _, states_SBTD = unroll(
            step,
            params,
            self.initial_state(e_BTD, rng),
            (e_BTD, positions_BT, segment_ids_BT),
            num_steps=num_loops,
            grad_steps=cfg.grad_steps,
            remat_policy=cfg.remat_policy or None,
            record_fn=lambda s: s,
        )
        return states_SBTD

    def sample_num_loops(self, rng: jax.Array, mean_loops: jax.Array | None = None) -> jax.Array:
        """r = Poisson(e^tau) + 1, tau ~ N(log max(r_bar, k) - sigma^2 / 2, sigma) (Eq. 2 with the
        reference's max(r_bar, k), k = grad_steps); int32 scalar. ``mean_loops`` (a traced float,
        e.g. a recurrence curriculum's current mean) replaces r_bar = cfg.mean_loops."""
        cfg = self.cfg
        tau_key, poisson_key = jax.random.split(rng)
        # The reference (randomized_iteration_sampler) centres on log(t + s) with t = max(r_bar - k, 0),
        # s = k: log(max(r_bar, k)), which differs from log(r_bar) when grad_steps > mean_loops.
        if mean_loops is None:
            mu = math.log(max(cfg.mean_loops, cfg.grad_steps)) - cfg.loop_sigma**2 / 2
        else:
            mu = jnp.log(jnp.maximum(jnp.asarray(mean_loops, jnp.float32), cfg.grad_steps)) - cfg.loop_sigma**2 / 2
        tau = mu + cfg.loop_sigma * jax.random.normal(tau_key, (), jnp.float32)
        r = jax.random.poisson(poisson_key, jnp.exp(tau), (), jnp.int32) + 1
        if cfg.max_train_loops:
            r = jnp.minimum(r, cfg.max_train_loops)
        return r.astype(jnp.int32)

    def loss(
        self,
        batch: dict,
        *,
        rng: jax.Array,
        train: bool = True,
        carry: None = None,
        mean_loops: jax.Array | None = None,
    ) -> LossOutput:
        """Weighted next-token cross-entropy (stateless: ``carry`` is unused). Training samples r
        from ``rng`` (mean ``mean_loops`` when given: the trainer's recurrence curriculum);
        evaluation uses ``eval_loops``. s_0 noise also comes from ``rng``, so a step is
        reproducible everywhere."""
        loop_key, state_key = jax.random.split(rng)
        num_loops = self.sample_num_loops(loop_key, mean_loops) if train else self.cfg.default_eval_loops
        logits_BTV, _ = self.forward(
            batch["inputs"],
            positions_BT=batch.get("positions"),
            segment_ids_BT=batch.get("segment_ids"),
            num_loops=num_loops,
            rng=state_key,
        )
        loss, metrics = cross_entropy(logits_BTV, batch["targets"], batch["weights"])
        metrics["num_loops"] = jnp.asarray(num_loops, jnp.float32)
        return LossOutput(loss, metrics)

    def adaptive_forward(
        self,
        inputs_BT: jax.Array,
        *,
        max_loops: int,
        exit_rule: ExitRule | None = _DEFAULT_RULE,
        freeze: bool = True,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        rng: jax.Array | None = None,
    ) -> AdaptiveOutput:
        """Early exit (Sec. 6) with one named criterion (`looped_jax.models.huginn_exit`: the
        reference's entropy-diff, latent-diff, kl, minp-kl, argmax-stability, cosine with its
        thresholds and start values). Per token, or per row with ``exit_rule.per_sequence``.
        ``exit_rule=None`` (or criterion "none") runs every token ``max_loops`` iterations.

        ``freeze``: an exited token's latent stays fixed while the others step (its keys at later
        steps are recomputed from that latent). ``freeze=False`` keeps every element stepping until
        all exited and reads each one out at its exit latent. Departure: the reference's
        ``forward_with_adaptive_compute`` runs token by token through its KV cache; that is
        `looped_jax.models.generate.adaptive_forward_sequential`. This is the parallel variant.
        s_0 = 0 when no ``rng`` is given (the reference samples s_0 unless init_scale = 0)."""
        rule = resolve_exit_rule(exit_rule)
        e_BTD, positions_BT = self._prepare(inputs_BT, positions_BT, segment_ids_BT)
        s_BTD = self.initial_state(e_BTD, rng)
        step, params = self.core_step_fn()
        readout, readout_params = self.readout_fn(positions_BT, segment_ids_BT)
        inputs = (e_BTD, positions_BT, segment_ids_BT)
        if rule is None:
            s_BTD, _ = unroll(step, params, s_BTD, inputs, num_steps=max_loops)
            steps_BT = jnp.full(inputs_BT.shape, max_loops, jnp.int32)
            return AdaptiveOutput(readout(readout_params, s_BTD), steps_BT, jnp.zeros(inputs_BT.shape, bool))
        result = adaptive_loop(
            lambda s, aux, index, active: (step(params, s, inputs), aux),
            lambda s: readout(readout_params, s),
            s_BTD,
            rule,
            max_steps=max_loops,
            vocab_size=self.cfg.vocab_size,
            freeze=freeze,
        )
        steps, exited = result.steps, result.exited
        if rule.per_sequence:
            steps = jnp.broadcast_to(steps[:, None], inputs_BT.shape)
            exited = jnp.broadcast_to(exited[:, None], inputs_BT.shape)
        return AdaptiveOutput(readout(readout_params, result.out_s), steps, exited)

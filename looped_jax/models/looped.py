"""Looped transformer (Saunshi et al. 2025, "Reasoning with Latent Thoughts: On the Power of
Looped Transformers"): a k-layer block applied L times with shared weights, written (k x L).

    s_0 = E(x)                  (no injection)      s_0 = 0 (with input injection)
    s_l = B(s_{l-1} [+ e])      l = 1..L            e = E(x) added before every loop
    p   = H(n(s_L))

``share_weights=False`` builds the non-looped baseline of the same depth from the same code:
the L loop bodies get their own parameters, stacked on a leading ``layers`` axis and scanned
over, while the looped model closes over one body (DESIGN: shared weights are closed over,
per-iteration weights are stacked). ``block_repeat=r`` applies each layer r times in a row
(MobileLLM's immediate block-wise sharing, Liu et al. 2024) without new parameters.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from looped_jax.config import check_model_field as _check
from looped_jax.losses import cross_entropy
from looped_jax.models.protocol import LossOutput, TokenModel
from looped_jax.nn import Block, BlockConfig, Embed, KVCache, RMSNorm, Unembed, resolve_dtype, takase_std
from looped_jax.recurrence import REMAT_POLICIES, is_static_int, unroll


@dataclasses.dataclass(frozen=True)
class LoopedConfig:
    """(num_layers x num_loops) looped transformer; share_weights=False, num_loops=1 is the
    ordinary fixed-depth baseline."""

    name: str = "looped"
    vocab_size: int = 259
    d_model: int = 256
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 64
    mlp_dim: int = 768
    num_layers: int = 4  # k: layers in the looped block
    num_loops: int = 4  # L: applications of the block
    share_weights: bool = True
    input_injection: bool = False
    block_repeat: int = 1  # apply each layer this many times in a row; 1 = off
    tie_embeddings: bool = True
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    dtype: str = "float32"
    remat_policy: str = ""
    window: int = 0  # > 0: causal sliding-window attention over this many tokens (incl. the current)

    def __post_init__(self):
        _check(self.name == "looped", "name", "'looped'", self.name)
        _check(self.window >= 0, "window", ">= 0 (0 = full causal attention)", self.window)
        for f in ("vocab_size", "d_model", "num_heads", "num_kv_heads", "head_dim", "mlp_dim"):
            _check(getattr(self, f) >= 1, f, ">= 1", getattr(self, f))
        _check(self.num_layers >= 1, "num_layers", ">= 1", self.num_layers)
        _check(self.num_loops >= 1, "num_loops", ">= 1", self.num_loops)
        _check(self.block_repeat >= 1, "block_repeat", ">= 1", self.block_repeat)
        _check(self.num_heads % self.num_kv_heads == 0, "num_heads", "a multiple of num_kv_heads", self.num_heads)
        _check(self.head_dim % 2 == 0, "head_dim", "even (rotary embeddings)", self.head_dim)
        _check(self.rope_theta > 0, "rope_theta", "> 0", self.rope_theta)
        _check(self.norm_eps > 0, "norm_eps", "> 0", self.norm_eps)
        _check(self.dtype in ("float32", "bfloat16"), "dtype", "'float32' or 'bfloat16'", self.dtype)
        _check(
            self.remat_policy == "" or self.remat_policy in REMAT_POLICIES,
            "remat_policy",
            f"'' or one of {sorted(REMAT_POLICIES)}",
            self.remat_policy,
        )

    @property
    def effective_depth(self) -> int:
        return self.num_layers * self.num_loops * self.block_repeat

    def block_config(self) -> BlockConfig:
        return BlockConfig(
            d_model=self.d_model,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            mlp_dim=self.mlp_dim,
            norm_style="pre",
            norm_eps=self.norm_eps,
            mask_kind="sliding" if self.window else "causal",
            window=self.window,
            rope_theta=self.rope_theta,
            dtype=self.dtype,
        )


class LoopBody(nnx.Module):
    """One loop iteration: optional input injection, then k blocks, each applied
    ``block_repeat`` times. Caches stack one KVCache per block application on axis 0."""

    def __init__(self, cfg: LoopedConfig, *, init_std: float, out_init_std: float, rngs: nnx.Rngs):
        self.input_injection = cfg.input_injection
        self.block_repeat = cfg.block_repeat
        bcfg = cfg.block_config()
        self.blocks = nnx.List(
            [Block(bcfg, init_std=init_std, out_init_std=out_init_std, rngs=rngs) for _ in range(cfg.num_layers)]
        )

    def __call__(
        self,
        x_BTD: jax.Array,
        e_BTD: jax.Array,
        positions_BT: jax.Array,
        segment_ids_BT: jax.Array | None = None,
        *,
        caches: KVCache | None = None,
        cache_index: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        if self.input_injection:
            x_BTD = x_BTD + e_BTD
        new = []
        for j, block in enumerate(self.blocks):
            for r in range(self.block_repeat):
                i = j * self.block_repeat + r
                cache = None if caches is None else jax.tree.map(lambda a, i=i: a[i], caches)
                x_BTD, cache = block(x_BTD, positions_BT, segment_ids_BT, cache=cache, cache_index=cache_index)
                new.append(cache)
        return x_BTD, (None if caches is None else jax.tree.map(lambda *a: jnp.stack(a), *new))


def stack_modules(modules: list[nnx.Module]) -> nnx.Module:
    """One module whose parameters stack those of ``modules`` (same structure) on a new leading
    axis, annotated with the ``layers`` logical axis. Call it only through a scan over its state."""
    graphdef, _ = nnx.split(modules[0])
    states = [nnx.split(m)[1] for m in modules]

    def stack(*vs: nnx.Variable) -> nnx.Variable:
        axes = vs[0].get_metadata().get("logical_axes")
        axes = None if axes is None else ("layers", *axes)
        return type(vs[0])(jnp.stack([v[...] for v in vs]), logical_axes=axes)

    stacked = jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, stacked)


class LoopedModel(TokenModel, nnx.Module):
    """Embedding -> loop body (shared, or stacked per loop) -> final norm -> head."""

    def __init__(self, cfg: LoopedConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        std = takase_std(cfg.d_model)
        out_std = std / math.sqrt(2 * cfg.effective_depth)
        dtype = resolve_dtype(cfg.dtype)
        self.embed = Embed(cfg.vocab_size, cfg.d_model, init_std=std, dtype=dtype, rngs=rngs)
        make = lambda: LoopBody(cfg, init_std=std, out_init_std=out_std, rngs=rngs)
        self.body = make() if cfg.share_weights else stack_modules([make() for _ in range(cfg.num_loops)])
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.unembed = (
            None if cfg.tie_embeddings else Unembed(cfg.d_model, cfg.vocab_size, init_std=std, dtype=dtype, rngs=rngs)
        )

    def embed_tokens(self, inputs_BT: jax.Array) -> jax.Array:
        return self.embed(inputs_BT).astype(jnp.float32)

    def initial_state(self, e_BTD: jax.Array) -> jax.Array:
        return jnp.zeros_like(e_BTD) if self.cfg.input_injection else e_BTD

    def head(self, x_BTD: jax.Array) -> jax.Array:
        x_BTD = self.final_norm(x_BTD)
        return self.embed.attend(x_BTD) if self.unembed is None else self.unembed(x_BTD)

    def body_step_fn(self):
        """(step, params): pure ``step(params, x_BTD, (e_BTD, positions, segment_ids))``; for
        ``share_weights=False`` the params carry a leading loop axis (scan over them)."""
        graphdef, params = nnx.split(self.body)

        def step(params, x_BTD, inputs):
            e_BTD, positions_BT, segment_ids_BT = inputs
            x_BTD, _ = nnx.merge(graphdef, params)(x_BTD, e_BTD, positions_BT, segment_ids_BT)
            return x_BTD

        return step, params

    def __call__(
        self,
        inputs_BT: jax.Array,
        *,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        num_loops: int | jax.Array | None = None,
        rng: jax.Array | None = None,
    ) -> jax.Array:
        """Logits [B, T, V] (float32). With shared weights ``num_loops`` may differ from the
        config (a Python int, or a traced int32 up to any value); unshared needs the config's."""
        del rng  # deterministic model
        cfg = self.cfg
        if inputs_BT.ndim != 2:
            raise ValueError(f"inputs must be [batch, length] token ids, got shape {inputs_BT.shape}")
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(inputs_BT.shape[1], dtype=jnp.int32), inputs_BT.shape)
        num_loops = cfg.num_loops if num_loops is None else num_loops
        e_BTD = self.embed_tokens(inputs_BT)
        x_BTD = self.initial_state(e_BTD)
        step, params = self.body_step_fn()
        inputs = (e_BTD, positions_BT, segment_ids_BT)
        if not cfg.share_weights and (not is_static_int(num_loops) or num_loops != cfg.num_loops):
            raise ValueError(
                f"share_weights=False has exactly num_loops={cfg.num_loops} loop bodies; got num_loops={num_loops!r}"
            )
        static = is_static_int(num_loops)
        # Shared weights are closed over by the engine's scan; unshared bodies are stacked on a
        # leading axis and sliced per step (stacked_params).
        x_BTD, _ = unroll(
            step,
            params,
            x_BTD,
            inputs,
            num_steps=num_loops,
            grad_steps=None if static else cfg.num_loops,
            remat_policy=cfg.remat_policy or None,
            stacked_params=not cfg.share_weights,
        )
        return self.head(x_BTD)

    def hidden_states(
        self,
        inputs_BT: jax.Array,
        *,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        num_loops: int | None = None,
        rng: jax.Array | None = None,
    ) -> jax.Array:
        """The residual stream after each loop [S, B, T, D] (float32, before the final norm), S = num_loops:
        the last S loop states of a looped model, the outputs of each layer body of the unshared baseline
        (one per layer when num_layers = 1). Used by the latent-prediction objective."""
        del rng
        cfg = self.cfg
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(inputs_BT.shape[1], dtype=jnp.int32), inputs_BT.shape)
        num_loops = cfg.num_loops if num_loops is None else num_loops
        if not is_static_int(num_loops) or (not cfg.share_weights and num_loops != cfg.num_loops):
            raise ValueError(
                f"hidden_states needs a Python int num_loops (= {cfg.num_loops} without shared weights), "
                f"got {num_loops!r}"
            )
        e_BTD = self.embed_tokens(inputs_BT)
        step, params = self.body_step_fn()
        _, states_SBTD = unroll(
            step,
            params,
            self.initial_state(e_BTD),
            (e_BTD, positions_BT, segment_ids_BT),
            num_steps=num_loops,
            remat_policy=cfg.remat_policy or None,
            record_fn=lambda x: x,
            stacked_params=not cfg.share_weights,
        )
        return states_SBTD

    def loss(self, batch: dict, *, rng: jax.Array, train: bool = True, carry: None = None) -> LossOutput:
        """Weighted next-token cross-entropy (the model is deterministic; ``rng`` is unused)."""
        del train, carry
        logits_BTV = self(
            batch["inputs"], positions_BT=batch.get("positions"), segment_ids_BT=batch.get("segment_ids"), rng=rng
        )
        loss, metrics = cross_entropy(logits_BTV, batch["targets"], batch["weights"])
        metrics["num_loops"] = jnp.asarray(self.cfg.num_loops, jnp.float32)
        return LossOutput(loss, metrics)

"""TransformerFAM (Hwang et al. 2024, "TransformerFAM: Feedback attention is working memory",
arXiv 2404.09173): block sliding window attention (BSWA) plus a feedback memory of ``fam_length``
vectors per layer that each block reads and rewrites (Alg. 2; the layer math is in ``fam_layers.py``).

The only new weight is F_0, a learned prompt of ``fam_length`` vectors at the embedding level; layer l
starts from the prompt carried through layers < l. The layers are ordinary pre-norm ``Block``s with the
parameter names of the looped / recurrent models, so a trained ``looped`` checkpoint runs as FAM
(``load_looped_params``); with ``fam_length=0`` the model is plain BSWA, and with ``block_size >= T`` too
it is the ordinary causal transformer.

Training options (Sec. 3.3 / 4.1 of the paper): full backprop through the FAM across blocks (or
``fam_stop_gradient``), a random rotary offset per row (uniform in [0, 2 pi 1e4], zero with probability
1/2), and random state passing: with ``state_passing_prob`` > 0 the model keeps a trainer carry
(``initial_carry``) holding every layer's final FAM, and each row starts from the previous step's final
FAM instead of the prompt with that probability.

Streaming inference (``init_cache`` / ``decode_step``): per layer K/V of (memory_segments + 1) blocks
plus the FAM; the cache size does not depend on the stream length.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from looped_jax.config import check_model_field as _check
from looped_jax.losses import cross_entropy
from looped_jax.models.fam_layers import LayerCache, fam_positions, layer_decode, layer_forward, prompt_step
from looped_jax.models.protocol import LossOutput, TokenModel
from looped_jax.nn import (
    Block,
    BlockConfig,
    Embed,
    RMSNorm,
    Unembed,
    param,
    resolve_dtype,
    takase_std,
    truncated_normal,
)
from looped_jax.recurrence import REMAT_POLICIES

MAX_POSITION_OFFSET = 2 * math.pi * 1e4  # random rotary offset range (paper Sec. 3.3)


@dataclasses.dataclass(frozen=True)
class FamConfig:
    """TransformerFAM over a pre-norm decoder; ``fam_length=0`` is plain block sliding window attention."""

    name: str = "fam"
    vocab_size: int = 259
    d_model: int = 128
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 32
    mlp_dim: int = 384
    num_layers: int = 2
    block_size: int = 1024  # tokens per block (paper: 1024)
    memory_segments: int = 3  # previous blocks each block attends to (paper: 3)
    fam_length: int = 64  # FAM vectors per layer (paper: 64); 0 = BSWA
    fam_stop_gradient: bool = False  # True: no backprop through the FAM between blocks (default: full BPTT)
    random_position_offset: bool = False  # training: rotary offset U[0, 2 pi 1e4] per row, zero w.p. 1/2
    state_passing_prob: float = 0.0  # training: start from the previous step's final FAM with this probability
    attention_impl: str = "auto"  # feedback_attention impl: auto | xla | pallas
    remat_policy: str = ""  # "" = none, else a name in recurrence.REMAT_POLICIES: each layer recomputed in backward
    tie_embeddings: bool = True
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    dtype: str = "float32"

    def __post_init__(self):
        _check(self.name == "fam", "name", "'fam'", self.name)
        for f in ("vocab_size", "d_model", "num_heads", "num_kv_heads", "head_dim", "mlp_dim", "num_layers"):
            _check(getattr(self, f) >= 1, f, ">= 1", getattr(self, f))
        _check(self.num_heads % self.num_kv_heads == 0, "num_heads", "a multiple of num_kv_heads", self.num_heads)
        _check(self.head_dim % 2 == 0, "head_dim", "even (rotary embeddings)", self.head_dim)
        _check(self.block_size >= 1, "block_size", ">= 1", self.block_size)
        _check(self.memory_segments >= 0, "memory_segments", ">= 0", self.memory_segments)
        _check(
            0 <= self.fam_length <= self.block_size,
            "fam_length",
            f"in [0, block_size={self.block_size}] (FAM positions are the block's last positions)",
            self.fam_length,
        )
        _check(0.0 <= self.state_passing_prob <= 1.0, "state_passing_prob", "in [0, 1]", self.state_passing_prob)
        _check(
            self.attention_impl in ("auto", "xla", "pallas"), "attention_impl", "auto|xla|pallas", self.attention_impl
        )
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
    def window(self) -> int:
        """Tokens a token can attend to without the FAM: (memory_segments + 1) * block_size."""
        return (self.memory_segments + 1) * self.block_size

    def block_config(self) -> BlockConfig:
        return BlockConfig(
            d_model=self.d_model,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            mlp_dim=self.mlp_dim,
            norm_style="pre",
            norm_eps=self.norm_eps,
            mask_kind="causal",
            rope_theta=self.rope_theta,
            dtype=self.dtype,
        )


class FamModel(TokenModel, nnx.Module):
    """Embedding -> FAM layers -> final norm -> head."""

    def __init__(self, cfg: FamConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        std = takase_std(cfg.d_model)
        out_std = std / math.sqrt(2 * cfg.num_layers)
        dtype = resolve_dtype(cfg.dtype)
        self.embed = Embed(cfg.vocab_size, cfg.d_model, init_std=std, dtype=dtype, rngs=rngs)
        bcfg = cfg.block_config()
        self.layers = nnx.List(
            [Block(bcfg, init_std=std, out_init_std=out_std, rngs=rngs) for _ in range(cfg.num_layers)]
        )
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.unembed = (
            None if cfg.tie_embeddings else Unembed(cfg.d_model, cfg.vocab_size, init_std=std, dtype=dtype, rngs=rngs)
        )
        # F_0: the learned FAM prompt at the embedding level (the only weight FAM adds).
        self.fam_init_FD = (
            param(truncated_normal(rngs.params(), (cfg.fam_length, cfg.d_model), std), (None, "embed"))
            if cfg.fam_length
            else None
        )

    # -- pieces ----------------------------------------------------------------------------------

    def head(self, x_BTD: jax.Array) -> jax.Array:
        x_BTD = self.final_norm(x_BTD)
        return self.embed.attend(x_BTD) if self.unembed is None else self.unembed(x_BTD)

    def prompt_fams(self, pos0_B: jax.Array) -> list[jax.Array]:
        """F_0 of every layer [B, F, D]: layer l's is the prompt carried through layers < l (rows differ
        only by their rotary offset ``pos0_B``)."""
        cfg = self.cfg
        B, F = pos0_B.shape[0], cfg.fam_length
        pos_BF = fam_positions(pos0_B, -1, cfg.block_size, F)
        fam_BFD = jnp.broadcast_to(self.fam_init_FD[...].astype(jnp.float32), (B, F, cfg.d_model))
        fams = []
        for block in self.layers:
            fams.append(fam_BFD)
            fam_BFD = prompt_step(block, fam_BFD, pos_BF)
        return fams

    def forward(
        self,
        inputs_BT: jax.Array,
        positions_BT: jax.Array | None = None,
        *,
        init_fams: list[jax.Array] | None = None,
        init_resids: list[jax.Array] | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Logits [B, T, V] and the final FAM of every layer [B, L, F, D].

        ``positions_BT`` (int or float; a row must count up by one) gives rotary positions; by default
        0..T-1. ``init_fams`` / ``init_resids`` override each layer's starting FAM and the residual of its
        first update (default: the prompt and zero). T is padded internally to a multiple of block_size;
        the final FAM then includes the padding block.
        """
        cfg = self.cfg
        if inputs_BT.ndim != 2:
            raise ValueError(f"inputs must be [batch, length] token ids, got shape {inputs_BT.shape}")
        B, T = inputs_BT.shape
        S, F, L = cfg.block_size, cfg.fam_length, cfg.num_layers
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        pos_BT = positions_BT.astype(jnp.float32)
        pad = -T % S
        if pad:
            inputs_BT = jnp.pad(inputs_BT, ((0, 0), (0, pad)))
            pos_BT = jnp.concatenate([pos_BT, pos_BT[:, -1:] + 1.0 + jnp.arange(pad, dtype=jnp.float32)], 1)
        x_BTD = self.embed(inputs_BT).astype(jnp.float32)
        if init_fams is None:
            init_fams = self.prompt_fams(pos_BT[:, 0]) if F else [jnp.zeros((B, 0, cfg.d_model))] * L
        if init_resids is None:
            init_resids = [jnp.zeros_like(f) for f in init_fams]

        def layer(block, x_BTD, pos_BT, fam_BFD, resid_BFD):
            return layer_forward(
                block,
                x_BTD,
                pos_BT,
                fam_BFD,
                resid_BFD,
                block_size=S,
                memory_segments=cfg.memory_segments,
                stop_gradient=cfg.fam_stop_gradient,
                impl=cfg.attention_impl,
            )

        if cfg.remat_policy:  # keep only each layer's inputs for the backward pass (pod-size activations)
            layer = nnx.remat(layer, policy=REMAT_POLICIES[cfg.remat_policy])
        finals = []
        for block, fam_BFD, resid_BFD in zip(self.layers, init_fams, init_resids, strict=True):
            x_BTD, fam_BFD = layer(block, x_BTD, pos_BT, fam_BFD, resid_BFD)
            finals.append(fam_BFD)
        return self.head(x_BTD[:, :T]), jnp.stack(finals, axis=1)

    def __call__(
        self,
        inputs_BT: jax.Array,
        *,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        num_loops: int | None = None,
        rng: jax.Array | None = None,
    ) -> jax.Array:
        """Logits [B, T, V]. Each row is one stream (``segment_ids`` is accepted for the trainer's interface;
        padding at the end of a row does not affect earlier tokens)."""
        del segment_ids_BT, rng
        if num_loops is not None:
            raise ValueError(f"the FAM model has no loop count; got num_loops={num_loops!r}")
        return self.forward(inputs_BT, positions_BT)[0]

    # -- training --------------------------------------------------------------------------------

    def initial_carry(self, batch_size: int) -> dict | None:
        """Trainer carry for random state passing: every layer's final FAM of the previous step and whether
        it is valid (0 before the first step). None (stateless) when state passing is off."""
        cfg = self.cfg
        if cfg.state_passing_prob == 0 or cfg.fam_length == 0:
            return None
        return {
            "fam_BLFD": jnp.zeros((batch_size, cfg.num_layers, cfg.fam_length, cfg.d_model), jnp.float32),
            "valid_B": jnp.zeros((batch_size,), jnp.float32),
        }

    def loss(self, batch: dict, *, rng: jax.Array, train: bool = True, carry: dict | None = None) -> LossOutput:
        """Weighted next-token cross-entropy. With a ``carry`` (random state passing, see
        ``initial_carry``) the previous step's final FAM may seed this step's, and the new carry
        holds this step's; without one (None) every row starts from the learnt prompt."""
        cfg = self.cfg
        inputs_BT = batch["inputs"]
        B, T = inputs_BT.shape
        positions_BT = batch.get("positions")
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        pos_BT = positions_BT.astype(jnp.float32)
        offset_key, zero_key, pass_key = jax.random.split(rng, 3)
        if train and cfg.random_position_offset:
            offset_B = jax.random.uniform(offset_key, (B,), jnp.float32, 0.0, MAX_POSITION_OFFSET)
            offset_B = jnp.where(jax.random.bernoulli(zero_key, 0.5, (B,)), 0.0, offset_B)
            pos_BT = pos_BT + offset_B[:, None]
        init_fams = init_resids = None
        metrics = {}
        if carry:
            prompts = self.prompt_fams(pos_BT[:, 0])
            use_B = (carry["valid_B"] > 0) & jax.random.bernoulli(pass_key, cfg.state_passing_prob, (B,))
            if not train:
                use_B = jnp.zeros_like(use_B)
            use_B11 = use_B[:, None, None]
            prev = [jax.lax.stop_gradient(carry["fam_BLFD"][:, l]) for l in range(cfg.num_layers)]
            init_fams = [jnp.where(use_B11, p, f) for p, f in zip(prev, prompts, strict=True)]
            init_resids = [jnp.where(use_B11, p, 0.0) for p in prev]
            metrics["state_passed"] = use_B.astype(jnp.float32).mean()
        logits_BTV, finals_BLFD = self.forward(inputs_BT, pos_BT, init_fams=init_fams, init_resids=init_resids)
        loss, ce_metrics = cross_entropy(logits_BTV, batch["targets"], batch["weights"])
        metrics = dict(ce_metrics, **metrics)
        if not carry:
            return LossOutput(loss, metrics, carry)
        new_carry = {"fam_BLFD": jax.lax.stop_gradient(finals_BLFD), "valid_B": jnp.ones((B,), jnp.float32)}
        return LossOutput(loss, metrics, new_carry)

    # -- streaming inference ---------------------------------------------------------------------

    def init_cache(self, batch_size: int) -> dict:
        """Decode state: per layer a ``LayerCache`` (K/V of (memory_segments + 1) blocks, FAM, residual) and
        the stream position of each ring slot (-1 = empty). Its size does not depend on the stream length."""
        cfg = self.cfg
        W = cfg.window
        dtype = resolve_dtype(cfg.dtype)
        kv = jnp.zeros((batch_size, W, cfg.num_kv_heads, cfg.head_dim), dtype)
        if cfg.fam_length:
            fams = self.prompt_fams(jnp.zeros((batch_size,), jnp.float32))
        else:
            fams = [jnp.zeros((batch_size, 0, cfg.d_model), jnp.float32)] * cfg.num_layers
        layers = [LayerCache(kv, kv, f, jnp.zeros_like(f)) for f in fams]
        return {"layers": layers, "slot_pos_W": jnp.full((W,), -1, jnp.int32), "index": jnp.zeros((), jnp.int32)}

    def decode_step(self, tokens_B: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        """Feeds one token per row at stream index ``cache['index']``; returns logits [B, V] and the new cache."""
        cfg = self.cfg
        t = cache["index"]
        slot_pos_W = cache["slot_pos_W"].at[t % cfg.window].set(t)
        x_B1D = self.embed(tokens_B[:, None]).astype(jnp.float32)
        layers = []
        for block, layer_cache in zip(self.layers, cache["layers"], strict=True):
            x_B1D, layer_cache = layer_decode(
                block, x_B1D, t, slot_pos_W, layer_cache, block_size=cfg.block_size, memory_segments=cfg.memory_segments
            )
            layers.append(layer_cache)
        return self.head(x_B1D)[:, 0], {"layers": layers, "slot_pos_W": slot_pos_W, "index": t + 1}


# -- foundation-model weights ------------------------------------------------------------------------


def fam_config_from_looped(looped_cfg, **fam_fields) -> FamConfig:
    """A FamConfig with the shapes of a ``LoopedConfig`` (depth = its effective depth) plus ``fam_fields``."""
    if looped_cfg.input_injection:
        raise ValueError("a looped model with input_injection=True is not a plain decoder; cannot run it as FAM")
    shared = {
        f: getattr(looped_cfg, f)
        for f in (
            "vocab_size", "d_model", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
            "tie_embeddings", "rope_theta", "norm_eps", "dtype",
        )
    }  # fmt: skip
    return FamConfig(num_layers=looped_cfg.effective_depth, **shared, **fam_fields)


def load_looped_params(fam: FamModel, looped) -> FamModel:
    """Copies a ``LoopedModel``'s weights into ``fam`` in place (and returns it): embedding, head, final norm,
    and layer i * num_layers * block_repeat + j * block_repeat + r <- loop i's block j (stacked slice i when
    share_weights=False, the shared block otherwise). The FAM prompt keeps its own initialisation."""
    lcfg, fcfg = looped.cfg, fam.cfg
    if lcfg.input_injection:
        raise ValueError("a looped model with input_injection=True is not a plain decoder; cannot run it as FAM")
    if fcfg.num_layers != lcfg.effective_depth:
        raise ValueError(
            f"model.num_layers={fcfg.num_layers} must equal the looped model's depth {lcfg.effective_depth}"
        )
    for f in ("vocab_size", "d_model", "num_heads", "num_kv_heads", "head_dim", "mlp_dim", "tie_embeddings"):
        if getattr(fcfg, f) != getattr(lcfg, f):
            raise ValueError(f"model.{f}={getattr(fcfg, f)} differs from the looped model's {getattr(lcfg, f)}")
    layer = 0
    for i in range(lcfg.num_loops):
        for j in range(lcfg.num_layers):
            state = nnx.state(looped.body.blocks[j], nnx.Param)
            if not lcfg.share_weights:
                state = jax.tree.map(lambda a, i=i: a[i], state)
            for _ in range(lcfg.block_repeat):
                nnx.update(fam.layers[layer], state)
                layer += 1
    nnx.update(fam.embed, nnx.state(looped.embed, nnx.Param))
    nnx.update(fam.final_norm, nnx.state(looped.final_norm, nnx.Param))
    if fam.unembed is not None:
        nnx.update(fam.unembed, nnx.state(looped.unembed, nnx.Param))
    return fam

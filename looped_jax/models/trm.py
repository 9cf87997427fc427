"""Tiny Recursive Model (Jolicoeur-Martineau 2025, "Less is More: Recursive Reasoning with Tiny
Networks"). One 2-layer network ``net`` serves both updates (Sec. 4, Fig. 3):

    latent_recursion:  n times  z <- net(z + y + x);   then  y <- net(y + z)
    deep_recursion:    T - 1 latent recursions without gradient, then one with full backprop
                       through all n + 1 calls; (y, z) detached and carried to the next segment
    y_hat = head(y)[:, P:],   q_halt = Linear(D, 2)(y[:, 0])[0]

Simplified ACT (Sec. 4.6): halt when q_halt > 0, loss = CE + 0.5 BCE(q_halt, exact); no
continue head target and no extra forward. P = 16 prefix positions (the puzzle embedding in
the first, the rest zero "registers"). ``mixer="mlp"`` is the MLP-mixer variant for fixed-size
grids: attention is replaced by a SwiGLU along the sequence axis (post-norm over that axis, as
the public code does). Training keeps an EMA of the weights (optim.ema_decay = 0.999).

Both loops are the loop engine's ``unroll``: deep recursion is ``unroll(latent_recursion_step,
num_steps=T, grad_steps=1)`` and the n z-updates inside a latent recursion are an ``unroll`` with
full backprop.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from looped_jax.models.hrm import (
    RecursiveReasoner,
    _check,
    lecun_init_block,
    post_norm_block_config,
    swiglu_hidden,
    validate_reasoner_fields,
)
from looped_jax.nn import Block, SwiGLU, apply_stack, lecun_truncated, param, resolve_dtype
from looped_jax.recurrence import unroll

MIXERS = ("attention", "mlp")


@dataclasses.dataclass(frozen=True)
class TRMConfig:
    """TRM. Defaults: the published Sudoku-Extreme attention model (2 layers of width 512,
    n = 6, T = 3, 16 prefix positions); ``mixer="mlp"`` gives the 5M MLP variant."""

    name: str = "trm"
    vocab_size: int = 11
    seq_len: int = 81
    num_puzzle_ids: int = 1
    puzzle_emb_dim: int = 512  # 0 = no puzzle embedding (the prefix registers stay)
    puzzle_emb_len: int = 16  # prefix positions P
    d_model: int = 512
    num_heads: int = 8
    head_dim: int = 64
    mlp_dim: int = 1536  # swiglu_hidden(512, 4)
    num_layers: int = 2
    latent_steps: int = 6  # n
    recursions: int = 3  # T
    mixer: str = "attention"
    seq_mlp_dim: int = 0  # SwiGLU width along the sequence (mixer="mlp"); 0 = swiglu_hidden(P + T, 4)
    pos_encoding: str = "rope"
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    halt_max_steps: int = 16
    halt_exploration_prob: float = 0.1
    loss_type: str = "stablemax"
    init_state_seed: int = 0
    init_states: tuple[tuple[float, ...], ...] = ()  # exact (y, z) initial vectors; () = from the seed
    dtype: str = "float32"

    def __post_init__(self):
        _check(self.name == "trm", "name", "'trm'", self.name)
        validate_reasoner_fields(self)
        for f in ("num_layers", "latent_steps", "recursions"):
            _check(getattr(self, f) >= 1, f, ">= 1", getattr(self, f))
        _check(self.mixer in MIXERS, "mixer", f"one of {MIXERS}", self.mixer)
        _check(self.seq_mlp_dim >= 0, "seq_mlp_dim", ">= 0", self.seq_mlp_dim)
        _check(
            self.puzzle_emb_len * self.d_model >= self.puzzle_emb_dim,
            "puzzle_emb_len",
            f">= ceil(puzzle_emb_dim / d_model) = {-(-self.puzzle_emb_dim // self.d_model)}",
            self.puzzle_emb_len,
        )

    @property
    def total_len(self) -> int:
        return self.puzzle_emb_len + self.seq_len

    @property
    def resolved_seq_mlp_dim(self) -> int:
        return self.seq_mlp_dim or swiglu_hidden(self.total_len, 4)


class SeqMixerBlock(nnx.Module):
    """Post-norm MLP-mixer block: h = rms_L(h + SwiGLU_L(h)) along the sequence, then
    h = rms_D(h + SwiGLU_D(h)) along channels (TRM's mlp_t variant)."""

    def __init__(self, cfg: TRMConfig, *, rngs: nnx.Rngs):
        length, f_seq = cfg.total_len, cfg.resolved_seq_mlp_dim
        self.eps = cfg.norm_eps
        self.dtype = resolve_dtype(cfg.dtype)
        key = rngs.params
        self.seq_gate_LF = param(lecun_truncated(key(), (length, f_seq), length), (None, "mlp"))
        self.seq_up_LF = param(lecun_truncated(key(), (length, f_seq), length), (None, "mlp"))
        self.seq_down_FL = param(lecun_truncated(key(), (f_seq, length), f_seq), ("mlp", None))
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_dim, init_std=1.0, out_init_std=1.0, dtype=self.dtype, rngs=rngs)
        for p, fan_in in (
            (self.mlp.gate_DF, cfg.d_model),
            (self.mlp.up_DF, cfg.d_model),
            (self.mlp.down_FD, cfg.mlp_dim),
        ):
            p[...] = lecun_truncated(key(), p.shape, fan_in)

    def _rms(self, x: jax.Array, axis: int) -> jax.Array:
        x32 = x.astype(jnp.float32)
        return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axis, keepdims=True) + self.eps)).astype(x.dtype)

    def __call__(
        self,
        h_BLD: jax.Array,
        positions_BL: jax.Array | None = None,
        segment_ids_BL: jax.Array | None = None,
        *,
        cache=None,
        cache_index=None,
    ) -> tuple[jax.Array, None]:
        """Block signature of ``looped_jax.nn.Block`` (so ``apply_stack`` runs it); no positions,
        segments or KV cache: the sequence SwiGLU mixes the whole fixed-length grid."""
        if cache is not None or cache_index is not None:
            raise ValueError("SeqMixerBlock (mixer='mlp') has no KV cache; call it with cache=None")
        del positions_BL, segment_ids_BL
        x = h_BLD.astype(self.dtype)
        cast = lambda p: p[...].astype(self.dtype)
        gate_BDF = jnp.einsum("bld,lf->bdf", x, cast(self.seq_gate_LF))
        up_BDF = jnp.einsum("bld,lf->bdf", x, cast(self.seq_up_LF))
        mixed_BLD = jnp.einsum("bdf,fl->bld", jax.nn.silu(gate_BDF) * up_BDF, cast(self.seq_down_FL))
        h_BLD = self._rms(h_BLD + mixed_BLD.astype(h_BLD.dtype), axis=1)
        h_BLD = self._rms(h_BLD + self.mlp(h_BLD).astype(h_BLD.dtype), axis=-1)
        return h_BLD, None


class TRMModel(RecursiveReasoner):
    """TRM with last-recursion backprop; see the module docstring."""

    use_continue = False

    def __init__(self, cfg: TRMConfig, *, rngs: nnx.Rngs):
        self._init_io(cfg, cfg.puzzle_emb_len, rngs)
        blocks = []
        for _ in range(cfg.num_layers):
            if cfg.mixer == "mlp":
                blocks.append(SeqMixerBlock(cfg, rngs=rngs))
            else:
                block = Block(post_norm_block_config(cfg), init_std=1.0, out_init_std=1.0, rngs=rngs)
                lecun_init_block(block, rngs)
                blocks.append(block)
        self.blocks = nnx.List(blocks)

    def net(self, h_BLD: jax.Array, injection_BLD: jax.Array, positions_BL: jax.Array) -> jax.Array:
        """net(h + injection): the one shared 2-layer network."""
        return apply_stack(self.blocks, h_BLD + injection_BLD, positions_BL)[0]

    def latent_recursion_step(self, graphdef: nnx.GraphDef):
        """The pure engine step of one latent recursion, ``step(params, (y, z), (x, positions)) -> (y, z)``:
        n times z <- net(z + y + x) (an inner ``unroll``, full backprop), then y <- net(y + z)."""
        latent_steps = self.cfg.latent_steps

        def z_step(params, z, inputs):
            yx, positions_BL = inputs
            return nnx.merge(graphdef, params).net(z, yx, positions_BL)

        def step(params, yz, inputs):
            y, z = yz
            x, positions_BL = inputs
            z, _ = unroll(z_step, params, z, (y + x, positions_BL), num_steps=latent_steps)
            return nnx.merge(graphdef, params).net(y, z, positions_BL), z

        return step

    def segment(self, zs, data: dict):
        """One forward (deep recursion): ((y, z) detached, logits [B,T,V], q_halt [B], q_continue [B]).

        ``unroll`` of T latent recursions with grad_steps=1: the first T - 1 see parameters, inputs
        and carry under stop_gradient; the last is differentiated through all its n + 1 calls.
        """
        y, z = (jax.lax.stop_gradient(s.astype(jnp.float32)) for s in zs)
        x = self.embed_inputs(data)
        positions_BL = self.positions(x.shape[0])
        graphdef, params = nnx.split(self)
        (y, z), _ = unroll(
            self.latent_recursion_step(graphdef),
            params,
            (y, z),
            (x, positions_BL),
            num_steps=self.cfg.recursions,
            grad_steps=1,
        )
        logits_BTV, q_halt_B, q_cont_B = self.heads(y)
        return jax.lax.stop_gradient((y, z)), logits_BTV, q_halt_B, q_cont_B

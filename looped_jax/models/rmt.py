"""Recurrent Memory Transformer (Bulatov et al. 2022, "Recurrent Memory Transformer", arXiv 2207.06881;
Bulatov et al. 2024, "Scaling Transformer to 1M tokens and beyond with RMT", arXiv 2304.11062).

The sequence is cut into segments of ``segment_len`` tokens, processed one after another by the same
transformer. Each segment's input is ``[read memory; segment tokens; write memory]`` (the decoder form:
``num_memory_tokens`` = M read tokens first, M write tokens last, both the current memory H_t):

    H_{t+1} = Transformer([H_t; X_t; H_t])[write positions]            (2022, Sec. 3)

with the attention mask of the decoder form: segment tokens attend causally to each other and to every
read token; the write tokens see the whole segment (and each other), so the new memory summarises the
segment; nothing attends to a write token except another write token, which keeps the logits causal.
Logits come from the segment-token positions only. The write outputs pass the final layer and a
``memory_norm`` (RMSNorm whose scale starts at the embedding std), so the memory stays at embedding scale
however many segments it crosses. H_0 is a learned parameter.

Rotary positions restart every segment (read memory 0..M-1, tokens M..M+S-1, write memory M+S..2M+S-1):
every segment is the same computation, the model has no absolute position beyond its segment, and any
length runs in O(segment) memory. The batch's ``positions`` are therefore not used.

Training: segments run under ``jax.lax.scan`` with the memory as the carry; truncated backprop through
time cuts the memory's gradient every ``bptt_segments`` segments (segments are grouped in blocks of that
many from the start of the stream; the memory entering a block is ``stop_gradient``-ed), so a loss reaches
back through at most ``bptt_segments`` segments (0 = full BPTT). Stateless to the trainer (``TokenModel``).

Streaming (``init_state`` / ``stream``): the state is the memory [B, M, D] (and a segment counter); a stream
of chunks whose lengths are multiples of ``segment_len`` equals one call over their concatenation, in
memory independent of the stream length.

Limitations: one stream per row (``segment_ids`` is accepted but packed documents would share the memory;
padding at the end of a row never affects earlier tokens); no token-by-token decode cache.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from looped_jax.config import check_model_field as _check
from looped_jax.losses import cross_entropy
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


@dataclasses.dataclass(frozen=True)
class RMTConfig:
    """Recurrent Memory Transformer over a pre-norm decoder (see the module docstring)."""

    name: str = "rmt"
    vocab_size: int = 259
    d_model: int = 128
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 32
    mlp_dim: int = 384
    num_layers: int = 2
    segment_len: int = 64  # tokens per segment (the 2024 paper: up to 512 for BERT, 1024 for decoders)
    num_memory_tokens: int = 8  # M read + M write memory tokens per segment; 0 = independent segments
    bptt_segments: int = 0  # truncated BPTT: gradients cross at most this many segments; 0 = full BPTT
    tie_embeddings: bool = True
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    dtype: str = "float32"

    def __post_init__(self):
        _check(self.name == "rmt", "name", "'rmt'", self.name)
        for f in ("vocab_size", "d_model", "num_heads", "num_kv_heads", "head_dim", "mlp_dim", "num_layers"):
            _check(getattr(self, f) >= 1, f, ">= 1", getattr(self, f))
        _check(self.num_heads % self.num_kv_heads == 0, "num_heads", "a multiple of num_kv_heads", self.num_heads)
        _check(self.head_dim % 2 == 0, "head_dim", "even (rotary embeddings)", self.head_dim)
        _check(self.segment_len >= 1, "segment_len", ">= 1", self.segment_len)
        _check(self.num_memory_tokens >= 0, "num_memory_tokens", ">= 0", self.num_memory_tokens)
        _check(self.bptt_segments >= 0, "bptt_segments", ">= 0 (0 = full BPTT)", self.bptt_segments)
        _check(self.rope_theta > 0, "rope_theta", "> 0", self.rope_theta)
        _check(self.norm_eps > 0, "norm_eps", "> 0", self.norm_eps)
        _check(self.dtype in ("float32", "bfloat16"), "dtype", "'float32' or 'bfloat16'", self.dtype)

    @property
    def segment_input_len(self) -> int:
        """Length of one segment's transformer input: M read + segment_len + M write."""
        return self.segment_len + 2 * self.num_memory_tokens

    @property
    def stream_multiple(self) -> int:
        """Stream chunks must be multiples of this (see ``RMTModel.stream``)."""
        return self.segment_len

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


class RMTState(NamedTuple):
    """Streaming state: the memory H_t and how many segments produced it."""

    memory_BMD: jax.Array  # float32
    segment: jax.Array  # int32 scalar: index of the next segment in the stream


def segment_mask(segment_len: int, num_memory_tokens: int) -> np.ndarray:
    """Boolean [L, L] (query, key) visibility over one segment input [read M; tokens S; write M]: causal,
    plus every read token visible to every query, plus the write tokens visible to each other."""
    S, M = segment_len, num_memory_tokens
    L = S + 2 * M
    q_L1 = np.arange(L)[:, None]
    k_1L = np.arange(L)[None, :]
    is_write = lambda i: i >= M + S  # noqa: E731
    return (k_1L <= q_L1) | (k_1L < M) | (is_write(q_L1) & is_write(k_1L))


def _block_apply(block: Block, x_BLD: jax.Array, positions_BL: jax.Array, mask_11LL: jax.Array) -> jax.Array:
    """One pre-norm block with an explicit attention mask: x + Attn(n(x)); x + MLP(n(x))."""
    attn = block.attn
    q_BLNH, k_BLKH, v_BLKH = attn.project(block.norm_attn_in(x_BLD), positions_BL)
    o_BLNH = attn.attend(q_BLNH, k_BLKH, v_BLKH, mask_11LL)
    x_BLD = x_BLD + attn.output(o_BLNH).astype(x_BLD.dtype)
    return x_BLD + block.mlp(block.norm_mlp_in(x_BLD)).astype(x_BLD.dtype)


class RMTModel(TokenModel, nnx.Module):
    """Embedding -> per-segment transformer with memory tokens (scanned over segments) -> final norm -> head."""

    def __init__(self, cfg: RMTConfig, *, rngs: nnx.Rngs):
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
        M = cfg.num_memory_tokens
        # H_0, the learned initial memory, and the norm that keeps every H_t at the embedding scale.
        self.memory_init_MD = (
            param(truncated_normal(rngs.params(), (M, cfg.d_model), std), (None, "embed")) if M else None
        )
        self.memory_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.memory_norm.scale = param(jnp.full((cfg.d_model,), std, jnp.float32), ("embed",))

    # -- pieces ----------------------------------------------------------------------------------

    def head(self, x_BTD: jax.Array) -> jax.Array:
        x_BTD = self.final_norm(x_BTD)
        return self.embed.attend(x_BTD) if self.unembed is None else self.unembed(x_BTD)

    def init_state(self, batch_size: int) -> RMTState:
        """Fresh streaming state: H_0 for every row, segment 0."""
        cfg = self.cfg
        shape = (batch_size, cfg.num_memory_tokens, cfg.d_model)
        if self.memory_init_MD is None:
            memory_BMD = jnp.zeros(shape, jnp.float32)
        else:
            memory_BMD = jnp.broadcast_to(self.memory_init_MD[...].astype(jnp.float32), shape)
        return RMTState(memory_BMD, jnp.zeros((), jnp.int32))

    def segment_step(self, memory_BMD: jax.Array, x_BSD: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One segment: the transformer over [H_t; x; H_t]. Returns H_{t+1} [B, M, D] and the segment tokens'
        final hidden states [B, S, D] (before the final norm)."""
        cfg = self.cfg
        B, S, D = x_BSD.shape
        M = cfg.num_memory_tokens
        L = S + 2 * M
        mem = memory_BMD.astype(x_BSD.dtype)
        h_BLD = jnp.concatenate([mem, x_BSD, mem], axis=1)
        positions_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        mask_11LL = jnp.asarray(segment_mask(S, M))[None, None]
        for block in self.layers:
            h_BLD = _block_apply(block, h_BLD, positions_BL, mask_11LL)
        new_memory_BMD = self.memory_norm(h_BLD[:, M + S :]).astype(jnp.float32)
        return new_memory_BMD, h_BLD[:, M : M + S]

    def hidden(self, x_BTD: jax.Array, state: RMTState) -> tuple[jax.Array, RMTState]:
        """Final hidden states [B, T, D] of embedded inputs continuing from ``state``, and the state after
        them. T is padded to a multiple of segment_len (the padding enters the returned memory)."""
        cfg = self.cfg
        B, T, D = x_BTD.shape
        S, k = cfg.segment_len, cfg.bptt_segments
        NS = -(-T // S)
        x_NBSD = jnp.moveaxis(jnp.pad(x_BTD, ((0, 0), (0, NS * S - T), (0, 0))).reshape(B, NS, S, D), 1, 0)
        index_N = state.segment + jnp.arange(NS, dtype=jnp.int32)
        graphdef, params = nnx.split(self)

        def body(memory_BMD, inputs):
            i, x_BSD = inputs
            if k:  # truncated BPTT: no gradient into the memory entering a block of k segments
                cut = (i % k == 0) & (i > 0)
                memory_BMD = jnp.where(cut, jax.lax.stop_gradient(memory_BMD), memory_BMD)
            return nnx.merge(graphdef, params).segment_step(memory_BMD, x_BSD)

        memory_BMD, h_NBSD = jax.lax.scan(body, state.memory_BMD, (index_N, x_NBSD))
        h_BTD = jnp.moveaxis(h_NBSD, 0, 1).reshape(B, NS * S, D)[:, :T]
        return h_BTD, RMTState(memory_BMD, state.segment + NS)

    def forward(self, inputs_BT: jax.Array, state: RMTState) -> tuple[jax.Array, RMTState]:
        """Logits [B, T, V] (float32) of token ids continuing from ``state``, and the state after them."""
        if inputs_BT.ndim != 2:
            raise ValueError(f"inputs must be [batch, length] token ids, got shape {inputs_BT.shape}")
        if state.memory_BMD.shape != (inputs_BT.shape[0], self.cfg.num_memory_tokens, self.cfg.d_model):
            raise ValueError(
                f"state memory has shape {state.memory_BMD.shape}, expected "
                f"{(inputs_BT.shape[0], self.cfg.num_memory_tokens, self.cfg.d_model)} [batch, memory, d_model]"
            )
        h_BTD, state = self.hidden(self.embed(inputs_BT).astype(jnp.float32), state)  # float32 residual stream
        return self.head(h_BTD), state

    def stream(self, inputs_BT: jax.Array, state: RMTState) -> tuple[jax.Array, RMTState]:
        """One chunk of a stream (length a multiple of segment_len): logits [B, T, V] and the next state.
        Chunk after chunk equals one ``__call__`` over the concatenation; the state is constant in size."""
        S = self.cfg.segment_len
        if inputs_BT.ndim != 2 or inputs_BT.shape[1] % S:
            raise ValueError(
                f"stream chunks must be [batch, length] with length a multiple of model.segment_len={S}, "
                f"got shape {inputs_BT.shape}"
            )
        return self.forward(inputs_BT, state)

    def __call__(
        self,
        inputs_BT: jax.Array,
        *,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        num_loops: int | None = None,
        rng: jax.Array | None = None,
    ) -> jax.Array:
        """Logits [B, T, V] of fresh streams (one per row). ``positions`` / ``segment_ids`` are accepted for the
        trainer's interface and not used (rotary positions restart every segment)."""
        del positions_BT, segment_ids_BT, rng
        if num_loops is not None:
            raise ValueError(f"the RMT model has no loop count; got num_loops={num_loops!r}")
        return self.forward(inputs_BT, self.init_state(inputs_BT.shape[0]))[0]

    def loss(self, batch: dict, *, rng: jax.Array, train: bool = True, carry: None = None) -> LossOutput:
        """Weighted next-token cross-entropy over the segment tokens (memory positions have no logits);
        stateless, ``carry`` is unused."""
        del train, carry
        logits_BTV = self(batch["inputs"], rng=rng)
        return LossOutput(*cross_entropy(logits_BTV, batch["targets"], batch["weights"]))

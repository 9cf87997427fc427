"""Titans (Behrouz et al. 2024, "Titans: Learning to Memorize at Test Time", arXiv 2501.00663, sec. 4).

Variants (``TitansConfig.variant``), each layer followed by a SwiGLU MLP with pre-norm residuals:

* ``mac`` memory as a context (sec. 4.1, eqs. 21-25): the sequence is split into segments of ``segment_len``;
  for segment S_t, ``h_t = M*_{t-1}(q_t)`` is read from the memory BEFORE the segment, attention runs over
  ``[persistent; h_t; S_t]``, the memory is updated with the attention output ``y_t`` and the output is
  ``y_t * sigmoid(M_t(y_t))``. Causality: a segment token attends to all persistent tokens but only to the
  retrieved tokens and segment tokens at positions <= its own (h_i is computed from token i's query).
* ``mag`` memory as a gate (sec. 4.2, eqs. 26-28): ``o = RMSNorm_y(y) * sigmoid(RMSNorm_m(M(x)))`` with
  ``y = SWA*(x)`` (sliding-window attention with the persistent tokens always visible); both branches are
  normalised with learnable vectors before the gate (``mag_branch_norm``, default on; off gives
  ``y * sigmoid(M(x))``), and the memory reads ``[persistent; x]`` (``memory_reads_persistent``, below).
* ``mal`` memory as a layer (sec. 4.3, eqs. 29-31): ``x + M(x)`` then ``x + SWA*(x)``; the memory reads
  ``[persistent; x]`` like MAG's.
* ``lmm`` the long-term memory alone (sec. 4.3, "LMM"): ``x + M(x)``.
* ``swa`` the sliding-window transformer baseline (persistent tokens, no memory), for equal-parameter comparisons.

Persistent memory (eq. 19): ``num_persistent`` learned tokens per layer, projected by that layer's attention
keys/values and visible to every query (so they do not fall out of the sliding window). In MAG and MAL the memory
also reads them before the sequence (eqs. 26, 29: the memory's input is ``[persistent; x]``): ``init_state``
writes the (pre-normed) persistent tokens into the learned ``M_0`` and drops their reads, so a fresh state already
holds them and streaming still starts at position 0.

Memory output (sec. 4.4, "we normalise and gate the output with a linear layer"): ``memory_output_gate`` (default
on) RMS-normalises each memory head's read and gates it with ``sigmoid(x W_g)`` before the output projection;
``memory_kind="mlp_ln"`` is the deep memory of the paper's later revision and ``memory_forget_gate="channel"`` the
channel-wise forgetting gate (looped_jax/models/neural_memory.py; both run on a pure-JAX chunked path, not the
Pallas kernel).

Sliding-window attention is computed block-wise (blocks of ``window`` queries against the previous and current
block), so memory grows linearly in the sequence length. :meth:`TitansModel.stream` carries everything a layer
needs across calls -- memory weights and momentum, the convolution history and the last ``window`` keys/values --
so inference memory is constant in the sequence length; a stream of chunks whose lengths are multiples of
``segment_len`` (mac) / ``memory_chunk_size`` (others) equals one call over the concatenation. A call shorter than
a chunk still updates the memory (the update pads ragged chunks with no-op tokens).

Departures from the paper:

* defaults changed with these options: ``memory_output_gate``, ``mag_branch_norm`` and ``memory_reads_persistent``
  default to the paper's behaviour (on), which changes the parameter tree and outputs of configs written before
  them; set all three False for the earlier model;
* MAG / MAL: the persistent tokens are written into the memory as their own update chunk(s) (a ragged chunk is
  padded with no-op tokens), not as the first tokens of the sequence's first chunk, so that every stream starts on
  a chunk boundary; their convolution history does carry into the first tokens of x. MAL's attention sees the
  raw persistent tokens as its always-visible prefix, not the memory's reads of them (eq. 30 attends over
  ``M([persistent; x])`` with a sliding window);
* the MAG gate is the sigmoid of the normalised memory branch (eq. 28 leaves the non-linearity open);
* the memory output gate is per head and channel, ``sigmoid(linear(x))`` of the memory's input;
* the MAC segment is attended as one block (no separate per-segment window).

Sleep-style consolidation (``consolidation_passes``, ``consolidation_lr_decay``, ``replay``; off by default, and
then the model is exactly the one without them): when a *segment* has been read, the memory runs
``consolidation_passes`` extra offline passes of its update over that segment before the next segment is read
(looped_jax/models/neural_memory.py, ``NeuralMemory.consolidate``). A segment is the MAC segment
(``segment_len`` tokens) for ``mac`` and a block of ``window`` tokens -- the tokens that then leave the sliding
window -- for ``mag``, ``mal`` and ``lmm`` (blocks counted from the start of each call; a shorter last block is a
segment too; ``lmm`` has no attention but uses the same ``window`` blocks). The passes reuse the segment's gates
(theta scaled by ``consolidation_lr_decay ** (pass + 1)``), keep invalid tokens no-ops and change only the memory
state handed to later segments, never the segment's own outputs. With ``replay=R`` every pass first replays the R
previous segments (oldest first) from a ring buffer in the streaming state. The persistent tokens' write in
``init_state`` is not consolidated. With consolidation on, ``stream_multiple`` of mag/mal/lmm becomes
``lcm(memory_chunk_size, window)``. The passes are a test-time knob as well: the parameters do not depend on them.

Limitations: rows are single sequences; ``segment_ids == 0`` marks padding (it never writes into the memory) but
several documents packed in one row would share the memory.
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
from looped_jax.models.neural_memory import FORGET_GATES, KERNEL_MEMORY_KINDS, MEMORY_KINDS, MemoryCarry, NeuralMemory
from looped_jax.models.protocol import LossOutput, TokenModel
from looped_jax.nn import Attention, Embed, RMSNorm, SwiGLU, Unembed, param, resolve_dtype, takase_std, truncated_normal
from looped_jax.recurrence import REMAT_POLICIES

VARIANTS = ("mac", "mag", "mal", "lmm", "swa")
_NEG = -1e30


@dataclasses.dataclass(frozen=True)
class TitansConfig:
    """Titans language model; ``variant`` picks the architecture (see module docstring)."""

    name: str = "titans"
    variant: str = "mac"
    vocab_size: int = 64
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 16
    mlp_dim: int = 192
    window: int = 16  # sliding-window attention span (mag, mal, swa)
    segment_len: int = 16  # mac segment length
    num_persistent: int = 4
    memory_kind: str = "linear"  # "linear", "mlp" or "mlp_ln" (deep memory x + LN(gelu(x W1) W2))
    memory_heads: int = 4
    memory_head_dim: int = 16
    memory_hidden: int = 0  # mlp memory hidden width; 0 = memory_head_dim ("mlp"), 4 x memory_head_dim ("mlp_ln")
    memory_layers: int = 2  # mlp memory depth
    memory_chunk_size: int = 8  # tokens per parallel update chunk (gradients at the chunk start, eq. 16)
    memory_max_lr: float = 0.05  # theta_t = memory_max_lr * sigmoid(.)
    use_momentum: bool = True
    use_forgetting: bool = True
    conv_kernel: int = 4
    max_surprise_norm: float = 0.0  # > 0 clips each chunk's update norm
    memory_impl: str = "auto"  # "auto", "xla" or "pallas"
    memory_forget_gate: str = "scalar"  # "scalar" alpha_t per head, "channel" alpha_t in [0, 1]^d per head
    memory_output_gate: bool = True  # sec. 4.4: RMS-normalise the memory read and gate it with sigmoid(linear(x))
    mag_branch_norm: bool = True  # MAG (eq. 28): RMS-normalise y and M(x) (learnable vectors) before the gate
    memory_reads_persistent: bool = True  # MAG / MAL (eqs. 26, 29): the memory first reads the persistent tokens
    alpha_bias: float = -6.0  # initial forgetting gate logit
    eta_bias: float = 2.0  # initial momentum gate logit
    theta_bias: float = 0.0  # initial learning-rate gate logit
    consolidation_passes: int = 0  # extra offline memory-update passes over each segment once it has been read
    consolidation_lr_decay: float = 1.0  # pass p (0-based) scales theta by consolidation_lr_decay ** (p + 1)
    replay: int = 0  # each consolidation pass also replays the R previous segments (oldest first)
    remat_policy: str = ""  # "" = none, else a name in recurrence.REMAT_POLICIES: each layer recomputed in backward
    tie_embeddings: bool = True
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    dtype: str = "float32"

    def __post_init__(self):
        _check(self.name == "titans", "name", "'titans'", self.name)
        _check(self.variant in VARIANTS, "variant", f"one of {VARIANTS}", self.variant)
        for f in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim"):
            _check(getattr(self, f) >= 1, f, ">= 1", getattr(self, f))
        for f in ("window", "segment_len", "memory_heads", "memory_head_dim", "memory_chunk_size", "conv_kernel"):
            _check(getattr(self, f) >= 1, f, ">= 1", getattr(self, f))
        _check(self.num_persistent >= 0, "num_persistent", ">= 0", self.num_persistent)
        _check(self.num_heads % self.num_kv_heads == 0, "num_heads", "a multiple of num_kv_heads", self.num_heads)
        _check(self.head_dim % 2 == 0, "head_dim", "even (rotary embeddings)", self.head_dim)
        _check(self.memory_kind in MEMORY_KINDS, "memory_kind", f"one of {MEMORY_KINDS}", self.memory_kind)
        _check(self.memory_hidden >= 0, "memory_hidden", ">= 0", self.memory_hidden)
        _check(
            self.memory_forget_gate in FORGET_GATES, "memory_forget_gate", f"one of {FORGET_GATES}",
            self.memory_forget_gate,
        )  # fmt: skip
        if self.memory_impl == "pallas":
            _check(
                self.memory_kind in KERNEL_MEMORY_KINDS and self.memory_forget_gate == "scalar",
                "memory_impl",
                f"'auto' or 'xla' for memory_kind={self.memory_kind!r}, memory_forget_gate="
                f"{self.memory_forget_gate!r} (the Pallas kernel runs {KERNEL_MEMORY_KINDS} with a scalar gate)",
                self.memory_impl,
            )
        _check(self.memory_layers >= 2, "memory_layers", ">= 2", self.memory_layers)
        _check(self.memory_max_lr > 0, "memory_max_lr", "> 0", self.memory_max_lr)
        _check(self.max_surprise_norm >= 0, "max_surprise_norm", ">= 0 (0 = off)", self.max_surprise_norm)
        _check(
            self.memory_impl in ("auto", "xla", "pallas"), "memory_impl", "'auto', 'xla' or 'pallas'", self.memory_impl
        )
        if self.variant == "mac":
            _check(
                self.segment_len % self.memory_chunk_size == 0,
                "segment_len",
                f"a multiple of memory_chunk_size={self.memory_chunk_size}",
                self.segment_len,
            )
        _check(self.consolidation_passes >= 0, "consolidation_passes", ">= 0 (0 = off)", self.consolidation_passes)
        _check(
            self.consolidation_passes == 0 or self.has_memory, "consolidation_passes",
            f"0 for variant={self.variant!r} (no memory)", self.consolidation_passes,
        )  # fmt: skip
        _check(0 < self.consolidation_lr_decay <= 1, "consolidation_lr_decay", "in (0, 1]", self.consolidation_lr_decay)
        _check(self.replay >= 0, "replay", ">= 0 (0 = off)", self.replay)
        _check(
            self.replay == 0 or self.consolidation_passes > 0, "replay",
            "0 when consolidation_passes == 0 (segments are replayed once per consolidation pass)", self.replay,
        )  # fmt: skip
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
    def has_memory(self) -> bool:
        return self.variant != "swa"

    @property
    def has_window_attention(self) -> bool:
        return self.variant in ("mag", "mal", "swa")

    @property
    def stream_multiple(self) -> int:
        """Stream chunks must be multiples of this for streaming to equal the one-shot forward."""
        if self.variant == "mac":
            return self.segment_len
        if self.consolidation_passes > 0:  # whole memory chunks and whole consolidation segments
            return math.lcm(self.memory_chunk_size, self.window)
        return self.memory_chunk_size

    @property
    def consolidation_segment_len(self) -> int:
        """Tokens per consolidation segment: the MAC segment, else a block of ``window`` tokens."""
        return self.segment_len if self.variant == "mac" else self.window


class WindowCache(NamedTuple):
    """The last ``window`` keys/values of a sliding-window attention layer (``valid`` False = empty slot)."""

    k_BWKH: jax.Array
    v_BWKH: jax.Array
    positions_BW: jax.Array
    valid_BW: jax.Array


class LayerCarry(NamedTuple):
    memory: MemoryCarry | None
    window: WindowCache | None


class TitansState(NamedTuple):
    """Streaming state: one carry per layer and the position of the next token."""

    layers: tuple[LayerCarry, ...]
    offset: jax.Array  # int32 scalar


def _attend(q_BQNH, k_BSKH, v_BSKH, mask_BQS) -> jax.Array:
    """Softmax attention in float32 with grouped kv heads; rows with no visible key give 0."""
    groups = q_BQNH.shape[2] // k_BSKH.shape[2]
    k = jnp.repeat(k_BSKH, groups, axis=2).astype(jnp.float32)
    v = jnp.repeat(v_BSKH, groups, axis=2).astype(jnp.float32)
    s_BNQS = jnp.einsum("bqnh,bsnh->bnqs", q_BQNH.astype(jnp.float32), k) / math.sqrt(q_BQNH.shape[-1])
    s_BNQS = jnp.where(mask_BQS[:, None], s_BNQS, _NEG)
    p = jax.nn.softmax(s_BNQS, axis=-1) * jnp.any(mask_BQS, -1)[:, None, :, None]
    return jnp.einsum("bnqs,bsnh->bqnh", p, v)


def _prefix_kv(attn: Attention, persistent_PD: jax.Array | None, batch: int):
    """Keys/values of the persistent tokens (no rotation: position 0), broadcast over the batch."""
    if persistent_PD is None:
        return None
    P = persistent_PD.shape[0]
    _, k, v = attn.project(persistent_PD[None], jnp.zeros((1, P), jnp.int32))
    bcast = lambda a: jnp.broadcast_to(a, (batch, *a.shape[1:]))
    return bcast(k), bcast(v)


def sliding_window_attention(
    attn: Attention,
    x_BTD: jax.Array,
    positions_BT: jax.Array,
    valid_BT: jax.Array,
    persistent_PD: jax.Array | None,
    cache: WindowCache,
    window: int,
) -> tuple[jax.Array, WindowCache]:
    """Causal attention to the last ``window`` positions (plus the always-visible persistent tokens), in blocks of
    ``window`` queries against [previous block; current block]; the cache holds the ``window`` tokens before x."""
    B, T, _ = x_BTD.shape
    W = window
    q_BTNH, k_BTKH, v_BTKH = attn.project(x_BTD, positions_BT)
    kc = jnp.concatenate([cache.k_BWKH.astype(k_BTKH.dtype), k_BTKH], axis=1)
    vc = jnp.concatenate([cache.v_BWKH.astype(v_BTKH.dtype), v_BTKH], axis=1)
    pc = jnp.concatenate([cache.positions_BW, positions_BT], axis=1)
    mc = jnp.concatenate([cache.valid_BW, valid_BT], axis=1)
    new_cache = WindowCache(kc[:, T:], vc[:, T:], pc[:, T:], mc[:, T:])
    NB = -(-T // W)
    pad = NB * W - T
    padT = lambda a: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
    kc, vc, pc, mc = map(padT, (kc, vc, pc, mc))
    blocks = lambda a, start: a[:, start : start + NB * W].reshape(B * NB, W, *a.shape[2:])
    both = lambda a: jnp.concatenate([blocks(a, 0), blocks(a, W)], axis=1)  # [B*NB, 2W, ...]
    k_b, v_b, kpos_b, kval_b = map(both, (kc, vc, pc, mc))
    q_b, qpos_b = blocks(padT(q_BTNH), 0), blocks(padT(positions_BT), 0)
    delta = qpos_b[:, :, None] - kpos_b[:, None, :]
    mask = kval_b[:, None, :] & (delta >= 0) & (delta < W)
    prefix = _prefix_kv(attn, persistent_PD, B * NB)
    if prefix is not None:
        k_b = jnp.concatenate([prefix[0].astype(k_b.dtype), k_b], axis=1)
        v_b = jnp.concatenate([prefix[1].astype(v_b.dtype), v_b], axis=1)
        mask = jnp.concatenate([jnp.ones((B * NB, W, prefix[0].shape[1]), bool), mask], axis=2)
    o = _attend(q_b, k_b, v_b, mask).reshape(B, NB * W, *q_BTNH.shape[2:])[:, :T]
    return attn.output(o), new_cache


def mac_attention(attn, x_BSD, h_BSD, positions_BS, valid_BS, persistent_PD) -> jax.Array:
    """MAC attention of one segment over [persistent; retrieved h; segment] (eq. 22-23), causal over h and x."""
    B, S, _ = x_BSD.shape
    q, kx, vx = attn.project(x_BSD, positions_BS)
    _, kh, vh = attn.project(h_BSD.astype(x_BSD.dtype), positions_BS)
    causal = (positions_BS[:, :, None] >= positions_BS[:, None, :]) & valid_BS[:, None, :]
    k, v, mask = jnp.concatenate([kh, kx], 1), jnp.concatenate([vh, vx], 1), jnp.concatenate([causal, causal], 2)
    prefix = _prefix_kv(attn, persistent_PD, B)
    if prefix is not None:
        k, v = jnp.concatenate([prefix[0], k], 1), jnp.concatenate([prefix[1], v], 1)
        mask = jnp.concatenate([jnp.ones((B, S, prefix[0].shape[1]), bool), mask], axis=2)
    return attn.output(_attend(q, k, v, mask))


class TitansLayer(nnx.Module):
    """One Titans layer of the configured variant followed by a SwiGLU MLP (pre-norm residuals)."""

    def __init__(self, cfg: TitansConfig, *, init_std: float, out_init_std: float, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = resolve_dtype(cfg.dtype)
        norm = lambda: RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.norm_mix = norm()
        self.norm_mlp = norm()
        self.mlp = SwiGLU(
            cfg.d_model, cfg.mlp_dim, init_std=init_std, out_init_std=out_init_std, dtype=dtype, rngs=rngs
        )
        self.attn = None
        if cfg.variant != "lmm":
            self.attn = nnx.data(
                Attention(
                    cfg.d_model,
                    cfg.num_heads,
                    cfg.num_kv_heads,
                    cfg.head_dim,
                    init_std=init_std,
                    out_init_std=out_init_std,
                    mask_kind="sliding",
                    window=cfg.window if cfg.variant != "mac" else cfg.segment_len,
                    rope_theta=cfg.rope_theta,
                    dtype=dtype,
                    rngs=rngs,
                )
            )
        self.persistent_PD = None
        if cfg.variant != "lmm" and cfg.num_persistent:
            p = truncated_normal(rngs.params(), (cfg.num_persistent, cfg.d_model), 1.0)
            self.persistent_PD = nnx.data(param(p, (None, "embed")))
        self.memory = None
        if cfg.has_memory:
            self.memory = nnx.data(
                NeuralMemory(
                    cfg.d_model,
                    num_heads=cfg.memory_heads,
                    head_dim=cfg.memory_head_dim,
                    memory=cfg.memory_kind,
                    hidden=cfg.memory_hidden,
                    num_layers=cfg.memory_layers,
                    chunk_size=cfg.memory_chunk_size,
                    max_lr=cfg.memory_max_lr,
                    use_momentum=cfg.use_momentum,
                    use_forgetting=cfg.use_forgetting,
                    conv_kernel=cfg.conv_kernel,
                    max_surprise_norm=cfg.max_surprise_norm,
                    impl=cfg.memory_impl,
                    alpha_bias=cfg.alpha_bias,
                    eta_bias=cfg.eta_bias,
                    theta_bias=cfg.theta_bias,
                    retrieval_query=cfg.variant == "mac",
                    forget_gate=cfg.memory_forget_gate,
                    output_gate=cfg.memory_output_gate,
                    init_std=init_std,
                    out_init_std=out_init_std,
                    rngs=rngs,
                    consolidation_passes=cfg.consolidation_passes,
                    consolidation_lr_decay=cfg.consolidation_lr_decay,
                    replay=cfg.replay,
                    segment_len=cfg.consolidation_segment_len,
                )
            )
        self.norm_second = nnx.data(norm()) if cfg.variant == "mal" else None
        branch_norms = cfg.variant == "mag" and cfg.mag_branch_norm  # eq. 28: learnable vector-valued norms
        self.norm_y = nnx.data(norm() if branch_norms else None)
        self.norm_m = nnx.data(norm() if branch_norms else None)

    @property
    def primes_memory(self) -> bool:
        """MAG / MAL with persistent tokens: the memory reads [persistent; x] (eqs. 26, 29)."""
        cfg = self.cfg
        return cfg.memory_reads_persistent and cfg.variant in ("mag", "mal") and self.persistent_PD is not None

    def initial_carry(self, batch: int) -> LayerCarry:
        cfg = self.cfg
        mem = self.memory.initial_carry(batch) if self.memory is not None else None
        if self.primes_memory:  # write the persistent tokens first; their reads are dropped
            p_BPD = jnp.broadcast_to(self.persistent_PD[...][None], (batch, *self.persistent_PD.shape))
            _, mem = self.memory(self.norm_mix(p_BPD), mem)
        win = None
        if cfg.has_window_attention:
            kv = jnp.zeros((batch, cfg.window, cfg.num_kv_heads, cfg.head_dim), jnp.float32)
            ids = jnp.zeros((batch, cfg.window), jnp.int32)
            win = WindowCache(kv, kv, ids, ids.astype(bool))
        return LayerCarry(mem, win)

    def _persistent(self):
        return None if self.persistent_PD is None else self.persistent_PD[...]

    def _swa(self, x, positions, valid, cache):
        return sliding_window_attention(self.attn, x, positions, valid, self._persistent(), cache, self.cfg.window)

    def _mac(self, x_BTD, positions_BT, valid_BT, carry: MemoryCarry) -> tuple[jax.Array, MemoryCarry]:
        """Scan over segments: retrieve from M_{t-1}, attend, update M with the attention output, gate."""
        B, T, D = x_BTD.shape
        S = self.cfg.segment_len
        NS = -(-T // S)
        pad = NS * S - T
        seg = lambda a: jnp.moveaxis(
            jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)).reshape(B, NS, S, *a.shape[2:]), 1, 0
        )
        graphdef, params = nnx.split((self.attn, self.memory))
        persistent = self._persistent()

        def body(c: MemoryCarry, inp):
            x, pos, val = inp
            attn, memory = nnx.merge(graphdef, params)
            h = memory.retrieve(x, c.state)  # M*_{t-1}(q_t), eq. 21
            y = mac_attention(attn, x, h, pos, val, persistent)  # eqs. 22-23
            m, c = memory(y, c, val, consolidate=True)  # eq. 24: update with y, read M_t(y) per token
            return c, y * jax.nn.sigmoid(m)  # eq. 25

        carry, o = jax.lax.scan(body, carry, (seg(x_BTD), seg(positions_BT), seg(valid_BT)))
        return jnp.moveaxis(o, 0, 1).reshape(B, NS * S, D)[:, :T], carry

    def _memory(self, x_BTD, valid_BT, carry: MemoryCarry) -> tuple[jax.Array, MemoryCarry]:
        """The memory over x (mag, mal, lmm); with consolidation on, in segments of ``window`` tokens, each
        consolidated after it is read (a shorter last segment too)."""
        if self.cfg.consolidation_passes == 0:
            return self.memory(x_BTD, carry, valid_BT)
        B, T, D = x_BTD.shape
        W = self.cfg.window
        NB, outs = T // W, []
        if NB:
            graphdef, params = nnx.split(self.memory)
            blocks = lambda a: jnp.moveaxis(a[:, : NB * W].reshape(B, NB, W, *a.shape[2:]), 1, 0)

            def body(c: MemoryCarry, inp):
                x, val = inp
                return nnx.merge(graphdef, params)(x, c, val, consolidate=True)[::-1]

            carry, o = jax.lax.scan(body, carry, (blocks(x_BTD), blocks(valid_BT)))
            outs.append(jnp.moveaxis(o, 0, 1).reshape(B, NB * W, D))
        if T > NB * W:
            o, carry = self.memory(x_BTD[:, NB * W :], carry, valid_BT[:, NB * W :], consolidate=True)
            outs.append(o)
        return jnp.concatenate(outs, axis=1), carry

    def __call__(self, x_BTD, positions_BT, valid_BT, carry: LayerCarry) -> tuple[jax.Array, LayerCarry]:
        v = self.cfg.variant
        mem, win = carry.memory, carry.window
        h = self.norm_mix(x_BTD)
        if v == "mac":
            o, mem = self._mac(h, positions_BT, valid_BT, mem)
        elif v == "mag":
            y, win = self._swa(h, positions_BT, valid_BT, win)
            m, mem = self._memory(h, valid_BT, mem)
            if self.norm_y is not None:
                y, m = self.norm_y(y), self.norm_m(m)
            o = y * jax.nn.sigmoid(m)
        elif v == "swa":
            o, win = self._swa(h, positions_BT, valid_BT, win)
        else:  # mal, lmm: the memory layer first
            o, mem = self._memory(h, valid_BT, mem)
        x_BTD = x_BTD + o.astype(x_BTD.dtype)
        if v == "mal":
            o, win = self._swa(self.norm_second(x_BTD), positions_BT, valid_BT, win)
            x_BTD = x_BTD + o.astype(x_BTD.dtype)
        x_BTD = x_BTD + self.mlp(self.norm_mlp(x_BTD)).astype(x_BTD.dtype)
        return x_BTD, LayerCarry(mem, win)


class TitansModel(TokenModel, nnx.Module):
    """Embedding -> Titans layers -> final norm -> (tied) head."""

    def __init__(self, cfg: TitansConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        std = takase_std(cfg.d_model)
        out_std = std / math.sqrt(2 * cfg.num_layers)
        dtype = resolve_dtype(cfg.dtype)
        self.embed = Embed(cfg.vocab_size, cfg.d_model, init_std=std, dtype=dtype, rngs=rngs)
        self.layers = nnx.List(
            [TitansLayer(cfg, init_std=std, out_init_std=out_std, rngs=rngs) for _ in range(cfg.num_layers)]
        )
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.unembed = (
            None if cfg.tie_embeddings else Unembed(cfg.d_model, cfg.vocab_size, init_std=std, dtype=dtype, rngs=rngs)
        )

    def init_state(self, batch: int) -> TitansState:
        """Fresh streaming state (learned initial memories, empty windows, position 0)."""
        return TitansState(tuple(layer.initial_carry(batch) for layer in self.layers), jnp.zeros((), jnp.int32))

    def forward(
        self, inputs_BT: jax.Array, positions_BT: jax.Array, valid_BT: jax.Array, state: TitansState
    ) -> tuple[jax.Array, TitansState]:
        """Logits ``[B, T, V]`` (float32) continuing from ``state``, and the state after the T tokens."""
        if inputs_BT.ndim != 2:
            raise ValueError(f"inputs must be [batch, length] token ids, got shape {inputs_BT.shape}")
        if len(state.layers) != len(self.layers):
            raise ValueError(f"state has {len(state.layers)} layer carries, the model has {len(self.layers)} layers")
        x_BTD = self.embed(inputs_BT).astype(jnp.float32)

        def apply(layer: TitansLayer, x_BTD, positions_BT, valid_BT, carry):
            return layer(x_BTD, positions_BT, valid_BT, carry)

        if self.cfg.remat_policy:  # keep only each layer's inputs for the backward pass (the memory's chunk states
            # of one layer at a time, instead of every layer's, live during the backward pass)
            apply = nnx.remat(apply, policy=REMAT_POLICIES[self.cfg.remat_policy])
        carries = []
        for layer, carry in zip(self.layers, state.layers, strict=True):
            x_BTD, carry = apply(layer, x_BTD, positions_BT, valid_BT, carry)
            carries.append(carry)
        x_BTD = self.final_norm(x_BTD)
        logits = self.embed.attend(x_BTD) if self.unembed is None else self.unembed(x_BTD)
        return logits, TitansState(tuple(carries), state.offset + inputs_BT.shape[1])

    def stream(self, inputs_BT: jax.Array, state: TitansState) -> tuple[jax.Array, TitansState]:
        """One chunk of a stream: positions continue from ``state.offset``; memory use is independent of the
        tokens seen so far. Chunks whose lengths are multiples of ``cfg.stream_multiple`` reproduce ``__call__``."""
        T = inputs_BT.shape[1]
        positions = jnp.broadcast_to(state.offset + jnp.arange(T, dtype=jnp.int32), inputs_BT.shape)
        return self.forward(inputs_BT, positions, jnp.ones(inputs_BT.shape, bool), state)

    def __call__(
        self,
        inputs_BT: jax.Array,
        *,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        num_loops: int | None = None,
        rng: jax.Array | None = None,
    ) -> jax.Array:
        """Logits ``[B, T, V]`` of a fresh sequence; ``segment_ids == 0`` marks padding (never written to memory)."""
        del num_loops, rng  # no loop count, deterministic
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(inputs_BT.shape[1], dtype=jnp.int32), inputs_BT.shape)
        valid = jnp.ones(inputs_BT.shape, bool) if segment_ids_BT is None else segment_ids_BT > 0
        logits, _ = self.forward(inputs_BT, positions_BT, valid, self.init_state(inputs_BT.shape[0]))
        return logits

    def loss(self, batch: dict, *, rng: jax.Array, train: bool = True, carry: None = None) -> LossOutput:
        """Weighted next-token cross-entropy (stateless: ``carry`` is unused)."""
        del train, carry
        logits = self(
            batch["inputs"], positions_BT=batch.get("positions"), segment_ids_BT=batch.get("segment_ids"), rng=rng
        )
        return LossOutput(*cross_entropy(logits, batch["targets"], batch["weights"]))

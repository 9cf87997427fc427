"""Titans neural long-term memory module (Behrouz et al. 2024, "Titans: Learning to Memorize at Test Time",
arXiv 2501.00663, sec. 3.1 and 4.4).

Per head the memory M is a linear map or a small MLP whose weights are trained AT TEST TIME on the associative
loss ``||M(k_t) - v_t||^2`` (eq. 12) by gradient descent with momentum and forgetting (eqs. 13-14); the update
itself is ``pallas_kernels.memory_update`` (chunked parallel form, eq. 16-18). This module supplies what feeds it:

* queries, keys, values: linear projections, a depthwise causal convolution (kernel 4, sec. 4.4), SiLU, and
  l2-normalised queries and keys;
* data-dependent gates per token and head from linear + sigmoid heads: forgetting ``alpha_t``, momentum decay
  ``eta_t`` and learning rate ``theta_t = max_lr * sigmoid(.)`` (sec. 3.2, "data-dependent" gates);
* learned initial memory weights ``M_0`` (shared over the batch);
* the output path (sec. 4.4, "we normalise and gate the output with a linear layer"): with ``output_gate=True``
  (the default) each head's read ``M(q)`` is RMS-normalised with a learnable vector and multiplied by
  ``sigmoid(x W_g)`` (a linear gate of the memory's input x, per head and channel) before the output projection;
  ``output_gate=False`` projects the raw read (the behaviour before this option existed);
* memories (``memory=``): ``"linear"`` ``M(x) = x W``; ``"mlp"`` ``M(x) = x + silu(x W_1) W_2`` (the kernel's
  MLP, pallas_kernels.memory_update.reference); ``"mlp_ln"`` the deep memory of the paper's later revision,
  ``M(x) = x + LN(gelu(x W_1) W_2)`` with ``hidden`` = 4 x head_dim by default (LN without affine weights: the
  memory's parameters are only its matrices);
* forgetting (``forget_gate=``): ``"scalar"`` one ``alpha_t`` per token and head (eq. 13), ``"channel"`` a vector
  ``alpha_t`` in [0, 1]^d per token and head, one rate per output channel of every memory matrix
  (``M_t[:, c] = (1 - alpha_t[c]) M_{t-1}[:, c] + S_t[:, c]``), from its own linear + sigmoid head;
* switches: ``use_momentum=False`` sets eta = 0 (no momentum), ``use_forgetting=False`` sets alpha = 0;
* validity: tokens with ``valid_BT`` False (padding anywhere in a row) leave the memory AND its momentum exactly
  unchanged, ``M_t = M_{t-1}``, ``S_t = S_{t-1}``: the mask goes into the memory-update op, because gates alone
  (alpha = 0, eta = 1, theta = 0) keep S but still move M by the carried surprise, ``M_t = M_{t-1} + S_{t-1}``
  (eq. 13). They still enter the convolution history of the tokens after them.

Update paths: ``memory in ("linear", "mlp")`` with ``forget_gate="scalar"`` runs the memory-update op (Pallas
kernel or its chunked XLA form); ``"mlp_ln"`` or ``forget_gate="channel"`` -- which the kernel cannot express (it
has no LayerNorm/GELU and takes one alpha per token) -- run :func:`memory_update_dual`, a pure-JAX chunked form
with the same semantics (chunk-start gradients, eq. 16; per-token retrieval through the TTT dual form; masks;
surprise clipping), and ``impl="pallas"`` with them is a ValueError.

Departures from the paper: the channel-wise gate's d is read as "each output channel of each memory matrix"
(A = hidden + head_dim rates for the 2-matrix memory), the paper does not say which axis; the LayerNorm of
``mlp_ln`` has no affine weights; ``memory_update_dual`` differentiates through ``jax.grad`` of the memory (second
order autodiff, no hand-written backward as the op has) and holds ``[C, C, A]`` gate tensors per chunk, so it
compiles and runs slower than the kernel path (no benchmark yet).

Everything the memory carries between calls (memory weights, momentum, the last ``conv_kernel - 1`` projected
inputs of the convolution) lives in :class:`MemoryCarry`, so a stream of chunks fed one after another gives the
same outputs as one call over the whole sequence (for chunks that are whole multiples of ``chunk_size``).

Sleep-style consolidation (``consolidation_passes=N > 0``, off by default): a call made with ``consolidate=True``
treats its tokens as one *segment* that has just been read (the caller decides what a segment is; Titans uses
the MAC segment or a block of ``window`` tokens). After the ordinary update over the segment, N extra offline
passes of the same memory update run over the segment's keys/values, starting from the post-segment state
(weights AND momentum); pass p (0-based) uses the segment's own gates alpha, eta and theta, except that theta is
multiplied by ``consolidation_lr_decay ** (p + 1)``; invalid tokens stay no-ops. With ``replay=R > 0`` each pass
first replays the R most recent earlier segments (oldest first, each with its own stored gates and the same
decayed theta), then the current segment. Those segments' keys, values, gates and masks live in a ring buffer,
:class:`ReplayBuffer` in ``MemoryCarry.replay`` (slots not yet filled are all-invalid, hence no-ops), so
streaming stays exact. The passes change only the state handed to what follows; the call's reads are those of
the ordinary update. ``consolidation_passes=0`` (the default) runs exactly the code it ran before.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from looped_jax import sharding as shd
from looped_jax.nn import param, truncated_normal
from looped_jax.nn.platform import target_platform
from pallas_kernels.memory_update import MemoryState, memory_retrieve, memory_update
from pallas_kernels.memory_update.reference import clip_scale_from_sq

_HI = lax.Precision.HIGHEST
MEMORY_KINDS = ("linear", "mlp", "mlp_ln")
KERNEL_MEMORY_KINDS = ("linear", "mlp")  # what pallas_kernels.memory_update runs
FORGET_GATES = ("scalar", "channel")


class ReplayBuffer(NamedTuple):
    """The memory inputs of the last R consolidated segments, oldest first (axis 0), each padded to S tokens:
    keys/values ``[R, B, H, S, K]``, gates ``alpha`` ``[R, B, H, S]`` (``[R, B, H, S, A]`` channel-wise), ``eta``,
    ``theta`` and ``valid`` ``[R, B, H, S]`` (False for padding and for slots not yet filled)."""

    k_RBHSK: jax.Array
    v_RBHSK: jax.Array
    alpha_RBHS: jax.Array
    eta_RBHS: jax.Array
    theta_RBHS: jax.Array
    valid_RBHS: jax.Array


class MemoryCarry(NamedTuple):
    """Streaming state of one memory: weights/momentum ``[B, H, ...]`` (float32), conv inputs ``[B, L-1, 3, H, K]``
    and, with ``replay > 0``, the consolidation ring buffer (None otherwise)."""

    state: MemoryState
    conv_BL3HK: jax.Array
    replay: ReplayBuffer | None = None


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / ||x|| over the last axis, in float32."""
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)


def _layer_norm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """LayerNorm over the last axis without affine weights."""
    mu = jnp.mean(x, axis=-1, keepdims=True)
    xc = x - mu
    return xc * jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + eps)


def _memory_forward(weights, x_CK, memory, dz=None):
    """``M(x)`` for one (batch, head) and the input of every memory matrix; ``dz`` (optional, one ``[C, d_out]``
    per matrix) is added to the matrices' outputs so that ``grad`` w.r.t. it gives the per-token output gradients."""
    h, inputs = x_CK, []
    act = jax.nn.gelu if memory == "mlp_ln" else jax.nn.silu
    for i, w in enumerate(weights):
        inputs.append(h)
        h = h @ w + (0.0 if dz is None else dz[i])
        if i < len(weights) - 1:
            h = act(h)
    if memory == "mlp_ln":
        h = x_CK + _layer_norm(h)
    elif memory == "mlp" and h.shape[-1] == x_CK.shape[-1]:
        h = h + x_CK
    return h, inputs


def memory_apply(weights, x_TK: jax.Array, memory: str) -> jax.Array:
    """``M(x)`` for one (batch, head), any memory kind."""
    return _memory_forward(weights, x_TK, memory)[0]


def _cumprods(x_CA: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``seg[i, j, a] = prod_{j < l <= i} x[l, a]`` (0 above the diagonal) and ``run[i, a] = prod_{l <= i} x[l, a]``."""
    C = x_CA.shape[0]
    i, j = jnp.arange(C)[:, None, None], jnp.arange(C)[None, :, None]
    z = jnp.where(i > j, x_CA[:, None, :], 1.0)
    return jnp.where(i >= j, jnp.cumprod(z, axis=0), 0.0), jnp.cumprod(x_CA, axis=0)


def _dual_chunk(state, chunk, memory, max_norm):
    """One chunk of C tokens for one (batch, head): every gradient at the chunk-start memory W0 (eq. 16); token i
    reads ``M_i(q_i)`` with ``W_i = A_i W0 + c_i S0 - sum_{j<=i} G_ij theta_j x_j^T dz_j`` (per output channel when
    alpha is), layer by layer (the TTT dual form), so no per-token weights are materialised."""
    w0, s0 = state
    q, k, v, alphas, eta, theta, valid = chunk  # alphas: one [C, 1 or d_out] per matrix
    H = _HI
    dz0 = [jnp.zeros((k.shape[0], w.shape[-1]), jnp.float32) for w in w0]

    def loss(dz):  # the summed associative loss (eq. 12) and every matrix's input, one forward at W0
        out, inputs = _memory_forward(w0, k, memory, dz)
        return jnp.sum(jnp.square(out - v)), inputs

    dz, xs = jax.grad(loss, has_aux=True)(dz0)
    if max_norm is not None:  # ||sum_j theta_j g_j|| over all matrices (reference._clip_scale)
        u = [jnp.einsum("jd,j,jc->dc", x, theta, g, precision=H) for x, g in zip(xs, dz, strict=True)]
        sq = sum(jnp.sum(jnp.square(ul)) for ul in u)
        theta = theta * clip_scale_from_sq(sq, max_norm)
    p_seg, e_run = _cumprods(eta[:, None])
    p_seg, e_run = p_seg[..., 0], e_run[:, 0]  # P [C, C], E [C]
    coeffs = []
    for a in alphas:
        d_seg, a_run = _cumprods(1.0 - a)  # D [C, C, A], A [C, A]
        g = jnp.einsum("ima,m,mj->ija", d_seg, valid, p_seg, precision=H)  # G
        c = jnp.einsum("ima,m,m->ia", d_seg, valid, e_run, precision=H)
        coeffs.append((g, a_run, c))
    # retrieval, layer by layer with the per-token weights
    h = q
    act = jax.nn.gelu if memory == "mlp_ln" else jax.nn.silu
    for l, (w, s, x, g_l, (g, a_run, c)) in enumerate(zip(w0, s0, xs, dz, coeffs, strict=True)):
        hx = jnp.einsum("id,jd->ij", h, x, precision=H)
        z = a_run * (h @ w) + c * (h @ s) - jnp.einsum("ija,j,ij,ja->ia", g, theta, hx, g_l, precision=H)
        h = act(z) if l < len(w0) - 1 else z
    if memory == "mlp_ln":
        h = q + _layer_norm(h)
    elif memory == "mlp" and h.shape[-1] == q.shape[-1]:
        h = h + q
    w_end, s_end = [], []
    for w, s, x, g_l, (g, a_run, c) in zip(w0, s0, xs, dz, coeffs, strict=True):
        w_end.append(a_run[-1] * w + c[-1] * s - jnp.einsum("ja,j,jd,ja->da", g[-1], theta, x, g_l, precision=H))
        s_end.append(e_run[-1] * s - jnp.einsum("j,jd,jc->dc", p_seg[-1] * theta, x, g_l, precision=H))
    return (tuple(w_end), tuple(s_end)), h


def memory_update_dual(
    q_BHTK: jax.Array,
    k_BHTK: jax.Array,
    v_BHTK: jax.Array,
    alpha_BHTA: jax.Array,
    eta_BHT: jax.Array,
    theta_BHT: jax.Array,
    state0: MemoryState,
    *,
    chunk_size: int,
    memory: str,
    max_surprise_norm: float | None = None,
    valid_BHT: jax.Array | None = None,
) -> tuple[jax.Array, MemoryState]:
    """Pure-JAX chunked Titans memory update for every memory kind and a scalar (``alpha_BHTA`` with A = 1) or
    channel-wise forgetting gate (A = the summed output widths of the memory matrices, split in order); the same
    semantics as ``pallas_kernels.memory_update.memory_update`` (chunk-start gradients, invalid tokens leave
    (M, S) unchanged, a ragged tail is padded with no-op tokens). Float32; returns ``(y_BHTK, final_state)``."""
    B, Hh, T, _ = q_BHTK.shape
    C = chunk_size
    N = -(-T // C)
    pad = N * C - T
    valid = jnp.ones((B, Hh, T), bool) if valid_BHT is None else valid_BHT.astype(bool)
    alpha = jnp.where(valid[..., None], alpha_BHTA, 0.0)
    eta, theta = jnp.where(valid, eta_BHT, 1.0), jnp.where(valid, theta_BHT, 0.0)

    def chunks(x, fill):  # [B, H, T, ...] -> [B, H, N, C, ...]
        x = jnp.pad(x.astype(jnp.float32), [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3), constant_values=fill)
        return x.reshape(B, Hh, N, C, *x.shape[3:])

    widths = [w.shape[-1] for w in state0.weights]
    if alpha.shape[-1] == 1:
        splits = [alpha] * len(widths)
    else:
        if alpha.shape[-1] != sum(widths):
            raise ValueError(f"alpha_BHTA's last axis must be 1 or {sum(widths)} (= {widths}), got {alpha.shape}")
        splits = jnp.split(alpha, [sum(widths[: i + 1]) for i in range(len(widths) - 1)], axis=-1)
    xs = (
        chunks(q_BHTK, 0.0), chunks(k_BHTK, 0.0), chunks(v_BHTK, 0.0), tuple(chunks(a, 0.0) for a in splits),
        chunks(eta, 1.0), chunks(theta, 0.0), chunks(valid, 0.0),
    )  # fmt: skip

    def one(xs_N, w0, s0):
        step = lambda st, ch: _dual_chunk(st, ch, memory, max_surprise_norm)
        (w, s), y = jax.lax.scan(step, (w0, s0), xs_N)
        return y.reshape(N * C, -1)[:T], w, s

    f32 = lambda t: tuple(a.astype(jnp.float32) for a in t)
    y, w, s = jax.vmap(jax.vmap(one))(xs, f32(state0.weights), f32(state0.momentum))
    return y, MemoryState(w, s)


class NeuralMemory(nnx.Module):
    """Long-term memory: ``(out_BTD, carry) = mem(x_BTD, carry)``; ``mem.retrieve(x, state)`` reads without writing."""

    def __init__(
        self,
        d_model: int,
        *,
        num_heads: int,
        head_dim: int,
        memory: str = "linear",
        hidden: int = 0,
        num_layers: int = 2,
        chunk_size: int = 16,
        max_lr: float = 0.05,
        use_momentum: bool = True,
        use_forgetting: bool = True,
        conv_kernel: int = 4,
        max_surprise_norm: float = 0.0,
        impl: str = "auto",
        alpha_bias: float = -6.0,
        eta_bias: float = 2.0,
        theta_bias: float = 0.0,
        retrieval_query: bool = False,
        forget_gate: str = "scalar",
        output_gate: bool = True,
        init_std: float,
        out_init_std: float,
        rngs: nnx.Rngs,
        consolidation_passes: int = 0,
        consolidation_lr_decay: float = 1.0,
        replay: int = 0,
        segment_len: int = 0,
    ):
        if memory not in MEMORY_KINDS:
            raise ValueError(f"memory must be one of {MEMORY_KINDS}, got {memory!r}")
        if forget_gate not in FORGET_GATES:
            raise ValueError(f"forget_gate must be one of {FORGET_GATES}, got {forget_gate!r}")
        if impl == "pallas" and (memory not in KERNEL_MEMORY_KINDS or forget_gate != "scalar"):
            raise ValueError(
                f"impl='pallas' cannot run memory={memory!r} with forget_gate={forget_gate!r}: the memory-update "
                f"kernel supports memory in {KERNEL_MEMORY_KINDS} with forget_gate='scalar'; use impl='auto' or 'xla' "
                "(the pure-JAX chunked form, memory_update_dual)"
            )
        if conv_kernel < 1:
            raise ValueError(f"conv_kernel must be >= 1, got {conv_kernel}")
        if not max_lr > 0:
            raise ValueError(f"max_lr must be > 0, got {max_lr}")
        if consolidation_passes < 0:
            raise ValueError(f"consolidation_passes must be >= 0, got {consolidation_passes}")
        if not 0 < consolidation_lr_decay <= 1:
            raise ValueError(f"consolidation_lr_decay must be in (0, 1], got {consolidation_lr_decay}")
        if replay < 0 or (replay > 0 and consolidation_passes == 0):
            raise ValueError(f"replay must be >= 0, and 0 when consolidation_passes == 0, got {replay}")
        if replay > 0 and segment_len < 1:
            raise ValueError(f"replay > 0 needs the segment length (segment_len >= 1), got {segment_len}")
        self.consolidation_passes, self.consolidation_lr_decay = consolidation_passes, consolidation_lr_decay
        self.replay, self.segment_len = replay, segment_len
        self.num_heads, self.head_dim, self.memory = num_heads, head_dim, memory
        self.hidden = hidden or (4 * head_dim if memory == "mlp_ln" else head_dim)
        self.forget_gate, self.output_gate = forget_gate, output_gate
        self.num_layers = num_layers
        self.chunk_size, self.max_lr, self.conv_kernel, self.impl = chunk_size, max_lr, conv_kernel, impl
        self.use_momentum, self.use_forgetting = use_momentum, use_forgetting
        self.max_surprise_norm = max_surprise_norm if max_surprise_norm > 0 else None
        key = rngs.params
        H, K = num_heads, head_dim
        self.qkv_D3HK = param(truncated_normal(key(), (d_model, 3, H, K), init_std), ("embed", None, "heads", "kv"))
        # depthwise causal conv, initialised to the identity (last tap 1) plus a little noise
        conv = jnp.zeros((conv_kernel, 3, H, K)).at[-1].set(1.0)
        conv = conv + truncated_normal(key(), conv.shape, 0.02)
        self.conv_L3HK = param(conv, (None, None, "heads", "kv"))
        self.gate_D3H = param(truncated_normal(key(), (d_model, 3, H), init_std), ("embed", None, "heads"))
        self.gate_bias_3H = param(
            jnp.array([alpha_bias, eta_bias, theta_bias])[:, None] * jnp.ones((3, H)), (None, "heads")
        )
        if memory == "linear":
            shapes = [(K, K)]
        else:
            dims = [K] + [self.hidden] * (num_layers - 1) + [K]
            shapes = list(zip(dims[:-1], dims[1:], strict=True))
        init = []
        for din, dout in shapes:
            w = jnp.zeros((H, din, dout)) if memory == "linear" else truncated_normal(key(), (H, din, dout), din**-0.5)
            init.append(param(w, ("heads", None, None)))
        self.init_weights = nnx.List(init)
        self.out_HKD = param(truncated_normal(key(), (H, K, d_model), out_init_std), ("heads", "kv", "embed"))
        self.retrieve_DHK = (
            param(truncated_normal(key(), (d_model, H, K), init_std), ("embed", "heads", "kv"))
            if retrieval_query
            else None
        )
        # drawn after the parameters above, so that those keep their values when the options are switched
        forget = out = (None, None)
        if forget_gate == "channel":  # one rate per output channel of every memory matrix
            A = sum(dout for _, dout in shapes)
            forget = (
                param(truncated_normal(key(), (d_model, H, A), init_std), ("embed", "heads", None)),
                param(jnp.full((H, A), alpha_bias), ("heads", None)),
            )
        if output_gate:  # sec. 4.4: normalise and gate the read with a linear layer of x
            out = (
                param(jnp.ones((H, K)), ("heads", "kv")),
                param(truncated_normal(key(), (d_model, H, K), init_std), ("embed", "heads", "kv")),
            )
        self.forget_DHA, self.forget_bias_HA = nnx.data(forget[0]), nnx.data(forget[1])
        self.out_norm_HK, self.out_gate_DHK = nnx.data(out[0]), nnx.data(out[1])

    @property
    def uses_kernel_op(self) -> bool:
        """True when the update runs pallas_kernels.memory_update, False for memory_update_dual."""
        return self.memory in KERNEL_MEMORY_KINDS and self.forget_gate == "scalar"

    def initial_carry(self, batch: int) -> MemoryCarry:
        """Learned ``M_0`` broadcast over the batch, zero momentum, empty convolution history."""
        H, K = self.num_heads, self.head_dim
        weights = tuple(jnp.broadcast_to(w[...].astype(jnp.float32), (batch, *w.shape)) for w in self.init_weights)
        state = MemoryState(weights, tuple(jnp.zeros_like(w) for w in weights))
        conv = jnp.zeros((batch, self.conv_kernel - 1, 3, H, K), jnp.float32)
        if self.replay == 0:
            return MemoryCarry(state, conv)
        R, S = self.replay, self.segment_len
        A = (sum(w.shape[-1] for w in weights),) if self.forget_gate == "channel" else ()
        kv = jnp.zeros((R, batch, H, S, K), jnp.float32)
        g = jnp.zeros((R, batch, H, S), jnp.float32)
        buf = ReplayBuffer(kv, kv, jnp.zeros((*g.shape, *A), jnp.float32), g, g, jnp.zeros(g.shape, bool))
        return MemoryCarry(state, conv, buf)

    def features(self, x_BTD: jax.Array, conv_BL3HK: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """``q, k, v`` as ``[B, H, T, K]`` (float32) and the new convolution history."""
        T, L = x_BTD.shape[1], self.conv_kernel
        z_BT3HK = jnp.einsum("btd,dshk->btshk", x_BTD.astype(jnp.float32), self.qkv_D3HK[...])
        zc = jnp.concatenate([conv_BL3HK.astype(jnp.float32), z_BT3HK], axis=1)  # [B, L-1+T, 3, H, K]
        w = self.conv_L3HK[...]
        z_BT3HK = sum(w[i] * zc[:, i : i + T] for i in range(L))
        new_conv = zc[:, zc.shape[1] - (L - 1) :]
        z_BT3HK = jax.nn.silu(z_BT3HK)
        q, k, v = (jnp.moveaxis(z_BT3HK[:, :, i], 1, 2) for i in range(3))
        return l2_normalize(q), l2_normalize(k), v, new_conv

    def gates(self, x_BTD: jax.Array, valid_BT: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``alpha, eta`` in [0, 1] and ``theta`` in [0, max_lr], each ``[B, H, T]`` (``alpha`` ``[B, H, T, A]``
        with ``forget_gate="channel"``, A = the summed output widths of the memory matrices); invalid tokens get
        alpha = 0, eta = 1, theta = 0 (the gates of padding). That alone keeps the momentum but not the memory
        (``M_t = M_{t-1} + S_{t-1}``, eq. 13); ``__call__`` also hands the mask to the memory-update op."""
        logits_BT3H = jnp.einsum("btd,dsh->btsh", x_BTD.astype(jnp.float32), self.gate_D3H[...])
        g = jax.nn.sigmoid(logits_BT3H + self.gate_bias_3H[...])
        alpha, eta, theta = (jnp.moveaxis(g[:, :, i], 1, 2) for i in range(3))
        theta = self.max_lr * theta
        if self.forget_DHA is not None:
            a_BTHA = jnp.einsum("btd,dha->btha", x_BTD.astype(jnp.float32), self.forget_DHA[...])
            alpha = jnp.moveaxis(jax.nn.sigmoid(a_BTHA + self.forget_bias_HA[...]), 1, 2)  # [B, H, T, A]
        if not self.use_forgetting:
            alpha = jnp.zeros_like(alpha)
        if not self.use_momentum:
            eta = jnp.zeros_like(eta)
        if valid_BT is not None:
            v = valid_BT[:, None, :]
            va = v[..., None] if alpha.ndim == 4 else v
            alpha, eta, theta = jnp.where(va, alpha, 0.0), jnp.where(v, eta, 1.0), jnp.where(v, theta, 0.0)
        return alpha, eta, theta

    def output(self, y_BHTK: jax.Array, x_BTD: jax.Array) -> jax.Array:
        """The read ``[B, H, T, K]`` projected to ``[B, T, D]``; with ``output_gate`` first RMS-normalised per head
        (learnable vector) and gated by ``sigmoid(x W_g)`` (sec. 4.4)."""
        y = y_BHTK.astype(jnp.float32)
        if self.output_gate:
            y = y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + 1e-6) * self.out_norm_HK[...][:, None]
            g_BTHK = jnp.einsum("btd,dhk->bthk", x_BTD.astype(jnp.float32), self.out_gate_DHK[...])
            y = y * jax.nn.sigmoid(jnp.moveaxis(g_BTHK, 1, 2))
        return jnp.einsum("bhtk,hkd->btd", y, self.out_HKD[...])

    def _update(self, q, k, v, alpha, eta, theta, state: MemoryState, valid_BHT):
        """One run of the memory update (the op, or memory_update_dual) over ``[B, H, T, ...]`` inputs from
        ``state``: ``(y_BHTK, final_state)``; ``valid_BHT`` None = every token valid."""
        if not self.uses_kernel_op:
            alpha = alpha if alpha.ndim == 4 else alpha[..., None]
            return memory_update_dual(
                q, k, v, alpha, eta, theta, state, chunk_size=self.chunk_size, memory=self.memory,
                max_surprise_norm=self.max_surprise_norm, valid_BHT=valid_BHT,
            )  # fmt: skip
        update = partial(
            memory_update,
            chunk_size=self.chunk_size,
            memory=self.memory,
            impl=self.impl,
            max_surprise_norm=self.max_surprise_norm,
            platform=target_platform(),  # the traced-for platform: Mosaic kernels in an AOT compile for TPU
        )
        # under shard_map over batch and heads: the Pallas kernel cannot be partitioned automatically
        bhtk, bht = ("batch", "heads", None, None), ("batch", "heads", None)
        args, axes = (q, k, v, alpha, eta, theta, state), (bhtk, bhtk, bhtk, bht, bht, bht, bhtk)
        if valid_BHT is None:
            kernel = update
        else:
            args += (valid_BHT,)
            axes += (bht,)
            kernel = lambda *a: update(*a[:7], valid_BHT=a[7])  # noqa: E731
        return shd.shard_kernel(kernel, args, axes, (bhtk, bhtk), batch=q.shape[0], heads=(q.shape[1],))

    def consolidate(
        self, state: MemoryState, replay: ReplayBuffer | None, k, v, alpha, eta, theta, valid_BHT
    ) -> tuple[MemoryState, ReplayBuffer | None]:
        """``consolidation_passes`` offline passes over one just-read segment (inputs ``[B, H, T, ...]``, gates as
        :meth:`gates` returns them) from the post-segment ``state``; each pass replays the buffered segments
        (oldest first) and then the segment, theta scaled by ``consolidation_lr_decay ** (pass + 1)``. Returns the
        consolidated state and the ring buffer with the segment pushed in (oldest dropped)."""
        N, R = self.consolidation_passes, self.replay
        if N == 0:
            return state, replay
        scales_N = self.consolidation_lr_decay ** jnp.arange(1, N + 1, dtype=jnp.float32)

        def one_pass(st, scale):
            for r in range(R):  # static: oldest first
                st = self._update(
                    replay.k_RBHSK[r], replay.k_RBHSK[r], replay.v_RBHSK[r], replay.alpha_RBHS[r],
                    replay.eta_RBHS[r], replay.theta_RBHS[r] * scale, st, replay.valid_RBHS[r],
                )[1]  # fmt: skip
            return self._update(k, k, v, alpha, eta, theta * scale, st, valid_BHT)[1], None

        state, _ = jax.lax.scan(one_pass, state, scales_N)
        if R == 0:
            return state, replay
        T, S = k.shape[2], self.segment_len
        if T > S:
            raise ValueError(f"a consolidated segment has {T} tokens, more than segment_len={S}")
        padS = lambda a, fill: jnp.pad(a, [(0, 0), (0, 0), (0, S - T)] + [(0, 0)] * (a.ndim - 3), constant_values=fill)
        new = ReplayBuffer(
            padS(k, 0.0), padS(v, 0.0), padS(alpha, 0.0), padS(eta, 1.0), padS(theta, 0.0), padS(valid_BHT, False)
        )
        push = lambda buf, x: jnp.concatenate([buf[1:], x[None].astype(buf.dtype)], axis=0)
        return state, jax.tree.map(push, replay, new)

    def __call__(
        self, x_BTD: jax.Array, carry: MemoryCarry, valid_BT: jax.Array | None = None, *, consolidate: bool = False
    ) -> tuple[jax.Array, MemoryCarry]:
        """Writes the tokens into the memory and reads ``M_t(q_t)`` after each write (eq. 15); ``[B, T, D]``.
        Tokens with ``valid_BT`` False leave the memory and its momentum unchanged and read ``M_{t-1}(q_t)``.
        ``consolidate=True``: the tokens are one segment; after the reads run :meth:`consolidate` on the state."""
        q, k, v, conv = self.features(x_BTD, carry.conv_BL3HK)
        alpha, eta, theta = self.gates(x_BTD, valid_BT)
        valid_BHT = None if valid_BT is None else jnp.broadcast_to(valid_BT.astype(bool)[:, None, :], eta.shape)
        y_BHTK, state = self._update(q, k, v, alpha, eta, theta, carry.state, valid_BHT)
        replay = carry.replay
        if consolidate and self.consolidation_passes > 0:
            valid = jnp.ones(eta.shape, bool) if valid_BHT is None else valid_BHT
            state, replay = self.consolidate(state, replay, k, v, alpha, eta, theta, valid)
        return self.output(y_BHTK, x_BTD), MemoryCarry(state, conv, replay)

    def retrieve(self, x_BTD: jax.Array, state: MemoryState) -> jax.Array:
        """``M*(q)`` with the given memory, no update (MAC reads ``M_{t-1}`` with the segment's queries, eq. 21)."""
        if self.retrieve_DHK is None:
            raise ValueError("this NeuralMemory was built with retrieval_query=False")
        q_BTHK = jax.nn.silu(jnp.einsum("btd,dhk->bthk", x_BTD.astype(jnp.float32), self.retrieve_DHK[...]))
        q_BHTK = jnp.moveaxis(l2_normalize(q_BTHK), 1, 2)
        if self.memory in KERNEL_MEMORY_KINDS:
            y_BHTK = memory_retrieve(state, q_BHTK, memory=self.memory)
        else:
            y_BHTK = jax.vmap(jax.vmap(lambda w, x: memory_apply(w, x, self.memory)))(state.weights, q_BHTK)
        return self.output(y_BHTK, x_BTD)

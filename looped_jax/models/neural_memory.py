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
* switches: ``use_momentum=False`` sets eta = 0 (no momentum), ``use_forgetting=False`` sets alpha = 0;
* validity: tokens with ``valid_BT`` False (padding anywhere in a row) leave the memory AND its momentum exactly
  unchanged, ``M_t = M_{t-1}``, ``S_t = S_{t-1}``: the mask goes into the memory-update op, because gates alone
  (alpha = 0, eta = 1, theta = 0) keep S but still move M by the carried surprise, ``M_t = M_{t-1} + S_{t-1}``
  (eq. 13). They still enter the convolution history of the tokens after them.

Everything the memory carries between calls (memory weights, momentum, the last ``conv_kernel - 1`` projected
inputs of the convolution) lives in :class:`MemoryCarry`, so a stream of chunks fed one after another gives the
same outputs as one call over the whole sequence (for chunks that are whole multiples of ``chunk_size``).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from looped_jax import sharding as shd
from looped_jax.nn import param, truncated_normal
from looped_jax.nn.platform import target_platform
from pallas_kernels.memory_update import MemoryState, memory_retrieve, memory_update

MEMORY_KINDS = ("linear", "mlp")


class MemoryCarry(NamedTuple):
    """Streaming state of one memory: weights/momentum ``[B, H, ...]`` (float32), conv inputs ``[B, L-1, 3, H, K]``."""

    state: MemoryState
    conv_BL3HK: jax.Array


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / ||x|| over the last axis, in float32."""
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)


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
        init_std: float,
        out_init_std: float,
        rngs: nnx.Rngs,
    ):
        if memory not in MEMORY_KINDS:
            raise ValueError(f"memory must be one of {MEMORY_KINDS}, got {memory!r}")
        if conv_kernel < 1:
            raise ValueError(f"conv_kernel must be >= 1, got {conv_kernel}")
        if not max_lr > 0:
            raise ValueError(f"max_lr must be > 0, got {max_lr}")
        self.num_heads, self.head_dim, self.memory = num_heads, head_dim, memory
        self.hidden = hidden or head_dim
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

    def initial_carry(self, batch: int) -> MemoryCarry:
        """Learned ``M_0`` broadcast over the batch, zero momentum, empty convolution history."""
        H, K = self.num_heads, self.head_dim
        weights = tuple(jnp.broadcast_to(w[...].astype(jnp.float32), (batch, *w.shape)) for w in self.init_weights)
        state = MemoryState(weights, tuple(jnp.zeros_like(w) for w in weights))
        return MemoryCarry(state, jnp.zeros((batch, self.conv_kernel - 1, 3, H, K), jnp.float32))

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
        """``alpha, eta`` in [0, 1] and ``theta`` in [0, max_lr], each ``[B, H, T]``; invalid tokens get
        alpha = 0, eta = 1, theta = 0 (the gates of padding). That alone keeps the momentum but not the memory
        (``M_t = M_{t-1} + S_{t-1}``, eq. 13); ``__call__`` also hands the mask to the memory-update op."""
        logits_BT3H = jnp.einsum("btd,dsh->btsh", x_BTD.astype(jnp.float32), self.gate_D3H[...])
        g = jax.nn.sigmoid(logits_BT3H + self.gate_bias_3H[...])
        alpha, eta, theta = (jnp.moveaxis(g[:, :, i], 1, 2) for i in range(3))
        theta = self.max_lr * theta
        if not self.use_forgetting:
            alpha = jnp.zeros_like(alpha)
        if not self.use_momentum:
            eta = jnp.zeros_like(eta)
        if valid_BT is not None:
            v = valid_BT[:, None, :]
            alpha, eta, theta = jnp.where(v, alpha, 0.0), jnp.where(v, eta, 1.0), jnp.where(v, theta, 0.0)
        return alpha, eta, theta

    def output(self, y_BHTK: jax.Array) -> jax.Array:
        return jnp.einsum("bhtk,hkd->btd", y_BHTK.astype(jnp.float32), self.out_HKD[...])

    def __call__(
        self, x_BTD: jax.Array, carry: MemoryCarry, valid_BT: jax.Array | None = None
    ) -> tuple[jax.Array, MemoryCarry]:
        """Writes the tokens into the memory and reads ``M_t(q_t)`` after each write (eq. 15); ``[B, T, D]``.
        Tokens with ``valid_BT`` False leave the memory and its momentum unchanged and read ``M_{t-1}(q_t)``."""
        q, k, v, conv = self.features(x_BTD, carry.conv_BL3HK)
        alpha, eta, theta = self.gates(x_BTD, valid_BT)
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
        args, axes = (q, k, v, alpha, eta, theta, carry.state), (bhtk, bhtk, bhtk, bht, bht, bht, bhtk)
        if valid_BT is None:
            kernel = update
        else:
            args += (jnp.broadcast_to(valid_BT.astype(bool)[:, None, :], alpha.shape),)
            axes += (bht,)
            kernel = lambda *a: update(*a[:7], valid_BHT=a[7])  # noqa: E731
        y_BHTK, state = shd.shard_kernel(kernel, args, axes, (bhtk, bhtk), batch=q.shape[0], heads=(q.shape[1],))
        return self.output(y_BHTK), MemoryCarry(state, conv)

    def retrieve(self, x_BTD: jax.Array, state: MemoryState) -> jax.Array:
        """``M*(q)`` with the given memory, no update (MAC reads ``M_{t-1}`` with the segment's queries, eq. 21)."""
        if self.retrieve_DHK is None:
            raise ValueError("this NeuralMemory was built with retrieval_query=False")
        q_BTHK = jax.nn.silu(jnp.einsum("btd,dhk->bthk", x_BTD.astype(jnp.float32), self.retrieve_DHK[...]))
        y_BHTK = memory_retrieve(state, jnp.moveaxis(l2_normalize(q_BTHK), 1, 2), memory=self.memory)
        return self.output(y_BHTK)

"""Dense contractions as one 2-D matmul.

``jnp.einsum("btd,df->btf", x, w)`` is one dot_general in the forward pass, but its weight
gradient contracts over two dimensions (b, t), and XLA:CPU runs that dot far below its matmul
peak: a d=512 SwiGLU's forward + backward took 45 ms as einsums and 28 ms as 2-D matmuls (batch
2 x 256, 2 cores). Folding the leading and the contracted dimensions into one each keeps every
dot of the forward and backward pass a plain [M, K] x [K, N] matmul. The reshapes are free on
every backend, and they merge a sharded major dimension with unsharded minor ones, which the
SPMD partitioner keeps sharded.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from looped_jax.sharding import constrain


def _batch_split(x: jax.Array) -> jax.Array:
    """Pins the leading (batch) dim to the (data, fsdp) split under a mesh (no-op without one): without it XLA
    follows the fsdp-sharded weights and runs dense layers on the whole fsdp group's batch (issue 19, item 4)."""
    return constrain(x, ("batch",) + (None,) * (x.ndim - 1)) if x.ndim >= 2 else x


def dense(x: jax.Array, w: jax.Array, *, contract: int = 1, preferred_element_type=None) -> jax.Array:
    """Contracts the last ``contract`` dims of ``x`` with the first ``contract`` dims of ``w``.

    ``dense(x_BTD, w_DNH)`` is ``einsum("btd,dnh->btnh")``; ``dense(o_BTNH, w_NHD, contract=2)``
    is ``einsum("btnh,nhd->btd")``.
    """
    if contract < 1 or x.shape[x.ndim - contract :] != w.shape[:contract]:
        raise ValueError(
            f"dense: the last {contract} dims of x {x.shape} must equal the first {contract} of w {w.shape}"
        )
    x = _batch_split(x)
    lead, inner, out = x.shape[: x.ndim - contract], w.shape[:contract], w.shape[contract:]
    k = math.prod(inner)
    y = jnp.matmul(
        x.reshape(math.prod(lead), k), w.reshape(k, math.prod(out)), preferred_element_type=preferred_element_type
    )
    return _batch_split(y.reshape(lead + out))


def dense_t(x: jax.Array, w_OD: jax.Array, *, preferred_element_type=None) -> jax.Array:
    """``einsum("...d,od->...o")``: x against a weight stored [out, in] (a tied embedding table)."""
    if x.shape[-1] != w_OD.shape[1]:
        raise ValueError(f"dense_t: x {x.shape} last dim must equal w {w_OD.shape} dim 1")
    x = _batch_split(x)
    y = jax.lax.dot_general(
        x.reshape(-1, x.shape[-1]), w_OD, (((1,), (1,)), ((), ())), preferred_element_type=preferred_element_type
    )
    return _batch_split(y.reshape(x.shape[:-1] + (w_OD.shape[0],)))

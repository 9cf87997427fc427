"""The one thing the analysis needs from a looped model: its loop as pure functions.

A `LoopSpec` bundles the engine's ``step(params, carry, inputs) -> carry`` with a readout
``readout(params, carry) -> logits [B, T, V]`` and the starting point. The analysis never
sees a model class: each family's accessor (``looped_jax.models.loop_access``) builds the
spec, so a new family needs a new accessor, nothing here.

Optional hooks:

* ``state_fn(carry) -> x_BTD``: the per-token latent the residual, norms, cycles and PCA
  are measured on (default: every float leaf of the carry concatenated on the last axis;
  an accessor drops e.g. a puzzle prefix so tokens line up with the readout).
* ``probe(params, carry, inputs) -> (carry, acts)``: the same step, also returning the
  intermediate activations of each layer it applies, for activation / attention statistics
  (see `looped_jax.analysis.activations`): ``acts["resid_LBTD"]`` residual stream after
  each layer, ``acts["mlp_LBTF"]`` MLP hidden activations, ``acts["attn_LBNTS"]``
  attention probabilities (any of them may be missing).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any

_TINY = float(jnp.finfo(jnp.float32).tiny)


class LoopSpec(NamedTuple):
    """A looped computation seen from outside: step, readout, starting carry and inputs."""

    step: Callable[[PyTree, PyTree, PyTree], PyTree]
    params: PyTree
    carry: PyTree
    inputs: PyTree = None
    readout: Callable[[PyTree, PyTree], jax.Array] | None = None
    state_fn: Callable[[PyTree], jax.Array] | None = None
    probe: Callable[[PyTree, PyTree, PyTree], tuple[PyTree, dict]] | None = None
    token_mask_BT: jax.Array | None = None  # tokens that count in summaries (default: all)
    name: str = "loop"


def float_leaves(tree: PyTree) -> list[jax.Array]:
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]


def default_state_fn(carry: PyTree) -> jax.Array:
    """Every float leaf of the carry, concatenated on the last axis (leaves share [B, T])."""
    leaves = float_leaves(carry)
    if not leaves:
        raise ValueError("the loop carry has no floating-point leaves to analyse")
    prefix = {x.shape[:-1] for x in leaves}
    if len(prefix) != 1:
        raise ValueError(f"carry leaves have different [batch, token] shapes {sorted(prefix)}; give LoopSpec.state_fn")
    return jnp.concatenate([x.astype(jnp.float32) for x in leaves], axis=-1)


def state_of(spec: LoopSpec, carry: PyTree) -> jax.Array:
    x = (spec.state_fn or default_state_fn)(carry)
    if x.ndim != 3:
        raise ValueError(f"state_fn must return a [batch, tokens, features] latent, got shape {x.shape}")
    return x.astype(jnp.float32)


def token_norm(x_BTD: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(x_BTD.astype(jnp.float32)), axis=-1))


def relative_distance(a_BTD: jax.Array, b_BTD: jax.Array) -> jax.Array:
    """||a - b|| / ||a|| per token (the engine's relative residual when b is the previous state)."""
    return token_norm(a_BTD - b_BTD) / jnp.maximum(token_norm(a_BTD), _TINY)


def example_dot(a: PyTree, b: PyTree) -> jax.Array:
    """Per-example inner product of two carries (float leaves, batch on axis 0) -> [B]."""
    total = None
    for x, y in zip(float_leaves(a), float_leaves(b), strict=True):
        d = jnp.sum((x.astype(jnp.float32) * y.astype(jnp.float32)).reshape(x.shape[0], -1), axis=-1)
        total = d if total is None else total + d
    return total


def example_norm(a: PyTree) -> jax.Array:
    return jnp.sqrt(example_dot(a, a))


def scale_examples(a: PyTree, s_B: jax.Array) -> PyTree:
    """Multiplies every example of every float leaf by s_B."""

    def f(x):
        if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
            return x
        return (x.astype(jnp.float32) * s_B.reshape((-1,) + (1,) * (x.ndim - 1))).astype(x.dtype)

    return jax.tree.map(f, a)


def tangent_like(carry: PyTree, key: jax.Array) -> PyTree:
    """A random tangent of unit norm per example (float leaves only)."""
    leaves, treedef = jax.tree.flatten(carry)
    keys = jax.random.split(key, len(leaves))
    out = [
        jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
        else x
        for k, x in zip(keys, leaves, strict=True)
    ]
    v = jax.tree.unflatten(treedef, out)
    return scale_examples(v, 1.0 / jnp.maximum(example_norm(v), _TINY))


def run(spec: LoopSpec, num_steps: int, carry: PyTree | None = None) -> PyTree:
    """The carry after ``num_steps`` steps (from ``spec.carry`` unless given), jitted, no trajectory."""
    from looped_jax.recurrence import unroll

    start = spec.carry if carry is None else carry

    @jax.jit
    def go(params, c, inputs):
        out, _ = unroll(spec.step, params, c, inputs, num_steps=num_steps, grad_steps=0)
        return out

    return go(spec.params, start, spec.inputs)

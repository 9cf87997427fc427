"""Fixed-depth loops over a shared step, with truncated backprop and trajectories.

`unroll` applies a pure ``step(params, carry, inputs) -> carry`` a fixed number of
times. Only the last ``grad_steps`` applications are differentiated; the earlier
ones run under ``jax.lax.stop_gradient`` so activation memory is independent of the
loop count. This is the truncated-backprop recipe of recurrent-depth training
(Geiping et al. 2025, "Scaling up Test-Time Compute with Latent Reasoning", Sec. 3.3).

The loop count may be a traced int32 scalar, so a trainer that samples the depth
``r`` every step compiles once: the gradient-free prefix is a ``fori_loop`` with a
dynamic trip count (never reverse-differentiated, its tangents are symbolic zeros)
and the differentiated suffix is a ``scan`` of static length ``grad_steps`` whose
surplus iterations are masked out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
StepFn = Callable[..., PyTree]  # step(params, carry, inputs[, xs=, index=]) -> carry
RecordFn = Callable[[PyTree], PyTree]

REMAT_POLICIES: dict[str, Callable[..., Any]] = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
    "dots_with_no_batch_dims_saveable": (jax.checkpoint_policies.dots_with_no_batch_dims_saveable),
}


def resolve_remat_policy(
    remat_policy: str | Callable[..., Any] | None,
) -> Callable[..., Any] | None:
    """Maps a policy name (or a `jax.checkpoint_policies` callable) to a callable."""
    if remat_policy is None or callable(remat_policy):
        return remat_policy
    if remat_policy not in REMAT_POLICIES:
        raise ValueError(f"Unknown remat_policy {remat_policy!r}; expected None or one of {sorted(REMAT_POLICIES)}.")
    return REMAT_POLICIES[remat_policy]


def is_static_int(x: Any) -> bool:
    """True for a Python / NumPy integer (not bool, not a JAX array)."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _stop_gradient(tree: PyTree) -> PyTree:
    """stop_gradient on the inexact leaves (PRNG keys and integers pass through unchanged)."""

    def sg(x):
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact):
            return jax.lax.stop_gradient(x)
        return x

    return jax.tree.map(sg, tree)


def _index(tree: PyTree, i: Any) -> PyTree:
    """Entry ``i`` of every leaf's leading axis (static or traced ``i``)."""
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), tree)


class _Caller(NamedTuple):
    """How the engine calls a step: the options decide which extra keyword arguments it gets.

    ``xs``: per-step inputs, a pytree with a leading step axis (``step(..., xs=xs[t])``);
    ``with_index``: ``step(..., index=t)`` with t the int32 0-based step index;
    ``stacked_params``: params carry a leading step axis and step t gets ``params[t]`` (the
    unshared baseline of a looped model: per-iteration weights stacked on a ``layers`` axis).
    """

    step: StepFn
    xs: PyTree
    with_index: bool
    stacked_params: bool

    def __call__(self, fn: StepFn, params: PyTree, carry: PyTree, inputs: PyTree, t: Any, xs: PyTree) -> PyTree:
        kwargs = {}
        if self.xs is not None:
            kwargs["xs"] = _index(xs, t)
        if self.with_index:
            kwargs["index"] = jnp.asarray(t, jnp.int32)
        p = _index(params, t) if self.stacked_params else params
        return fn(p, carry, inputs, **kwargs)


def _make_apply(step: StepFn, remat_policy: Any) -> StepFn:
    """The step, wrapped in `jax.checkpoint` when a policy is given."""
    policy = resolve_remat_policy(remat_policy)
    if policy is None:
        return step
    # prevent_cse=False: the call sits inside a scan, which already blocks CSE.
    return jax.checkpoint(step, policy=policy, prevent_cse=False)


def _leading_lengths(tree: PyTree) -> set[int]:
    return {jnp.shape(x)[0] if jnp.ndim(x) else -1 for x in jax.tree.leaves(tree)}


def _validate(
    num_steps: Any,
    grad_steps: Any,
    max_steps: Any,
    record_fn: Any,
    params: PyTree,
    xs: PyTree,
    stacked_params: bool,
) -> bool:
    """Checks the loop arguments; returns True when num_steps is static."""
    if grad_steps is not None and (not is_static_int(grad_steps) or grad_steps < 0):
        raise ValueError(f"grad_steps must be None or a Python int >= 0, got {grad_steps!r}.")
    if max_steps is not None and (not is_static_int(max_steps) or max_steps < 0):
        raise ValueError(f"max_steps must be None or a Python int >= 0, got {max_steps!r}.")
    static = is_static_int(num_steps)
    if static:
        if num_steps < 0:
            raise ValueError(f"num_steps must be >= 0, got {num_steps}.")
        if max_steps is not None and num_steps > max_steps:
            raise ValueError(f"num_steps={num_steps} exceeds max_steps={max_steps}.")
    else:
        if isinstance(num_steps, (bool, float)) or not hasattr(num_steps, "dtype"):
            raise ValueError(f"num_steps must be a Python int or an integer JAX scalar, got {num_steps!r}.")
        if jnp.ndim(num_steps) != 0 or not jnp.issubdtype(num_steps.dtype, jnp.integer):
            raise ValueError(
                "A traced num_steps must be an integer scalar, got shape "
                f"{jnp.shape(num_steps)} and dtype {num_steps.dtype}."
            )
        if grad_steps is None:
            raise ValueError(
                "grad_steps must be a static int when num_steps is traced (the "
                "differentiated phase is a scan of static length grad_steps)."
            )
        if record_fn is not None and max_steps is None:
            raise ValueError("record_fn with a traced num_steps needs a static max_steps (the trajectory length).")
    for name, tree in (("xs", xs), ("params (stacked_params=True)", params if stacked_params else None)):
        if tree is None:
            continue
        lengths = _leading_lengths(tree)
        if len(lengths) != 1:
            raise ValueError(f"every leaf of {name} needs the same leading step axis, got lengths {sorted(lengths)}.")
        (length,) = lengths
        need = num_steps if static else max_steps
        if need is None:
            raise ValueError(f"{name} with a traced num_steps needs a static max_steps (the length of its step axis).")
        if (length < need) if static else (length != need):
            expected = f">= num_steps={num_steps}" if static else f"== max_steps={max_steps}"
            raise ValueError(f"{name} has a leading step axis of length {length}; expected {expected}.")
    return static


def _pad_with_last(traj: PyTree, final_record: PyTree, length: int) -> PyTree:
    """Extends a [n, ...] trajectory to [length, ...] by repeating final_record."""

    def pad(t: jax.Array, last: jax.Array) -> jax.Array:
        fill = jnp.broadcast_to(last, (length - t.shape[0],) + last.shape)
        return jnp.concatenate([t, fill.astype(t.dtype)], axis=0)

    return jax.tree.map(pad, traj, final_record)


def _unroll_static(
    call: _Caller,
    apply: StepFn,
    params: PyTree,
    carry: PyTree,
    inputs: PyTree,
    num_steps: int,
    grad_steps: int | None,
    record_fn: RecordFn | None,
    max_steps: int | None,
) -> tuple[PyTree, PyTree]:
    n_grad = num_steps if grad_steps is None else min(num_steps, grad_steps)
    n_nograd = num_steps - n_grad

    def scan_phase(fn, p, c, x, xs, start, length):
        def body(c, t):
            c = call(fn, p, c, x, t, xs)
            return c, (None if record_fn is None else record_fn(c))

        return jax.lax.scan(body, c, jnp.arange(start, start + length, dtype=jnp.int32))

    trajs = []
    if n_nograd > 0:
        sg = _stop_gradient
        carry, traj = scan_phase(call.step, sg(params), sg(carry), sg(inputs), sg(call.xs), 0, n_nograd)
        trajs.append(traj)
    if n_grad > 0 or not trajs:
        carry, traj = scan_phase(apply, params, carry, inputs, call.xs, n_nograd, n_grad)
        trajs.append(traj)
    if grad_steps == 0:
        carry = _stop_gradient(carry)  # also for num_steps == 0: the result is never differentiated
    if record_fn is None:
        return carry, None
    traj = jax.tree.map(lambda *t: jnp.concatenate(t, axis=0), *trajs)
    if max_steps is not None and max_steps > num_steps:
        traj = _pad_with_last(traj, record_fn(carry), max_steps)
    return carry, traj


def _unroll_traced(
    call: _Caller,
    apply: StepFn,
    params: PyTree,
    carry: PyTree,
    inputs: PyTree,
    num_steps: jax.Array,
    grad_steps: int,
    record_fn: RecordFn | None,
    max_steps: int | None,
) -> tuple[PyTree, PyTree]:
    n = jnp.maximum(jnp.asarray(num_steps, jnp.int32), 0)
    if max_steps is not None:
        n = jnp.minimum(n, max_steps)
    n_grad = jnp.minimum(n, grad_steps)
    n_nograd = n - n_grad

    # Phase 1: gradient-free prefix with a dynamic trip count. Every input is
    # stop_gradient-ed, so the while_loop's tangents are symbolic zeros and
    # reverse mode never has to transpose it.
    p0, c0, x0, xs0 = (_stop_gradient(t) for t in (params, carry, inputs, call.xs))
    if record_fn is None:
        c_nograd = jax.lax.fori_loop(0, n_nograd, lambda i, c: call(call.step, p0, c, x0, i, xs0), c0)
        buf = None
    else:
        rec_shapes = jax.eval_shape(record_fn, carry)
        buf0 = jax.tree.map(lambda s: jnp.zeros((max_steps,) + s.shape, s.dtype), rec_shapes)

        def body(i, val):
            c, b = val
            c = call(call.step, p0, c, x0, i, xs0)
            b = jax.tree.map(
                lambda bb, r: jax.lax.dynamic_update_index_in_dim(bb, r, i, 0),
                b,
                record_fn(c),
            )
            return c, b

        c_nograd, buf = jax.lax.fori_loop(0, n_nograd, body, (c0, buf0))
    if grad_steps == 0:
        carry_out = _stop_gradient(c_nograd)
        if record_fn is None:
            return carry_out, None
        t = jnp.arange(max_steps, dtype=jnp.int32)
        last = record_fn(carry_out)

        def fill(b, r):
            mask = (t < n_nograd).reshape((max_steps,) + (1,) * (b.ndim - 1))
            return jnp.where(mask, b, jnp.broadcast_to(r, b.shape))

        return carry_out, jax.tree.map(fill, buf, last)
    # With an empty prefix the initial carry itself must keep its gradient.
    has_prefix = n_nograd > 0
    start = jax.tree.map(lambda a, b: jnp.where(has_prefix, a, b), c_nograd, carry)
    last_step = max(max_steps - 1, 0) if max_steps is not None else None

    # Phase 2: static-length scan; iterations i >= n_grad keep the carry. A cond (not a
    # compute-then-select) skips the step's work, forward and backward, when r < grad_steps.
    def grad_body(c, i):
        t = n_nograd + i
        if last_step is not None:
            t = jnp.minimum(t, last_step)
        c = jax.lax.cond(i < n_grad, lambda c: call(apply, params, c, inputs, t, call.xs), lambda c: c, c)
        return c, (None if record_fn is None else record_fn(c))

    carry_out, ys = jax.lax.scan(grad_body, start, jnp.arange(grad_steps, dtype=jnp.int32))
    if record_fn is None:
        return carry_out, None

    # Trajectory entry t: the prefix buffer for t < n_nograd, else grad-phase
    # record t - n_nograd, clamped to its last entry (= the final carry's record).
    t = jnp.arange(max_steps, dtype=jnp.int32)
    idx = jnp.clip(t - n_nograd, 0, grad_steps - 1)
    in_prefix = t < n_nograd

    def merge(b: jax.Array, y: jax.Array) -> jax.Array:
        mask = in_prefix.reshape((max_steps,) + (1,) * (b.ndim - 1))
        return jnp.where(mask, b, jnp.take(y, idx, axis=0))

    return carry_out, jax.tree.map(merge, buf, ys)


def unroll(
    step: StepFn,
    params: PyTree,
    carry: PyTree,
    inputs: PyTree = None,
    *,
    num_steps: int | jax.Array,
    grad_steps: int | None = None,
    remat_policy: str | Callable[..., Any] | None = None,
    record_fn: RecordFn | None = None,
    max_steps: int | None = None,
    xs: PyTree = None,
    with_index: bool = False,
    stacked_params: bool = False,
) -> tuple[PyTree, PyTree | None]:
    """Applies ``carry <- step(params, carry, inputs)`` ``num_steps`` times.

    Truncated backprop: the first ``max(num_steps - grad_steps, 0)`` steps run under
    ``stop_gradient`` (params, inputs and carry), the last ``min(num_steps,
    grad_steps)`` are differentiated. ``grad_steps=None`` differentiates every step,
    ``grad_steps=0`` none (the result is under ``stop_gradient``). When the prefix is
    non-empty the initial carry gets a zero gradient.

    Per-step data: with ``xs`` (a pytree whose leaves lead with a step axis) step ``t``
    is called as ``step(params, carry, inputs, xs=xs[t])`` (e.g. one PRNG key per step);
    ``with_index=True`` adds ``index=t`` (int32, 0-based, counting every step, the
    gradient-free ones included); ``stacked_params=True`` hands step ``t`` the slice
    ``params[t]`` of parameters stacked on a leading axis (unshared loop bodies). The
    step axis must be at least ``num_steps`` long (static), or exactly ``max_steps``
    (traced ``num_steps``).

    Args:
      step: pure ``step(params, carry, inputs) -> carry``; every differentiable
        value must come in through ``params`` / ``inputs`` (not a closure), so that
        the gradient-free prefix really is gradient free.
      params: shared weights, closed over (broadcast) by the loop.
      carry: initial state (pytree).
      inputs: per-call data constant across iterations (e.g. an injected embedding).
      num_steps: Python int, or a traced int32 scalar (one compile for every value;
        negative values count as 0 and, with ``max_steps``, values are clipped to
        ``max_steps``). A traced count needs a static ``grad_steps``.
      grad_steps: number of differentiated (final) steps, None for all, 0 for none.
      remat_policy: None, a name in ``REMAT_POLICIES`` or a
        ``jax.checkpoint_policies`` callable; wraps the differentiated step in
        ``jax.checkpoint``.
      record_fn: optional ``record_fn(carry) -> pytree`` recorded after each step.
      max_steps: static trajectory length; required with ``record_fn``, ``xs`` or
        ``stacked_params`` and a traced ``num_steps``.
      xs: per-step inputs (leading step axis), passed as ``xs=``.
      with_index: pass the step index as ``index=``.
      stacked_params: slice ``params`` along its leading axis per step.

    Returns:
      ``(carry, trajectory)``. The trajectory stacks ``record_fn`` outputs on a
      leading axis of length ``max_steps`` if given, else ``num_steps``; entry ``t``
      is the record after step ``t + 1``, and entries ``t >= num_steps`` repeat the
      record of the final carry (for ``num_steps = 0``: of the initial carry).
      ``None`` when ``record_fn`` is None.
    """
    static = _validate(num_steps, grad_steps, max_steps, record_fn, params, xs, stacked_params)
    apply = _make_apply(step, remat_policy)
    call = _Caller(step, xs, with_index, stacked_params)
    if static:
        return _unroll_static(
            call,
            apply,
            params,
            carry,
            inputs,
            int(num_steps),
            grad_steps,
            record_fn,
            max_steps,
        )
    return _unroll_traced(call, apply, params, carry, inputs, num_steps, grad_steps, record_fn, max_steps)

"""Iterate a shared step until each token (or example) settles.

Adaptive test-time compute for recurrent-depth models: keep applying the core
block to the latent state until it stops changing, with per-token exits as in
Geiping et al. 2025 ("Scaling up Test-Time Compute with Latent Reasoning",
Sec. 6: zero-shot adaptive compute via the KL divergence between successive
output distributions). The step is always applied to the full batch; masking
decides what is kept, so converged elements stay frozen while the rest go on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from looped_jax.recurrence.unroll import PyTree, StepFn, is_static_int

ReadoutFn = Callable[[PyTree, jax.Array], jax.Array]

GRANULARITIES = ("token", "example")
_TINY = float(jnp.finfo(jnp.float32).tiny)


class ConvergenceResult(NamedTuple):
    """Outcome of `iterate_to_convergence`.

    Elements are tokens ([B, ...] = state.shape[:-1]) for granularity="token" and
    examples ([B]) for granularity="example".

    Attributes:
      state: final state, same shape/dtype as the input state.
      steps: int32 per element, how many step applications were kept.
      converged: bool per element; False where max_steps ran out first.
      residuals: float32 [max_steps, B]. Row k-1 holds, per example, the max over
        its elements still active at iteration k of the relative change
        ||s_k - s_{k-1}|| / ||s_k||; 0 if none of its elements were active; NaN for
        iterations that never ran (k > num_iterations).
      kl: float32 [max_steps, B], same convention for KL(p_k || p_{k-1}) of the
        readout distributions; None without a readout.
      num_iterations: int32 scalar, how many times the loop body ran.
      aux: the final aux pytree (None without one).
    """

    state: jax.Array
    steps: jax.Array
    converged: jax.Array
    residuals: jax.Array
    kl: jax.Array | None
    num_iterations: jax.Array
    aux: Any = None


def kl_divergence(logits_p: jax.Array, logits_q: jax.Array) -> jax.Array:
    """KL(softmax(logits_p) || softmax(logits_q)) over the last axis, in float32.

    The textbook sum p (log p - log q) loses everything below ~1e-6 to rounding of
    the log-probabilities. With delta = logits_p - logits_q and c = delta - E_p[delta]
    (so E_p[c] = 0), KL = log E_p[exp(-c)] = log1p(E_p[exp(-c) - 1 + c]), where
    exp(-c) - 1 + c = c^2/2 - c^3/6 + ... is summed as a series for small |c|; this
    keeps its relative accuracy as p -> q. The textbook form is used where the
    divergence is large (no overflow there).
    """
    logits_p = logits_p.astype(jnp.float32)
    logits_q = logits_q.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits_p, axis=-1)
    p = jnp.exp(logp)
    logq = jax.nn.log_softmax(logits_q, axis=-1)
    # Zero-probability entries (e.g. -inf logits on both sides) contribute nothing.
    naive = jnp.sum(jnp.where(p > 0, p * (logp - logq), 0.0), axis=-1)
    delta = jnp.where(p > 0, logits_p - logits_q, 0.0)
    c = delta - jnp.sum(p * delta, axis=-1, keepdims=True)
    series = c * c * (0.5 - c * (1.0 / 6.0 - c * (1.0 / 24.0 - c / 120.0)))
    phi = jnp.where(jnp.abs(c) < 1e-2, series, jnp.expm1(-c) + c)
    small = jnp.log1p(jnp.sum(p * phi, axis=-1))
    return jnp.maximum(jnp.where(naive > 1e-2, naive, small), 0.0)


def _validate(
    state: Any,
    max_steps: Any,
    tol: Any,
    readout: Any,
    kl_tol: Any,
    argmax_patience: Any,
    granularity: Any,
    min_steps: Any,
) -> None:
    if not is_static_int(max_steps) or max_steps < 1:
        raise ValueError(f"max_steps must be a Python int >= 1, got {max_steps!r}.")
    if not is_static_int(min_steps) or not 1 <= min_steps <= max_steps:
        raise ValueError(f"min_steps must be a Python int in [1, max_steps={max_steps}], got {min_steps!r}.")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}.")
    if jnp.ndim(state) < 2:
        raise ValueError(f"state must have shape [B, ..., D] (ndim >= 2), got {jnp.shape(state)}.")
    if tol is None and kl_tol is None and argmax_patience is None:
        raise ValueError("Give at least one criterion: tol, kl_tol or argmax_patience.")
    if tol is not None and not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}.")
    if kl_tol is not None and not kl_tol > 0:
        raise ValueError(f"kl_tol must be > 0, got {kl_tol!r}.")
    if argmax_patience is not None and (not is_static_int(argmax_patience) or argmax_patience < 1):
        raise ValueError(f"argmax_patience must be a Python int >= 1, got {argmax_patience!r}.")
    if (kl_tol is not None or argmax_patience is not None) and readout is None:
        raise ValueError("kl_tol and argmax_patience need a readout function.")


def iterate_to_convergence(
    step: StepFn,
    params: PyTree,
    state: jax.Array,
    inputs: PyTree = None,
    *,
    max_steps: int,
    tol: float | None = None,
    readout: ReadoutFn | None = None,
    kl_tol: float | None = None,
    argmax_patience: int | None = None,
    granularity: str = "token",
    min_steps: int = 1,
    aux: PyTree = None,
    with_index: bool = False,
    with_active: bool = False,
    initial_logits: jax.Array | None = None,
) -> ConvergenceResult:
    """Runs ``state <- step(params, state, inputs)`` until every element converged.

    An element (token, or whole example) converges at step k >= ``min_steps`` (k
    counts applications of ``step``) when every given criterion holds:

    * ``tol``: relative latent change ||s_k - s_{k-1}|| / ||s_k|| < tol, the norm
      taken over the last axis (token) or all non-batch axes (example);
    * ``kl_tol``: KL(p_k || p_{k-1}) < kl_tol with p = softmax(readout(params, s))
      in float32; per token, or the max over an example's tokens;
    * ``argmax_patience``: argmax of the readout unchanged for that many
      consecutive steps (for an example: on every token).

    Converged elements keep their state (``jnp.where``); the loop stops once all
    have converged or after ``max_steps`` iterations. Runs a ``while_loop``, so it
    is for inference and analysis, not reverse-mode differentiation.

    Extra step arguments, for steps that carry more than the latent (a KV cache, a
    counter) or must know which elements still run:

    * ``aux``: a pytree carried beside the state; the step is then called as
      ``step(params, (state, aux), inputs) -> (state, aux)``. The engine masks only
      the state; the step decides what a converged element does to its aux.
    * ``with_index``: ``step(..., index=k)``, k the int32 0-based iteration.
    * ``with_active``: ``step(..., active=mask)``, the bool per-element mask of
      elements still iterating (shape of ``steps``) before this iteration.
    * ``initial_logits``: the readout the first KL is measured against (default
      ``readout(params, state)``; e.g. zeros for a uniform start, as Geiping et al.).

    Args:
      step: pure ``step(params, state, inputs) -> state``.
      params: shared weights.
      state: latent of shape [B, ..., D] (e.g. [B, T, D]).
      inputs: per-call data constant across iterations.
      max_steps: static cap on step applications (>= 1).
      tol: relative-change tolerance.
      readout: ``readout(params, state) -> logits [B, ..., V]``.
      kl_tol: KL tolerance between successive readout distributions.
      argmax_patience: number of consecutive steps with unchanged argmax.
      granularity: "token" or "example".
      min_steps: minimum number of applications before an element may converge.
      aux: extra carried pytree (see above); returned as ``ConvergenceResult.aux``.
      with_index: pass ``index=`` to the step.
      with_active: pass ``active=`` to the step.
      initial_logits: logits [B, ..., V] the first KL compares with.

    Returns:
      A `ConvergenceResult`.
    """
    _validate(state, max_steps, tol, readout, kl_tol, argmax_patience, granularity, min_steps)
    batch = state.shape[0]
    token_shape = state.shape[:-1]
    per_token = granularity == "token"
    elem_shape = token_shape if per_token else (batch,)
    nonbatch_tok_axes = tuple(range(1, len(token_shape)))

    def elem_to_token(mask: jax.Array) -> jax.Array:
        """Per-element values broadcast to per-token shape [B, ...]."""
        if per_token:
            return mask
        return jnp.broadcast_to(mask.reshape((batch,) + (1,) * (len(token_shape) - 1)), token_shape)

    def token_max_to_elem(x: jax.Array) -> jax.Array:
        return x if per_token else jnp.max(x, axis=nonbatch_tok_axes)

    def elem_max_to_example(x: jax.Array) -> jax.Array:
        return jnp.max(x, axis=nonbatch_tok_axes) if per_token else x

    def relative_change(new: jax.Array, old: jax.Array) -> jax.Array:
        diff = (new - old).astype(jnp.float32)
        new32 = new.astype(jnp.float32)
        axes = (-1,) if per_token else tuple(range(1, new.ndim))
        num = jnp.sqrt(jnp.sum(diff * diff, axis=axes))
        den = jnp.sqrt(jnp.sum(new32 * new32, axis=axes))
        return num / jnp.maximum(den, _TINY)

    def logits32(s: jax.Array) -> jax.Array:
        return readout(params, s).astype(jnp.float32)

    init = {
        "k": jnp.zeros((), jnp.int32),
        "state": state,
        "steps": jnp.zeros(elem_shape, jnp.int32),
        "active": jnp.ones(elem_shape, bool),
        "residuals": jnp.full((max_steps, batch), jnp.nan, jnp.float32),
    }
    if initial_logits is not None and readout is None:
        raise ValueError("initial_logits needs a readout function.")
    if aux is not None:
        init["aux"] = aux
    if readout is not None:
        if initial_logits is None:
            logits0 = logits32(state)
        else:
            logits0 = jnp.broadcast_to(initial_logits.astype(jnp.float32), jax.eval_shape(logits32, state).shape)
        init["logits"] = logits0
        init["kl"] = jnp.full((max_steps, batch), jnp.nan, jnp.float32)
        if argmax_patience is not None:
            init["argmax"] = jnp.argmax(logits0, axis=-1).astype(jnp.int32)
            init["same_count"] = jnp.zeros(token_shape, jnp.int32)

    def cond(c: dict[str, jax.Array]) -> jax.Array:
        return (c["k"] < max_steps) & jnp.any(c["active"])

    def body(c: dict[str, jax.Array]) -> dict[str, jax.Array]:
        k = c["k"] + 1
        active = c["active"]
        active_tok = elem_to_token(active)
        kwargs = {}
        if with_index:
            kwargs["index"] = k - 1
        if with_active:
            kwargs["active"] = active
        if aux is None:
            new = step(params, c["state"], inputs, **kwargs)
        else:
            new, new_aux = step(params, (c["state"], c["aux"]), inputs, **kwargs)
        rel = relative_change(new, c["state"])
        conv = jnp.full(elem_shape, k >= min_steps)
        if tol is not None:
            conv &= rel < tol
        out = dict(c)
        if readout is not None:
            logits = logits32(new)
            kl = token_max_to_elem(kl_divergence(logits, c["logits"]))
            if kl_tol is not None:
                conv &= kl < kl_tol
            out["logits"] = jnp.where(active_tok[..., None], logits, c["logits"])
            out["kl"] = c["kl"].at[k - 1].set(elem_max_to_example(jnp.where(active, kl, 0.0)))
            if argmax_patience is not None:
                am = jnp.argmax(logits, axis=-1).astype(jnp.int32)
                count = jnp.where(am == c["argmax"], c["same_count"] + 1, 0)
                count_elem = count if per_token else jnp.min(count, nonbatch_tok_axes)
                conv &= count_elem >= argmax_patience
                out["argmax"] = jnp.where(active_tok, am, c["argmax"])
                out["same_count"] = jnp.where(active_tok, count, c["same_count"])
        keep_new = active_tok[..., None]
        out["state"] = jnp.where(keep_new, new, c["state"])
        out["steps"] = c["steps"] + active.astype(jnp.int32)
        out["residuals"] = c["residuals"].at[k - 1].set(elem_max_to_example(jnp.where(active, rel, 0.0)))
        out["active"] = active & ~conv
        out["k"] = k
        if aux is not None:
            out["aux"] = new_aux
        return out

    final = jax.lax.while_loop(cond, body, init)
    return ConvergenceResult(
        state=final["state"],
        steps=final["steps"],
        converged=~final["active"],
        residuals=final["residuals"],
        kl=final.get("kl"),
        num_iterations=final["k"],
        aux=final.get("aux"),
    )

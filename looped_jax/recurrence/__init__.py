"""The loop engine: pure functions over ``step(params, carry, inputs) -> carry``.

* `unroll`: fixed depth (``lax.scan``), truncated backprop (``grad_steps``: all, the
  last k, or none), static or traced depth, remat policies, trajectory recording
  (``record_fn``), per-step inputs (``xs``), the step index and stacked per-step
  parameters.
* `iterate_to_convergence`: ``lax.while_loop`` with per-token / per-example exits on the
  relative residual, the KL of successive readouts or a stable argmax; an auxiliary carry,
  the step index and the active mask for steps that need them.
* `fixed_point_one_step` / `fixed_point_implicit`: one-step (HRM) and implicit
  (DEQ) gradients through a fixed point.
"""

from looped_jax.recurrence.convergence import (
    ConvergenceResult,
    iterate_to_convergence,
    kl_divergence,
)
from looped_jax.recurrence.fixed_point import (
    fixed_point_implicit,
    fixed_point_one_step,
)
from looped_jax.recurrence.unroll import (
    REMAT_POLICIES,
    PyTree,
    StepFn,
    is_static_int,
    resolve_remat_policy,
    unroll,
)

__all__ = [
    "REMAT_POLICIES",
    "ConvergenceResult",
    "PyTree",
    "StepFn",
    "fixed_point_implicit",
    "fixed_point_one_step",
    "is_static_int",
    "iterate_to_convergence",
    "kl_divergence",
    "resolve_remat_policy",
    "unroll",
]

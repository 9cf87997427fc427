"""The loop engine: pure functions over ``step(params, carry, inputs) -> carry``.

* `unroll`: fixed depth (``lax.scan``), truncated backprop, static or traced depth,
  remat policies and trajectory recording.
* `iterate_to_convergence`: ``lax.while_loop`` with per-token / per-example exits.
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
    resolve_remat_policy,
    unroll,
)

__all__ = [
    "REMAT_POLICIES",
    "ConvergenceResult",
    "fixed_point_implicit",
    "fixed_point_one_step",
    "iterate_to_convergence",
    "kl_divergence",
    "resolve_remat_policy",
    "unroll",
]

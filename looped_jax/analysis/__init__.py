"""Fixed-point and activation analysis of looped models, over the loop engine's step + readout.

Everything here takes a `LoopSpec` (pure ``step(params, carry, inputs) -> carry``, a readout
``readout(params, carry) -> logits`` and hooks), never a model class; the families' accessors
live in ``looped_jax.models.loop_access``.

* `trajectory`: per-step residuals, norms, KL / argmax changes / entropy of the readout,
  distance to a reference, period-p recurrence distances, Lyapunov growth, tracked paths,
  activation statistics -- summaries only, through the engine's ``record_fn``.
* `long_run_reference`, `fit_rate`, `first_step_below`: the fixed point and convergence rate.
* `jacobian_spectrum`: spectral radius of the step Jacobian (power iteration + Arnoldi on JVPs).
* `classify`, `shares`: converged / cycling (period) / wandering / diverged tokens.
* `activations`: massive activations, MLP sparsity (Hoyer), attention entropy / overlap /
  column sums. `pca_2d`: 2-D PCA of a latent path.
"""

from looped_jax.analysis import activations
from looped_jax.analysis.cycles import CLASSES, classify, shares, shares_by_step
from looped_jax.analysis.fixed_point import Reference, first_step_below, fit_rate, long_run_reference
from looped_jax.analysis.loop import LoopSpec, default_state_fn, run, state_of
from looped_jax.analysis.pca import pca_2d
from looped_jax.analysis.spectral import Spectrum, jacobian_spectrum
from looped_jax.analysis.trajectory import Trajectory, masked_mean_over_tokens, trajectory

__all__ = [
    "CLASSES",
    "LoopSpec",
    "Reference",
    "Spectrum",
    "Trajectory",
    "activations",
    "classify",
    "default_state_fn",
    "first_step_below",
    "fit_rate",
    "jacobian_spectrum",
    "long_run_reference",
    "masked_mean_over_tokens",
    "pca_2d",
    "run",
    "shares",
    "shares_by_step",
    "state_of",
    "trajectory",
]

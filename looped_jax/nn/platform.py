"""The platform a traced program is *for*, which can differ from the host's backend.

Code paths that differ by accelerator (Mosaic kernels, flash attention, cuDNN attention) ask
:func:`target_platform` instead of ``jax.default_backend()``: an AOT compile for a TPU topology on a CPU host
sets the target with ``with use_platform("tpu"): ...`` so that the compiled program is the one a TPU would run.
Outside such a block the target is the default backend ("cpu", "tpu", "cuda" or "rocm").
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

from pallas_kernels.dispatch import resolve_platform

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("looped_jax_target_platform", default=None)


def target_platform() -> str:
    """The platform being traced for: the innermost ``use_platform`` value, else the default backend."""
    return resolve_platform(_TARGET.get())


@contextlib.contextmanager
def use_platform(platform: str | None) -> Iterator[str]:
    """Trace for ``platform`` ("cpu", "tpu", "cuda", "rocm"; "gpu" means "cuda"; None: the default backend)."""
    resolved = resolve_platform(platform)  # raises ValueError naming PLATFORMS for an unknown name
    token = _TARGET.set(resolved)
    try:
        yield resolved
    finally:
        _TARGET.reset(token)

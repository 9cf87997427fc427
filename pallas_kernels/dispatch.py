"""What every op's dispatch shares: the target platform, the chosen implementation and the fallback log line.

``impl="pallas"`` means the kernel or an error naming the property the kernel does not support; ``impl="auto"``
may fall back to XLA and says so once per distinct reason (a ``logging`` warning on the ``pallas_kernels`` logger).
``which_impl`` in each op's ops.py returns an :class:`ImplChoice` without running anything.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import jax

PLATFORMS = ("cpu", "tpu", "cuda", "rocm")
_ALIASES = {"gpu": "cuda"}  # jax.default_backend() says "gpu" for an NVIDIA device
logger = logging.getLogger("pallas_kernels")
_warned: set[str] = set()


class ImplChoice(NamedTuple):
    """The implementation a call uses and why.

    ``impl`` (forward) and ``backward`` are one of "xla", "pallas_interpret" (TPU kernel code in the Pallas
    interpreter), "pallas_tpu" (Mosaic TPU), "pallas_gpu" (the op's GPU kernel); ``platform`` is the target.
    """

    impl: str
    backward: str
    platform: str
    reason: str


def _default_platform() -> str:
    """jax.default_backend(), with "gpu" told apart as "cuda" or "rocm" (both report "gpu")."""
    backend = jax.default_backend()
    if backend != "gpu":
        return backend
    version = str(getattr(jax.devices()[0].client, "platform_version", "")).lower()
    return "rocm" if "rocm" in version or "hip" in version else "cuda"


def resolve_platform(platform: str | None) -> str:
    """The lowering target: ``platform`` if given (for export / cross-lowering), else ``jax.default_backend()``."""
    if platform is None:
        platform = _default_platform()
    if not isinstance(platform, str):
        raise ValueError(f"platform must be one of {PLATFORMS} or None, got {platform!r}")
    name = _ALIASES.get(platform.lower(), platform.lower())
    if name not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS} or None, got {platform!r}")
    return name


def check_interpret(interpret) -> None:
    if interpret is not None and not isinstance(interpret, bool):
        raise ValueError(f"interpret must be True, False or None, got {interpret!r}")


def warn_fallback_once(op: str, reason: str) -> None:
    """One warning per distinct (op, reason) per process: ``impl='auto'`` ran XLA instead of a kernel."""
    key = f"{op}: {reason}"
    if key in _warned:
        return
    _warned.add(key)
    logger.warning("%s: impl='auto' runs the XLA path: %s", op, reason)

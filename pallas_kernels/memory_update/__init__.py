"""Titans neural long-term memory update (Behrouz et al. 2024): reference, chunked XLA form, Pallas kernels."""

from pallas_kernels.memory_update.ops import init_memory_state, memory_retrieve, memory_update, which_impl
from pallas_kernels.memory_update.reference import (
    MemoryState,
    memory_update_per_token_exact,
    memory_update_reference,
)

__all__ = [
    "MemoryState",
    "init_memory_state",
    "memory_retrieve",
    "memory_update",
    "memory_update_per_token_exact",
    "memory_update_reference",
    "which_impl",
]

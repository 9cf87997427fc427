"""TransformerFAM feedback attention (block sliding window + feedback memory): reference and Pallas kernels."""

from pallas_kernels.feedback_attention.ops import feedback_attention, feedback_attention_sharded, which_impl
from pallas_kernels.feedback_attention.reference import feedback_attention_reference, num_blocks

__all__ = [
    "feedback_attention",
    "feedback_attention_reference",
    "feedback_attention_sharded",
    "num_blocks",
    "which_impl",
]

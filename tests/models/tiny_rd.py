"""The tiny recurrent-depth model and prompt the decoding tests share (generate, cache lookups, speculative)."""

import jax

from looped_jax.models import RecurrentDepthConfig

RD = RecurrentDepthConfig(
    vocab_size=37,
    d_model=32,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
    mlp_dim=64,
    num_prelude_layers=1,
    num_core_layers=2,
    num_coda_layers=1,
    mean_loops=3,
    grad_steps=2,
    init_scale=0.0,
)
PROMPT = jax.random.randint(jax.random.key(3), (2, 5), 0, 37)

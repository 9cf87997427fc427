"""A tiny Latent-Thought Model on byte-level text, sized for a few minutes on 2 CPU cores.

d 64, 2 layers, 4 latent vectors per layer, sliding window 16 within 64-token sequences (so
information from further back than 16 tokens can only arrive through the latents), 16 inner Adam
steps per training sequence. Its autoregressive baseline of equal parameters on the same tokens is
``configs/ar_baseline_cpu.py``; ``scripts/ltm_eval.py`` trains both and compares perplexities.
The outer learning rate is higher than the paper's 4e-4 because the run is only a few hundred steps.

The posterior settings are the paper's (log sigma^2_0 = -5, one eps fixed over the inner loop). At
this size the 16-step KL stays ~8 nats/token (Adam moves log sigma^2 by ~lr per step, so it cannot
leave -5 in 16 steps) and the decoder learns to exploit the fitted eps; the variant
``configs/ltm_cpu_vi.py`` (``model.init_logvar=0``, ``model.resample_eps=True``: posterior started at
the prior's variance, fresh eps per inner step) trains as ordinary stochastic VI. Numbers: scripts/ltm_eval.py.
"""

from looped_jax.config import CheckpointConfig, ExperimentConfig, OptimConfig, TrainConfig
from looped_jax.data import DataConfig
from looped_jax.models.latent_thought import LatentThoughtConfig

SEQ_LEN = 64


def get_config() -> ExperimentConfig:
    model = LatentThoughtConfig(
        vocab_size=259,
        d_model=64,
        num_heads=4,
        num_kv_heads=4,
        head_dim=16,
        mlp_dim=192,
        num_layers=2,
        num_latents=4,
        window=16,
        latent_span=SEQ_LEN,
        inner_steps=16,
    )
    return ExperimentConfig(
        model=model,
        data=DataConfig(name="bytes_text", seq_len=SEQ_LEN, max_text_bytes=4_000_000),
        optim=OptimConfig(
            learning_rate=3e-3, warmup_steps=30, end_learning_rate_ratio=0.1, weight_decay=0.1, b1=0.9, b2=0.95
        ),
        train=TrainConfig(num_steps=600, global_batch_size=16, log_every=25, eval_batches=4, output_dir="runs/ltm_cpu"),
        checkpoint=CheckpointConfig(enabled=True, save_every=0, keep=1, async_save=False),
    )

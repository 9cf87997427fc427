"""The paper's 3.5B recurrent-depth model (Geiping et al. 2025, "Scaling up Test-Time Compute
with Latent Reasoning", Table/Sec. 4 "Huginn-0125"), for AOT compiles on a TPU topology:

    python scripts/compile_tpu.py --config configs/recurrent_depth_huginn.py --topology v5e:16x16

d_model 5280, 55 heads x 96, SwiGLU 17920, prelude/core/coda 2/4/2, vocabulary 65536, mean
recurrence 32 with 8 backpropagated steps, sequence length 4096, bf16 compute with float32
parameters; the core step is rematerialized (nothing saved) so activation memory is that of
8 core steps' carries plus one step's recomputation.

Mesh: FSDP shards the ``embed`` dim (5280 = 2^5 * 3 * 5 * 11), so fsdp must divide 5280:
fsdp=32 x data=8 on 256 v5e chips; one 4096-token sequence per chip (global batch 256, 1M
tokens/step). The byte-text data entry is only a placeholder for shapes: compile_tpu never
reads data, and the model vocabulary (65536) covers the byte vocabulary.

Memory plan: data 8 x fsdp 32 with the splash-attention dispatch and the activation sharding constraints; before
those (issue 16) the same layout needed 64.65 GiB per chip.

Measured plan (v5e:16x16, 256 chips, AOT on CPU: `python scripts/compile_tpu.py --all --only
recurrent_depth_huginn`): mesh data 8 x fsdp 32, remat nothing_saveable, 1 sequence(s) per chip; per chip the
compiler's peak is 13.44 GiB of 15.75 (arguments 1.37, outputs 1.37, temporaries 15.85 GiB, not all live at once);
625 collectives; no projected MFU (a data-dependent loop).
"""

from looped_jax.config import CheckpointConfig, ExperimentConfig, MeshConfig, OptimConfig, TrainConfig
from looped_jax.data import DataConfig
from looped_jax.models.recurrent_depth import RecurrentDepthConfig

TARGET_TOPOLOGY = "v5e:16x16"  # the slice this config is planned for (scripts/compile_tpu.py --all)


def get_config() -> ExperimentConfig:
    model = RecurrentDepthConfig(
        vocab_size=65536,
        d_model=5280,
        num_heads=55,
        num_kv_heads=55,
        head_dim=96,
        mlp_dim=17920,
        num_prelude_layers=2,
        num_core_layers=4,
        num_coda_layers=2,
        mean_loops=32,
        grad_steps=8,
        max_train_loops=128,
        eval_loops=32,
        dtype="bfloat16",
        remat_policy="nothing_saveable",
    )
    return ExperimentConfig(
        model=model,
        data=DataConfig(name="bytes_text", seq_len=4096),
        optim=OptimConfig(learning_rate=4e-5, warmup_steps=4096, weight_decay=0.1, grad_clip=1.0),
        train=TrainConfig(
            num_steps=800_000, global_batch_size=256, log_every=10, output_dir="runs/recurrent_depth_huginn"
        ),
        mesh=MeshConfig(data=8, fsdp=32, tensor=1),
        checkpoint=CheckpointConfig(save_every=1000, keep=3),
    )

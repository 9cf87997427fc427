"""TransformerFAM at ~1B parameters (Hwang et al. 2024 train FAM on Flan-PaLM 1B / 8B / 24B; the layout here
is a 1B decoder of our own choosing at their block settings), for AOT compiles on a TPU slice:

    python scripts/compile_tpu.py --config configs/fam_1b.py --topology v5e:16x16

d_model 2048, 20 layers, 16 heads x 128, SwiGLU 5632, vocabulary 32000 (an LM tokenizer's size; the
byte-text data entry is only a shape placeholder: compile_tpu never reads data), block 1024 with 3
memory segments and 64 FAM vectors per layer (the paper's settings), sequence 4096, bf16 compute
with float32 parameters, global batch 256 (1M tokens per step).

Memory plan for v5e:16x16 (256 chips, 15.75 GiB HBM usable): data 16 x fsdp 16 (the parameters and
Adam state, ~18 GB, split 16 ways), one sequence per chip, every layer rematerialized
(``remat_policy="nothing_saveable"``): without it the step needs 46.13 GiB per chip at data 256
(issue 16); the per-chip figures of this layout are in ``runs/aot/results.md``
(``python scripts/compile_tpu.py --all --only fam_1b``).

Measured plan (v5e:16x16, 256 chips, AOT on CPU: `python scripts/compile_tpu.py --all --only fam_1b`): mesh data 16
x fsdp 16, remat nothing_saveable, 1 sequence(s) per chip; per chip the compiler's peak is 3.26 GiB of 15.75
(arguments 0.76, outputs 0.76, temporaries 6.05 GiB, not all live at once); 3,040 collectives; projected MFU 0.81.
"""

from looped_jax.config import CheckpointConfig, ExperimentConfig, MeshConfig, OptimConfig, TrainConfig
from looped_jax.data import DataConfig
from looped_jax.models.fam import FamConfig

TARGET_TOPOLOGY = "v5e:16x16"  # the slice this config is planned for (scripts/compile_tpu.py --all)


def get_config() -> ExperimentConfig:
    model = FamConfig(
        vocab_size=32_000,
        d_model=2048,
        num_heads=16,
        num_kv_heads=16,
        head_dim=128,
        mlp_dim=5632,
        num_layers=20,
        block_size=1024,
        memory_segments=3,
        fam_length=64,
        random_position_offset=True,
        dtype="bfloat16",
        remat_policy="nothing_saveable",
    )
    return ExperimentConfig(
        model=model,
        data=DataConfig(name="bytes_text", seq_len=4096),
        optim=OptimConfig(learning_rate=3e-4, warmup_steps=2000, weight_decay=0.1, grad_clip=1.0),
        train=TrainConfig(num_steps=100_000, global_batch_size=256, log_every=100, output_dir="runs/fam_1b"),
        mesh=MeshConfig(data=16, fsdp=16, tensor=1),
        checkpoint=CheckpointConfig(save_every=1000, keep=3),
    )

"""Continue training a retrofitted transformer with a recurrence curriculum (McLeish et al. 2025), CPU.

The starting point is the tiny random Llama fixture (6 layers, d 32) retrofitted by

    python scripts/retrofit.py --hf_dir tests/fixtures/llama/checkpoint --prelude 0 --core 1-4 --coda 5 \
        --mean_loops 4 --grad_steps 2 --out runs/retrofit_chains/init
    python scripts/train.py --config configs/retrofit_chains_cpu.py

layer 0 the prelude, layers 1-4 the shared core, layer 5 the coda, in Llama's pre-norm layout with
its untied head; the adapter starts as [0; I], so one loop is the original network. Training on
1-4 hop variable chains ramps the mean loop count linearly from 1 to 4 over the first 200 steps
(``train.mean_loops_ramp_steps``). The model fields must equal the export's (the trainer checks
them, naming any that differ).
"""

from looped_jax.config import CheckpointConfig, ExperimentConfig, OptimConfig, TrainConfig
from looped_jax.data import DataConfig
from looped_jax.models.recurrent_depth import RecurrentDepthConfig


def get_config() -> ExperimentConfig:
    model = RecurrentDepthConfig(
        vocab_size=96,
        d_model=32,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        mlp_dim=64,
        num_prelude_layers=1,
        num_core_layers=4,
        num_coda_layers=1,
        mean_loops=4,
        loop_sigma=0.5,
        grad_steps=2,
        rope_theta=10_000.0,
        norm_eps=1e-5,
        norm_style="pre",
        qk_bias=False,
        scale_embeddings=False,
        tie_embeddings=False,
        coda_input_norm=False,
    )
    data = DataConfig(name="chains", seq_len=40, num_train=4_000, num_test=200, test_hops=(2, 4))
    return ExperimentConfig(
        model=model,
        data=data,
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=20),
        train=TrainConfig(
            num_steps=400,
            global_batch_size=32,
            log_every=20,
            eval_every=200,
            output_dir="runs/retrofit_chains/train",
            init_params_from="runs/retrofit_chains/init",
            mean_loops_ramp_steps=200,
            mean_loops_ramp_start=1.0,
        ),
        checkpoint=CheckpointConfig(save_every=200, keep=2),
    )

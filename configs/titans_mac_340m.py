"""Titans-MAC, 340M size class (Behrouz et al. 2024, sec. 5.1 and App. E / Table 5: AdamW 4e-4 with cosine decay,
weight decay 0.1, 4k context, 15B training tokens; Llama 2 tokenizer, 32k vocabulary).

The paper's layout: 24 layers of width 1024 (16 attention heads of 64), attention window / MAC segment 2048,
128 persistent tokens, memory updated in chunks of 16 tokens, the deep memory of the later revision
(``memory_kind="mlp_ln"``: 2 matrices, 4x expansion, GELU, ``x + LN(W2 gelu(W1 x))``, 16 heads of 64) with the
normalised and gated memory output (sec. 4.4, the TitansConfig default). The MAC segment length is not separate
in the table; it is set equal to the window here. The feed-forward width (2816, the LLaMA / GLA 340M setting)
is ours: the paper gives no FFN width.

Parameters: ~509M (counted with nnx.eval_shape in tests/models/test_titans.py, no allocation), i.e. more than
the size label: each layer carries a transformer block (attention 4.2M + SwiGLU 8.7M) plus the memory's own
projections (q/k/v, retrieval query, output projection and output gate: 6.3M) and the 128 persistent tokens.
The memory runs on the pure-JAX chunked path (the Pallas kernel has no LayerNorm/GELU memory), see
looped_jax/models/neural_memory.py.

Memory plan (v5e:16x16, 16 GiB HBM per chip): fsdp 128 x tensor 2, one 4096-token sequence per chip, and every
layer rematerialised in the backward pass (``remat_policy``). Without remat the backward pass keeps every layer's
per-chunk memory states at once (256 chunks of 16 heads x (64 x 256 + 256 x 64) weights per sequence and layer).
Measured per-chip numbers: the README's table of ``scripts/compile_tpu.py --all``.

Data: the model's vocabulary is the paper's 32k; the ``data`` entry is a shape placeholder (byte-level text,
4096-token rows): the paper trains on FineWeb-Edu with the Llama 2 tokenizer, which this repository's data
pipeline does not provide. Point data.name / data_dir at a prepared 32k-token data set to train for real.

Measured plan (v5e:16x16, 256 chips, AOT on CPU: `python scripts/compile_tpu.py --all --only titans_mac_340m`): mesh
fsdp 128 x tensor 2, remat nothing_saveable, 1 sequence(s) per chip; per chip the compiler's peak is 12.63 GiB of
15.75 (arguments 0.11, outputs 0.11, temporaries 15.53 GiB, not all live at once); 4,897 collectives; projected MFU
0.77.
"""

from looped_jax.config import CheckpointConfig, ExperimentConfig, MeshConfig, OptimConfig, TrainConfig
from looped_jax.data import DataConfig
from looped_jax.models.titans import TitansConfig

TARGET_TOPOLOGY = "v5e:16x16"  # the slice this config is planned for (scripts/compile_tpu.py --all)


def get_config() -> ExperimentConfig:
    model = TitansConfig(
        variant="mac",
        vocab_size=32_000,
        d_model=1024,
        num_layers=24,
        num_heads=16,
        num_kv_heads=16,
        head_dim=64,
        mlp_dim=2816,
        window=2048,
        segment_len=2048,
        num_persistent=128,
        memory_kind="mlp_ln",
        memory_heads=16,
        memory_head_dim=64,
        memory_hidden=256,  # 4x memory_head_dim
        memory_layers=2,
        memory_chunk_size=16,
        memory_max_lr=1e-3,
        max_surprise_norm=1.0,
        memory_output_gate=True,
        remat_policy="nothing_saveable",  # each layer recomputed in the backward pass (see the module docstring)
        dtype="bfloat16",
    )
    return ExperimentConfig(
        model=model,
        data=DataConfig(name="bytes_text", seq_len=4096),  # placeholder, see the module docstring
        optim=OptimConfig(learning_rate=4e-4, warmup_steps=2000, weight_decay=0.1, end_learning_rate_ratio=0.1),
        train=TrainConfig(num_steps=28_600, global_batch_size=128, log_every=100, output_dir="runs/titans_mac_340m"),
        # 256 chips, 128 sequences: fsdp 128 splits the batch and the weights, tensor 2 the heads / MLP
        mesh=MeshConfig(data=1, fsdp=128, tensor=2),
        checkpoint=CheckpointConfig(save_every=1000, keep=3),
    )

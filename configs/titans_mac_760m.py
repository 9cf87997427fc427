"""Titans-MAC, 760M size class (Behrouz et al. 2024, sec. 5.1 and App. E / Table 5: AdamW 4e-4 with cosine decay,
weight decay 0.1, 4k context, 30B training tokens; Llama 2 tokenizer, 32k vocabulary).

The paper's layout: 24 layers of width 1536 with 16 heads (head dim 96), attention window / MAC segment 2048,
128 persistent tokens, memory chunks of 16 tokens, deep memory with 4x expansion (16 heads of 96, hidden 384).
The feed-forward width (4096, the LLaMA / GLA 760M setting) is ours: the paper gives no FFN width.
Parameters: ~1.10B (counted with nnx.eval_shape in tests/models/test_titans.py), more than the size label for the
reason given in titans_mac_340m.py (a full memory block beside every transformer block).

Everything else (optimiser, the data placeholder, memory options) comes from titans_mac_340m.py.

Measured plan (v5e:16x16, 256 chips, AOT on CPU: `python scripts/compile_tpu.py --all --only titans_mac_760m`): mesh
fsdp 128 x tensor 2, remat nothing_saveable, 1 sequence(s) per chip; per chip the compiler's peak is 13.38 GiB of
15.75 (arguments 0.23, outputs 0.23, temporaries 17.03 GiB, not all live at once); 7,220 collectives; projected MFU
0.77.
"""

from pathlib import Path

from looped_jax.config import ExperimentConfig, apply_overrides, load_config

TARGET_TOPOLOGY = "v5e:16x16"  # the slice this config is planned for (scripts/compile_tpu.py --all)


def get_config() -> ExperimentConfig:
    return apply_overrides(
        load_config(Path(__file__).with_name("titans_mac_340m.py")),
        {
            "model.d_model": 1536,
            "model.num_layers": 24,
            "model.num_heads": 16,
            "model.num_kv_heads": 16,
            "model.head_dim": 96,
            "model.mlp_dim": 4096,
            "model.memory_heads": 16,
            "model.memory_head_dim": 96,
            "model.memory_hidden": 384,
            "train.num_steps": 57200,
            "train.output_dir": "runs/titans_mac_760m",
        },
    )

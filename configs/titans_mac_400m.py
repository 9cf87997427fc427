"""Titans-MAC, 400M size (Behrouz et al. 2024, sec. 5.1: AdamW 4e-4 with cosine decay, weight decay 0.1,
4k context, 15B training tokens; Llama 32k vocabulary). Parameters: ~398M (counted with nnx.eval_shape
in tests/models/test_titans.py, no allocation).

Deep (2-layer MLP) memory with 16 heads of 64, updated in chunks of 64 tokens; theta is kept small
(memory_max_lr 1e-3, so one chunk's summed step stays << 1) and each chunk's surprise is clipped.
Data: set data.name / data_dir to a prepared text data set (the default here is byte-level text for a smoke
run; the paper trains on FineWeb-Edu with the Llama 2 tokenizer, which is not bundled).

Everything else (optimiser, data, memory) comes from titans_mac_340m.py.
"""

from pathlib import Path

from looped_jax.config import ExperimentConfig, apply_overrides, load_config


def get_config() -> ExperimentConfig:
    return apply_overrides(
        load_config(Path(__file__).with_name("titans_mac_340m.py")),
        {
            "model.num_layers": 20,
            "model.mlp_dim": 2816,
            "train.output_dir": "runs/titans_mac_400m",
        },
    )

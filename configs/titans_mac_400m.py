"""Titans-MAC, 400M size label (Behrouz et al. 2024, sec. 5.1: AdamW 4e-4 with cosine decay, weight decay 0.1,
4k context, 15B training tokens; Llama 2 tokenizer, 32k vocabulary).

The paper's table gives no layout for this size that we reproduce; this is the titans_mac_340m.py layout with
20 layers, so it counts FEWER parameters than titans_mac_340m.py: ~430M (counted with nnx.eval_shape in
tests/models/test_titans.py, no allocation). The name is kept for existing run directories only.

Everything else (optimiser, the data placeholder, memory) comes from titans_mac_340m.py.

Measured plan (v5e:16x16, 256 chips, AOT on CPU: `python scripts/compile_tpu.py --all --only titans_mac_400m`): mesh
fsdp 128 x tensor 2, remat nothing_saveable, 1 sequence(s) per chip; per chip the compiler's peak is 11.43 GiB of
15.75 (arguments 0.09, outputs 0.09, temporaries 14.13 GiB, not all live at once); 4,085 collectives; projected MFU
0.78.
"""

from pathlib import Path

from looped_jax.config import ExperimentConfig, apply_overrides, load_config

TARGET_TOPOLOGY = "v5e:16x16"  # the slice this config is planned for (scripts/compile_tpu.py --all)


def get_config() -> ExperimentConfig:
    return apply_overrides(
        load_config(Path(__file__).with_name("titans_mac_340m.py")),
        {
            "model.num_layers": 20,
            "train.output_dir": "runs/titans_mac_400m",
        },
    )

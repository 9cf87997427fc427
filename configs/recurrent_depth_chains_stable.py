"""The main job's recurrent-depth model with Parcae-style stable injection (issue 12).

Same data, model size and training as ``recurrent_depth_chains``; only the adapter differs:
x = a * s + B RMSNorm(e) with a = exp(-exp(log_rate)) in (0, 1) per channel (spectral radius of
the state path < 1 by construction) instead of A([s; e]).
"""

import dataclasses
import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_rd_chains", Path(__file__).with_name("recurrent_depth_chains.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config():
    cfg = _base.get_config()
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, stable_injection=True),
        train=dataclasses.replace(cfg.train, output_dir="runs/recurrent_depth_chains_stable"),
    )

"""Import / export: one module per outside format, each with its documented name map.

- ``safetensors_io``: the safetensors file format (numpy only, memory-mapped reads).
- ``params``: params-only export of any family + manifest; Orbax training checkpoints read
  without their optimizer state (optionally onto another mesh).
- ``huginn_raven``: the Hugging Face layout of Huginn-0125 (recurrent depth), both ways.
- ``stablehlo``: serialized ``jax.export`` serving artifacts and ``load_serving``.
- ``torch_pickle``: torch ``state_dict`` files read without torch (restricted unpickler) and written.
- ``hrm_trm``: the official HRM / TRM training checkpoints (torch pickle + all_config.yaml), both ways.

Names are imported lazily, so ``load_serving`` runs without importing any model code.
"""

import importlib

from looped_jax.export.safetensors_io import ExportError, SafetensorsError, read_safetensors, write_safetensors

_LAZY = {
    "TrainingCheckpoint": "params",
    "flatten_params": "params",
    "load_params_safetensors": "params",
    "model_config_from_dict": "params",
    "model_from_params": "params",
    "params_of": "params",
    "read_training_checkpoint": "params",
    "save_params_safetensors": "params",
    "export_huginn_raven": "huginn_raven",
    "import_huginn_raven": "huginn_raven",
    "export_official": "hrm_trm",
    "import_official": "hrm_trm",
    "read_state_dict": "torch_pickle",
    "read_torch_pickle": "torch_pickle",
    "write_state_dict": "torch_pickle",
    "export_serving": "stablehlo",
    "load_serving": "stablehlo",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"looped_jax.export.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'looped_jax.export' has no attribute {name!r}")


__all__ = ["ExportError", "SafetensorsError", "read_safetensors", "write_safetensors", *sorted(_LAZY)]

"""Model families and the registry the trainer builds from (``cfg.name`` selects the family).

Every family implements the interface of ``looped_jax.models.protocol`` (``initial_carry``,
``loss -> LossOutput``, ``evaluate -> sums``), which is all the trainer calls, and runs its loops
through the engine in ``looped_jax.recurrence``.
"""

from __future__ import annotations

import jax
from flax import nnx

from looped_jax.models.fam import FamConfig, FamModel
from looped_jax.models.gram import GramConfig, GramModel
from looped_jax.models.hrm import HRMConfig, HRMModel
from looped_jax.models.latent_thought import LatentThoughtConfig, LatentThoughtModel
from looped_jax.models.looped import LoopedConfig, LoopedModel
from looped_jax.models.protocol import LossOutput, Model, TokenModel
from looped_jax.models.recurrent_depth import RecurrentDepthConfig, RecurrentDepthModel
from looped_jax.models.rmt import RMTConfig, RMTModel
from looped_jax.models.titans import TitansConfig, TitansModel
from looped_jax.models.trm import TRMConfig, TRMModel

MODEL_CONFIGS: dict[str, type] = {
    "recurrent_depth": RecurrentDepthConfig,
    "looped": LoopedConfig,
    "latent_thought": LatentThoughtConfig,
    "fam": FamConfig,
    "titans": TitansConfig,
    "hrm": HRMConfig,
    "trm": TRMConfig,
    "gram": GramConfig,
    "rmt": RMTConfig,
}
MODEL_CLASSES: dict[str, type[nnx.Module]] = {
    "recurrent_depth": RecurrentDepthModel,
    "looped": LoopedModel,
    "latent_thought": LatentThoughtModel,
    "fam": FamModel,
    "titans": TitansModel,
    "hrm": HRMModel,
    "trm": TRMModel,
    "gram": GramModel,
    "rmt": RMTModel,
}


def build_model(cfg, *, rngs: nnx.Rngs) -> nnx.Module:
    """Instantiates the family named by ``cfg.name`` with ``cfg``."""
    name = getattr(cfg, "name", None)
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model.name={name!r}; expected one of {sorted(MODEL_CONFIGS)}")
    if not isinstance(cfg, MODEL_CONFIGS[name]):
        raise ValueError(f"model.name={name!r} needs a {MODEL_CONFIGS[name].__name__}, got {type(cfg).__name__}")
    return MODEL_CLASSES[name](cfg, rngs=rngs)


def count_params(model: nnx.Module) -> int:
    """Number of scalars in the model's ``nnx.Param`` leaves."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


__all__ = [
    "FamConfig",
    "FamModel",
    "GramConfig",
    "GramModel",
    "HRMConfig",
    "HRMModel",
    "MODEL_CLASSES",
    "MODEL_CONFIGS",
    "LatentThoughtConfig",
    "LatentThoughtModel",
    "LoopedConfig",
    "LoopedModel",
    "LossOutput",
    "Model",
    "TokenModel",
    "RecurrentDepthConfig",
    "RecurrentDepthModel",
    "RMTConfig",
    "RMTModel",
    "TitansConfig",
    "TitansModel",
    "TRMConfig",
    "TRMModel",
    "build_model",
    "count_params",
]

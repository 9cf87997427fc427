"""Turns an Orbax training checkpoint into an outside format (optimizer state dropped).

    python scripts/export.py --checkpoint_dir runs/x --format safetensors --out exported/x [--ema] [--step N]

Formats: ``safetensors`` (every family: flat dotted names + manifest.json), ``huginn_raven``
(recurrent depth: the Hugging Face layout of Huginn-0125, sharded, streamed shard by shard),
``stablehlo`` (recurrent depth: jax.export serving artifact, see looped_jax.export.load_serving),
``hrm`` / ``trm`` (the official sapientinc/HRM and TinyRecursiveModels checkpoint layout: a
torch state_dict ``step_<N>`` with ``_orig_mod.`` prefixes + ``all_config.yaml``; without torch
installed, ``step_<N>.safetensors`` with the same names; see looped_jax.export.hrm_trm).
Every output directory gets a ``manifest.json`` (config, parameter count, per-tensor sha256,
source step).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FORMATS = ("safetensors", "huginn_raven", "stablehlo", "hrm", "trm")


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint_dir", required=True, help="a run's output dir or its checkpoints/ dir")
    ap.add_argument("--format", required=True, choices=FORMATS)
    ap.add_argument("--out", required=True, help="output directory (created)")
    ap.add_argument("--ema", action="store_true", help="export the EMA weights (optim.ema_decay > 0)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--max_shard_bytes", type=int, default=5 * 2**30, help="huginn_raven shard size")
    ap.add_argument("--no_compile_prefix", action="store_true", help="hrm/trm: keys without torch.compile's _orig_mod.")
    args = ap.parse_args(argv)

    from looped_jax.export import read_training_checkpoint, save_params_safetensors

    t0 = time.perf_counter()
    ck = read_training_checkpoint(args.checkpoint_dir, step=args.step, ema=args.ema)
    print(f"read {ck.weights} of step {ck.step} ({ck.model_cfg.name}) from {ck.path}", flush=True)
    if args.format == "safetensors":
        out = save_params_safetensors(
            args.out, ck.model_cfg, ck.params, step=ck.step, source=ck.path, weights=ck.weights
        )
    elif args.format in ("hrm", "trm"):
        from looped_jax.export import ExportError
        from looped_jax.export.hrm_trm import export_official

        if ck.model_cfg.name != args.format:
            raise ExportError(f"--format {args.format} needs a {args.format} checkpoint, not {ck.model_cfg.name}")
        out = export_official(
            args.out,
            ck.model_cfg,
            ck.params,
            step=ck.step,
            source=ck.path,
            weights=ck.weights,
            compiled_prefix=not args.no_compile_prefix,
            train_config=_train_fields(ck.config),
        )
    elif args.format == "stablehlo":
        from looped_jax.export.stablehlo import export_serving

        out = export_serving(args.out, ck.model_cfg, ck.params)
    else:
        from looped_jax.export.huginn_raven import export_huginn_raven

        out = export_huginn_raven(
            args.out,
            ck.model_cfg,
            ck.params,
            step=ck.step,
            source=ck.path,
            weights=ck.weights,
            max_shard_bytes=args.max_shard_bytes,
        )
    print(f"wrote {args.format} to {out} in {time.perf_counter() - t0:.1f}s", flush=True)
    return Path(out)


def _train_fields(config: dict) -> dict:
    """PretrainConfig fields we know from our experiment config (the rest keep the published defaults)."""
    optim, train = config.get("optim") or {}, config.get("train") or {}
    known = {
        "global_batch_size": train.get("global_batch_size"),
        "lr": optim.get("learning_rate"),
        "lr_warmup_steps": optim.get("warmup_steps"),
        "weight_decay": optim.get("weight_decay"),
        "beta1": optim.get("b1"),
        "beta2": optim.get("b2"),
    }
    return {k: v for k, v in known.items() if isinstance(v, int | float) and not isinstance(v, bool)}


if __name__ == "__main__":
    main()

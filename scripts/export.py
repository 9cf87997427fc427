"""Turns an Orbax training checkpoint into an outside format (optimizer state dropped).

    python scripts/export.py --checkpoint_dir runs/x --format safetensors --out exported/x [--ema] [--step N]

Formats: ``safetensors`` (every family: flat dotted names + manifest.json), ``huginn_raven``
(recurrent depth: the Hugging Face layout of Huginn-0125, sharded, streamed shard by shard),
``stablehlo`` (recurrent depth: jax.export serving artifact, see looped_jax.export.load_serving).
Every output directory gets a ``manifest.json`` (config, parameter count, per-tensor sha256,
source step).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FORMATS = ("safetensors", "huginn_raven", "stablehlo")


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint_dir", required=True, help="a run's output dir or its checkpoints/ dir")
    ap.add_argument("--format", required=True, choices=FORMATS)
    ap.add_argument("--out", required=True, help="output directory (created)")
    ap.add_argument("--ema", action="store_true", help="export the EMA weights (optim.ema_decay > 0)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--max_shard_bytes", type=int, default=5 * 2**30, help="huginn_raven shard size")
    args = ap.parse_args(argv)

    from looped_jax.export import read_training_checkpoint, save_params_safetensors

    t0 = time.perf_counter()
    ck = read_training_checkpoint(args.checkpoint_dir, step=args.step, ema=args.ema)
    print(f"read {ck.weights} of step {ck.step} ({ck.model_cfg.name}) from {ck.path}", flush=True)
    if args.format == "safetensors":
        out = save_params_safetensors(
            args.out, ck.model_cfg, ck.params, step=ck.step, source=ck.path, weights=ck.weights
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


if __name__ == "__main__":
    main()

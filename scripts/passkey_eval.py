"""PassKey accuracy vs length for TransformerFAM and its BSWA baseline (Hwang et al. 2024, Sec. 4.2).

Trains configs/bswa_passkey_cpu.py and configs/fam_passkey_cpu.py (same model, fam_length=0) with the
Trainer, then scores every test_len{L} split: digit accuracy over the answer digits, key accuracy (all
digits right; teacher-forced), and the compiled temporary memory of the evaluation forward at that length.
Also sizes each model's streaming decode cache (``init_cache``, constant in the stream length) from its
pytree. Writes ``runs/<name>/results.md`` (the README table) and ``results.json``.

    python scripts/passkey_eval.py --steps 2400
    python scripts/passkey_eval.py --cache_only          # the decode-cache sizes alone, no training
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from looped_jax.config import load_config, parse_overrides  # noqa: E402
from looped_jax.models import build_model  # noqa: E402
from looped_jax.results import (  # noqa: E402
    MIB,
    Table,
    compiled_temp_bytes,
    exact_match_counts,
    tree_bytes,
    write_results,
)

CONFIGS = {"BSWA": "configs/bswa_passkey_cpu.py", "FAM": "configs/fam_passkey_cpu.py"}


def score(trainer, params, batches: list[dict]) -> dict:
    """Digit and whole-key accuracy over the weighted (answer) targets of ``batches``."""
    graphdef = trainer.graphdef
    forward = jax.jit(lambda p, x, pos: nnx.merge(graphdef, p)(x, positions_BT=pos).argmax(-1))
    digits = correct = keys = keys_right = 0
    with jax.set_mesh(trainer.mesh):
        for b in batches:
            pred_BT = np.asarray(forward(params, b["inputs"], b["positions"]))
            w_BT = b["weights"] > 0
            digits += int(w_BT.sum())
            correct += int(((pred_BT == b["targets"]) & w_BT).sum())
            e, a = exact_match_counts(pred_BT, b["targets"], b["weights"])
            keys_right, keys = keys_right + e, keys + a
    return {"digit_accuracy": correct / max(digits, 1), "key_accuracy": keys_right / max(keys, 1), "keys": keys}


def eval_temp_bytes(trainer, params, batch: int, length: int) -> int | None:
    """Compiled temporary memory of the evaluation forward for [batch, length] inputs."""
    graphdef = trainer.graphdef
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    return compiled_temp_bytes(lambda p, x: nnx.merge(graphdef, p)(x), params, tokens)


def decode_cache_bytes(model_cfg, batch: int) -> int:
    """Bytes of the streaming decode cache (``FamModel.init_cache``) at ``batch`` rows; no weights are made."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_model(model_cfg, rngs=nnx.Rngs(0))))
    return tree_bytes(jax.eval_shape(lambda state: nnx.merge(graphdef, state).init_cache(batch), abstract))


def cache_table(results: dict, batch: int) -> Table:
    rows = [
        [m, f"{r['window']}", f"{r['fam_length']}", f"{r['cache_bytes']:,}", f"{r['cache_bytes'] / 1e6:.2f} MB"]
        for m, r in results.items()
    ]
    return Table(
        ["model", "window", "FAM length", "decode cache bytes", "decode cache"],
        rows,
        title="Streaming decode cache",
        caption=f"Size of init_cache at batch {batch} (K/V ring of the window, FAM and its residual per layer); "
        "it does not grow with the stream length.",
    )


def accuracy_table(results: dict) -> Table:
    labels = list(results)
    header = ["length"] + [f"{m} {col}" for m in labels for col in ("digit", "key", "MiB")]
    rows = []
    for length in results[labels[0]]["lengths"]:
        window = results[labels[0]]["window"]
        name = f"{length} ({length // window}x the window)" if length == 4 * window else str(length)
        cells = [name]
        for m in labels:
            r = results[m]["lengths"][length]
            mib = "n/a" if r["temp_bytes"] is None else f"{r['temp_bytes'] / MIB:.1f}"
            cells += [f"{r['digit_accuracy']:.3f}", f"{r['key_accuracy']:.3f}", mib]
        rows.append(cells)
    first = results[labels[0]]
    caption = (
        f"{first['steps']:,} training steps; {first['lengths'][next(iter(first['lengths']))]['keys']} test keys per "
        "length; digit and whole-key accuracy, compiled temp memory (MiB) of the parallel eval forward."
    )
    return Table(header, rows, title="PassKey retrieval", caption=caption)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    ap.add_argument("--steps", type=int, default=0, help="train.num_steps of both models (0: the config's)")
    ap.add_argument("--eval_batch", type=int, default=32, help="batch of the eval forward and the decode cache")
    ap.add_argument("--models", default="BSWA,FAM")
    ap.add_argument("--cache_only", action="store_true", help="only size the decode caches (no training)")
    ap.add_argument("--name", default="passkey_eval", help="results go to runs/<name>/")
    args, rest = ap.parse_known_args(argv)
    overrides = parse_overrides(rest)  # --config.section.field=value, applied to both models
    results = {}
    for label in args.models.split(","):
        if label not in CONFIGS:
            ap.error(f"--models entries must be among {sorted(CONFIGS)}, got {label!r}")
        run_overrides = {"train.output_dir": f"runs/{args.name}/{label.lower()}", **overrides}
        if args.steps:
            run_overrides["train.num_steps"] = str(args.steps)
        cfg = load_config(CONFIGS[label], run_overrides)
        entry = {
            "window": cfg.model.window,
            "fam_length": cfg.model.fam_length,
            "cache_bytes": decode_cache_bytes(cfg.model, args.eval_batch),
        }
        results[label] = entry
        print(f"[{label}] decode cache at batch {args.eval_batch}: {entry['cache_bytes']:,} bytes", flush=True)
        if args.cache_only:
            continue
        from looped_jax.data import make_eval_batches, prepare
        from looped_jax.train.trainer import Trainer

        prepare(cfg.data)
        trainer = Trainer(cfg)
        state, history = trainer.fit()
        params = state.eval_params
        rows = {}
        for length in cfg.data.passkey_test_lens:
            batches = make_eval_batches(cfg.data, f"test_len{length}", args.eval_batch)
            rows[length] = dict(
                score(trainer, params, batches), temp_bytes=eval_temp_bytes(trainer, params, args.eval_batch, length)
            )
            print(f"[{label}] len {length}: {rows[length]}", flush=True)
        entry.update(
            train_seconds=round(history["train_seconds"], 1), train_final=history["train"], steps=history["steps"]
        )
        entry["lengths"] = rows
        jax.clear_caches()
    tables = [cache_table(results, args.eval_batch)]
    if not args.cache_only:
        tables.insert(0, accuracy_table(results))
    out = write_results(args.name, tables, results)
    print("\n" + "\n\n".join(t.markdown() for t in tables) + f"\n\nwrote {out / 'results.md'}", flush=True)


if __name__ == "__main__":
    main()

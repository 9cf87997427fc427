"""PassKey accuracy vs length for TransformerFAM and its BSWA baseline (Hwang et al. 2024, Sec. 4.2).

Trains configs/fam_passkey_cpu.py and configs/bswa_passkey_cpu.py (same model, fam_length=0) with the
Trainer, then scores every test_len{L} split: digit accuracy over the answer digits, key accuracy (all
digits right; teacher-forced), and the compiled temporary memory of the evaluation forward at that length
(``memory_analysis().temp_size_in_bytes``). Writes a Markdown table and JSON to --out_dir.

    JAX_PLATFORMS=cpu .venv/bin/python scripts/passkey_eval.py --steps 600
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from looped_jax.config import load_config  # noqa: E402
from looped_jax.data import make_eval_batches, prepare  # noqa: E402
from looped_jax.models.fam import FamModel  # noqa: E402
from looped_jax.train.trainer import Trainer  # noqa: E402

CONFIGS = {"BSWA": "configs/bswa_passkey_cpu.py", "FAM": "configs/fam_passkey_cpu.py"}


def score(model: FamModel, batches: list[dict]) -> dict:
    """Digit and whole-key accuracy over the weighted (answer) targets of ``batches``."""
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda p, x, pos: nnx.merge(graphdef, p)(x, positions_BT=pos))
    digits = correct = keys = keys_right = 0.0
    for b in batches:
        pred_BT = np.asarray(jnp.argmax(forward(params, b["inputs"], b["positions"]), -1))
        w_BT = b["weights"] > 0
        right_BT = (pred_BT == b["targets"]) & w_BT
        digits += w_BT.sum()
        correct += right_BT.sum()
        real_B = w_BT.any(-1)
        keys += real_B.sum()
        keys_right += (real_B & (right_BT.sum(-1) == w_BT.sum(-1))).sum()
    return {"digit_accuracy": correct / max(digits, 1), "key_accuracy": keys_right / max(keys, 1), "keys": int(keys)}


def eval_temp_bytes(model: FamModel, batch: int, length: int) -> int:
    """Compiled temporary memory of the evaluation forward for [batch, length] inputs."""
    graphdef, params = nnx.split(model)
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    compiled = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)).lower(params, tokens).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=0, help="override train.num_steps (0: the config's)")
    ap.add_argument("--data_dir", default="", help="override data.data_dir")
    ap.add_argument("--num_test", type=int, default=0, help="override data.num_test")
    ap.add_argument("--eval_batch", type=int, default=32)
    ap.add_argument("--out_dir", default="runs/passkey_eval")
    ap.add_argument("--models", default="BSWA,FAM")
    ap.add_argument("--set", action="append", default=[], help="extra override FIELD=VALUE, e.g. model.fam_length=8")
    args = ap.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for label in args.models.split(","):
        overrides = {}
        if args.steps:
            overrides["train.num_steps"] = str(args.steps)
        if args.data_dir:
            overrides["data.data_dir"] = args.data_dir
        if args.num_test:
            overrides["data.num_test"] = str(args.num_test)
        overrides["train.output_dir"] = str(out_dir / label.lower())
        overrides.update(kv.split("=", 1) for kv in args.set)
        cfg = load_config(CONFIGS[label], overrides)
        prepare(cfg.data)
        t0 = time.perf_counter()
        trainer = Trainer(cfg)
        state, history = trainer.fit()
        train_s = time.perf_counter() - t0
        model = trainer.model(state.eval_params)
        rows = {}
        for length in cfg.data.passkey_test_lens:
            batches = make_eval_batches(cfg.data, f"test_len{length}", args.eval_batch)
            rows[length] = dict(score(model, batches), temp_bytes=eval_temp_bytes(model, args.eval_batch, length))
            print(f"[{label}] len {length}: {rows[length]}", flush=True)
        results[label] = {
            "window": cfg.model.window,
            "fam_length": cfg.model.fam_length,
            "train_seconds": train_s,
            "train_final": history["train"],
            "steps": cfg.train.num_steps,
            "lengths": rows,
        }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=float))
    labels = list(results)
    lines = [
        "| length | " + " | ".join(f"{m} digit acc | {m} key acc | {m} temp MiB" for m in labels) + " |",
        "|---" * (1 + 3 * len(labels)) + "|",
    ]
    for length in results[labels[0]]["lengths"]:
        cells = []
        for m in labels:
            r = results[m]["lengths"][length]
            cells += [f"{r['digit_accuracy']:.3f}", f"{r['key_accuracy']:.3f}", f"{r['temp_bytes'] / 2**20:.2f}"]
        lines.append(f"| {length} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (out_dir / "table.md").write_text(table + "\n")
    print(table)
    for m in labels:
        print(f"{m}: window {results[m]['window']}, {results[m]['steps']} steps in {results[m]['train_seconds']:.0f}s")


if __name__ == "__main__":
    main()

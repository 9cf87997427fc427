"""Needle-in-a-haystack table (model x sequence length) for Titans vs a sliding-window transformer.

Trains each model of ``--configs`` with the Trainer on the ``niah`` / ``assoc_recall`` TFDS data set
(rows of ``data.seq_len`` tokens, looped_jax.data.niah), then measures exact-match retrieval accuracy
(every answer token right) on each ``test_len{L}`` split of ``data.niah_test_lens`` (``data.num_test``
problems each), plus the compiled temporary memory of the one-shot eval forward at each length and of
one streaming chunk (constant in the sequence length). Writes ``runs/<name>/results.md`` and
``results.json``.

    python scripts/niah_eval.py --steps 600 --configs configs/swa_niah_cpu.py,configs/titans_mac_cpu.py,\
configs/titans_mag_cpu.py,configs/titans_mal_cpu.py,configs/titans_lmm_cpu.py
    python scripts/niah_eval.py --configs configs/titans_mag_cpu.py --steps 5 --name smoke --config.data.num_test=25
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from looped_jax.config import load_config, parse_overrides  # noqa: E402
from looped_jax.models import count_params  # noqa: E402
from looped_jax.results import MIB, Table, compiled_temp_bytes, exact_match_counts, write_results  # noqa: E402

LABELS = {
    "swa": "sliding-window transformer",
    "mac": "MAC",
    "mag": "MAG",
    "mal": "MAL",
    "lmm": "LMM (memory only)",
    "rmt": "RMT (memory tokens)",
}


def evaluate(trainer, params, data_cfg, length: int, batch_size: int) -> tuple[float, int | None]:
    """Exact-match accuracy over split ``test_len{length}`` and the eval forward's compiled temp bytes."""
    from looped_jax.data import make_eval_batches

    graphdef = trainer.graphdef
    forward = jax.jit(lambda p, x, pos, seg: nnx.merge(graphdef, p)(x, positions_BT=pos, segment_ids_BT=seg).argmax(-1))
    exact = answered = 0
    mem = None
    with jax.set_mesh(trainer.mesh):
        for b in make_eval_batches(data_cfg, f"test_len{length}", batch_size):
            args = (params, b["inputs"], b["positions"], b["segment_ids"])
            if mem is None:
                mem = compiled_temp_bytes(forward, *args)
            e, a = exact_match_counts(np.asarray(forward(*args)), b["targets"], b["weights"])
            exact, answered = exact + e, answered + a
    return exact / max(answered, 1), mem


def stream_temp_bytes(trainer, params, chunk: int, batch: int) -> int | None:
    """Compiled temp bytes of one streaming chunk, independent of how many tokens came before."""
    graphdef = trainer.graphdef
    model = trainer.model(params)
    state = jax.eval_shape(lambda: model.init_state(batch))
    fn = lambda p, x, s: nnx.merge(graphdef, p).stream(x, s)  # noqa: E731
    return compiled_temp_bytes(fn, params, jax.ShapeDtypeStruct((batch, chunk), jnp.int32), state)


def tables(results: dict, lengths: list[int], eval_batch: int) -> list[Table]:
    acc_rows = [
        [r["label"], f"{r['params']:,}"] + [f"{r['acc'][str(n)]:.3f}" for n in lengths] for r in results.values()
    ]
    mem_rows = [
        [r["label"]]
        + [f"{r['temp_mib'][str(n)]:.1f}" for n in lengths]
        + [f"{r['stream_temp_mib']:.1f} (chunk {r['stream_chunk']})"]
        for r in results.values()
    ]
    first = next(iter(results.values()))
    return [
        Table(
            ["model", "params"] + [str(n) for n in lengths],
            acc_rows,
            title="Exact-match retrieval accuracy by sequence length",
            caption=f"Trained {first['steps']:,} steps on {first['train_len']}-token rows; "
            f"{first['num_test']} problems per length.",
        ),
        Table(
            ["model"] + [str(n) for n in lengths] + ["streaming"],
            mem_rows,
            title="Compiled temp memory (MiB) of the one-shot eval forward",
            caption=f"Batch {eval_batch}; the last column is one streaming chunk at any length.",
        ),
    ]


def main(argv=None) -> None:
    from looped_jax.data import prepare
    from looped_jax.train.trainer import Trainer

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    ap.add_argument("--configs", required=True, help="comma-separated config files")
    ap.add_argument("--steps", type=int, default=0, help="train.num_steps of every model (0 = each config's)")
    ap.add_argument("--eval_batch", type=int, default=25)
    ap.add_argument("--name", default="niah_eval", help="results go to runs/<name>/")
    args, rest = ap.parse_known_args(argv)
    overrides = parse_overrides(rest)  # --config.section.field=value, applied to every config
    results = {}
    lengths: list[int] = []
    for path in args.configs.split(","):
        key = Path(path).stem
        run_overrides = {"train.output_dir": f"runs/{args.name}/{key}", **overrides}
        if args.steps:
            run_overrides["train.num_steps"] = str(args.steps)
        cfg = load_config(path, run_overrides)
        lengths = list(cfg.data.niah_test_lens)
        prepare(cfg.data)
        print(f"== {key}: training {cfg.train.num_steps} steps on length {cfg.data.seq_len}", flush=True)
        trainer = Trainer(cfg)
        state, history = trainer.fit()
        params = state.eval_params
        res = {
            "label": LABELS.get(kind := getattr(cfg.model, "variant", cfg.model.name), kind),
            "config": path,
            "params": count_params(trainer.model(params)),
            "steps": history["steps"],
            "train_len": cfg.data.seq_len,
            "num_test": cfg.data.num_test,
            "train_seconds": round(history["train_seconds"], 1),
            "acc": {},
            "temp_mib": {},
        }
        for length in lengths:
            acc, mem = evaluate(trainer, params, cfg.data, length, args.eval_batch)
            res["acc"][str(length)] = acc
            res["temp_mib"][str(length)] = None if mem is None else round(mem / MIB, 2)
            print(f"  len {length:6d}: exact-match {acc:.3f}  eval temp {res['temp_mib'][str(length)]} MiB", flush=True)
        chunk = 4 * cfg.model.stream_multiple
        mem = stream_temp_bytes(trainer, params, chunk, args.eval_batch)
        res["stream_chunk"], res["stream_temp_mib"] = chunk, None if mem is None else round(mem / MIB, 2)
        results[key] = res
        jax.clear_caches()
    out_tables = tables(results, lengths, args.eval_batch)
    out = write_results(args.name, out_tables, results)
    print("\n" + "\n\n".join(t.markdown() for t in out_tables), flush=True)
    print(f"\nwrote {out / 'results.md'} and {out / 'results.json'}")
    print(json.dumps({k: r["acc"] for k, r in results.items()}))


if __name__ == "__main__":
    main()

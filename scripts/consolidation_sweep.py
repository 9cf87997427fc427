"""Sleep-style consolidation as a test-time knob: accuracy vs extra memory-update passes (looped_jax/models/titans.py).

Trains one small Titans config once (``--config``, default configs/titans_mag_cpu.py on associative recall), then
evaluates the SAME parameters with ``model.consolidation_passes`` in ``--passes`` (and ``model.replay`` /
``model.consolidation_lr_decay``; passes=0 is the trained model) on every ``test_len{L}`` split of
``data.niah_test_lens`` (lengths beyond the training rows) at each difficulty level (``--level_field`` in
``--levels``, default ``data.niah_num_pairs``). Writes ``runs/<name>/results.md|json`` (one table per level:
exact-match accuracy by passes x length, with an estimate of the memory-update FLOPs per token) and
``runs/<name>/consolidation.png`` (accuracy vs passes and vs memory-update FLOPs, one line per level x length).

Memory-update FLOPs per token are estimated as ``6 * sum(d_in * d_out)`` per memory head and layer (the memory's
forward on the key, the gradient's outer product, the weight update) times ``1 + passes * (1 + replay)``.

    python scripts/consolidation_sweep.py --steps 600 --name consolidation_sweep
    python scripts/consolidation_sweep.py --quick   # a smoke run: 5 steps, 8 problems, two lengths
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from looped_jax.config import load_config, parse_overrides  # noqa: E402
from looped_jax.models import build_model  # noqa: E402
from looped_jax.results import Table, exact_match_counts, write_results  # noqa: E402


def memory_update_flops_per_token(model_cfg) -> float:
    """Estimated memory-update FLOPs per token over all layers, consolidation passes and replays included."""
    K = model_cfg.memory_head_dim
    if model_cfg.memory_kind == "linear":
        dims = [K, K]
    else:
        hidden = model_cfg.memory_hidden or (4 * K if model_cfg.memory_kind == "mlp_ln" else K)
        dims = [K] + [hidden] * (model_cfg.memory_layers - 1) + [K]
    per_pass = 6 * sum(a * b for a, b in zip(dims[:-1], dims[1:], strict=True))
    runs = 1 + model_cfg.consolidation_passes * (1 + model_cfg.replay)
    return float(model_cfg.num_layers * model_cfg.memory_heads * per_pass * runs)


def accuracy(graphdef, params, data_cfg, length: int, batch_size: int, mesh) -> float:
    """Exact-match accuracy (every answer token right) over split ``test_len{length}``."""
    from looped_jax.data import make_eval_batches

    forward = jax.jit(lambda p, x, pos, seg: nnx.merge(graphdef, p)(x, positions_BT=pos, segment_ids_BT=seg).argmax(-1))
    exact = answered = 0
    with jax.set_mesh(mesh):
        for b in make_eval_batches(data_cfg, f"test_len{length}", batch_size):
            e, a = exact_match_counts(np.asarray(forward(params, b["inputs"], b["positions"], b["segment_ids"])),
                                      b["targets"], b["weights"])  # fmt: skip
            exact, answered = exact + e, answered + a
    return exact / max(answered, 1)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    for level, by_len in results["acc"].items():
        for length, by_n in by_len.items():
            ns = sorted(int(n) for n in by_n)
            acc = [by_n[str(n)] for n in ns]
            flops = [results["flops_per_token"][str(n)] for n in ns]
            label = f"{results['level_field'].split('.')[-1]}={level}, len {length}"
            ax0.plot(ns, acc, marker="o", label=label)
            ax1.plot(flops, acc, marker="o", label=label)
    ax0.set(xlabel="consolidation passes N", ylabel="exact-match accuracy", title="accuracy vs passes")
    ax1.set(xlabel="memory-update FLOPs / token (estimate)", ylabel="exact-match accuracy", xscale="log",
            title="accuracy vs memory-update compute")  # fmt: skip
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    from looped_jax.data import prepare
    from looped_jax.train.trainer import Trainer

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    ap.add_argument("--config", default="configs/titans_mag_cpu.py")
    ap.add_argument("--task", default="assoc_recall", help="data.name for training and evaluation")
    ap.add_argument("--steps", type=int, default=0, help="train.num_steps (0 = the config's)")
    ap.add_argument("--passes", default="0,1,2,4,8", help="consolidation_passes values, evaluation only")
    ap.add_argument("--replay", type=int, default=0, help="model.replay with passes > 0")
    ap.add_argument("--lr_decay", type=float, default=1.0, help="model.consolidation_lr_decay")
    ap.add_argument("--level_field", default="data.niah_num_pairs", help="the data field that sets difficulty")
    ap.add_argument("--levels", default="2,4", help="its values at evaluation (training uses the config's)")
    ap.add_argument("--eval_batch", type=int, default=25)
    ap.add_argument("--name", default="consolidation_sweep", help="results go to runs/<name>/")
    ap.add_argument("--quick", action="store_true", help="smoke run: 5 steps, 8 problems, lengths 64 and 128")
    ap.add_argument("--train_with_passes", action="store_true",
                    help="train one model per passes value, with those passes (default: train once)")  # fmt: skip
    args, rest = ap.parse_known_args(argv)
    overrides = {"data.name": args.task, "train.output_dir": f"runs/{args.name}/train", **parse_overrides(rest)}
    if args.quick:
        overrides = {"train.num_steps": "5", "data.num_test": "8", "data.num_train": "400",
                     "data.niah_test_lens": "(64,128)", "train.log_every": "5", **overrides}  # fmt: skip
    if args.steps:
        overrides["train.num_steps"] = str(args.steps)
    cfg = load_config(args.config, overrides)
    prepare(cfg.data)
    passes = [int(n) for n in args.passes.split(",")]
    params_by_n = {}
    for n in passes if args.train_with_passes else [None]:
        run_cfg = cfg
        if n is not None:
            run_cfg = load_config(args.config, {
                **overrides, "train.output_dir": f"runs/{args.name}/train_p{n}", "model.consolidation_passes": str(n),
                "model.replay": str(args.replay if n else 0), "model.consolidation_lr_decay": str(args.lr_decay),
            })  # fmt: skip
        print(f"== training {cfg.model.variant} {cfg.train.num_steps} steps on {cfg.data.name} length "
              f"{cfg.data.seq_len}" + ("" if n is None else f" with {n} consolidation passes"), flush=True)  # fmt: skip
        trainer = Trainer(run_cfg)
        state, history = trainer.fit()
        params_by_n[n] = state.eval_params
    lengths = list(cfg.data.niah_test_lens)
    results = {"config": args.config, "task": cfg.data.name, "steps": history["steps"], "train_len": cfg.data.seq_len,
               "num_test": cfg.data.num_test, "replay": args.replay, "lr_decay": args.lr_decay,
               "level_field": args.level_field, "train_with_passes": args.train_with_passes,
               "acc": {}, "flops_per_token": {}}  # fmt: skip
    graphdefs = {}
    for n in passes:
        mcfg = dataclasses.replace(
            cfg.model, consolidation_passes=n, replay=args.replay if n else 0, consolidation_lr_decay=args.lr_decay
        )
        graphdefs[n] = nnx.split(nnx.eval_shape(lambda m=mcfg: build_model(m, rngs=nnx.Rngs(0))), nnx.Param, ...)[0]
        results["flops_per_token"][str(n)] = memory_update_flops_per_token(mcfg)
    tables = []
    for level in args.levels.split(","):
        lcfg = load_config(args.config, {**overrides, args.level_field: level})
        prepare(lcfg.data)
        acc = results["acc"][level] = {str(L): {} for L in lengths}
        for n in passes:
            for L in lengths:
                params = params_by_n[n if args.train_with_passes else None]
                acc[str(L)][str(n)] = accuracy(graphdefs[n], params, lcfg.data, L, args.eval_batch, trainer.mesh)
            print(f"  {args.level_field}={level} passes={n}: " + "  ".join(f"{L}:{acc[str(L)][str(n)]:.3f}"
                                                                          for L in lengths), flush=True)  # fmt: skip
        rows = [[str(n), f"{results['flops_per_token'][str(n)]:,.0f}"] + [f"{acc[str(L)][str(n)]:.3f}" for L in lengths]
                for n in passes]  # fmt: skip
        tables.append(Table(
            ["passes", "mem-update FLOPs/token"] + [str(L) for L in lengths], rows,
            title=f"Exact-match accuracy by consolidation passes and length, {args.level_field}={level}",
            caption=f"{cfg.model.variant} trained {history['steps']} steps on {cfg.data.seq_len}-token "
            f"{cfg.data.name} rows ({args.level_field}={getattr(cfg.data, args.level_field.split('.')[-1])}); "
            + ("trained and evaluated with each number of passes" if args.train_with_passes else
               "passes set at evaluation only")
            + f" (replay={args.replay}, lr decay={args.lr_decay}); "
            f"{cfg.data.num_test} problems per length.",
        ))  # fmt: skip
    out = write_results(args.name, tables, results)
    plot(results, out / "consolidation.png")
    print("\n" + "\n\n".join(t.markdown() for t in tables), flush=True)
    print(f"\nwrote {out / 'results.md'}, {out / 'results.json'} and {out / 'consolidation.png'}")
    print(json.dumps(results["acc"]))


if __name__ == "__main__":
    main()

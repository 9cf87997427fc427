"""Exact-match evaluation of HRM / TRM (and other ACT reasoners) per ACT step: the HRM / TRM table.

For every config of ``--configs``: trains it with the Trainer (``train.num_steps`` from ``--steps``:
the papers' optimizer from ``optim.name``, deep supervision through the trainer carry, the EMA when
``optim.ema_decay > 0``; a finished checkpoint in the run directory is resumed instead of retrained)
or restores it from ``--checkpoint_dirs``, then reports on a puzzle split exact (whole-grid) accuracy
after every ACT step, token accuracy per step, the accuracy of the answer the halting rule picks and
the mean number of steps it uses. Writes ``runs/<name>/results.md`` (the README table) and
``results.json``.

    python scripts/evaluate.py --configs configs/hrm_sudoku_cpu.py,configs/trm_sudoku_cpu.py,\
configs/transformer_sudoku_cpu.py --steps 2280,766,3990 --name hrm_trm_sudoku
    python scripts/evaluate.py --configs configs/hrm_sudoku.py --checkpoint_dirs runs/hrm_sudoku --name hrm_sudoku
    python scripts/evaluate.py --configs configs/trm_sudoku_cpu.py --steps 20 --name smoke --config.train.log_every=5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from looped_jax.config import load_config, parse_overrides, to_dict  # noqa: E402
from looped_jax.data import default_test_split  # noqa: E402
from looped_jax.models import build_model, count_params  # noqa: E402
from looped_jax.results import Table, write_results  # noqa: E402


def train(cfg):
    """Trains ``cfg`` with the Trainer; returns (trainer, eval params, info)."""
    from looped_jax.data import prepare
    from looped_jax.train.trainer import Trainer

    prepare(cfg.data)
    trainer = Trainer(cfg)
    state, history = trainer.fit()
    info = {"steps": history["steps"], "train_seconds": round(history["train_seconds"], 1), "train": history["train"]}
    return trainer, state.eval_params, info


def restore(cfg, checkpoint_dir: str):
    """(trainer, eval_params, info) of the latest Trainer checkpoint in ``checkpoint_dir`` (or its checkpoints/)."""
    from looped_jax.checkpoint import Checkpointer
    from looped_jax.train.trainer import Trainer

    trainer = Trainer(cfg, log=False)
    directory = Path(checkpoint_dir).expanduser()
    if (directory / "checkpoints").is_dir():
        directory = directory / "checkpoints"
    ckpt = Checkpointer(directory, async_save=False)
    if ckpt.latest_step() is None:
        raise FileNotFoundError(f"no checkpoint in {str(directory)!r}")
    state, _, step = ckpt.restore(trainer.abstract_state(), config=to_dict(cfg))
    ckpt.close()
    return trainer, state.eval_params, {"steps": step, "restored_from": str(directory)}


def evaluate(cfg, trainer, params, *, split: str, batch_size: int, num_batches: int | None) -> dict:
    """Exact accuracy per ACT step, halted-answer accuracy and mean steps over a split (model.evaluate_steps)."""
    from looped_jax.data import make_pipeline, prepare

    prepare(cfg.data)
    it = make_pipeline(cfg.data, split=split, global_batch_size=batch_size, seed=0, shuffle=False, num_epochs=1)
    graphdef = trainer.graphdef
    run = jax.jit(lambda p, b: nnx.merge(graphdef, p).evaluate_steps(b))
    exact = token = halted = steps = 0.0
    n = 0
    with jax.set_mesh(trainer.mesh):
        for i, batch in enumerate(it):
            if num_batches is not None and i >= num_batches:
                break
            out = jax.device_get(run(params, {k: np.asarray(v) for k, v in batch.items()}))
            valid = np.asarray(out["valid_B"], bool)
            exact = exact + out["exact_S_B"][:, valid].sum(-1)
            token = token + out["token_acc_S_B"][:, valid].sum(-1)
            halted += float(out["exact_at_halt_B"][valid].sum())
            steps += float(out["halt_step_B"][valid].sum())
            n += int(valid.sum())
    n = max(n, 1)
    return {
        "split": split,
        "num_puzzles": n,
        "exact_accuracy_per_step": [round(float(x) / n, 4) for x in np.atleast_1d(exact)],
        "token_accuracy_per_step": [round(float(x) / n, 4) for x in np.atleast_1d(token)],
        "exact_accuracy_at_halt": halted / n,
        "mean_halt_steps": steps / n,
    }


def label(cfg) -> str:
    """The README's row name of a reasoner config."""
    m = cfg.model
    if m.name == "hrm" and m.h_cycles == m.l_cycles == m.halt_max_steps == 1:
        return f"transformer, {m.num_h_layers + m.num_l_layers} layers, no recursion"
    if m.name == "hrm":
        cycles = f"N = T = {m.h_cycles}" if m.h_cycles == m.l_cycles else f"N = {m.h_cycles}, T = {m.l_cycles}"
        return f"HRM ({cycles}, one-step gradient)"
    if m.name == "trm":
        ema = f", EMA {cfg.optim.ema_decay:g}" if cfg.optim.ema_decay else ""
        return f"TRM (n = {m.latent_steps}, T = {m.recursions}{ema})"
    return m.name


def results_table(results: dict) -> Table:
    """Exact accuracy after ACT steps 1 / 2 / 4 / 8 (those a model has) and at the halting step."""
    longest = max(len(r["exact_accuracy_per_step"]) for r in results.values())
    shown = [s for s in (1, 2, 4, 8, 16, 32, 64) if s <= longest]
    rows = []
    for r in results.values():
        per_step = r["exact_accuracy_per_step"]
        cells = " / ".join(f"{per_step[s - 1]:.3f}" for s in shown if s <= len(per_step))
        mean_steps = f"{r['mean_halt_steps']:.1f}".removesuffix(".0")
        rows.append([r["label"], f"{r['steps']:,}", cells, f"{r['exact_accuracy_at_halt']:.3f} ({mean_steps})"])
    header = ["model", "steps trained", "exact after ACT step " + " / ".join(map(str, shown))]
    split = next(iter(results.values()))["split"]
    n = next(iter(results.values()))["num_puzzles"]
    caption = f"Exact (whole-grid) accuracy on {n:,} puzzles of split {split!r}."
    return Table(header + ["at the halting step (mean steps)"], rows, title="ACT reasoners", caption=caption)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--configs", required=True, help="comma-separated config files")
    parser.add_argument(
        "--steps", default="", help="train.num_steps: one value for every config or one per config (default: config)"
    )
    parser.add_argument("--checkpoint_dirs", default="", help="evaluate these checkpoints (one per config) instead")
    parser.add_argument(
        "--split", default="", help="split to report (default: the data set's, test_hard for 6x6 / 9x9 sudoku)"
    )
    parser.add_argument("--eval_batch_size", type=int, default=250)
    parser.add_argument("--eval_batches", type=int, default=0, help="0 = the whole split")
    parser.add_argument("--name", default="hrm_trm_sudoku", help="results go to runs/<name>/")
    args, rest = parser.parse_known_args(argv)
    overrides = parse_overrides(rest)  # --config.section.field=value, applied to every config
    paths = args.configs.split(",")
    steps = [int(s) for s in args.steps.split(",")] if args.steps else [0]
    if len(steps) not in (1, len(paths)):
        parser.error(f"--steps needs one value or one per config ({len(paths)}), got {args.steps!r}")
    steps = steps * len(paths) if len(steps) == 1 else steps
    checkpoints = args.checkpoint_dirs.split(",") if args.checkpoint_dirs else []
    if checkpoints and (len(checkpoints) != len(paths) or args.steps):
        parser.error("--checkpoint_dirs needs one directory per config and no --steps")
    results = {}
    for i, path in enumerate(paths):
        key = Path(path).stem
        run_overrides = {"train.output_dir": f"runs/{args.name}/{key}", **overrides}
        if steps[i]:
            run_overrides["train.num_steps"] = str(steps[i])
        cfg = load_config(path, run_overrides)
        n_params = count_params(nnx.eval_shape(lambda cfg=cfg: build_model(cfg.model, rngs=nnx.Rngs(0))))
        print(f"== {key}: {cfg.model.name}, {n_params:,} parameters", flush=True)
        if checkpoints:
            trainer, params, info = restore(cfg, checkpoints[i])
        else:
            trainer, params, info = train(cfg)
        r = evaluate(
            cfg,
            trainer,
            params,
            split=args.split or default_test_split(cfg.data),
            batch_size=args.eval_batch_size,
            num_batches=args.eval_batches or None,
        )
        r.update(config=path, label=label(cfg), model=cfg.model.name, num_params=n_params, **info)
        print(json.dumps(r), flush=True)
        results[key] = r
        jax.clear_caches()
    table = results_table(results)
    out = write_results(args.name, [table], results)
    print("\n" + table.markdown() + f"\n\nwrote {out / 'results.md'} and {out / 'results.json'}", flush=True)
    return results


if __name__ == "__main__":
    main()

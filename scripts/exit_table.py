"""Exit steps of each Huginn early-exit criterion on a trained recurrent-depth model (Geiping et al.
2025, Sec. 6), beside the fixed-depth baseline.

    python scripts/exit_table.py      # configs/recurrent_depth_chains.py + runs/test_time_scaling/recurrent_depth
    python scripts/exit_table.py --splits test_h2,test_h8 --max_loops 32 --per_sequence --threshold kl=1e-4

For every criterion of `looped_jax.models.huginn_exit.EXIT_CRITERIA` (per token; with
``--per_sequence`` also per row) and every chosen test split, `RecurrentDepthModel.adaptive_forward`
runs the first ``--max_examples`` rows with at most ``--max_loops`` core steps (s_0 = 0, exited
tokens frozen). Over the scored tokens (weights > 0) it reports the mean / median / max exit step,
the share that exited before max_loops, and the token accuracy at exit; the fixed-depth row runs
every token max_loops steps. Writes runs/<name>/results.md and results.json; progress on stdout.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

FIXED = "fixed depth"


def parse_thresholds(items: list[str], criteria: tuple[str, ...]) -> dict[str, float]:
    """``["kl=1e-4", ...]`` -> {criterion: threshold}; an unknown criterion or a bad number is an error."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in criteria:
            raise ValueError(f"--threshold must be CRITERION=VALUE with CRITERION one of {criteria}, got {item!r}")
        out[name] = float(value)
    return out


def exit_stats(steps_BT, logits_BTV, targets_BT, weights_BT, max_loops: int) -> dict:
    """Exit-step statistics and accuracy over the scored tokens (weights > 0)."""
    mask = np.asarray(weights_BT) > 0
    if not mask.any():
        raise ValueError("the batch has no scored tokens (weights > 0)")
    steps = np.asarray(steps_BT)[mask]
    correct = np.argmax(np.asarray(logits_BTV), axis=-1)[mask] == np.asarray(targets_BT)[mask]
    return {
        "tokens": int(mask.sum()),
        "mean_step": float(steps.mean()),
        "median_step": float(np.median(steps)),
        "max_step": int(steps.max()),
        "min_step": int(steps.min()),
        "exited_early": float((steps < max_loops).mean()),
        "accuracy": float(correct.mean()),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--config", default=str(ROOT / "configs" / "recurrent_depth_chains.py"))
    p.add_argument("--checkpoint_dir", default="runs/test_time_scaling/recurrent_depth")
    p.add_argument("--splits", default="test_h2,test_h8", help="comma-separated test splits")
    p.add_argument("--max_examples", type=int, default=64, help="rows per split (the first ones, unshuffled)")
    p.add_argument("--max_loops", type=int, default=32)
    p.add_argument("--criteria", default="", help="comma-separated subset of the criteria (default: all)")
    p.add_argument("--per_sequence", action="store_true", help="also each criterion per row (reference reduce=True)")
    p.add_argument("--threshold", action="append", default=[], help="CRITERION=VALUE (default: the reference's)")
    p.add_argument("--name", default="exit_table", help="results go to <root>/<name>/")
    p.add_argument("--root", default="runs")
    args, rest = p.parse_known_args(argv)
    if args.max_loops < 1 or args.max_examples < 1:
        p.error(f"--max_loops and --max_examples must be >= 1, got {args.max_loops}, {args.max_examples}")

    from looped_jax.models.huginn_exit import DEFAULT_THRESHOLDS, EXIT_CRITERIA, ExitRule

    criteria = tuple(c for c in args.criteria.split(",") if c) or EXIT_CRITERIA
    bad = [c for c in criteria if c not in EXIT_CRITERIA]
    if bad:
        p.error(f"--criteria: unknown {bad}; choose from {EXIT_CRITERIA}")
    try:
        thresholds = parse_thresholds(args.threshold, EXIT_CRITERIA)
    except ValueError as e:
        p.error(str(e))

    import jax
    from analyze import restore_params
    from flax import nnx

    from looped_jax.checkpoint import CheckpointError, ConfigMismatchError
    from looped_jax.config import load_config, parse_overrides
    from looped_jax.data import make_eval_batches, prepare, split_names
    from looped_jax.results import Table, write_results

    cfg = load_config(args.config, parse_overrides(rest))
    if cfg.model.name != "recurrent_depth":
        raise SystemExit(
            f"{args.config}: exit criteria need a recurrent_depth model, this config is {cfg.model.name!r}"
        )
    prepare(cfg.data)
    known = [s for s in split_names(cfg.data) if s != "train"]
    splits = [s for s in args.splits.split(",") if s]
    if not splits or any(s not in known for s in splits):
        p.error(f"--splits: {splits} not all in this config's test splits {known}")
    try:
        trainer, params, step = restore_params(cfg, args.checkpoint_dir)
    except (FileNotFoundError, CheckpointError, ConfigMismatchError) as e:
        raise SystemExit(f"cannot use --checkpoint_dir {args.checkpoint_dir!r} with {args.config}: {e}") from e
    graphdef = trainer.graphdef

    rules = [(FIXED, None)]
    for c in criteria:
        rules.append((c, ExitRule(criterion=c, threshold=thresholds.get(c))))
    if args.per_sequence:
        for c in criteria:
            rules.append((f"{c} (per sequence)", ExitRule(criterion=c, threshold=thresholds.get(c), per_sequence=True)))

    batches = {s: make_eval_batches(cfg.data, s, args.max_examples, max_batches=1)[0] for s in splits}
    print(
        f"recurrent_depth checkpoint step {step} in {args.checkpoint_dir}: {len(rules)} rules x {len(splits)} splits, "
        f"{args.max_examples} rows, max_loops {args.max_loops}",
        flush=True,
    )
    results: dict = {}
    for label, rule in rules:

        @jax.jit
        def run(params, inputs_BT, positions_BT, segment_ids_BT, rule=rule):
            model = nnx.merge(graphdef, params)
            out = model.adaptive_forward(
                inputs_BT,
                max_loops=args.max_loops,
                exit_rule=rule,
                freeze=True,
                positions_BT=positions_BT,
                segment_ids_BT=segment_ids_BT,
            )
            return out.logits_BTV, out.steps_BT

        for s in splits:
            b = batches[s]
            t0 = time.perf_counter()
            logits, steps = jax.device_get(run(params, b["inputs"], b["positions"], b["segment_ids"]))
            stats = exit_stats(steps, logits, b["targets"], b["weights"], args.max_loops)
            stats["threshold"] = (
                None if rule is None else thresholds.get(rule.criterion, DEFAULT_THRESHOLDS[rule.criterion])
            )
            stats["seconds"] = round(time.perf_counter() - t0, 2)
            results.setdefault(s, {})[label] = stats
            print(
                f"  {s:>8} {label:<32} mean {stats['mean_step']:6.2f} median {stats['median_step']:5.1f} "
                f"max {stats['max_step']:3d} early {stats['exited_early']:.3f} acc {stats['accuracy']:.3f} "
                f"({stats['seconds']:.1f}s)",
                flush=True,
            )

    header = ["split", "criterion", "threshold", "mean exit step", "median", "max", "exited early", "accuracy at exit",
              "fixed-depth accuracy"]  # fmt: skip
    rows = []
    for s in splits:
        base = results[s][FIXED]["accuracy"]
        for label, _ in rules:
            r = results[s][label]
            thr = "-" if r["threshold"] is None else f"{r['threshold']:g}"
            rows.append([s, label, thr, f"{r['mean_step']:.2f}", f"{r['median_step']:g}", r["max_step"],
                         f"{r['exited_early']:.3f}", f"{r['accuracy']:.3f}", f"{base:.3f}"])  # fmt: skip
    table = Table(
        header,
        rows,
        title="Huginn early exit: exit steps per criterion",
        caption=(
            f"Recurrent-depth checkpoint step {step} ({args.checkpoint_dir}), "
            f"first {args.max_examples} rows per split, scored tokens (weights > 0) only, "
            f"at most {args.max_loops} core steps, s_0 = 0, exited tokens frozen. "
            f"'exited early': share of tokens that stopped before {args.max_loops}."
        ),
    )
    data = {
        "config": args.config,
        "checkpoint_dir": args.checkpoint_dir,
        "checkpoint_step": step,
        "max_loops": args.max_loops,
        "max_examples": args.max_examples,
        "results": results,
    }
    out = write_results(args.name, [table], data, root=args.root)
    print(table.markdown())
    print(f"wrote {out / 'results.md'} and {out / 'results.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

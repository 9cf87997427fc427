"""GRAM width and depth scaling: puzzle accuracy against N sampled trajectories and against depth.

Trains the config (or resumes its finished checkpoint in ``train.output_dir``), then on the evaluation split
samples ``max(N)`` prior trajectories per puzzle in parallel (``jax.vmap`` over trajectory keys) for every
depth (number of transitions from z_0) and reports, for each N, the exact-puzzle accuracy of

    single    one trajectory (mean over all sampled trajectories, i.e. the expected N = 1 accuracy),
    majority  the most frequent whole grid among N,
    reward    the trajectory with the highest latent process reward v_psi,
    oracle    any of the N is right (pass@N, an upper bound for any selector),

averaged over the max(N) / N disjoint groups of N trajectories. Writes ``runs/<name>/results.md`` (the README
table), ``results.json`` and a PNG; the run itself lives in ``runs/<name>/<config>``.

    python scripts/gram_eval.py --config configs/gram_sudoku_cpu.py --config.train.num_steps=3000 \
        --depths 1,2,4,8,16 --max_batches 4
    python scripts/gram_eval.py --config.train.num_steps=5 --depths 1,2 --max_batches 1 --name smoke

``--halting`` adds one row: every trajectory stopped by the halting head as at test time in the paper
(supervision steps of ``num_transitions`` prior transitions until q_halt > 0, at most
``--halt_max_segments``, default the config's ``supervision_steps``), with the mean depth it ran:

    python scripts/gram_eval.py --config configs/gram_sudoku_cpu_paper.py --config.train.num_steps=12000 \
        --depths 1,2,4,8,16 --max_batches 4 --halting --name gram_eval_paper
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from looped_jax.config import load_config, parse_overrides  # noqa: E402
from looped_jax.results import Table, write_results  # noqa: E402


def selection_metrics(preds_NBT, reward_NB, targets_BT, weights_BT, group: int) -> dict:
    """Exact / cell accuracy of each selection rule for disjoint groups of ``group`` trajectories."""
    import jax.numpy as jnp

    from looped_jax.models.gram import exact_and_accuracy, gather_trajectory, select_by_reward, select_majority

    n = preds_NBT.shape[0]
    if n % group:
        raise ValueError(f"group size {group} must divide the number of trajectories {n}")
    real_B = (weights_BT.sum(-1) > 0).astype(jnp.float32)
    count = jnp.maximum(real_B.sum(), 1.0)
    mean = lambda x_B: float((x_B * real_B).sum() / count)
    exact_NB, acc_NB = jnp.vectorize(
        lambda p: exact_and_accuracy(p, targets_BT, weights_BT), signature="(b,t)->(b),(b)"
    )(preds_NBT)
    out = {"single_exact": mean(exact_NB.mean(0)), "single_cell": mean(acc_NB.mean(0))}
    sums: dict = {}
    for g in range(n // group):
        sl = slice(g * group, (g + 1) * group)
        maj_B, _ = select_majority(preds_NBT[sl], weights_BT)
        rew_B = select_by_reward(reward_NB[sl])
        for rule, idx_B in (("majority", maj_B), ("reward", rew_B)):
            sums[f"{rule}_exact"] = sums.get(f"{rule}_exact", 0.0) + mean(gather_trajectory(exact_NB[sl], idx_B))
            sums[f"{rule}_cell"] = sums.get(f"{rule}_cell", 0.0) + mean(gather_trajectory(acc_NB[sl], idx_B))
        sums["oracle_exact"] = sums.get("oracle_exact", 0.0) + mean(exact_NB[sl].max(0))
    out.update({k: v / (n // group) for k, v in sums.items()})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--config", default=str(ROOT / "configs" / "gram_sudoku_cpu.py"))
    p.add_argument("--samples", default="1,4,16", help="numbers of trajectories N")
    p.add_argument("--depths", default="1,2,4,8,16,32", help="numbers of transitions")
    p.add_argument("--eval_batch_size", type=int, default=128)
    p.add_argument("--max_batches", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="seed of the trajectory keys")
    p.add_argument("--split", default="", help="split to report (default: the data set's, test_hard for 9x9)")
    p.add_argument("--halting", action="store_true", help="add a row with trajectories stopped by the halting head")
    p.add_argument("--halt_max_segments", type=int, default=0, help="cap of --halting (default supervision_steps)")
    p.add_argument("--name", default="gram_eval", help="results go to runs/<name>/")
    args, rest = p.parse_known_args(argv)
    overrides = parse_overrides(rest)  # --config.section.field=value

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from looped_jax.data import default_test_split, make_eval_batches, prepare
    from looped_jax.models import build_model, count_params
    from looped_jax.train.trainer import Trainer

    samples = [int(x) for x in args.samples.split(",")]
    depths = [int(x) for x in args.depths.split(",")]
    n_max = max(samples)
    cfg = load_config(args.config, {"train.output_dir": f"runs/{args.name}/{Path(args.config).stem}", **overrides})
    prepare(cfg.data)
    trainer = Trainer(cfg)
    t0 = time.perf_counter()
    state, history = trainer.fit()
    results: dict = {
        "config": args.config,
        "overrides": overrides,
        "params": count_params(nnx.eval_shape(lambda: build_model(cfg.model, rngs=nnx.Rngs(0)))),
        "train_steps": history["steps"],
        "fit_seconds": round(time.perf_counter() - t0, 1),
        "train_metrics": history["train"],
        "train_depth": cfg.model.supervision_steps * cfg.model.num_transitions,
        "samples": samples,
        "depths": depths,
        "by_depth": {},
    }
    split = args.split or default_test_split(cfg.data)  # 4x4: test; 9x9: test_hard
    results["split"] = split
    batches = make_eval_batches(cfg.data, split, args.eval_batch_size, max_batches=args.max_batches)
    graphdef, params = trainer.graphdef, state.eval_params

    def sample(params, batch, key, depth):
        return nnx.merge(graphdef, params).sample_trajectories(batch, key, num_samples=n_max, depth=depth)

    sample = jax.jit(sample, static_argnums=3)
    base = jax.random.key(args.seed)
    with jax.set_mesh(trainer.mesh):
        for depth in depths:
            t1 = time.perf_counter()
            preds, rewards, targets, weights = [], [], [], []
            for i, batch in enumerate(batches):
                b = {k: jnp.asarray(v) for k, v in batch.items()}
                o = sample(params, b, jax.random.fold_in(base, i), depth)
                preds.append(o["preds"])
                rewards.append(o["reward"])
                targets.append(b["targets"])
                weights.append(b["weights"])
            preds_NBT, reward_NB = jnp.concatenate(preds, 1), jnp.concatenate(rewards, 1)
            targets_BT, weights_BT = jnp.concatenate(targets), jnp.concatenate(weights)
            entry = {str(n): selection_metrics(preds_NBT, reward_NB, targets_BT, weights_BT, n) for n in samples}
            entry["num_puzzles"] = int((weights_BT.sum(-1) > 0).sum())
            entry["seconds"] = round(time.perf_counter() - t1, 2)
            results["by_depth"][str(depth)] = entry
            line = "  ".join(
                f"N={n}: maj {entry[str(n)]['majority_exact']:.3f} rew {entry[str(n)]['reward_exact']:.3f} "
                f"orc {entry[str(n)]['oracle_exact']:.3f}"
                for n in samples
            )
            print(f"depth {depth:3d}  single {entry[str(samples[0])]['single_exact']:.3f}  {line}", flush=True)
        if args.halting:
            segments = args.halt_max_segments or cfg.model.supervision_steps
            halt_fn = jax.jit(
                lambda params, batch, key: nnx.merge(graphdef, params).sample_halting(
                    batch, key, num_samples=n_max, max_segments=segments
                )
            )
            t1 = time.perf_counter()
            preds, rewards, depths_run, targets, weights = [], [], [], [], []
            for i, batch in enumerate(batches):
                b = {k: jnp.asarray(v) for k, v in batch.items()}
                o = halt_fn(params, b, jax.random.fold_in(base, i))
                preds.append(o["preds"])
                rewards.append(o["reward"])
                depths_run.append(o["depth"])
                targets.append(b["targets"])
                weights.append(b["weights"])
            targets_BT, weights_BT = jnp.concatenate(targets), jnp.concatenate(weights)
            preds_NBT, reward_NB = jnp.concatenate(preds, 1), jnp.concatenate(rewards, 1)
            depth_NB = jnp.concatenate(depths_run, 1).astype(jnp.float32)
            real_B = (weights_BT.sum(-1) > 0).astype(jnp.float32)
            entry = {str(n): selection_metrics(preds_NBT, reward_NB, targets_BT, weights_BT, n) for n in samples}
            entry["mean_depth"] = float((depth_NB * real_B).sum() / jnp.maximum(real_B.sum() * depth_NB.shape[0], 1.0))
            entry["max_segments"] = segments
            entry["seconds"] = round(time.perf_counter() - t1, 2)
            results["halting"] = entry
            print(
                f"halting (mean depth {entry['mean_depth']:.2f})  single {entry[str(samples[0])]['single_exact']:.3f}"
            )
    table = results_table(results)
    out = write_results(args.name, [table], results)
    _plot(results, out / "gram_width_depth.png", np)
    print("\n" + table.markdown())
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'gram_width_depth.png'}")
    return 0


def results_table(results: dict) -> Table:
    """Rows: depth; columns: N = 1 (one trajectory), then vote / reward / any (pass@N) for each larger N."""
    samples = results["samples"]
    header = ["depth (transitions)"] + [f"N = {n}" if n == 1 else f"N = {n} vote / reward / any" for n in samples]
    rows = []
    for depth in results["depths"]:
        entry = results["by_depth"][str(depth)]
        name = f"{depth} (trained)" if depth == results["train_depth"] else str(depth)
        cells = []
        for n in samples:
            e = entry[str(n)]
            if n == 1:
                cells.append(f"{e['single_exact']:.3f}")
            else:
                cells.append(" / ".join(f"{e[f'{rule}_exact']:.3f}" for rule in ("majority", "reward", "oracle")))
        rows.append([name] + cells)
    if "halting" in results:
        e_h = results["halting"]
        cells = []
        for n in samples:
            e = e_h[str(n)]
            if n == 1:
                cells.append(f"{e['single_exact']:.3f}")
            else:
                cells.append(" / ".join(f"{e[f'{rule}_exact']:.3f}" for rule in ("majority", "reward", "oracle")))
        rows.append(
            [f"halting head (mean depth {e_h['mean_depth']:.1f}, at most {e_h['max_segments']} supervision steps)"]
            + cells
        )
    n_puzzles = results["by_depth"][str(results["depths"][0])]["num_puzzles"]
    split = results.get("split", "test")
    split_label = "test" if split == "test" else f"{split!r}"
    caption = (
        f"Exact (whole-grid) accuracy on {n_puzzles} {split_label} puzzles after {results['train_steps']:,} "
        "training steps; N trajectories sampled from the prior, chosen by majority vote or the latent reward head; "
        "any = pass@N."
    )
    return Table(header, rows, title="GRAM width and depth scaling", caption=caption)


def _plot(results: dict, path: Path, np) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples, depths = results["samples"], results["depths"]
    by_depth = results["by_depth"]
    train_depth = str(results["train_depth"]) if str(results["train_depth"]) in by_depth else str(depths[-1])
    fig, (ax_n, ax_d) = plt.subplots(1, 2, figsize=(11, 4))
    for rule, style in (("majority", "o-"), ("reward", "s--"), ("oracle", "^:")):
        ax_n.plot(samples, [by_depth[train_depth][str(n)][f"{rule}_exact"] for n in samples], style, label=rule)
    ax_n.set_xscale("log", base=2)
    ax_n.set_xlabel("trajectories N")
    ax_n.set_ylabel("puzzle (exact) accuracy")
    ax_n.set_title(f"width scaling at depth {train_depth}")
    ax_n.legend()
    for n in samples:
        for rule, style in (("majority", "o-"), ("reward", "s--")):
            if n == 1 and rule == "reward":
                continue
            ys = [by_depth[str(d)][str(n)][f"{rule}_exact"] for d in depths]
            ax_d.plot(depths, ys, style, label=f"N={n} {rule}" if n > 1 else "N=1")
    ax_d.set_xscale("log", base=2)
    ax_d.set_xlabel("depth (transitions)")
    ax_d.set_ylabel("puzzle (exact) accuracy")
    ax_d.set_title("depth scaling")
    ax_d.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())

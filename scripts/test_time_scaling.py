"""The main job: test-time depth scaling of a recurrent-depth model on variable chains.

Trains a tiny recurrent-depth model (loop counts sampled around mean_loops, truncated
backprop) and a fixed-depth transformer with the same parameter count on 1-4 hop problems,
then evaluates answer accuracy on 1-8 hop test splits with 1..64 test-time loops. Prints a
table, writes ``results.json`` and plots ``accuracy_vs_loops.png`` in the output directory.

    python scripts/test_time_scaling.py                 # ~5 minutes on 2 CPU cores
    python scripts/test_time_scaling.py --steps 300     # a quicker smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from looped_jax.config import apply_overrides, load_config  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="training steps for each model (default: config)")
    p.add_argument("--loops", default="1,2,4,6,8,12,16,24,32,64", help="test-time loop counts")
    p.add_argument("--output", default="runs/test_time_scaling")
    p.add_argument("--data_dir", default=None, help="TFDS data directory (default: config)")
    p.add_argument("--eval_size", type=int, default=500, help="test problems per hop count")
    args = p.parse_args()

    import jax

    from looped_jax.data import prepare, split_names
    from looped_jax.models import build_model, count_params
    from looped_jax.train.trainer import Trainer

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    loops = [int(x) for x in args.loops.split(",")]
    results: dict = {"loops": loops}
    for name in ("recurrent_depth_chains", "baseline_chains"):
        overrides = {"train.output_dir": str(out / name)}
        if args.steps:
            overrides["train.num_steps"] = str(args.steps)
        if args.data_dir:
            overrides["data.data_dir"] = args.data_dir
        cfg = load_config(ROOT / "configs" / f"{name}.py", overrides)
        cfg = apply_overrides(cfg, {"data.num_test": str(args.eval_size)})
        prepare(cfg.data)
        splits = [s for s in split_names(cfg.data) if s.startswith("test_h")]
        trainer = Trainer(cfg)
        n_params = count_params(build_model(cfg.model, rngs=__import__("flax").nnx.Rngs(0)))
        print(f"\n=== {name}: {n_params:,} parameters, {cfg.train.num_steps} steps ===", flush=True)
        t0 = time.perf_counter()
        state, _ = trainer.fit()
        train_s = time.perf_counter() - t0
        entry = {"params": n_params, "train_seconds": round(train_s, 1), "config": dataclasses.asdict(cfg.model)}
        t0 = time.perf_counter()
        if cfg.model.name == "recurrent_depth":
            entry["accuracy"] = {
                s: [trainer.evaluate(state.params, s, num_loops=n, batch_size=250)["accuracy"] for n in loops]
                for s in splits
            }
            entry["trained_mean_loops"] = cfg.model.mean_loops
        else:
            entry["accuracy"] = {s: trainer.evaluate(state.params, s, batch_size=250)["accuracy"] for s in splits}
        entry["eval_seconds"] = round(time.perf_counter() - t0, 1)
        results[name] = entry
        jax.clear_caches()

    table = format_table(results)
    print("\n" + table)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(table + "\n")
    plot(results, out / "accuracy_vs_loops.png")
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'} and {out / 'accuracy_vs_loops.png'}")
    return 0


def format_table(results: dict) -> str:
    rd, base = results["recurrent_depth_chains"], results["baseline_chains"]
    splits = list(rd["accuracy"])
    head = "| test-time loops | " + " | ".join(s.replace("test_h", "") + " hops" for s in splits) + " |"
    rows = [head, "|" + "---|" * (len(splits) + 1)]
    for i, n in enumerate(results["loops"]):
        mark = " (trained mean)" if n == rd["trained_mean_loops"] else ""
        rows.append(
            f"| recurrent depth, {n}{mark} | " + " | ".join(f"{rd['accuracy'][s][i]:.3f}" for s in splits) + " |"
        )
    rows.append("| fixed-depth baseline | " + " | ".join(f"{base['accuracy'][s]:.3f}" for s in splits) + " |")
    return (
        f"Answer accuracy on variable chains (trained on 1-4 hops); recurrent depth {rd['params']:,} params, "
        f"baseline {base['params']:,} params\n\n" + "\n".join(rows)
    )


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rd, base = results["recurrent_depth_chains"], results["baseline_chains"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    cmap = plt.get_cmap("viridis")
    splits = list(rd["accuracy"])
    for j, s in enumerate(splits):
        color = cmap(j / max(len(splits) - 1, 1))
        hops = s.replace("test_h", "")
        ax.plot(results["loops"], rd["accuracy"][s], "o-", color=color, label=f"{hops} hops")
        ax.axhline(base["accuracy"][s], color=color, ls=":", lw=1)
    ax.axvline(rd["trained_mean_loops"], color="grey", ls="--", lw=1, label="trained mean loops")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("test-time loops (recurrent depth)")
    ax.set_ylabel("answer accuracy")
    ax.set_title("Recurrent depth vs fixed-depth baseline (dotted) on variable chains")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())

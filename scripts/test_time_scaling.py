"""The main job: test-time depth scaling of a recurrent-depth model on variable chains.

Trains a tiny recurrent-depth model (one shared layer looped; loop counts sampled around
mean_loops, truncated backprop), a fixed-depth transformer with the same parameter count and a
4-layer fixed-depth transformer on 1-4 hop problems, then evaluates answer accuracy on 1-8 hop
test splits, the recurrent model with 1..64 test-time loops. Prints a
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
    results: dict = {"loops": loops, "models": {}}
    for key, config_name, extra, label in RUNS:
        overrides = {"train.output_dir": str(out / key), **extra}
        if args.steps:
            overrides["train.num_steps"] = str(args.steps)
        if args.data_dir:
            overrides["data.data_dir"] = args.data_dir
        cfg = load_config(ROOT / "configs" / f"{config_name}.py", overrides)
        cfg = apply_overrides(cfg, {"data.num_test": str(args.eval_size)})
        prepare(cfg.data)
        splits = [s for s in split_names(cfg.data) if s.startswith("test_h")]
        trainer = Trainer(cfg)
        n_params = count_params(build_model(cfg.model, rngs=__import__("flax").nnx.Rngs(0)))
        print(f"\n=== {label}: {n_params:,} parameters, {cfg.train.num_steps} steps ===", flush=True)
        t0 = time.perf_counter()
        state, _ = trainer.fit()
        train_s = time.perf_counter() - t0
        entry = {"label": label, "params": n_params, "train_seconds": round(train_s, 1)}
        entry["config"] = dataclasses.asdict(cfg.model)
        t0 = time.perf_counter()
        if cfg.model.name == "recurrent_depth":
            entry["accuracy"] = {}
            for s in splits:
                entry["accuracy"][s] = [
                    trainer.evaluate(state.params, s, num_loops=n, batch_size=250)["accuracy"] for n in loops
                ]
                print(f"  {s}: " + " ".join(f"{a:.3f}" for a in entry["accuracy"][s]), flush=True)
            entry["trained_mean_loops"] = cfg.model.mean_loops
        else:
            entry["accuracy"] = {s: trainer.evaluate(state.params, s, batch_size=250)["accuracy"] for s in splits}
            print("  " + " ".join(f"{s}: {a:.3f}" for s, a in entry["accuracy"].items()), flush=True)
        entry["eval_seconds"] = round(time.perf_counter() - t0, 1)
        results["models"][key] = entry
        jax.clear_caches()

    table = format_table(results)
    print("\n" + table)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(table + "\n")
    plot(results, out / "accuracy_vs_loops.png")
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'} and {out / 'accuracy_vs_loops.png'}")
    return 0


# (results key, config, overrides, label). The recurrent model is first; the baselines follow.
RUNS = (
    ("recurrent_depth", "recurrent_depth_chains", {}, "recurrent depth (1 shared layer, looped)"),
    ("fixed_depth_equal_params", "baseline_chains", {}, "fixed depth, 1 layer (equal parameters)"),
    (
        "fixed_depth_4_layers",
        "baseline_chains",
        {"model.num_layers": "4", "model.mlp_dim": "192"},
        "fixed depth, 4 layers (compute of 4 loops)",
    ),
)


def format_table(results: dict) -> str:
    models = results["models"]
    rd = models["recurrent_depth"]
    baselines = [m for k, m in models.items() if k != "recurrent_depth"]
    splits = list(rd["accuracy"])
    head = "| model, test-time loops | " + " | ".join(s.replace("test_h", "") + " hops" for s in splits) + " |"
    rows = [head, "|" + "---|" * (len(splits) + 1)]
    for i, n in enumerate(results["loops"]):
        mark = " (trained mean)" if n == rd["trained_mean_loops"] else ""
        rows.append(
            f"| recurrent depth, {n}{mark} | " + " | ".join(f"{rd['accuracy'][s][i]:.3f}" for s in splits) + " |"
        )
    for m in baselines:
        rows.append(f"| {m['label']} | " + " | ".join(f"{m['accuracy'][s]:.3f}" for s in splits) + " |")
    params = ", ".join(f"{m['label']} {m['params']:,}" for m in models.values())
    return f"Answer accuracy on variable chains (trained on 1-4 hops). Parameters: {params}\n\n" + "\n".join(rows)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    rd = models["recurrent_depth"]
    equal = models["fixed_depth_equal_params"]
    splits = list(rd["accuracy"])
    hops = [int(s.replace("test_h", "")) for s in splits]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    cmap = plt.get_cmap("viridis")
    for j, s in enumerate(splits):
        color = cmap(j / max(len(splits) - 1, 1))
        ax.plot(results["loops"], rd["accuracy"][s], "o-", color=color, label=f"{hops[j]} hops")
        ax.axhline(equal["accuracy"][s], color=color, ls=":", lw=1)
    ax.axvline(rd["trained_mean_loops"], color="grey", ls="--", lw=1, label="trained mean loops")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("test-time loops")
    ax.set_ylabel("answer accuracy")
    ax.set_title("Recurrent depth; dotted: fixed depth of equal parameters")
    ax.legend(fontsize=8, ncol=2)
    for n in (1, 2, 4, rd["trained_mean_loops"], 16, 64):
        if n in results["loops"]:
            i = results["loops"].index(n)
            ax2.plot(
                hops,
                [rd["accuracy"][s][i] for s in splits],
                "o-",
                label=f"recurrent depth, {n} loop{'s' if n > 1 else ''}",
            )
    for m, style in zip((m for k, m in models.items() if k != "recurrent_depth"), ("k:s", "k--^"), strict=False):
        ax2.plot(hops, [m["accuracy"][s] for s in splits], style, label=m["label"])
    ax2.axvspan(0.5, 4.5, color="grey", alpha=0.1, label="trained hop counts")
    ax2.set_xlabel("hops (test split)")
    ax2.set_ylabel("answer accuracy")
    ax2.set_title("Accuracy against problem depth")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())

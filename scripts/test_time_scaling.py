"""The main job: test-time depth scaling of a recurrent-depth model on variable chains.

Trains a tiny recurrent-depth model (one shared layer looped; loop counts sampled around
mean_loops, truncated backprop), a fixed-depth transformer with the same parameter count and a
4-layer fixed-depth transformer on 1-4 hop problems, then evaluates answer accuracy on 1-8 hop
test splits, the recurrent model with 1..64 test-time loops. Prints the table, writes it to
``runs/<name>/results.md`` (with ``results.json``) and plots ``accuracy_vs_loops.png`` there.

    python scripts/test_time_scaling.py --steps 1500    # the README table, ~5 minutes on 2 CPU cores
    python scripts/test_time_scaling.py --steps 300 --name smoke   # a quicker smoke run

``--config.section.field=value`` overrides apply to all three runs (e.g. ``--config.data.data_dir=...``).

Reproducibility: the data, its order, the initialisation and the step rngs are fixed by the configs'
seeds, and two runs on the same machine with the same number of usable CPUs give bitwise-identical
parameters (checked at 30, 300 and 1,500 steps, also for runs started concurrently and for a run resumed
from its checkpoint). XLA:CPU's results do depend on its intra-op thread count, which is the number of CPUs
the process may use: its YNNPACK reduce fusions split the batch x length sums of the weight gradients
over the threads (with YNNPACK off its dots do), so 1 and 2 threads differ in their last bit from step
~2-6 on, and 1,500 steps amplify that (4-layer baseline, 2-hop accuracy 0.862 with 2 threads, 0.966
with 1). No XLA flag tried removes this (xla_cpu_multi_thread_eigen=false, YNNPACK off or dots only,
the legacy runtime), so ``--cpu_threads N`` pins the process to N CPUs before JAX starts, and
``results.json`` records the count used; other CPU instruction sets or jax versions can still change
the numbers. A second run with the same ``--name`` resumes from the checkpoints in ``runs/<name>/``
instead of training again.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from looped_jax.config import load_config, parse_overrides  # noqa: E402
from looped_jax.results import Table, write_results  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--steps", type=int, default=None, help="training steps for each model (default: config)")
    p.add_argument("--loops", default="1,2,4,6,8,12,16,24,32,64", help="test-time loop counts")
    p.add_argument("--name", default="test_time_scaling", help="results go to runs/<name>/")
    p.add_argument("--eval_batch_size", type=int, default=250)
    p.add_argument(
        "--recurrent_config",
        default="recurrent_depth_chains",
        help="config of the recurrent model (e.g. recurrent_depth_chains_stable for stable injection)",
    )
    p.add_argument(
        "--models", default=",".join(r[0] for r in RUNS), help=f"comma-separated runs, of {[r[0] for r in RUNS]}"
    )
    p.add_argument(
        "--cpu_threads", type=int, default=0, help="pin to this many CPUs (XLA:CPU numerics depend on it); 0: all"
    )
    args, rest = p.parse_known_args(argv)
    chosen = [m for m in args.models.split(",") if m]
    unknown = sorted(set(chosen) - {r[0] for r in RUNS})
    if unknown or "recurrent_depth" not in chosen:
        p.error(f"--models: unknown run(s) {unknown} or no recurrent_depth; choose from {[r[0] for r in RUNS]}")
    if not (ROOT / "configs" / f"{args.recurrent_config}.py").is_file():
        p.error(f"--recurrent_config: no file configs/{args.recurrent_config}.py")
    overrides = parse_overrides(rest)
    cpu_threads = pin_cpu_threads(args.cpu_threads)  # before JAX starts its CPU backend

    import jax
    from flax import nnx

    from looped_jax.data import prepare, split_names
    from looped_jax.models import build_model, count_params
    from looped_jax.train.trainer import Trainer

    loops = [int(x) for x in args.loops.split(",")]
    results: dict = {"loops": loops, "models": {}, "cpu_threads": cpu_threads}
    print(f"XLA:CPU intra-op threads: {cpu_threads}", flush=True)
    for key, config_name, extra, label in RUNS:
        if key not in chosen:
            continue
        if key == "recurrent_depth":
            config_name = args.recurrent_config
        run_overrides = {"train.output_dir": f"runs/{args.name}/{key}", **extra, **overrides}
        if args.steps:
            run_overrides["train.num_steps"] = str(args.steps)
        cfg = load_config(ROOT / "configs" / f"{config_name}.py", run_overrides)
        prepare(cfg.data)
        splits = [s for s in split_names(cfg.data) if s.startswith("test_h")]
        trainer = Trainer(cfg)
        n_params = count_params(nnx.eval_shape(lambda cfg=cfg: build_model(cfg.model, rngs=nnx.Rngs(0))))
        print(f"\n=== {label}: {n_params:,} parameters, {cfg.train.num_steps} steps ===", flush=True)
        state, history = trainer.fit()
        entry = {"label": label, "params": n_params, "steps": history["steps"]}
        entry["train_seconds"] = round(history["train_seconds"], 1)
        entry["config"] = dataclasses.asdict(cfg.model)
        t0 = time.perf_counter()
        bs = args.eval_batch_size
        if cfg.model.name == "recurrent_depth":
            entry["accuracy"] = {}
            for s in splits:
                entry["accuracy"][s] = [
                    trainer.evaluate(state.eval_params, s, num_loops=n, batch_size=bs)["accuracy"] for n in loops
                ]
                print(f"  {s}: " + " ".join(f"{a:.3f}" for a in entry["accuracy"][s]), flush=True)
            entry["trained_mean_loops"] = cfg.model.mean_loops
        else:
            entry["accuracy"] = {s: trainer.evaluate(state.eval_params, s, batch_size=bs)["accuracy"] for s in splits}
            print("  " + " ".join(f"{s}: {a:.3f}" for s, a in entry["accuracy"].items()), flush=True)
        entry["num_test"] = cfg.data.num_test
        entry["eval_seconds"] = round(time.perf_counter() - t0, 1)
        results["models"][key] = entry
        jax.clear_caches()

    table = results_table(results)
    out = write_results(args.name, [table], results)
    plot(results, out / "accuracy_vs_loops.png")
    print("\n" + table.markdown())
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


def pin_cpu_threads(n: int) -> int:
    """Restricts this process to its first ``n`` usable CPUs (0: leaves it as it is); returns the count.

    XLA:CPU sizes its intra-op thread pool, and so splits its reductions, by the CPUs the process may
    use when the backend starts; a fixed count makes runs comparable across machines and schedulers.
    """
    if not hasattr(os, "sched_getaffinity"):
        if n:
            raise ValueError("--cpu_threads needs os.sched_setaffinity (Linux); pass --cpu_threads 0 here")
        return os.cpu_count() or 1
    usable = sorted(os.sched_getaffinity(0))
    if n < 0 or n > len(usable):
        raise ValueError(f"--cpu_threads must be in [0, {len(usable)}] (the CPUs this process may use), got {n}")
    if n:
        os.sched_setaffinity(0, set(usable[:n]))
    return n or len(usable)


def results_table(results: dict) -> Table:
    """The README table: one row per test-time loop count of the recurrent model, then the baselines."""
    models = results["models"]
    rd = models["recurrent_depth"]
    baselines = [m for k, m in models.items() if k != "recurrent_depth"]
    splits = list(rd["accuracy"])
    header = ["model, test-time loops"] + [s.replace("test_h", "") + " hops" for s in splits]
    rows = []
    for i, n in enumerate(results["loops"]):
        mark = " (trained mean)" if n == rd["trained_mean_loops"] else ""
        rows.append([f"recurrent depth, {n}{mark}"] + [f"{rd['accuracy'][s][i]:.3f}" for s in splits])
    for m in baselines:
        rows.append([m["label"]] + [f"{m['accuracy'][s]:.3f}" for s in splits])
    params = ", ".join(f"{m['label']} {m['params']:,}" for m in models.values())
    steps = ", ".join(sorted({f"{m['steps']:,}" for m in models.values()}))
    caption = (
        f"Answer accuracy on {rd['num_test']} unseen problems per hop count, trained {steps} steps on 1-4 hops. "
        f"Parameters: {params}."
    )
    return Table(header, rows, title="Test-time loops on variable chains", caption=caption)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    rd = models["recurrent_depth"]
    equal = models.get("fixed_depth_equal_params")
    splits = list(rd["accuracy"])
    hops = [int(s.replace("test_h", "")) for s in splits]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    cmap = plt.get_cmap("viridis")
    for j, s in enumerate(splits):
        color = cmap(j / max(len(splits) - 1, 1))
        ax.plot(results["loops"], rd["accuracy"][s], "o-", color=color, label=f"{hops[j]} hops")
        if equal is not None:
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

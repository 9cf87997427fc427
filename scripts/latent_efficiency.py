"""Sample efficiency of next-token prediction with and without the latent-prediction objective on the random
hierarchy model (Korchinski, Favero & Wyart 2026: predicting one's own latents should need a number of samples
that stays flat in the grammar depth L, token prediction exponentially many).

For every grammar depth L (``--depths``), number of distinct training sentences P (``--samples``) and
``latent.weight`` (``--weights``; 0 = token prediction only) it trains ``--config`` (default
configs/hierarchy_cpu.py) for ``--steps`` steps, then measures on the held-out test sentences:

* the next-token loss and accuracy;
* linear-probe accuracy of the hidden symbols: for each level l < L, a softmax-regression probe reads a
  model state at the positions where a level-l subtree has just been read completely (its last leaf is the
  input) and predicts that subtree's symbol; for the root (l = 0), the state at the last input position
  (every leaf but the last read). Probes train on the first half of the test sentences and are scored on the
  second half; chance is 1 / grammar_vocab. Each of the model's states (``hidden_states``: layer outputs or
  loop states) gets its own probe; the table reports the best state's accuracy, averaged over levels.

Each depth also gets an untrained row (P = 0: the probes on the initial parameters), which shows how much
a linear probe reads from random features (a level-1 symbol is a function of two just-read leaves, so it is
largely decodable before any training). Then, per (L, weight) and level: the number of training sentences
needed to reach ``--threshold`` probe accuracy (log-linear interpolation between grid points; "> P_max" when
never reached). Writes
``runs/<name>/results.md|json`` and ``runs/<name>/latent_efficiency.png``.

    python scripts/latent_efficiency.py --name latent_efficiency
    python scripts/latent_efficiency.py --quick      # smoke run: L=2, two sample sizes, 20 steps
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from looped_jax.config import load_config, parse_overrides  # noqa: E402
from looped_jax.data.grammar import num_sentences  # noqa: E402
from looped_jax.results import Table, write_results  # noqa: E402


def probe_sites(depth: int, branching: int, n_leaves: int) -> list[tuple[int, list[int], list[int]]]:
    """Per level l: (l, positions whose state is read, positions p' such that the label is ancestors[l, p']).

    Position p reads leaf p - 1 (inputs are BOS, leaf_0 .. leaf_{n-2}); a level-l subtree covering leaves
    [a, a + s^(L-l)) has been read completely at p = a + s^(L-l), and its symbol is the level-l ancestor of
    leaf p - 1, stored at ancestors[l, p - 1] (ancestors index the target leaf). Subtrees ending with the last
    leaf are never read completely; the root is read at the last position instead (all leaves but one)."""
    sites = [(0, [n_leaves - 1], [0])]
    for level in range(1, depth):
        size = branching ** (depth - level)
        ends = [p for p in range(size, n_leaves, size)]
        sites.append((level, ends, [p - 1 for p in ends]))
    return sites


def fit_probe(x_train, y_train, x_test, y_test, num_classes: int, steps: int = 300, lr: float = 0.05) -> float:
    """Accuracy on (x_test, y_test) of a softmax regression fit to standardised (x_train, y_train)."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    xtr, xte = (x_train - mean) / std, (x_test - mean) / std
    params = {"w": jnp.zeros((xtr.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}
    tx = optax.adamw(lr, weight_decay=1e-3)

    def loss(p):
        logits = xtr @ p["w"] + p["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, ytr).mean()

    ytr = jnp.asarray(y_train)

    @jax.jit
    def train(p):
        def body(carry, _):
            p, s = carry
            g = jax.grad(loss)(p)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (p, _), _ = jax.lax.scan(body, (p, tx.init(p)), None, length=steps)
        return p

    params = train(params)
    pred = np.asarray(jnp.argmax(xte @ params["w"] + params["b"], -1))
    return float(np.mean(pred == np.asarray(y_test)))


def collect_states(trainer, params, data_cfg, batch_size: int):
    """(states [S, N, T, D], ancestors [N, L, T], roots [N], lengths [N]) of every test sentence."""
    from looped_jax.data import make_eval_batches

    forward = jax.jit(lambda p, x, pos, seg: trainer.model(p).hidden_states(x, positions_BT=pos, segment_ids_BT=seg))
    states, anc, roots, lengths = [], [], [], []
    with jax.set_mesh(trainer.mesh):
        for b in make_eval_batches(data_cfg, "test", batch_size):
            keep = np.asarray(b["segment_ids"]).max(1) > 0  # the padding rows of the last batch have none
            s = np.asarray(forward(params, b["inputs"], b["positions"], b["segment_ids"]))
            states.append(s[:, keep])
            anc.append(np.asarray(b["ancestors"])[keep])
            roots.append(np.asarray(b["root"])[keep])
            lengths.append((np.asarray(b["segment_ids"])[keep] > 0).sum(1))
    return np.concatenate(states, 1), np.concatenate(anc), np.concatenate(roots), np.concatenate(lengths)


def probe_accuracy(states, ancestors, roots, depth: int, branching: int, vocab: int) -> dict:
    """Per state index: per-level probe accuracy and their mean (see the module docstring)."""
    n_leaves = branching**depth
    half = states.shape[1] // 2
    out = []
    for j in range(states.shape[0]):
        levels = {}
        for level, read_at, label_at in probe_sites(depth, branching, n_leaves):
            feats = states[j][:, read_at].reshape(-1, states.shape[-1])  # [N * sites, D]
            labels = roots[:, None].repeat(len(read_at), 1) if level == 0 else ancestors[:, level, label_at]
            labels = labels.reshape(-1)
            n_tr = half * len(read_at)
            levels[level] = fit_probe(feats[:n_tr], labels[:n_tr], feats[n_tr:], labels[n_tr:], vocab)
        out.append({"levels": levels, "mean": float(np.mean(list(levels.values())))})
    return {"per_state": out, "best_state": int(np.argmax([o["mean"] for o in out]))}


def samples_to_reach(samples: list[int], accs: list[float], threshold: float) -> float | None:
    """The first P (log-linear interpolation between grid points) where accuracy reaches ``threshold``."""
    for i, (p, a) in enumerate(zip(samples, accs, strict=True)):
        if a >= threshold:
            if i == 0:
                return float(p)
            p0, a0 = samples[i - 1], accs[i - 1]
            frac = (threshold - a0) / (a - a0)
            return float(math.exp(math.log(p0) + frac * (math.log(p) - math.log(p0))))
    return None


def run_one(
    base_overrides: dict,
    depth: int,
    num_train: int,
    weight: float,
    steps: int,
    out_dir: Path,
    args,
    *,
    train: bool = True,
) -> dict:
    from looped_jax.data import prepare
    from looped_jax.train.trainer import Trainer

    overrides = dict(base_overrides)
    overrides.update({
        "data.grammar_depth": str(depth),
        "data.num_train": str(num_train),
        "latent.weight": str(weight),
        "train.output_dir": str(out_dir),
        "checkpoint.enabled": "false",
    })  # fmt: skip
    if steps:
        overrides["train.num_steps"] = str(steps)
    cfg = load_config(args.config, overrides)
    prepare(cfg.data)
    trainer = Trainer(cfg, log=False)
    t0 = time.perf_counter()
    if train:
        state, history = trainer.fit(eval_splits=("test",))
    else:  # the initial parameters
        state = trainer.init_state()
        history = {"steps": 0, "eval": {"test": trainer.evaluate(state.eval_params, "test")}}
    train_s = time.perf_counter() - t0
    states, anc, roots, _ = collect_states(trainer, state.eval_params, cfg.data, args.eval_batch)
    probes = probe_accuracy(states, anc, roots, depth, cfg.data.grammar_branching, cfg.data.grammar_vocab)
    best = probes["per_state"][probes["best_state"]]
    ev = history["eval"]["test"]
    result = {
        "depth": depth,
        "num_train": num_train if train else 0,
        "weight": weight,
        "steps": history["steps"],
        "train_seconds": train_s,
        "test_loss": ev["loss"],
        "test_accuracy": ev["accuracy"],
        "probe": probes,
        "probe_mean": best["mean"],
        "probe_levels": best["levels"],
    }
    print(
        f"[latent_efficiency] L={depth} P={num_train if train else 0} weight={weight:g}: "
        f"{history['steps']} steps in {train_s:.0f} s, "
        f"test loss {ev['loss']:.4f}, probe {best['mean']:.3f} (state {probes['best_state']}, levels "
        + ", ".join(f"{k}:{v:.2f}" for k, v in best["levels"].items())
        + ")",
        flush=True,
    )
    return result


def plot(results: list[dict], depths, weights, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for depth in depths:
        for w in weights:
            rows = [r for r in results if r["depth"] == depth and r["weight"] == w and r["num_train"] > 0]
            rows = sorted(rows, key=lambda r: r["num_train"])
            if not rows:
                continue
            xs = [r["num_train"] for r in rows]
            style = "-" if w == 0 else "--"
            label = f"L={depth}, {'tokens only' if w == 0 else f'latent {w:g}'}"
            axes[0].plot(xs, [r["probe_mean"] for r in rows], style, marker="o", label=label)
            axes[1].plot(xs, [r["test_loss"] for r in rows], style, marker="o", label=label)
    for ax, ylabel in zip(axes, ("probe accuracy of hidden symbols", "test next-token loss"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("training sentences P")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/hierarchy_cpu.py")
    ap.add_argument("--depths", default="2,3,4", help="grammar depths L")
    ap.add_argument("--samples", default="256,1024,4096,16384", help="training sentences P")
    ap.add_argument("--weights", default="0,1", help="latent.weight values (0 = token prediction only)")
    ap.add_argument("--steps", type=int, default=0, help="train.num_steps (0 = the config's)")
    ap.add_argument("--threshold", type=float, default=0.5, help="probe accuracy for the samples-needed column")
    ap.add_argument("--eval_batch", type=int, default=100)
    ap.add_argument("--name", default="latent_efficiency", help="results go to runs/<name>/")
    ap.add_argument("--root", default="runs")
    ap.add_argument("--quick", action="store_true", help="smoke run: L=2, P in {256, 512}, 20 steps")
    args, rest = ap.parse_known_args(argv)
    overrides = parse_overrides(rest)
    if args.quick:
        args.depths, args.samples, args.steps = "2", "256,512", args.steps or 20
        overrides.setdefault("data.num_test", "200")
    depths = [int(x) for x in args.depths.split(",")]
    samples = sorted(int(x) for x in args.samples.split(","))
    weights = [float(x) for x in args.weights.split(",")]
    base = load_config(args.config, overrides)
    if base.data.name != "hierarchy":
        raise ValueError(f"--config must train on data.name='hierarchy', {args.config} has {base.data.name!r}")
    out = Path(args.root) / args.name
    results, skipped = [], []
    for depth in depths:
        d = base.data
        results.append(run_one(overrides, depth, samples[0], 0.0, args.steps, out / "train" / f"L{depth}_init", args,
                               train=False))  # fmt: skip
        capacity = num_sentences(depth, d.grammar_vocab, d.grammar_rules, d.grammar_branching)
        for p in samples:
            if p + d.num_test > capacity:
                skipped.append(f"L={depth} P={p} (the grammar has {capacity} sentences, fewer than P + num_test)")
                print(f"[latent_efficiency] skipping {skipped[-1]}", flush=True)
                continue
            for w in weights:
                run_dir = out / "train" / f"L{depth}_P{p}_w{w:g}"
                results.append(run_one(overrides, depth, p, w, args.steps, run_dir, args))
    steps = max((r["steps"] for r in results), default=0)
    main_rows, need_rows = [], []
    for r in results:
        lv = r["probe_levels"]
        levels = " / ".join(f"{lv[k]:.2f}" for k in sorted(lv))
        weight = f"{r['weight']:g}" if r["num_train"] else "-"
        main_rows.append([r["depth"], r["num_train"] or "0 (init)", weight, f"{r['test_loss']:.4f}",
                          f"{r['test_accuracy']:.3f}", f"{r['probe_mean']:.3f}", levels])  # fmt: skip
    for depth in depths:
        for w in weights:
            rows = sorted((r for r in results if r["depth"] == depth and r["weight"] == w and r["num_train"] > 0),
                          key=lambda r: r["num_train"])  # fmt: skip
            if not rows:
                continue
            cells = []
            for level in sorted(rows[0]["probe_levels"]):
                accs = [r["probe_levels"][level] for r in rows]
                need = samples_to_reach([r["num_train"] for r in rows], accs, args.threshold)
                cells.append("> " + str(rows[-1]["num_train"]) if need is None else f"{need:.0f}")
            need_rows.append([depth, f"{w:g}", " / ".join(cells)])
    caption = (
        f"{args.config}, {steps} steps of batch {base.train.global_batch_size} per trained run, "
        f"grammar v={base.data.grammar_vocab} "
        f"m={base.data.grammar_rules} s={base.data.grammar_branching}, {base.data.num_test} test sentences "
        f"(probes: half to fit, half to score; chance {1 / base.data.grammar_vocab:.3f}). Probe accuracy: the best "
        "model state's, averaged over levels (root first)."
    )
    tables = [
        Table(
            ["L", "P", "latent weight", "test loss", "test accuracy", "probe acc", "probe acc per level"],
            main_rows,
            title="Next-token loss and hidden-symbol probes by depth, samples and objective",
            caption=caption + (" Skipped: " + "; ".join(skipped) if skipped else ""),
        ),  # fmt: skip
        Table(
            ["L", "latent weight", f"P to reach probe acc {args.threshold:g}, per level (root first)"],
            need_rows,
            title="Training sentences needed",
            caption="Log-linear interpolation between the trained grid points.",
        ),  # fmt: skip
    ]
    written = write_results(args.name, tables, {"results": results, "skipped": skipped}, root=args.root)
    if results:
        plot(results, depths, weights, written / "latent_efficiency.png")
    for t in tables:
        print(t.markdown())
    print(f"wrote {written / 'results.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

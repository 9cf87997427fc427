"""Latent-Thought Model vs an autoregressive baseline: ELBO perplexity against inner steps.

Trains (or resumes, if ``<output>/<name>`` holds a finished checkpoint) the LTM config and the AR
baseline config on the same token stream (same data, batch, seed and steps), then on held-out
text (split ``validation``) reports

    LTM ELBO perplexity  exp((NLL + KL) / N)  with the inner loop run k times on the evaluated text,
    LTM reconstruction   exp(NLL / N)         (not a bound: excludes the KL),
    AR perplexity        exp(NLL / N)

for k in ``--inner``. E_q log p(x | z) is averaged over ``--num_samples`` fresh eps drawn independently
of the eps the inner loop fitted (mu, sigma) to (``elbo_ppl_fitted_eps`` reuses it: optimistic, not a
bound). Both models are scored on the same validation batches. Writes ``results.json`` and
``elbo_ppl_vs_inner_steps.png`` to ``--output``.

    python scripts/ltm_eval.py --steps 300                  # a few minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from looped_jax.config import load_config  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ltm_config", default=str(ROOT / "configs" / "ltm_cpu.py"))
    p.add_argument("--ar_config", default=str(ROOT / "configs" / "ar_baseline_cpu.py"), help="'' skips it")
    p.add_argument("--steps", type=int, default=None, help="training steps for each model (default: config)")
    p.add_argument("--inner", default="1,4,16,64", help="inner-step counts for the ELBO")
    p.add_argument("--eval_batches", type=int, default=4)
    p.add_argument("--eval_batch_size", type=int, default=16)
    p.add_argument("--num_samples", type=int, default=4, help="fresh eps samples per ELBO estimate")
    p.add_argument("--seed", type=int, default=0, help="seed of the posterior initialisation and eps")
    p.add_argument("--output", default="runs/ltm_eval")
    p.add_argument("--set", action="append", default=[], help="LTM config override, e.g. model.init_logvar=0")
    p.add_argument("--set_ar", action="append", default=[], help="AR baseline config override")
    p.add_argument("--ar_name", default="ar_baseline", help="results key and run directory of the AR baseline")
    p.add_argument("--set_both", action="append", default=[], help="override for both models, e.g. data.seq_len=128")
    args = p.parse_args()

    import jax
    from flax import nnx

    from looped_jax.data import make_eval_batches, prepare
    from looped_jax.data.tokenizer import decode_text
    from looped_jax.models import build_model, count_params
    from looped_jax.models.latent_thought import generate
    from looped_jax.train.trainer import Trainer

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    inner = [int(x) for x in args.inner.split(",")]
    results: dict = {"inner_steps": inner, "eval_batches": args.eval_batches, "eval_batch_size": args.eval_batch_size}

    def train(path: str, name: str, extra: dict | None = None):
        overrides = {"train.output_dir": str(out / name), **(extra or {})}
        if args.steps:
            overrides["train.num_steps"] = str(args.steps)
        cfg = load_config(path, overrides)
        prepare(cfg.data)
        trainer = Trainer(cfg)
        n_params = count_params(nnx.eval_shape(lambda: build_model(cfg.model, rngs=nnx.Rngs(0))))
        print(f"\n=== {name}: {n_params:,} parameters, {cfg.train.num_steps} steps ===", flush=True)
        t0 = time.perf_counter()
        state, history = trainer.fit()
        entry = {"params": n_params, "steps": cfg.train.num_steps, "train_seconds": round(time.perf_counter() - t0, 1)}
        entry["train_metrics"] = history["train"]
        return cfg, trainer, state, entry

    ltm_cfg, trainer, state, entry = train(
        args.ltm_config, "ltm", dict(kv.split("=", 1) for kv in args.set_both + args.set)
    )
    batches = make_eval_batches(ltm_cfg.data, "validation", args.eval_batch_size, max_batches=args.eval_batches)
    rng = jax.random.key(args.seed)
    graphdef = trainer.graphdef
    entry["elbo"] = {}
    with jax.set_mesh(trainer.mesh):
        for k in inner:
            fn = jax.jit(
                lambda params, batch, r, k=k: nnx.merge(graphdef, params).elbo(
                    batch, k, r, num_samples=args.num_samples
                )
            )
            t0 = time.perf_counter()
            tot = {"nll_sum": 0.0, "kl_sum": 0.0, "correct": 0.0, "num_tokens": 0.0, "nll_sum_fitted_eps": 0.0}
            for i, b in enumerate(batches):
                o = fn(state.params, {key: jax.numpy.asarray(v) for key, v in b.items()}, jax.random.fold_in(rng, i))
                for key in tot:
                    tot[key] += float(o[key])
            n = tot["num_tokens"]
            row = {
                "elbo_ppl": math.exp((tot["nll_sum"] + tot["kl_sum"]) / n),
                "recon_ppl": math.exp(tot["nll_sum"] / n),
                "nll_per_token": tot["nll_sum"] / n,
                "kl_per_token": tot["kl_sum"] / n,
                "elbo_ppl_fitted_eps": math.exp((tot["nll_sum_fitted_eps"] + tot["kl_sum"]) / n),
                "accuracy": tot["correct"] / n,
                "num_tokens": n,
                "seconds": round(time.perf_counter() - t0, 1),
            }
            entry["elbo"][str(k)] = row
            print(f"LTM inner steps {k:3d}: " + "  ".join(f"{a}={v:.4g}" for a, v in row.items()), flush=True)
        model = trainer.model(state.params)
        prompt = jax.numpy.asarray(batches[0]["inputs"][:2, :32])
        toks = jax.jit(lambda pr, r: generate(model, pr, num_new_tokens=32, rng=r, temperature=0.0))(prompt, rng)
        entry["sample"] = [decode_text(list(map(int, row))) for row in toks]
    results["ltm"] = entry
    jax.clear_caches()

    if args.ar_config:
        _, ar_trainer, ar_state, ar_entry = train(
            args.ar_config, args.ar_name, dict(kv.split("=", 1) for kv in args.set_both + args.set_ar)
        )
        ev = ar_trainer.evaluate(
            ar_state.params, "validation", num_batches=args.eval_batches, batch_size=args.eval_batch_size
        )
        ar_entry.update(
            ppl=math.exp(ev["loss"]), nll_per_token=ev["loss"], accuracy=ev["accuracy"], num_tokens=ev["num_tokens"]
        )
        print(f"AR baseline: ppl={ar_entry['ppl']:.4g} nll={ev['loss']:.4g} acc={ev['accuracy']:.4g}", flush=True)
        results[args.ar_name] = ar_entry

    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "elbo_ppl_vs_inner_steps.png")
    print(f"\nwrote {out / 'results.json'} and {out / 'elbo_ppl_vs_inner_steps.png'}")
    return 0


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = results["inner_steps"]
    elbo = results["ltm"]["elbo"]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot(ks, [elbo[str(k)]["elbo_ppl"] for k in ks], "o-", label="LTM ELBO perplexity exp((NLL+KL)/N)")
    ax.plot(ks, [elbo[str(k)]["recon_ppl"] for k in ks], "s--", label="LTM reconstruction exp(NLL/N) (no KL)")
    for style, (name, entry) in zip(
        (":", "-."), ((k, v) for k, v in results.items() if k.startswith("ar")), strict=False
    ):
        ax.axhline(entry["ppl"], color="k", ls=style, label=f"{name} perplexity (equal params)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("inner (posterior) steps on the evaluated text")
    ax.set_ylabel("perplexity per byte (validation)")
    ax.set_title("Latent-Thought Model: ELBO perplexity vs inference steps")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())

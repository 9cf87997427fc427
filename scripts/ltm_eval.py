"""Latent-Thought Models vs autoregressive baselines: ELBO perplexity against inner steps.

Trains (or resumes, if ``runs/<name>/<config>`` holds a finished checkpoint) every LTM config of
``--ltm_configs`` and every AR baseline of ``--ar_configs`` on the same token stream (same data, batch,
seed and steps), then on held-out text (split ``validation``) reports

    LTM ELBO perplexity  exp((NLL + KL) / N)  with the inner loop run k times on the evaluated text,
    LTM reconstruction   exp(NLL / N)         (not a bound: excludes the KL),
    AR perplexity        exp(NLL / N)

for k in ``--inner``. E_q log p(x | z) is averaged over ``--num_samples`` fresh eps drawn independently
of the eps the inner loop fitted (mu, sigma) to (``elbo_ppl_fitted_eps`` reuses it: optimistic, not a
bound). Every model is scored on the same validation batches.

``--protocol paper`` (or ``both``) adds the paper's evaluation protocol (the authors' evaluation code)
beside the bound: each sequence's exp((NLL_i + KL_i) / T_i) at the eps the posterior was fitted to,
averaged over sequences. It is not a bound (the fitted eps is reused, and a mean of per-sequence
perplexities is not the perplexity of the text); it is there to compare with the paper's numbers.

Writes ``runs/<name>/results.md`` (two tables: ELBO perplexity by inner steps with one column per LTM,
and one row per measure), ``results.json`` and ``elbo_ppl_vs_inner_steps.png``.

    python scripts/ltm_eval.py --steps 600 --ltm_configs configs/ltm_cpu.py,configs/ltm_cpu_vi.py
    python scripts/ltm_eval.py --steps 600 --protocol both --name ltm_eval_paper \
        --ltm_configs configs/ltm_cpu.py,configs/ltm_cpu_vi.py,configs/ltm_cpu_paper.py
    python scripts/ltm_eval.py --steps 600 --ltm_configs configs/ltm_cpu_vi_8latents.py \
        --ar_configs configs/ar_baseline_cpu.py,configs/ar_baseline_cpu_window16.py --eval_batches 16 --name ltm_8

Overrides: ``--config.section.field=value`` applies to every model, ``--ltm_config.…`` to the LTMs only
and ``--ar_config.…`` to the AR baselines only.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from looped_jax.config import load_config, parse_override_groups  # noqa: E402
from looped_jax.results import Table, write_results  # noqa: E402

# LTM columns are named by how their model config differs from this one (the paper's posterior settings).
REFERENCE_LTM = ROOT / "configs" / "ltm_cpu.py"
PROTOCOLS = ("bound", "paper", "both")


def ltm_label(model_cfg) -> str:
    """'LTM, paper posterior init', or the model fields that differ from REFERENCE_LTM."""
    reference = load_config(REFERENCE_LTM).model
    diffs = []
    for f in dataclasses.fields(model_cfg):
        value = getattr(model_cfg, f.name)
        if value != getattr(reference, f.name):
            diffs.append(
                f"`{f.name}`"
                if value is True
                else f"`{f.name}={value:g}`"
                if isinstance(value, float)
                else f"`{f.name}={value}`"
            )
    return "LTM, " + (", ".join(diffs) if diffs else "paper posterior init")


def ar_label(model_cfg) -> str:
    window = getattr(model_cfg, "window", None)
    return "AR baseline, " + ("full causal attention" if not window else f"the LTM's {window}-byte sliding window")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--ltm_configs", default=str(REFERENCE_LTM), help="comma-separated LTM config files")
    p.add_argument("--ar_configs", default=str(ROOT / "configs" / "ar_baseline_cpu.py"), help="'' skips them")
    p.add_argument("--steps", type=int, default=None, help="training steps for each model (default: config)")
    p.add_argument("--inner", default="1,4,16,64", help="inner-step counts for the ELBO")
    p.add_argument("--eval_batches", type=int, default=4)
    p.add_argument("--eval_batch_size", type=int, default=16)
    p.add_argument("--num_samples", type=int, default=4, help="fresh eps samples per ELBO estimate")
    p.add_argument("--seed", type=int, default=0, help="seed of the posterior initialisation and eps")
    p.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="bound",
        help="bound: the ELBO with fresh eps (a bound); paper: also the paper's protocol (fitted eps, "
        "mean over sequences of exp(NELBO_i / T_i)); both: the same as paper",
    )
    p.add_argument("--name", default="ltm_eval", help="results go to runs/<name>/")
    args, rest = p.parse_known_args(argv)
    groups = parse_override_groups(rest, ("config", "ltm_config", "ar_config"))

    import jax
    from flax import nnx

    from looped_jax.data import make_eval_batches, prepare
    from looped_jax.data.tokenizer import decode_text
    from looped_jax.models import build_model, count_params
    from looped_jax.models.latent_thought import generate
    from looped_jax.train.trainer import Trainer

    inner = [int(x) for x in args.inner.split(",")]
    results: dict = {
        "protocol": args.protocol,
        "inner_steps": inner,
        "eval_batches": args.eval_batches,
        "eval_batch_size": args.eval_batch_size,
        "ltm": {},
        "ar": {},
    }

    def train(path: str, kind: str):
        key = Path(path).stem
        overrides = {"train.output_dir": f"runs/{args.name}/{key}", **groups["config"], **groups[f"{kind}_config"]}
        if args.steps:
            overrides["train.num_steps"] = str(args.steps)
        cfg = load_config(path, overrides)
        prepare(cfg.data)
        trainer = Trainer(cfg)
        n_params = count_params(nnx.eval_shape(lambda: build_model(cfg.model, rngs=nnx.Rngs(0))))
        print(f"\n=== {key}: {n_params:,} parameters, {cfg.train.num_steps} steps ===", flush=True)
        state, history = trainer.fit()
        entry = {"config": path, "params": n_params, "steps": history["steps"]}
        entry.update(train_seconds=round(history["train_seconds"], 1), train_metrics=history["train"])
        return key, cfg, trainer, state, entry

    batches = None
    for path in args.ltm_configs.split(","):
        key, cfg, trainer, state, entry = train(path, "ltm")
        entry["label"] = ltm_label(cfg.model)
        if batches is None:
            batches = make_eval_batches(cfg.data, "validation", args.eval_batch_size, max_batches=args.eval_batches)
        rng = jax.random.key(args.seed)
        graphdef = trainer.graphdef
        params = state.eval_params
        entry["elbo"] = {}
        with jax.set_mesh(trainer.mesh):
            for k in inner:
                fn = jax.jit(
                    lambda params, batch, r, k=k: nnx.merge(graphdef, params).elbo(
                        batch, k, r, num_samples=args.num_samples
                    )
                )
                t0 = time.perf_counter()
                tot = dict.fromkeys(
                    (
                        "nll_sum",
                        "kl_sum",
                        "correct",
                        "num_tokens",
                        "nll_sum_fitted_eps",
                        "paper_ppl_sum",
                        "num_sequences",
                    ),
                    0.0,
                )
                for i, b in enumerate(batches):
                    o = fn(params, {name: jax.numpy.asarray(v) for name, v in b.items()}, jax.random.fold_in(rng, i))
                    for name in tot:
                        tot[name] += float(o[name])
                n = tot["num_tokens"]
                row = {
                    "elbo_ppl": math.exp((tot["nll_sum"] + tot["kl_sum"]) / n),
                    "recon_ppl": math.exp(tot["nll_sum"] / n),
                    "nll_per_token": tot["nll_sum"] / n,
                    "kl_per_token": tot["kl_sum"] / n,
                    "elbo_ppl_fitted_eps": math.exp((tot["nll_sum_fitted_eps"] + tot["kl_sum"]) / n),
                    "paper_ppl": paper_protocol_ppl(tot),
                    "accuracy": tot["correct"] / n,
                    "num_tokens": n,
                    "seconds": round(time.perf_counter() - t0, 1),
                }
                entry["elbo"][str(k)] = row
                print(f"{key} inner steps {k:3d}: " + "  ".join(f"{a}={v:.4g}" for a, v in row.items()), flush=True)
            model = trainer.model(params)
            prompt = jax.numpy.asarray(batches[0]["inputs"][:2, :32])
            toks = jax.jit(lambda pr, r: generate(model, pr, num_new_tokens=32, rng=r, temperature=0.0))(prompt, rng)
            entry["sample"] = [decode_text(list(map(int, row))) for row in toks]
        results["ltm"][key] = entry
        jax.clear_caches()

    for path in args.ar_configs.split(",") if args.ar_configs else []:
        key, cfg, trainer, state, entry = train(path, "ar")
        ev = trainer.evaluate(
            state.eval_params, "validation", num_batches=args.eval_batches, batch_size=args.eval_batch_size
        )
        entry.update(
            label=ar_label(cfg.model),
            ppl=math.exp(ev["loss"]),
            nll_per_token=ev["loss"],
            accuracy=ev["accuracy"],
            num_tokens=ev["num_tokens"],
        )
        print(f"{key}: ppl={entry['ppl']:.4g} nll={ev['loss']:.4g} acc={ev['accuracy']:.4g}", flush=True)
        results["ar"][key] = entry
        jax.clear_caches()

    tables = results_tables(results)
    out = write_results(args.name, tables, results)
    plot(results, out / "elbo_ppl_vs_inner_steps.png")
    print("\n" + "\n\n".join(t.markdown() for t in tables))
    print(f"\nwrote {out / 'results.md'}, {out / 'results.json'} and {out / 'elbo_ppl_vs_inner_steps.png'}")
    return 0


def paper_protocol_ppl(tot: dict) -> float:
    """The paper's number: the mean over sequences of exp(NELBO_i / T_i) at the fitted eps."""
    return tot["paper_ppl_sum"] / max(tot["num_sequences"], 1.0)


def _ppl(x: float) -> str:
    """Perplexities as the README writes them: 7.01, 1412, 3.7e4."""
    return f"{x:.2f}" if x < 100 else f"{x:.0f}" if x < 1e4 else f"{x:.1e}".replace("e+0", "e").replace("e+", "e")


def results_tables(results: dict) -> list[Table]:
    """(1) rows = inner steps, one ELBO column per LTM, one row per AR baseline; (2) one row per measure."""
    ks, ltms, ars = results["inner_steps"], results["ltm"], results["ar"]
    n_tokens = next(iter(ltms.values()))["elbo"][str(ks[0])]["num_tokens"] if ltms else 0
    caption = (
        f"Held-out ELBO perplexity per byte on {int(n_tokens):,} validation tokens "
        f"({results['eval_batches']} batches of {results['eval_batch_size']}), against the inner steps at evaluation; "
        "models trained " + ", ".join(sorted({f"{e['steps']:,}" for e in (*ltms.values(), *ars.values())})) + " steps."
    )
    paper = results.get("protocol", "bound") != "bound"
    if paper:
        caption += (
            " Columns marked (paper protocol): the paper's evaluation, mean over sequences of exp(NELBO_i / T_i)"
            " at the fitted eps; not a bound."
        )
    header = ["inner steps"] + [e["label"] for e in ltms.values()]
    if paper:
        header += [f"{e['label']} (paper protocol)" for e in ltms.values()]
    rows = []
    for k in ks:
        row = [str(k)] + [_ppl(e["elbo"][str(k)]["elbo_ppl"]) for e in ltms.values()]
        if paper:
            row += [_ppl(e["elbo"][str(k)]["paper_ppl"]) for e in ltms.values()]
        rows.append(row)
    for e in ars.values():
        rows.append([f"{e['label']} ({e['params']:,} params)"] + [_ppl(e["ppl"])] * (len(header) - 1))
    by_inner = Table(header, rows, title="ELBO perplexity", caption=caption)
    rows = []
    for e in ltms.values():
        settings = e["label"].removeprefix("LTM, ")
        rows.append([f"LTM ELBO perplexity ({settings})"] + [_ppl(e["elbo"][str(k)]["elbo_ppl"]) for k in ks])
        rows.append(["LTM reconstruction perplexity (no KL)"] + [_ppl(e["elbo"][str(k)]["recon_ppl"]) for k in ks])
        if paper:
            rows.append(
                ["LTM paper-protocol perplexity (fitted eps, not a bound)"]
                + [_ppl(e["elbo"][str(k)]["paper_ppl"]) for k in ks]
            )
    for e in ars.values():
        rows.append([e["label"], _ppl(e["ppl"])] + [""] * (len(ks) - 1))
    by_measure = Table(["inner steps"] + [str(k) for k in ks], rows, title="Perplexity by measure", caption=caption)
    return [by_inner, by_measure]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = results["inner_steps"]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for entry in results["ltm"].values():
        elbo = entry["elbo"]
        ax.plot(ks, [elbo[str(k)]["elbo_ppl"] for k in ks], "o-", label=f"{entry['label']}: ELBO exp((NLL+KL)/N)")
        ax.plot(ks, [elbo[str(k)]["recon_ppl"] for k in ks], "s--", label=f"{entry['label']}: exp(NLL/N) (no KL)")
    for style, entry in zip((":", "-."), results["ar"].values(), strict=False):
        ax.axhline(entry["ppl"], color="k", ls=style, label=f"{entry['label']} perplexity")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("inner (posterior) steps on the evaluated text")
    ax.set_ylabel("perplexity per byte (validation)")
    ax.set_title("Latent-Thought Model: ELBO perplexity vs inference steps")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())

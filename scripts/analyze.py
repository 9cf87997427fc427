"""Fixed-point and activation analysis of a looped model: does the loop converge, to what, how fast?

    python scripts/analyze.py --config configs/recurrent_depth_chains.py \
        --checkpoint_dir runs/test_time_scaling/recurrent_depth --max_loops 256 --out runs/analysis/rd
    python scripts/analyze.py --config configs/hrm_sudoku_cpu.py --max_loops 64     # at initialisation

For every evaluation split of the config's data (per hop count on chains), on ``--num_examples``
examples: per-step relative residual, norms, KL / argmax changes / entropy of the readout,
distance to a long-run reference s* (``--reference_factor`` x max_loops steps), the fitted
per-token convergence rate, the spectral radius of the step Jacobian at s* (power iteration +
Arnoldi on JVPs), converged / cycling / wandering / diverged shares at steps 64 and max_loops, the
finite-time Lyapunov exponent, activation / attention statistics (families with a probe) and PCA
paths. Writes report.json, report.md and PNG plots to ``--out``; progress on stdout.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def restore_params(cfg, checkpoint_dir: str):
    """Eval params of the latest checkpoint in ``checkpoint_dir`` (or its checkpoints/), config-checked."""
    from looped_jax.checkpoint import Checkpointer
    from looped_jax.config import to_dict
    from looped_jax.train.trainer import Trainer

    trainer = Trainer(cfg, log=False)
    directory = Path(checkpoint_dir).expanduser()
    if (directory / "checkpoints").is_dir():
        directory = directory / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"--checkpoint_dir {str(directory)!r} does not exist")
    ckpt = Checkpointer(directory, async_save=False)
    current = to_dict(cfg)
    latest = ckpt.latest_step()
    if latest is not None:
        current = _tolerate_new_default_fields(current, ckpt.read_meta(latest).get("config", {}), cfg)
    state, _, step = ckpt.restore(trainer.abstract_state(), config=current)
    ckpt.close()
    return trainer, state.eval_params, step


def _tolerate_new_default_fields(current: dict, saved: dict, cfg) -> dict:
    """Drops config fields a checkpoint predates when they hold their default value (a field added
    to the code since, which cannot have changed the saved model); every other difference still fails."""
    import dataclasses

    from looped_jax.config import to_dict

    out = dict(current)
    for section in ("model", "data"):
        sec_cfg = getattr(cfg, section)
        try:
            defaults = to_dict(type(sec_cfg)())
        except Exception:  # a config type without full defaults: compare everything
            continue
        names = {f.name for f in dataclasses.fields(sec_cfg)}
        kept = {}
        for k, v in out.get(section, {}).items():
            if k in names and k not in saved.get(section, {}) and defaults.get(k, object()) == v:
                continue
            kept[k] = v
        out[section] = kept
    return out


def eval_batch(cfg, split: str, n: int) -> dict:
    from looped_jax.data import make_pipeline

    it = make_pipeline(cfg.data, split=split, global_batch_size=n, seed=0, shuffle=False, num_epochs=1)
    return {k: np.asarray(v) for k, v in next(iter(it)).items()}


def analyse_split(spec, args, log) -> tuple[dict, dict]:
    from looped_jax import analysis as an

    r = args.max_loops
    t0 = time.perf_counter()
    ref = an.long_run_reference(spec, args.reference_factor * r)
    log(f"    reference s* after {args.reference_factor * r} steps ({time.perf_counter() - t0:.1f}s)")
    t0 = time.perf_counter()
    traj = an.trajectory(
        spec, r, period_window=args.period_window, reference_BTD=ref.state_BTD, track=[(0, t) for t in args.track]
    )
    t_traj = time.perf_counter() - t0
    log(f"    trajectory of {r} steps ({t_traj:.1f}s)")
    t0 = time.perf_counter()
    spectrum = an.jacobian_spectrum(spec, ref.carry, power_steps=args.power_steps, arnoldi_steps=args.arnoldi_steps)
    log(f"    spectrum at s* ({time.perf_counter() - t0:.1f}s)")
    acts = None
    if spec.probe is not None:
        acts = an.trajectory(spec, min(r, args.act_steps), activations=True, lyapunov=False).acts
    mask = traj.token_mask_BT
    mean = lambda x: an.masked_mean_over_tokens(x, mask)
    first = an.first_step_below(traj.residual_RBT, args.tol)[mask]
    rate, _ = an.fit_rate(traj.distance_RBT, floor=1e-6)
    rate = rate[mask]
    summary = {
        "num_tokens": int(mask.sum()),
        "residual_below_tol": {
            "tol": args.tol,
            "share_reached": float((first > 0).mean()),
            "median_step": float(np.median(first[first > 0])) if (first > 0).any() else None,
            "max_step": int(first.max()) if (first > 0).all() else None,
            "step_of_mean_residual": int(an.first_step_below(mean(traj.residual_RBT)[:, None, None], args.tol)[0, 0]),
        },
        "final_residual_mean": float(mean(traj.residual_RBT)[-1]),
        "reference_residual_mean": float(ref.residual_BT[mask].mean()),
        "final_distance_mean": float(mean(traj.distance_RBT)[-1]),
        "rate_median": float(np.nanmedian(rate)) if np.isfinite(rate).any() else None,
        "spectral_radius": {
            "mean": float(spectrum.radius_B.mean()),
            "min": float(spectrum.radius_B.min()),
            "max": float(spectrum.radius_B.max()),
            "share_contractive": float(spectrum.contractive_B.mean()),
            "power_ratio_mean": float(spectrum.power_radius_B.mean()),
            "top_magnitudes_example0": [round(float(x), 4) for x in spectrum.top_magnitudes_BM[0]],
        },
        "ftle_mean": float(traj.ftle_B.mean()),
        "shares": {str(k): an.shares(traj, k, tol=args.tol) for k in sorted({min(64, r), r})},
        "final_kl_mean": float(mean(traj.kl_RBT)[-1]),
        "argmax_changes_last_quarter": float(traj.argmax_change_RBT[-max(r // 4, 1) :][:, mask].mean()),
    }
    if acts is not None:
        summary["activations_last_step"] = {
            "massive_ratio_per_layer": [round(float(x), 2) for x in acts["massive_ratio"][-1]],
            "massive_token_dim_per_layer": [
                (int(t), int(d)) for t, d in zip(acts["massive_token"][-1], acts["massive_dim"][-1], strict=True)
            ],
            "mlp_hoyer_per_layer": [round(float(x), 3) for x in acts["mlp_hoyer"][-1]],
            "mlp_near_zero_per_layer": [round(float(x), 3) for x in acts["mlp_near_zero"][-1]],
            "attn_entropy_mean": float(acts["attn_entropy_LN"][-1].mean()),
            "attn_overlap_mean": float(acts["attn_overlap_LN"][-1].mean()),
        }
    curves = {
        "residual": mean(traj.residual_RBT),
        "distance": mean(traj.distance_RBT),
        "kl": mean(traj.kl_RBT),
        "entropy": mean(traj.entropy_RBT),
        "shares": an.shares_by_step(traj, tol=args.tol),
        "radius_B": spectrum.radius_B,
        "path": traj.path_RND,
        "acts": acts,
        "seconds_trajectory": t_traj,
        "record_bytes": int(
            sum(
                np.asarray(x).nbytes
                for x in (
                    traj.residual_RBT,
                    traj.norm_RBT,
                    traj.recurrence_RPBT,
                    traj.distance_RBT,
                    traj.kl_RBT,
                    traj.entropy_RBT,
                )
            )
        ),
        "full_state_bytes": int(r * np.prod(np.asarray(ref.state_BTD).shape) * 4),
    }
    summary["seconds_trajectory"] = round(t_traj, 2)
    summary["trajectory_record_bytes"] = curves["record_bytes"]
    summary["full_states_would_be_bytes"] = curves["full_state_bytes"]
    return summary, curves


def plot(curves_by_split: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from looped_jax.analysis import pca_2d

    files = []
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    ax_res, ax_dist, ax_kl, ax_rad, ax_sh, ax_pca = axes.ravel()
    cmap = plt.get_cmap("viridis")
    n = len(curves_by_split)
    for j, (split, c) in enumerate(curves_by_split.items()):
        col = cmap(j / max(n - 1, 1))
        k = np.arange(1, len(c["residual"]) + 1)
        ax_res.semilogy(k, np.maximum(c["residual"], 1e-12), color=col, label=split)
        ax_dist.semilogy(k, np.maximum(c["distance"], 1e-12), color=col, label=split)
        ax_kl.semilogy(k, np.maximum(c["kl"], 1e-14), color=col, label=split)
        ax_rad.hist(c["radius_B"], bins=20, alpha=0.5, color=col, label=split)
        for cls, ls in (("converged", "-"), ("cycling", "--"), ("wandering", ":")):
            ax_sh.plot(k, c["shares"][cls], ls, color=col, label=f"{split} {cls}" if j == 0 or n == 1 else None)
        if c["path"] is not None and j == 0:
            for i in range(c["path"].shape[1]):
                xy, share = pca_2d(c["path"][:, i])
                ax_pca.plot(xy[:, 0], xy[:, 1], "-o", ms=2, label=f"token {i} ({share.sum():.0%} var)")
                ax_pca.plot(xy[-1, 0], xy[-1, 1], "k*")
    ax_res.axhline(1e-3, color="grey", ls="--", lw=1)
    ax_res.set(title="relative residual ||s_k - s_{k-1}|| / ||s_k||", xlabel="loop step", xscale="log")
    ax_dist.set(title="distance to long-run s*, ||s_k - s*|| / ||s*||", xlabel="loop step", xscale="log")
    ax_kl.set(title="KL(p_k || p_{k-1}) of the readout", xlabel="loop step", xscale="log")
    ax_rad.axvline(1.0, color="k", ls="--", lw=1)
    ax_rad.set(title="spectral radius of d step / d s at s* (per example)", xlabel="radius")
    ax_sh.set(
        title="share converged (-) / cycling (--) / wandering (:)", xlabel="loop step", xscale="log", ylim=(-0.02, 1.02)
    )
    ax_pca.set(title=f"PCA of latent paths ({next(iter(curves_by_split))}, example 0; * = last)")
    for ax in (ax_res, ax_dist, ax_kl, ax_rad, ax_sh, ax_pca):
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "convergence.png", dpi=110)
    plt.close(fig)
    files.append("convergence.png")
    acts = {s: c["acts"] for s, c in curves_by_split.items() if c["acts"] is not None}
    if acts:
        split, a = next(iter(acts.items()))
        fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.5))
        steps = np.arange(1, a["massive_ratio"].shape[0] + 1)
        for layer in range(a["massive_ratio"].shape[1]):
            ax1.semilogy(steps, a["massive_ratio"][:, layer], label=f"layer {layer}")
            ax2.plot(steps, a["attn_entropy_LN"][:, layer].mean(-1), label=f"layer {layer} entropy")
            ax3.plot(steps, a["mlp_hoyer"][:, layer], label=f"layer {layer} Hoyer")
            if "attn_overlap_LN" in a:
                ax2.plot(steps, a["attn_overlap_LN"][:, layer].mean(-1), "--", label=f"layer {layer} overlap")
        ax1.set(title=f"massive activations: max|x| / median|x| ({split})", xlabel="loop step")
        ax2.set(title="attention entropy (nats, -) and overlap with previous step (--)", xlabel="loop step")
        ax3.set(title="MLP hidden sparsity (Hoyer)", xlabel="loop step")
        for ax in (ax1, ax2, ax3):
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "activations.png", dpi=110)
        plt.close(fig)
        files.append("activations.png")
    return files


def report_md(report: dict) -> str:
    lines = [f"# Loop analysis: {report['config']} ({report['params_from']})", ""]
    r = report["max_loops"]
    hdr = (
        f"| split | first step residual < {report['tol']:g} (median / max token; mean curve) | final residual | "
        f"spectral radius at s* (mean, min-max) | contractive | FTLE | conv / cycle / wander / diverge @64 | @{r} |"
    )
    lines += [hdr, "|" + "---|" * 8]
    for split, s in report["splits"].items():
        rb = s["residual_below_tol"]
        sr = s["spectral_radius"]
        fmt = lambda d: " / ".join(f"{d[c]:.2f}" for c in ("converged", "cycling", "wandering", "diverged"))
        sh = s["shares"]
        lines.append(
            f"| {split} | {rb['median_step']} / {rb['max_step']}; {rb['step_of_mean_residual'] or 'never'} | "
            f"{s['final_residual_mean']:.2e} | {sr['mean']:.3f} ({sr['min']:.3f}-{sr['max']:.3f}) | "
            f"{sr['share_contractive']:.2f} | {s['ftle_mean']:.3f} | {fmt(sh[str(min(64, r))])} | {fmt(sh[str(r)])} |"
        )
    lines += ["", f"Time and memory: {json.dumps(report['resources'])}", ""]
    lines += [f"![{f}]({f})" for f in report["plots"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--checkpoint_dir", default="", help="restore the latest checkpoint here (default: initialisation)")
    p.add_argument("--max_loops", type=int, default=256)
    p.add_argument("--out", default="", help="default runs/analysis/<config name>")
    p.add_argument("--splits", default="", help="comma-separated eval splits (default: every non-train split)")
    p.add_argument("--num_examples", type=int, default=32)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--reference_factor", type=int, default=4)
    p.add_argument("--period_window", type=int, default=8)
    p.add_argument("--power_steps", type=int, default=50)
    p.add_argument("--arnoldi_steps", type=int, default=8)
    p.add_argument("--act_steps", type=int, default=32, help="loop steps with activation statistics")
    p.add_argument("--track", default="0,1,2,3", help="token positions of example 0 whose path is PCA-plotted")
    args, rest = p.parse_known_args(argv)
    args.track = [int(x) for x in args.track.split(",") if x]
    if args.max_loops < 1:
        p.error(f"--max_loops must be >= 1, got {args.max_loops}")

    import jax
    from flax import nnx

    from looped_jax.config import load_config, parse_overrides
    from looped_jax.data import prepare, split_names
    from looped_jax.models import MODEL_CONFIGS, build_model
    from looped_jax.models.loop_access import ACCESSORS, loop_spec

    cfg = load_config(args.config, parse_overrides(rest))
    family = cfg.model.name
    if family not in MODEL_CONFIGS:
        raise SystemExit(f"unknown model family {family!r}; expected one of {sorted(MODEL_CONFIGS)}")
    if family not in ACCESSORS:
        raise SystemExit(f"model family {family!r} has no loop to analyse here; supported: {sorted(ACCESSORS)}")
    out = Path(args.out or f"runs/analysis/{Path(args.config).stem}")
    out.mkdir(parents=True, exist_ok=True)
    prepare(cfg.data)
    splits = [s for s in (args.splits.split(",") if args.splits else split_names(cfg.data)) if s and s != "train"]
    model = build_model(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
    params_from = "initialisation"
    if args.checkpoint_dir:
        trainer, params, step = restore_params(cfg, args.checkpoint_dir)
        model = nnx.merge(trainer.graphdef, params)
        params_from = f"checkpoint step {step} in {args.checkpoint_dir}"
    print(f"{family}: analysing {params_from}, {len(splits)} splits, R = {args.max_loops}", flush=True)
    report = {
        "config": args.config,
        "family": family,
        "params_from": params_from,
        "max_loops": args.max_loops,
        "tol": args.tol,
        "num_examples": args.num_examples,
        "splits": {},
    }
    curves = {}
    t_all = time.perf_counter()
    for split in splits:
        print(f"  split {split}", flush=True)
        spec = loop_spec(model, eval_batch(cfg, split, args.num_examples))
        report["splits"][split], curves[split] = analyse_split(spec, args, lambda m: print(m, flush=True))
        jax.clear_caches()
    report["resources"] = {
        "seconds_total": round(time.perf_counter() - t_all, 1),
        "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    report["plots"] = plot(curves, out)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float))
    (out / "report.md").write_text(report_md(report))
    print(report_md(report))
    print(f"wrote {out / 'report.json'}, {out / 'report.md'} and {', '.join(report['plots'])}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

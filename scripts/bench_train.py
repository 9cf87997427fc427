"""Benchmark a recurrent-depth train step on the current backend; prints ONE JSON object.

    python scripts/bench_train.py [--config configs/recurrent_depth_512.py] [--steps 10] \
        [--config.model.mean_loops=8] [--quick] [--skip_compile_scan] [--skip_memory] [--skip_profile]

Writes the README table (tokens/s, MFU, compile times, compiled temp memory) to ``runs/<name>/results.md``
and the whole JSON object to ``results.json``.

Measures, in one run (progress goes to stderr):
  1. the backend's matmul peak (a jitted square matmul, best of several runs after warmup);
  2. train-step throughput on real batches (tokens/s, s/step, the sampled loop counts r);
  3. MFU: analytic model FLOPs of each step's sampled r over (time x measured f32 matmul peak);
  4. compile time of the train step at mean_loops 4 vs 64 (r is traced: should be equal), and of
     the forward with a static loop count 4 vs 64 (a scan: should be nearly equal);
  5. compiled temp memory of the train step at mean_loops 8 vs 64, and of the loss' forward +
     backward at a static loop count 8 vs 64 with grad_steps=k (truncated backprop: flat) next
     to grad_steps=r (full backprop: grows with r);
  6. (profile) a breakdown: one core iteration forward, forward + backward, with and without the
     packed-sequence mask, the optimizer update and the host data pipeline, plus a fit of the
     step time against r.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "recurrent_depth_512.py")

FLOPS_FORMULA = (
    "per token, with P_x the matmul weights of part x (attention q/k/v/o + SwiGLU gate/up/down per "
    "block, the 2D x D adapter in the core, V x D tied head in the coda part), T = seq_len, "
    "A = 4*T*num_heads*head_dim attention FLOPs per layer (QK^T and AV, full T x T: no causal "
    "halving, as computed by the masked XLA attention), L_x the layers of part x: "
    "F_once = 2*(P_prelude + P_coda + P_head) + A*(L_prelude + L_coda); F_core = 2*P_core + A*L_core; "
    "model FLOPs/token = 3*F_once + (r + 2*min(r, k))*F_core  (forward once + r core loops, backward = "
    "2x forward for prelude/coda/head and the min(r, k) differentiated core loops). "
    "Hardware FLOPs also count the masked grad-phase iterations and remat: forward max(r, k) core "
    "loops, backward 2*k, plus k times the matmul FLOPs the remat policy recomputes (a whole core "
    "loop for nothing_saveable, attention's QK^T and PV for dots_with_no_batch_dims_saveable). "
    "Embedding lookup, norms, softmax, RoPE and the optimizer are not counted."
)


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# 1. matmul peak


def matmul_peak_flops(size: int, dtype: str, repeats: int = 5) -> float:
    """FLOP/s of a jitted size^3 matmul: best of ``repeats`` timed runs after one warmup."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32).astype(dtype)
    f = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(f(a, b))
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, b))
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best


# ---------------------------------------------------------------------------------------------
# 3. analytic FLOPs


def flops_per_token(model_cfg, seq_len: int) -> dict:
    """Forward FLOPs per token of the once-run parts (prelude, coda, head) and of one core loop."""
    m = model_cfg
    d, nh, kh, hd, f = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim
    block = d * nh * hd + 2 * d * kh * hd + nh * hd * d + 3 * d * f
    attn = 4 * seq_len * nh * hd
    once = 2 * ((m.num_prelude_layers + m.num_coda_layers) * block + m.vocab_size * d)
    once += attn * (m.num_prelude_layers + m.num_coda_layers)
    core = 2 * (m.num_core_layers * block + 2 * d * d) + attn * m.num_core_layers
    return {"once": float(once), "core": float(core)}


def step_flops(model_cfg, seq_len: int, tokens: int, r: int) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) of one train step that ran ``r`` core loops."""
    per = flops_per_token(model_cfg, seq_len)
    k = model_cfg.grad_steps
    model = 3 * per["once"] + (r + 2 * min(r, k)) * per["core"]
    hardware = 3 * per["once"] + (max(r, k) + 2 * k) * per["core"] + k * remat_flops_per_token(model_cfg, seq_len)
    return model * tokens, hardware * tokens


def remat_flops_per_token(model_cfg, seq_len: int) -> float:
    """Matmul FLOPs per token one differentiated core loop recomputes in its backward pass.

    nothing_saveable recomputes the whole loop; dots_with_no_batch_dims_saveable keeps the
    projections (2-D matmuls) and recomputes attention's batched QK^T / PV; dots_saveable and
    everything_saveable keep every matmul output (only elementwise work is recomputed).
    """
    policy = model_cfg.remat_policy
    if policy == "nothing_saveable":
        return flops_per_token(model_cfg, seq_len)["core"]
    if policy == "dots_with_no_batch_dims_saveable":
        return float(4 * seq_len * model_cfg.num_heads * model_cfg.head_dim * model_cfg.num_core_layers)
    return 0.0


# ---------------------------------------------------------------------------------------------
# helpers


def with_model(cfg, **changes):
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **changes))


def abstract_batch(trainer):
    import jax
    import jax.numpy as jnp

    from looped_jax.train.trainer import BATCH_KEYS

    shape = (trainer.cfg.train.global_batch_size, trainer.cfg.data.seq_len)
    return {
        k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "weights" else jnp.int32, sharding=trainer.batch_sharding)
        for k in BATCH_KEYS
    }


_TRAIN_COMPILES: dict = {}


def compile_train_step(cfg) -> tuple[float, float, int]:
    """(lower_s, compile_s, temp bytes) of the jitted train step for ``cfg`` (memoized per config)."""
    import jax

    if cfg in _TRAIN_COMPILES:
        return _TRAIN_COMPILES[cfg]

    from looped_jax.train.trainer import Trainer

    trainer = Trainer(cfg, log=False)
    t0 = time.perf_counter()
    with jax.set_mesh(trainer.mesh):
        lowered = trainer.train_step.lower(trainer.abstract_state(), abstract_batch(trainer))
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    _TRAIN_COMPILES[cfg] = (t1 - t0, t2 - t1, _temp_bytes(compiled))
    return _TRAIN_COMPILES[cfg]


def _temp_bytes(compiled) -> int:
    from looped_jax.results import temp_bytes

    n = temp_bytes(compiled)
    return -1 if n is None else n


def compile_forward(trainer, num_loops: int) -> tuple[float, int]:
    """(compile_s, temp bytes) of the eval forward at a static loop count."""
    import jax
    import jax.numpy as jnp

    params = trainer.abstract_state().params
    x = jax.ShapeDtypeStruct((trainer.cfg.train.global_batch_size, trainer.cfg.data.seq_len), jnp.int32)
    fwd = jax.jit(lambda p, tokens: trainer.model(p)(tokens, num_loops=num_loops))
    with jax.set_mesh(trainer.mesh):
        lowered = fwd.lower(params, x)
    t0 = time.perf_counter()
    compiled = lowered.compile()
    return time.perf_counter() - t0, _temp_bytes(compiled)


def static_loss_grad_temp_bytes(trainer, num_loops: int) -> int:
    """Temp bytes of value_and_grad of the loss with ``num_loops`` static (unroll's static path)."""
    import jax

    from looped_jax.losses import cross_entropy

    def loss(params, batch):
        logits, _ = trainer.model(params).forward(
            batch["inputs"],
            positions_BT=batch["positions"],
            segment_ids_BT=batch["segment_ids"],
            num_loops=num_loops,
            rng=jax.random.key(0),
        )
        return cross_entropy(logits, batch["targets"], batch["weights"])[0]

    with jax.set_mesh(trainer.mesh):
        lowered = jax.jit(jax.value_and_grad(loss)).lower(trainer.abstract_state().params, abstract_batch(trainer))
    return _temp_bytes(lowered.compile())


def best_time(fn, *args, repeats: int = 3) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


# ---------------------------------------------------------------------------------------------
# 2. train throughput


def bench_train(cfg, steps: int, warmup: int) -> tuple[dict, object, dict]:
    """Times ``steps`` train steps on real batches after ``warmup`` (compiling) steps."""
    import jax
    import numpy as np

    from looped_jax.data import prepare
    from looped_jax.train.trainer import Trainer

    _quiet_prepare(cfg.data, prepare)
    trainer = Trainer(cfg, log=False)
    it = trainer.make_train_iterator()
    state = trainer.init_state()
    data_s = []

    def next_batch():
        t0 = time.perf_counter()
        b = trainer.global_batch(next(it))
        jax.block_until_ready(b)
        data_s.append(time.perf_counter() - t0)
        return b

    with jax.set_mesh(trainer.mesh):
        t0 = time.perf_counter()
        for _ in range(warmup):
            state, metrics = trainer.train_step(state, next_batch())
            jax.block_until_ready(metrics)
        first_s = time.perf_counter() - t0
        log(f"warmup ({warmup} steps incl. compile): {first_s:.1f}s")
        batches = [next_batch() for _ in range(steps)]  # host data timed apart from the steps
        step_s, loops = [], []
        for i, batch in enumerate(batches):
            t0 = time.perf_counter()
            state, metrics = trainer.train_step(state, batch)
            jax.block_until_ready(state)
            step_s.append(time.perf_counter() - t0)
            loops.append(int(jax.device_get(metrics["num_loops"])))
            log(f"step {i + 1}/{steps}: r={loops[-1]} {step_s[-1]:.3f}s loss={float(metrics['loss']):.3f}")
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    flops = [step_flops(cfg.model, cfg.data.seq_len, tokens, r) for r in loops]
    out = {
        "steps": steps,
        "tokens_per_step": tokens,
        "warmup_s": first_s,
        "step_s": float(np.mean(step_s)),
        "step_s_median": float(np.median(step_s)),
        "step_s_all": [round(s, 4) for s in step_s],
        "num_loops": loops,
        "num_loops_mean": float(np.mean(loops)),
        "tokens_per_s": tokens * steps / float(np.sum(step_s)),
        "model_flops_per_step_mean": float(np.mean([f[0] for f in flops])),
        "model_flops_per_s": float(np.sum([f[0] for f in flops]) / np.sum(step_s)),
        "hardware_flops_per_s": float(np.sum([f[1] for f in flops]) / np.sum(step_s)),
        "host_data_s_per_batch": float(np.median(data_s)),
    }
    # Step time against r: the slope is the cost of one extra gradient-free loop (r > k).
    extra = np.maximum(np.asarray(loops) - cfg.model.grad_steps, 0)
    if len(set(extra.tolist())) > 1:
        slope, intercept = np.polyfit(extra, np.asarray(step_s), 1)
        out["fit_step_s"] = {"at_r_le_k": float(intercept), "per_extra_nograd_loop": float(slope)}
    return out, trainer, batches[0]


def _quiet_prepare(data_cfg, prepare) -> None:
    import contextlib

    with contextlib.redirect_stdout(sys.stderr):
        prepare(data_cfg)


# ---------------------------------------------------------------------------------------------
# 6. profile


def profile(trainer, batch, peak: float) -> dict:
    """Times the pieces of a step: one core loop (fwd, fwd+bwd, mask vs fused causal), optimizer."""
    import jax
    import jax.numpy as jnp
    import optax

    cfg = trainer.cfg
    params = trainer.init_state().params
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    per = flops_per_token(cfg.model, cfg.data.seq_len)
    model = trainer.model(params)
    step, core_params = model.core_step_fn()
    shape = batch["inputs"].shape + (cfg.model.d_model,)
    s = jax.random.normal(jax.random.key(0), shape, jnp.float32)
    e = jax.random.normal(jax.random.key(1), shape, jnp.float32)
    pos, seg = batch["positions"], batch["segment_ids"]

    fwd = jax.jit(lambda p, s, e, pos, seg: step(p, s, (e, pos, seg)))
    grad = jax.jit(jax.value_and_grad(lambda p, s, e, pos, seg: jnp.sum(step(p, s, (e, pos, seg))), argnums=(0, 1)))
    out = {}
    with jax.set_mesh(trainer.mesh):
        t_fwd = best_time(fwd, core_params, s, e, pos, seg)
        t_fwd_causal = best_time(fwd, core_params, s, e, pos, None)
        t_grad = best_time(grad, core_params, s, e, pos, seg)
        f_core = per["core"] * tokens
        out["core_loop_fwd_s"] = t_fwd
        out["core_loop_fwd_flops_util"] = f_core / t_fwd / peak
        out["core_loop_fwd_causal_no_segments_s"] = t_fwd_causal
        out["core_loop_fwd_bwd_s"] = t_grad
        out["core_loop_fwd_bwd_flops_util"] = 3 * f_core / t_grad / peak
        # The same loop without attention's T x T work: how much of it is attention.
        attn = 4 * cfg.data.seq_len * cfg.model.num_heads * cfg.model.head_dim * cfg.model.num_core_layers
        out["core_loop_attention_flops_fraction"] = attn / per["core"]

        grads = jax.tree.map(jnp.zeros_like, params)
        opt_state = trainer.tx.init(params)

        def update(g, o, p):
            u, o = trainer.tx.update(g, o, p)
            return optax.apply_updates(p, u), o

        out["optimizer_update_s"] = best_time(jax.jit(update), grads, opt_state, params)
    return out


# ---------------------------------------------------------------------------------------------


def quick_overrides(cfg):
    """Tiny sizes for a smoke test."""
    model = dataclasses.replace(
        cfg.model,
        d_model=64,
        num_heads=2,
        num_kv_heads=2,
        head_dim=32,
        mlp_dim=128,
        num_prelude_layers=1,
        num_core_layers=1,
        num_coda_layers=1,
        mean_loops=4,
        grad_steps=2,
    )
    data = dataclasses.replace(cfg.data, seq_len=32)
    train = dataclasses.replace(cfg.train, global_batch_size=2)
    return dataclasses.replace(cfg, model=model, data=data, train=train)


def run(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="a recurrent-depth config file")
    parser.add_argument("--steps", type=int, default=10, help="timed train steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (the first compiles)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--matmul_size", type=int, default=0, help="matmul size for the peak (0: 2048, quick 256)")
    parser.add_argument("--skip_compile_scan", action="store_true", help="skip compile times at 4 vs 64 loops")
    parser.add_argument("--skip_memory", action="store_true", help="skip the compiled temp memory comparison")
    parser.add_argument("--skip_profile", action="store_true", help="skip the per-piece timing breakdown")
    parser.add_argument("--name", default="bench_train", help="the table goes to runs/<name>/results.md")
    args, rest = parser.parse_known_args(argv)

    import jax

    from looped_jax.config import apply_overrides, load_config, parse_overrides

    overrides = parse_overrides(rest)  # --config.section.field=value
    path = args.config
    cfg = load_config(path)
    if args.quick:
        cfg = quick_overrides(cfg)
    overrides.setdefault("checkpoint.enabled", "false")
    cfg = apply_overrides(cfg, overrides)
    if cfg.model.name != "recurrent_depth":
        raise ValueError(f"bench_train measures recurrent-depth configs, got model.name={cfg.model.name!r}")

    result: dict = {
        "name": args.name,
        "config": path,
        "overrides": overrides,
        "quick": args.quick,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "num_devices": jax.device_count(),
        "model": dataclasses.asdict(cfg.model),
        "seq_len": cfg.data.seq_len,
        "global_batch_size": cfg.train.global_batch_size,
    }
    size = args.matmul_size or (256 if args.quick else 2048)
    log(f"matmul peak ({size}^3) ...")
    peak = {"size": size, "float32": matmul_peak_flops(size, "float32")}
    peak["bfloat16"] = matmul_peak_flops(size, "bfloat16")
    log(f"train steps ({args.steps} timed) ...")
    train, trainer, batch = bench_train(cfg, args.steps, args.warmup)
    # Measured again after the steps; the higher (conservative) value is the peak: on a shared
    # machine a single measurement can be low and would flatter the MFU.
    peak["float32_after"] = matmul_peak_flops(size, "float32")
    peak["bfloat16_after"] = matmul_peak_flops(size, "bfloat16")
    dtype = "bfloat16" if cfg.model.dtype == "bfloat16" else "float32"
    ref_peak = max(peak[dtype], peak[f"{dtype}_after"])
    result["matmul_peak_flops"] = peak
    result["peak_used_for_mfu"] = {"dtype": dtype, "flops_per_s": ref_peak, "rule": "max of before/after"}
    result["train"] = train
    result["tokens_per_s"] = train["tokens_per_s"]
    result["step_s"] = train["step_s"]
    result["num_loops"] = train["num_loops"]
    result["mfu"] = train["model_flops_per_s"] / ref_peak
    result["hfu"] = train["hardware_flops_per_s"] / ref_peak
    result["flops_formula"] = FLOPS_FORMULA
    result["flops_per_token"] = flops_per_token(cfg.model, cfg.data.seq_len)

    if not args.skip_compile_scan:
        log("compile time at mean_loops 4 vs 64 ...")
        c = {}
        for n in (4, 64):
            lower_s, compile_s, _ = compile_train_step(with_model(cfg, mean_loops=n))
            c[f"train_lower_s_{n}"], c[f"train_compile_s_{n}"] = lower_s, compile_s
            c[f"forward_static_compile_s_{n}"], _ = compile_forward(trainer, n)
        c["train_ratio_64_over_4"] = c["train_compile_s_64"] / c["train_compile_s_4"]
        c["forward_static_ratio_64_over_4"] = c["forward_static_compile_s_64"] / c["forward_static_compile_s_4"]
        result["compile_s"] = c

    if not args.skip_memory:
        log("compiled temp memory at 8 vs 64 loops ...")
        k = cfg.model.grad_steps
        mem = {"grad_steps": k}
        for n in (8, 64):
            mem[f"train_step_temp_bytes_mean_loops_{n}"] = compile_train_step(with_model(cfg, mean_loops=n))[2]
            mem[f"static_loss_grad_temp_bytes_{n}"] = static_loss_grad_temp_bytes(trainer, n)
        mem["train_step_ratio_64_over_8"] = (
            mem["train_step_temp_bytes_mean_loops_64"] / mem["train_step_temp_bytes_mean_loops_8"]
        )
        mem["static_ratio_64_over_8"] = mem["static_loss_grad_temp_bytes_64"] / mem["static_loss_grad_temp_bytes_8"]
        # Contrast: full backprop through all r loops (grad_steps = r) grows with r.
        from looped_jax.train.trainer import Trainer

        for n in (8, 64):
            full = Trainer(with_model(cfg, grad_steps=n), log=False)
            mem[f"full_backprop_static_loss_grad_temp_bytes_{n}"] = static_loss_grad_temp_bytes(full, n)
        mem["full_backprop_static_ratio_64_over_8"] = (
            mem["full_backprop_static_loss_grad_temp_bytes_64"] / mem["full_backprop_static_loss_grad_temp_bytes_8"]
        )
        result["memory"] = mem

    if not args.skip_profile:
        log("profile ...")
        result["profile"] = profile(trainer, batch, ref_peak)
    return result


def _mb(n: int) -> str:
    """Bytes as the README writes them: 668 MB, 1.72 GB (powers of 10)."""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def results_table(result: dict):
    """The README's measure / value table from ``run``'s result (rows for the parts that were measured)."""
    from looped_jax.results import Table

    peak = result["peak_used_for_mfu"]
    rows = [
        ["tokens/s", f"{result['tokens_per_s']:.0f}"],
        [
            f"MFU against the {'f32' if peak['dtype'] == 'float32' else 'bf16'} matmul peak measured in the same run "
            f"({peak['flops_per_s'] / 1e9:.0f} GFLOP/s)",
            f"{result['mfu']:.2f} (HFU {result['hfu']:.2f})",
        ],
    ]
    c = result.get("compile_s")
    if c:
        rows.append(
            [
                "train-step compile time, mean_loops 4 vs 64",
                f"{c['train_compile_s_4']:.2f} s vs {c['train_compile_s_64']:.2f} s "
                f"(ratio {c['train_ratio_64_over_4']:.2f})",
            ]
        )
        rows.append(
            [
                "forward compile time, static 4 vs 64 loops (scan)",
                f"{c['forward_static_compile_s_4']:.2f} s vs {c['forward_static_compile_s_64']:.2f} s "
                f"(ratio {c['forward_static_ratio_64_over_4']:.2f})",
            ]
        )
    m = result.get("memory")
    if m:
        k = m["grad_steps"]
        rows.append(
            [
                f"compiled temp memory, mean_loops 8 vs 64, k = {k}",
                f"{_mb(m['train_step_temp_bytes_mean_loops_8'])} vs {_mb(m['train_step_temp_bytes_mean_loops_64'])} "
                f"(ratio {m['train_step_ratio_64_over_8']:.2f})",
            ]
        )
        rows.append(
            [
                "same at a static loop count, truncated vs full backprop",
                f"{_mb(m['static_loss_grad_temp_bytes_8'])} vs {_mb(m['static_loss_grad_temp_bytes_64'])} truncated "
                f"(8 vs 64 loops), {_mb(m['full_backprop_static_loss_grad_temp_bytes_64'])} full at 64 loops",
            ]
        )
    model = result["model"]
    config = os.path.relpath(result["config"], Path(__file__).resolve().parents[1])
    caption = (
        f"{config} on {result['num_devices']} x {result['device_kind']} ({result['backend']}), "
        f"batch {result['global_batch_size']} x {result['seq_len']}, mean_loops {model['mean_loops']}, "
        f"k = {model['grad_steps']}, {model['dtype']}; {result['train']['steps']} timed steps. MB = 10^6 bytes."
    )
    return Table(["measure", "value"], rows, title="Training-step benchmark", caption=caption)


def main(argv: list[str]) -> int:
    result = run(argv)
    from looped_jax.results import write_results

    table = results_table(result)
    out = write_results(result["name"], [table], result)
    log(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Benchmark train steps on the current backend; prints ONE JSON object.

    python scripts/bench_train.py [--config configs/recurrent_depth_512.py] [--steps 10] \
        [--config.model.mean_loops=8] [--quick] [--skip_compile_scan] [--skip_memory] [--skip_profile] \
        [--families transformer,hrm | all] [--families_only] [--family.data.data_dir=...] [--device]

Writes the README tables (tokens/s, MFU, compile times, compiled temp memory; one row per family
with --families) to ``runs/<name>/results.md`` and the whole JSON object to ``results.json``.

Measures, in one run (progress goes to stderr):
  1. the backend's matmul peak (a jitted square matmul, best of several runs after warmup);
  2. train-step throughput of the d 512 recurrent-depth config on real batches (tokens/s, s/step,
     the sampled loop counts r);
  3. MFU: analytic model FLOPs of each step's sampled r over (time x peak);
  4. compile time of the train step at mean_loops 4 vs 64 (r is traced: should be equal), and of
     the forward with a static loop count 4 vs 64 (a scan: should be nearly equal);
  5. compiled temp memory of the train step at mean_loops 8 vs 64, and of the loss' forward +
     backward at a static loop count 8 vs 64 with grad_steps=k (truncated backprop: flat) next
     to grad_steps=r (full backprop: grows with r);
  6. (profile) a breakdown: one core iteration forward, forward + backward, with and without the
     packed-sequence mask, the optimizer update and the host data pipeline, plus a fit of the
     step time against r;
  7. (--families) each named family's CPU config (see FAMILIES) through the real trainer's jitted
     train step: compile time, median step time after warmup, tokens/s, FLOPs per step as XLA's
     ``cost_analysis()`` counts them for the compiled step, and MFU = FLOPs / step time / peak.
     XLA counts the body of a while loop (lax.scan / fori_loop / while_loop) once, not once per
     iteration, so for families that loop the FLOPs and MFU are lower bounds. --family.<section>.<field>
     overrides apply to every family's config (e.g. --family.data.data_dir=/tmp/tfds).

The peak: on CPU, the matmul peak measured in the same run (the higher of a measurement before and
one after the steps, in the model's dtype). With --device (GPU or TPU only; it refuses on CPU) the
peak is the chip's published dense bf16 FLOP/s (PUBLISHED_PEAK_FLOPS, keyed on the device kind)
times the number of chips, or the measured bf16 matmul peak, with a note, for a chip not in the
table. --device is the one command to time the train step the first time an accelerator is lent:

    python scripts/bench_train.py --device --families all --skip_compile_scan --skip_memory
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


class UsageError(ValueError):
    """A bad command line or an unusable machine: ``main`` prints it and exits with status 2."""


# ---------------------------------------------------------------------------------------------
# families and peaks

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# family -> (CPU config file, the model.name it builds)
FAMILIES = {
    "transformer": ("ar_baseline_cpu.py", "looped"),
    "recurrent_depth": ("recurrent_depth_chains.py", "recurrent_depth"),
    "fam": ("fam_passkey_cpu.py", "fam"),
    "titans": ("titans_mag_cpu.py", "titans"),
    "rmt": ("rmt_passkey_cpu.py", "rmt"),
    "hrm": ("hrm_sudoku_cpu.py", "hrm"),
    "trm": ("trm_sudoku_cpu.py", "trm"),
    "ltm": ("ltm_cpu.py", "latent_thought"),
    "gram": ("gram_sudoku_cpu.py", "gram"),
}

# Published peak dense (no 2:4 sparsity) bf16 matmul FLOP/s per chip, matched in order against
# jax.devices()[0].device_kind (case-insensitive regex search). Sources (the NVIDIA figures were
# checked against copies of the datasheets' tables; NVIDIA quotes Hopper/Ampere tensor FLOPS with
# sparsity, "1/2 lower without"):
#   NVIDIA H100 datasheet (https://www.nvidia.com/en-us/data-center/h100/): BF16 Tensor Core
#     1,979 TFLOPS SXM / 1,513 PCIe with sparsity -> 989.4 / 756 dense;
#   NVIDIA H200 datasheet (https://www.nvidia.com/en-us/data-center/h200/): the H100's GH100 die and
#     tensor cores, BF16 1,979 TFLOPS (SXM) with sparsity -> 989 dense;
#   NVIDIA A100 datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf): BF16 Tensor Core
#     312 TFLOPS dense, 624 with sparsity (SXM and PCIe alike);
#   Google Cloud TPU docs, "Peak compute per chip (bf16)": v4 275, v5e 197, v5p 459, v6e 918 TFLOPs
#     (https://cloud.google.com/tpu/docs/v4, .../v5e, .../v5p, .../v6e).
# JAX names TPUs "TPU v4", "TPU v5 lite" (v5e), "TPU v5" (v5p), "TPU v6 lite" (v6e). Left out, for
# want of a checked figure, so they fall back to the measured peak: "TPU v4 lite" (v4i), the H100 and
# H200 NVL boards (lower clocks), GH200, Blackwell and later chips.
PUBLISHED_PEAK_FLOPS = (
    (r"\bh200\b(?!.*\bnvl\b)", "NVIDIA H200", 989e12),
    (r"\bh100\b.*\bpcie\b", "NVIDIA H100 PCIe", 756e12),
    (r"\bh100\b(?!.*\b(pcie|nvl)\b)", "NVIDIA H100 SXM", 989e12),
    (r"\ba100\b", "NVIDIA A100", 312e12),
    (r"^tpu v4$", "TPU v4", 275e12),
    (r"^tpu v5( ?lite|e)$", "TPU v5e", 197e12),
    (r"^tpu v5p?$", "TPU v5p", 459e12),
    (r"^tpu v6( ?lite|e)$", "TPU v6e", 918e12),
)


def published_peak_flops(device_kind: str) -> tuple[str, float] | None:
    """(chip, published dense bf16 FLOP/s per chip) for a JAX device kind; None when the table lacks it."""
    import re

    kind = device_kind.strip().lower()
    for pattern, chip, flops in PUBLISHED_PEAK_FLOPS:
        if re.search(pattern, kind):
            return chip, flops
    return None


def parse_families(spec: str) -> list[str]:
    """``--families`` (a comma list of FAMILIES names, or ``all``) -> family names, in the order given."""
    if not spec:
        return []
    names = list(FAMILIES) if spec.strip() == "all" else [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown or not names:
        raise UsageError(f"unknown families {unknown} in --families={spec!r}; valid: {', '.join(FAMILIES)} (or all)")
    return list(dict.fromkeys(names))  # a name given twice runs once


def require_accelerator() -> str:
    """The backend when it is "gpu" or "tpu"; a UsageError otherwise (``--device`` times accelerators only)."""
    import jax

    backend = jax.default_backend()
    if backend not in ("gpu", "tpu"):
        devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
        raise UsageError(
            f"--device times a train step on a GPU or TPU, but no accelerator is visible: jax.default_backend() "
            f"is {backend!r} (devices: {devices}). Install jax with CUDA or TPU support (pip install -e '.[cuda]' "
            "or '.[tpu]'), check JAX_PLATFORMS, or drop --device to benchmark this backend."
        )
    return backend


def mfu_peak(measured: dict, dtype: str, *, device: bool) -> dict:
    """The peak FLOP/s that MFU divides by, with where it comes from.

    CPU (no --device): the measured matmul peak of ``dtype``, the higher of before/after the steps
    (on a shared machine one measurement can be low and would flatter the MFU). --device: the chip's
    published dense bf16 peak times the chips in use, or the measured bf16 peak (one chip's matmul,
    times the chips) with a note when the device kind is not in PUBLISHED_PEAK_FLOPS.
    """
    import jax

    if not device:
        flops = max(measured[dtype], measured.get(f"{dtype}_after", 0.0))
        return {"source": "measured matmul", "dtype": dtype, "flops_per_s": flops, "rule": "max of before/after"}
    kind, chips = jax.devices()[0].device_kind, jax.device_count()
    found = published_peak_flops(kind)
    if found is not None:
        chip, per_chip = found
        return {
            "source": "published",
            "dtype": "bfloat16",
            "chip": chip,
            "device_kind": kind,
            "chips": chips,
            "per_chip_flops_per_s": per_chip,
            "flops_per_s": per_chip * chips,
            "rule": "published dense bf16 peak per chip x chips",
        }
    per_chip = max(measured["bfloat16"], measured.get("bfloat16_after", 0.0))
    return {
        "source": "measured matmul",
        "dtype": "bfloat16",
        "device_kind": kind,
        "chips": chips,
        "per_chip_flops_per_s": per_chip,
        "flops_per_s": per_chip * chips,
        "rule": "max of before/after, x chips",
        "note": f"device kind {kind!r} is not in PUBLISHED_PEAK_FLOPS: MFU is against the measured bf16 matmul "
        "peak, which is below the chip's real peak (so this MFU is flattered)",
    }


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
# 7. families


def xla_flops(compiled) -> float:
    """FLOPs of one run of a compiled executable, as XLA's cost analysis counts them (per device).

    XLA counts the body of a while loop once, whatever its trip count, so a jitted function that
    loops (lax.scan / fori_loop / while_loop) gets fewer FLOPs than it runs.
    """
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def load_family_config(family: str, overrides: dict):
    """The family's CPU config with ``overrides`` (and checkpointing off); checks the model it builds."""
    from looped_jax.config import apply_overrides, load_config

    filename, model_name = FAMILIES[family]
    cfg = load_config(CONFIGS / filename)
    cfg = apply_overrides(cfg, {"checkpoint.enabled": "false", **overrides})
    if cfg.model.name != model_name:
        raise ValueError(f"family {family!r}: configs/{filename} builds model {cfg.model.name!r}, not {model_name!r}")
    return cfg


def bench_family(family: str, cfg, steps: int, warmup: int) -> dict:
    """Compiles the trainer's jitted train step for ``cfg`` and times it on real batches.

    compile_s is lowering + XLA compile of the step (timed apart from running it); the step time is
    the median of ``steps`` steps after ``warmup`` untimed ones, each waited for with
    ``jax.block_until_ready``. FLOPs per step: XLA's ``cost_analysis()`` of the compiled step (per
    device) x the devices in the mesh. ``run`` adds MFU = FLOPs per step / median step time / peak.
    """
    import jax
    import numpy as np

    from looped_jax.data import prepare
    from looped_jax.train.trainer import Trainer

    _quiet_prepare(cfg.data, prepare)
    trainer = Trainer(cfg, log=False)
    it = trainer.make_train_iterator()
    state = trainer.init_state()
    first = trainer.global_batch(next(it))
    with jax.set_mesh(trainer.mesh):
        t0 = time.perf_counter()
        lowered = trainer.train_step.lower(state, first)
        t1 = time.perf_counter()
        step = lowered.compile()
        lower_s, compile_s = t1 - t0, time.perf_counter() - t1
        per_device = xla_flops(step)
        devices = trainer.mesh.devices.size
        batches = [first] + [trainer.global_batch(next(it)) for _ in range(warmup + steps - 1)]
        jax.block_until_ready(batches)  # host data is laid out before the clock starts
        for batch in batches[:warmup]:
            state, metrics = step(state, batch)
            jax.block_until_ready((state, metrics))
        step_s, loops, loss = [], [], math.nan
        for i, batch in enumerate(batches[warmup:]):
            t0 = time.perf_counter()
            state, metrics = step(state, batch)
            jax.block_until_ready((state, metrics))
            step_s.append(time.perf_counter() - t0)
            loss = float(metrics["loss"])
            if "num_loops" in metrics:
                loops.append(int(jax.device_get(metrics["num_loops"])))
            log(f"{family} step {i + 1}/{steps}: {step_s[-1] * 1e3:.1f} ms loss={loss:.3f}")
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    median = float(np.median(step_s))
    flops = per_device * devices
    out = {
        "config": f"configs/{FAMILIES[family][0]}",
        "model": cfg.model.name,
        "dtype": getattr(cfg.model, "dtype", "float32"),
        "global_batch_size": cfg.train.global_batch_size,
        "seq_len": cfg.data.seq_len,
        "tokens_per_step": tokens,
        "devices": devices,
        "lower_s": lower_s,
        "compile_s": compile_s,
        "compile_total_s": lower_s + compile_s,
        "steps": steps,
        "warmup": warmup,
        "step_s_median": median,
        "step_s_all": [round(x, 5) for x in step_s],
        "tokens_per_s": tokens / median,
        "xla_flops_per_step_per_device": per_device,
        "flops_per_step": flops,
        "flops_source": "XLA cost_analysis() of the compiled train step x devices (loop bodies counted once)",
        "last_loss": loss,
    }
    if cfg.model.name == "recurrent_depth" and loops:
        # The analytic model FLOPs (section 3) of the sampled r, next to XLA's loop-once count.
        analytic = [step_flops(cfg.model, cfg.data.seq_len, tokens, r)[0] for r in loops]
        out["num_loops"] = loops
        out["analytic_model_flops_per_step_mean"] = float(np.mean(analytic))
        out["analytic_model_flops_per_s"] = float(np.sum(analytic) / np.sum(step_s))
    return out


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
    parser.add_argument("--steps", type=int, default=10, help="timed train steps (of each family too)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (the first compiles)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes of the recurrent-depth config (smoke test)")
    parser.add_argument(
        "--matmul_size", type=int, default=0, help="matmul size for the peak (0: 2048, quick 256, --device 8192)"
    )
    parser.add_argument("--skip_compile_scan", action="store_true", help="skip compile times at 4 vs 64 loops")
    parser.add_argument("--skip_memory", action="store_true", help="skip the compiled temp memory comparison")
    parser.add_argument("--skip_profile", action="store_true", help="skip the per-piece timing breakdown")
    parser.add_argument(
        "--families",
        default="",
        help=f"comma list of families whose CPU config to time too, or 'all': {', '.join(FAMILIES)}",
    )
    parser.add_argument(
        "--families_only", action="store_true", help="time only the --families (skip the recurrent-depth bench)"
    )
    parser.add_argument(
        "--device",
        action="store_true",
        help="time on the GPU/TPU (refuses without one); MFU against the chip's published bf16 peak",
    )
    parser.add_argument("--name", default="bench_train", help="the tables go to runs/<name>/results.md")
    args, rest = parser.parse_known_args(argv)
    families = parse_families(args.families)  # a bad name fails before any work
    if args.families_only and not families:
        raise UsageError("--families_only needs --families (a comma list, or all)")

    import jax

    if args.device:
        require_accelerator()

    from looped_jax.config import apply_overrides, load_config, parse_override_groups

    groups = parse_override_groups(rest, ("config", "family"))  # --config.section.field=value, --family....
    overrides, family_overrides = groups["config"], groups["family"]
    family_cfgs = {f: load_family_config(f, family_overrides) for f in families}  # bad overrides fail early
    path = args.config
    result: dict = {
        "name": args.name,
        "device_mode": args.device,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "num_devices": jax.device_count(),
    }
    cfg = None
    if not args.families_only:
        cfg = load_config(path)
        if args.quick:
            cfg = quick_overrides(cfg)
        overrides.setdefault("checkpoint.enabled", "false")
        cfg = apply_overrides(cfg, overrides)
        if cfg.model.name != "recurrent_depth":
            raise ValueError(f"bench_train measures recurrent-depth configs, got model.name={cfg.model.name!r}")
        result.update(
            config=path,
            overrides=overrides,
            quick=args.quick,
            model=dataclasses.asdict(cfg.model),
            seq_len=cfg.data.seq_len,
            global_batch_size=cfg.train.global_batch_size,
        )
    size = args.matmul_size or (256 if args.quick else 8192 if args.device else 2048)
    log(f"matmul peak ({size}^3) ...")
    peak = {"size": size, "float32": matmul_peak_flops(size, "float32")}
    peak["bfloat16"] = matmul_peak_flops(size, "bfloat16")
    if cfg is not None:
        log(f"train steps ({args.steps} timed) ...")
        train, trainer, batch = bench_train(cfg, args.steps, args.warmup)
    family_results = {}
    for family, family_cfg in family_cfgs.items():
        log(f"family {family} ({FAMILIES[family][0]}): compile + {args.warmup} warmup + {args.steps} timed steps ...")
        family_results[family] = bench_family(family, family_cfg, args.steps, args.warmup)
    # Measured again after the steps; the higher (conservative) value is the peak: on a shared
    # machine a single measurement can be low and would flatter the MFU.
    peak["float32_after"] = matmul_peak_flops(size, "float32")
    peak["bfloat16_after"] = matmul_peak_flops(size, "bfloat16")
    result["matmul_peak_flops"] = peak
    if family_results:
        for out in family_results.values():
            fam_peak = mfu_peak(peak, "bfloat16" if out["dtype"] == "bfloat16" else "float32", device=args.device)
            out["peak_used_for_mfu"] = fam_peak
            out["mfu"] = out["flops_per_step"] / out["step_s_median"] / fam_peak["flops_per_s"]
            if "analytic_model_flops_per_s" in out:
                out["analytic_mfu"] = out["analytic_model_flops_per_s"] / fam_peak["flops_per_s"]
        result["families"] = family_results
        result["families_flops_note"] = (
            "flops_per_step is XLA's count: cost_analysis() of the compiled train step (per device) x devices. "
            "XLA counts a while loop's body (lax.scan / fori_loop / while_loop) once, not per iteration, so for "
            "families that loop it is a lower bound, and so is their MFU."
        )
    if cfg is None:
        return result
    dtype = "bfloat16" if cfg.model.dtype == "bfloat16" else "float32"
    peak_info = mfu_peak(peak, dtype, device=args.device)
    ref_peak = peak_info["flops_per_s"]
    result["peak_used_for_mfu"] = peak_info
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
        [f"MFU against {peak_phrase(peak)}", f"{result['mfu']:.2f} (HFU {result['hfu']:.2f})"],
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


def peak_phrase(peak: dict) -> str:
    """How a table names the peak MFU divides by: measured in the run, or the chip's published one."""
    value = peak["flops_per_s"]
    amount = f"{value / 1e12:.0f} TFLOP/s" if value >= 1e13 else f"{value / 1e9:.0f} GFLOP/s"
    dtype = "f32" if peak["dtype"] == "float32" else "bf16"
    if peak["source"] == "published":
        return f"the published dense bf16 peak of {peak['chips']} x {peak['chip']} ({amount})"
    chips = f"{peak['chips']} x " if peak.get("chips", 1) > 1 else ""
    return f"the {dtype} matmul peak measured in the same run ({chips}{amount})"


def families_table(result: dict):
    """One row per family: compile time, median step time, tokens/s, XLA FLOPs per step and MFU."""
    from looped_jax.results import Table

    rows = []
    for family, f in result["families"].items():
        p = f["peak_used_for_mfu"]
        rows.append(
            [
                family,
                f"`{f['config']}`",
                f"{f['global_batch_size']} x {f['seq_len']}",
                f"{f['compile_total_s']:.1f}",
                f"{f['step_s_median'] * 1e3:.1f}",
                f"{f['tokens_per_s']:.0f}",
                f"{f['flops_per_step'] / 1e9:.3f}",
                f"{f['mfu']:.3f}",
                f"{'f32' if p['dtype'] == 'float32' else 'bf16'} {p['flops_per_s'] / 1e9:.0f}",
            ]
        )
    steps = {(f["steps"], f["warmup"]) for f in result["families"].values()}
    steps_text = ", ".join(f"{n} timed steps after {w} warmup" for n, w in sorted(steps))
    sources = {f["peak_used_for_mfu"]["source"] for f in result["families"].values()}
    peak_text = (
        "the chip's published dense bf16 peak (x chips)"
        if sources == {"published"}
        else "the matmul peak measured in the same run in the model's dtype (higher of before / after the steps)"
    )
    caption = (
        f"Each family's CPU config through the trainer's jitted train step on {result['num_devices']} x "
        f"{result['device_kind']} ({result['backend']}); {steps_text}. Compile = lowering + XLA compile of the "
        "step; step time = median (waited with jax.block_until_ready); tokens/s = batch x seq_len / median "
        "step time (padding included). FLOPs per step are XLA's count (cost_analysis() of the compiled step, "
        "per device x devices), which counts a while loop's body (scan / fori_loop / while_loop) once, not per "
        f"iteration: for families that loop, FLOPs and MFU are lower bounds. MFU = FLOPs / step time / {peak_text}."
    )
    analytic = [(n, f["analytic_mfu"]) for n, f in result["families"].items() if "analytic_mfu" in f]
    if analytic:
        caption += " Against the analytic model FLOPs of its sampled loop counts (FLOPS_FORMULA), MFU is " + (
            ", ".join(f"{mfu:.3f} for {n}" for n, mfu in analytic) + "."
        )
    header = ["family", "config", "batch x seq", "compile s", "step ms", "tokens/s", "GFLOP/step (XLA)", "MFU"]
    return Table(header + ["peak GFLOP/s"], rows, title="Train step per family", caption=caption)


def main(argv: list[str]) -> int:
    try:
        result = run(argv)
    except UsageError as e:
        print(f"bench_train.py: error: {e}", file=sys.stderr)
        return 2
    from looped_jax.results import write_results

    tables = ([results_table(result)] if "train" in result else []) + (
        [families_table(result)] if "families" in result else []
    )
    out = write_results(result["name"], tables, result)
    log(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Times TransformerFAM feedback attention: the Pallas kernel vs the XLA reference, forward and forward+backward.

    python scripts/bench_feedback_attention.py                      # TPU/GPU: 4k..64k, kernel and reference
    JAX_PLATFORMS=cpu python scripts/bench_feedback_attention.py    # CPU: the reference only, short lengths

Prints one JSON object per (impl, mode, seq_len) with the median time, tokens/s, attention TFLOP/s (useful FLOPs of
the visible scores only) and the compiled memory (``memory_analysis``) where the backend reports it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pallas_kernels.feedback_attention import feedback_attention  # noqa: E402

ACCEL_LENGTHS = "4096,8192,16384,32768,65536"
CPU_LENGTHS = "1024,2048"


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default=None, help=f"comma-separated T (default {ACCEL_LENGTHS}; CPU {CPU_LENGTHS})")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv_heads", type=int, default=8)
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--block_size", type=int, default=1024)
    p.add_argument("--memory_segments", type=int, default=3)
    p.add_argument("--fam", type=int, default=64, help="FAM length F")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--block_q", type=int, default=None)
    p.add_argument("--block_k", type=int, default=None)
    p.add_argument("--impls", default=None, help="comma-separated of pallas,xla (default: both on TPU/GPU, xla on CPU)")
    p.add_argument("--modes", default="fwd,fwd_bwd")
    p.add_argument("--iters", type=int, default=None, help="timed runs (default 10 on TPU/GPU, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=1)
    return p.parse_args(argv)


def useful_flops(a: argparse.Namespace, T: int) -> float:
    """2 matmuls x 2 FLOPs per visible (query, key) pair per head dim: local keys in the window plus F FAM keys."""
    S, M = a.block_size, a.memory_segments
    pairs = 0
    for t in range(0, T, S):  # per block: causal own block + full earlier blocks + FAM
        n_q = min(S, T - t)
        pairs += n_q * (n_q + 1) // 2 + n_q * (min(M * S, t) + a.fam)
    return 4.0 * a.batch * a.heads * a.head_dim * pairs


def memory_stats(compiled) -> dict:
    try:
        m = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        return {}
    if m is None:
        return {}
    return {
        "argument_mib": m.argument_size_in_bytes / 2**20,
        "output_mib": m.output_size_in_bytes / 2**20,
        "temp_mib": m.temp_size_in_bytes / 2**20,
    }


def bench_one(a: argparse.Namespace, impl: str, mode: str, T: int) -> dict:
    dtype = jnp.dtype(a.dtype)
    N = math.ceil(T / a.block_size)
    B, H, G, K, F = a.batch, a.heads, a.kv_heads, a.head_dim, a.fam
    shapes = [(B, T, H, K), (B, T, G, K), (B, T, G, K), (B, N, F, G, K), (B, N, F, G, K)]
    keys = jax.random.split(jax.random.key(0), 5)
    args = [jax.random.normal(k, s, jnp.float32).astype(dtype) for k, s in zip(keys, shapes, strict=True)]
    kw = dict(block_size=a.block_size, memory_segments=a.memory_segments, impl=impl)
    if impl == "pallas":
        kw.update(block_q=a.block_q, block_k=a.block_k, interpret=False)
    fwd = lambda *x: feedback_attention(*x, **kw)
    if mode == "fwd":
        fn = fwd
    else:
        fn = jax.grad(lambda *x: fwd(*x).astype(jnp.float32).sum(), argnums=(0, 1, 2, 3, 4))
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(a.warmup):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(a.iters):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    sec = sorted(times)[len(times) // 2]
    flops = useful_flops(a, T) * (1 if mode == "fwd" else 2.5)  # bwd: 5 matmuls vs 2 (recompute of s included)
    return {
        "impl": impl,
        "mode": mode,
        "seq_len": T,
        "batch": B,
        "heads": H,
        "kv_heads": G,
        "head_dim": K,
        "block_size": a.block_size,
        "memory_segments": a.memory_segments,
        "fam": F,
        "dtype": a.dtype,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "median_ms": sec * 1e3,
        "min_ms": min(times) * 1e3,
        "tokens_per_s": B * T / sec,
        "useful_tflops_per_s": flops / sec / 1e12,
        "compile_s": compile_s,
        **memory_stats(compiled),
    }


def main(argv=None) -> list[dict]:
    a = parse(argv)
    accel = jax.default_backend() in ("tpu", "gpu")
    lengths = [int(x) for x in (a.lengths or (ACCEL_LENGTHS if accel else CPU_LENGTHS)).split(",")]
    impls = (a.impls or ("pallas,xla" if accel else "xla")).split(",")
    a.iters = a.iters or (10 if accel else 3)
    if not accel and "pallas" in impls:
        raise SystemExit("--impls=pallas needs a TPU or GPU backend (on CPU only the XLA reference is timed)")
    results = []
    for T in lengths:
        for mode in a.modes.split(","):
            for impl in impls:
                try:
                    r = bench_one(a, impl, mode, T)
                except Exception as e:  # e.g. the dense reference running out of memory at 64k
                    r = {"impl": impl, "mode": mode, "seq_len": T, "error": f"{type(e).__name__}: {str(e)[:300]}"}
                print(json.dumps(r), flush=True)
                results.append(r)
    return results


if __name__ == "__main__":
    main()

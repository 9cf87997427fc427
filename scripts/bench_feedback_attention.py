"""Times TransformerFAM feedback attention: the Pallas kernel vs the XLA reference, forward and forward+backward.

    python scripts/bench_feedback_attention.py                      # TPU/GPU: 4k, 32k, 128k; kernel and reference
    JAX_PLATFORMS=cpu python scripts/bench_feedback_attention.py    # CPU: the reference only, short lengths
    JAX_PLATFORMS=cpu python scripts/bench_feedback_attention.py --lengths 512 --heads 2 --kv_heads 2 \
        --head_dim 64 --block_size 128 --memory_segments 1        # CPU smoke test of the same command (seconds)

Prints one JSON object per (impl, mode, seq_len) with the median time, tokens/s, attention TFLOP/s (useful FLOPs of
the visible scores only) and the compiled memory (``memory_analysis``: argument / output / temp MiB) where the
backend reports it (GPU and TPU do); a case that fails (the dense reference out of memory at 128k) is a JSON line
with its error. On a GPU, ``--impls pallas`` runs the Mosaic-GPU kernels forward and backward (``which_impl`` in
the record says so), or stops with the property they do not support.

With ``--aot_topology`` nothing runs: each case is compiled ahead of time for one chip of a TPU topology (needs
libtpu, the ``tpu`` extra; works on a CPU-only machine) and the compiled temp memory per chip is tabled, a case
that does not fit reported with the memory the compiler asked for. This writes the README's kernel-memory table:

    python scripts/bench_feedback_attention.py --aot_topology v5e:2x2 --lengths 8192,65536

Timed or AOT, the table goes to ``runs/<name>/results.md`` and every record to ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from looped_jax.results import MIB, Table, temp_bytes, write_results  # noqa: E402
from pallas_kernels.feedback_attention import feedback_attention, which_impl  # noqa: E402

ACCEL_LENGTHS = "4096,32768,131072"
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
    p.add_argument("--aot_topology", default="", help="e.g. v5e:2x2: AOT-compile for one chip of it, run nothing")
    p.add_argument("--name", default="", help="results go to runs/<name>/ (default bench_feedback_attention[_aot])")
    a = p.parse_args(argv)
    a.name = a.name or ("bench_feedback_attention_aot" if a.aot_topology else "bench_feedback_attention")
    return a


def useful_flops(a: argparse.Namespace, T: int) -> float:
    """2 matmuls x 2 FLOPs per visible (query, key) pair per head dim: local keys in the window plus F FAM keys."""
    S, M = a.block_size, a.memory_segments
    pairs = 0
    for t in range(0, T, S):  # per block: causal own block + full earlier blocks + FAM
        n_q = min(S, T - t)
        pairs += n_q * (n_q + 1) // 2 + n_q * (min(M * S, t) + a.fam)
    return 4.0 * a.batch * a.heads * a.head_dim * pairs


def memory_stats(compiled) -> dict:
    """Argument, output and temp memory (MiB) where the backend reports them."""
    temp = temp_bytes(compiled)
    if temp is None:
        return {}
    m = compiled.memory_analysis()
    return {
        "argument_mib": m.argument_size_in_bytes / MIB,
        "output_mib": m.output_size_in_bytes / MIB,
        "temp_mib": temp / MIB,
    }


def input_shapes(a: argparse.Namespace, T: int) -> list[tuple[int, ...]]:
    """q_BTHK, k_BTGK, v_BTGK, famk_BNFGK, famv_BNFGK."""
    N = math.ceil(T / a.block_size)
    B, H, G, K, F = a.batch, a.heads, a.kv_heads, a.head_dim, a.fam
    return [(B, T, H, K), (B, T, G, K), (B, T, G, K), (B, N, F, G, K), (B, N, F, G, K)]


def bench_fn(a: argparse.Namespace, impl: str, mode: str, platform: str | None = None):
    """The forward (mode fwd) or the gradient w.r.t. every input (fwd_bwd) of one implementation, lowered for
    ``platform`` (default: this host's backend; "tpu" for the AOT compiles on a CPU host)."""
    kw = dict(block_size=a.block_size, memory_segments=a.memory_segments, impl=impl, platform=platform)
    if impl == "pallas":
        kw.update(block_q=a.block_q, block_k=a.block_k, interpret=False)
    fwd = lambda *x: feedback_attention(*x, **kw)  # noqa: E731
    if mode == "fwd":
        return fwd
    return jax.grad(lambda *x: fwd(*x).astype(jnp.float32).sum(), argnums=(0, 1, 2, 3, 4))


# XLA:TPU's out-of-memory messages ("... temporaries (19.32G) exceeds available HBM (15.75G)" or "Used 17.40G of
# 15.75G hbm"); sizes are binary (G = GiB).
_OOM_RES = (
    re.compile(r"\(([0-9.]+)([KMGT])\) exceeds available \w+ \(([0-9.]+)([KMGT])\)"),
    re.compile(r"[Uu]sed ([0-9.]+)([KMGT])i?B? of ([0-9.]+)([KMGT])i?B?"),
)


def aot_one(a: argparse.Namespace, impl: str, mode: str, T: int, device) -> dict:
    """Compiles one case for ``device`` (a TPU topology device) and reports its temp memory, or how much it needed."""
    sharding = jax.sharding.SingleDeviceSharding(device)
    dtype = jnp.dtype(a.dtype)
    structs = [jax.ShapeDtypeStruct(s, dtype, sharding=sharding) for s in input_shapes(a, T)]
    record = {"impl": impl, "mode": mode, "seq_len": T, "dtype": a.dtype, "device_kind": device.device_kind}
    t0 = time.perf_counter()
    try:
        compiled = jax.jit(bench_fn(a, impl, mode, platform="tpu")).lower(*structs).compile()
    except Exception as e:  # the compiler refuses a program that does not fit the chip's memory
        match = next((m for m in (r.search(str(e)) for r in _OOM_RES) if m), None)
        if match is None:
            raise
        scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
        record["needed_bytes"] = float(match.group(1)) * scale[match.group(2)]
        record["available_bytes"] = float(match.group(3)) * scale[match.group(4)]
        record["error"] = str(e).splitlines()[0][:300]
        return record
    record["compile_s"] = time.perf_counter() - t0
    record["temp_bytes"] = temp_bytes(compiled)
    return record


def memory_table(records: list[dict], a: argparse.Namespace, topology: str) -> Table:
    """Rows: tokens; columns: Pallas / XLA x forward / fwd+bwd compiled temp memory per chip."""
    cols = [(i, m) for i in ("pallas", "xla") for m in ("fwd", "fwd_bwd")]
    names = {"pallas": "Pallas", "xla": "XLA", "fwd": "forward", "fwd_bwd": "fwd+bwd"}
    by_key = {(r["impl"], r["mode"], r["seq_len"]): r for r in records}
    rows = []
    for T in sorted({r["seq_len"] for r in records}):
        cells = [f"{T:,}"]
        for impl, mode in cols:
            r = by_key.get((impl, mode, T))
            if r is None:
                cells.append("")
            elif "needed_bytes" in r:
                cells.append(f"does not fit ({r['needed_bytes'] / 2**30:.1f} GiB)")
            else:
                cells.append("n/a" if r["temp_bytes"] is None else f"{r['temp_bytes'] / MIB:,.0f} MiB")
        rows.append(cells)
    caption = (
        f"{topology} AOT (one chip), {a.dtype}, {a.heads} heads x {a.head_dim} ({a.kv_heads} kv heads), block "
        f"{a.block_size}, {a.memory_segments} memory segments, {a.fam} FAM vectors, batch {a.batch}: compiled temp "
        "memory per chip."
    )
    header = ["tokens"] + [f"{names[i]} {names[m]}" for i, m in cols]
    return Table(header, rows, title="Feedback attention compiled memory", caption=caption)


def time_table(records: list[dict]) -> Table:
    rows = [
        [
            r["impl"],
            r["mode"],
            f"{r['seq_len']:,}",
            r.get("error", "")[:60] or f"{r['median_ms']:.2f}",
            "" if "error" in r else f"{r['tokens_per_s']:,.0f}",
        ]
        for r in records
    ]
    return Table(["impl", "mode", "tokens", "median ms", "tokens/s"], rows, title="Feedback attention timings")


def bench_one(a: argparse.Namespace, impl: str, mode: str, T: int) -> dict:
    dtype = jnp.dtype(a.dtype)
    B, H, G, K, F = a.batch, a.heads, a.kv_heads, a.head_dim, a.fam
    keys = jax.random.split(jax.random.key(0), 5)
    args = [jax.random.normal(k, s, jnp.float32).astype(dtype) for k, s in zip(keys, input_shapes(a, T), strict=True)]
    fn = bench_fn(a, impl, mode)
    kw = dict(block_size=a.block_size, memory_segments=a.memory_segments, impl=impl)
    if impl == "pallas":
        kw.update(block_q=a.block_q, block_k=a.block_k, interpret=False)
    choice = which_impl(*args, **kw)  # raises, naming the property, where impl="pallas" has no kernel
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
        "kernel": choice.impl,
        "kernel_backward": choice.backward if mode == "fwd_bwd" else None,
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
    if a.aot_topology:
        return main_aot(a)
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
    tables = [time_table(results)]
    if any("temp_mib" in r for r in results):
        recs = [dict(r, temp_bytes=r["temp_mib"] * MIB) for r in results if "temp_mib" in r]
        tables.append(memory_table(recs, a, jax.devices()[0].device_kind))
    write_results(a.name, tables, results)
    return results


def main_aot(a: argparse.Namespace) -> list[dict]:
    """Compiles every (length, mode, impl) for one chip of ``a.aot_topology``; tables the temp memory."""
    from looped_jax.aot import topology_devices

    device = topology_devices(a.aot_topology)[0]
    lengths = [int(x) for x in (a.lengths or "8192,65536").split(",")]
    impls = (a.impls or "pallas,xla").split(",")
    records = []
    for T in lengths:
        for mode in a.modes.split(","):
            for impl in impls:
                r = aot_one(a, impl, mode, T, device)
                print(json.dumps(r), flush=True)
                records.append(r)
    table = memory_table(records, a, a.aot_topology)
    out = write_results(a.name, [table], records)
    print("\n" + table.markdown() + f"\n\nwrote {out / 'results.md'}", flush=True)
    return records


if __name__ == "__main__":
    main()

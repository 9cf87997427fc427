"""Benchmark the Titans memory update: Pallas kernel vs chunked XLA vs token-by-token scan; prints JSON lines.

    python scripts/bench_memory_update.py [--lengths 4096,32768,131072] [--memory linear|mlp] [--grad]

One line per (implementation, length): forward time (median of --repeats after a warmup run), compile time,
tokens/s and the compiled memory (``memory_analysis`` temp MiB, where the backend reports it: GPU and TPU do); with
--grad also forward+backward. A case that fails (e.g. out of memory) is a JSON line with its error. On a GPU or TPU
one command measures kernel vs XLA time and memory at 4k / 32k / 128k tokens:

    python scripts/bench_memory_update.py --grad

and on a CPU the same code path runs in seconds with ``--lengths 256,512`` (the kernel is not timed on CPU).
Implementations: "kernel" (ops impl="pallas", only on TPU/GPU), "chunked" (ops impl="xla") and "scan"
(reference.memory_update_reference: the same chunk-start-gradient recurrence written token by token; skipped above
--max_scan_length). The last line compares chunked and scan outputs.
On CPU the default lengths are short so the run ends in about a minute. The table (rows: length; columns: forward
and forward+backward ms per implementation) goes to ``runs/<name>/results.md``, the JSON lines to ``results.json``:

    python scripts/bench_memory_update.py --grad          # the README's CPU numbers (1k and 4k tokens)

With ``--aot_topology`` nothing runs: the kernel (impl="pallas") and chunked XLA (impl="xla"), forward and
forward+backward, are compiled ahead of time for one chip of a TPU topology (needs libtpu; works on a CPU-only
host, ``ALLOW_MULTIPLE_LIBTPU_LOAD=1 TPU_SKIP_MDS_QUERY=1``) and the compiled temp memory per chip is tabled in
``runs/<name>/results.md`` (default name ``bench_memory_update_aot``):

    python scripts/bench_memory_update.py --aot_topology v5e:2x2 --lengths 32768 --heads 16 --memory mlp \
        --dtype bfloat16 --max_surprise_norm 1.0
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from looped_jax.results import MIB, Table, temp_bytes, write_results  # noqa: E402
from pallas_kernels.memory_update import (  # noqa: E402
    MemoryState,
    memory_update,
    memory_update_reference,
    which_impl,
)


def make_inputs(B, H, T, K, V, memory, hidden, seed=0):
    rng = np.random.default_rng(seed)
    normal = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32))
    sig = lambda x: 1.0 / (1.0 + jnp.exp(-x))
    q, k, v = normal(B, H, T, K), normal(B, H, T, K) / np.sqrt(K), normal(B, H, T, V)
    alpha, eta = 0.01 * sig(normal(B, H, T)), 0.9 * sig(normal(B, H, T) + 2)
    theta = 1e-3 * sig(normal(B, H, T))
    dims = [K, V] if memory == "linear" else [K, hidden, V]
    ws = tuple(normal(B, H, a, b) / np.sqrt(a) for a, b in zip(dims[:-1], dims[1:], strict=True))
    return q, k, v, alpha, eta, theta, MemoryState(ws, tuple(jnp.zeros_like(w) for w in ws))


def timed(fn, args, repeats):
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))  # warmup
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), compile_s, compiled


def main(argv=None) -> None:
    on_accel = jax.default_backend() in ("tpu", "gpu", "cuda")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_lengths = "4096,32768,131072" if on_accel else "1024,4096"
    p.add_argument("--lengths", default=default_lengths, help="comma-separated sequence lengths")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4 if on_accel else 2)
    p.add_argument("--d_k", type=int, default=64)
    p.add_argument("--d_v", type=int, default=64)
    p.add_argument("--chunk_size", type=int, default=64)
    p.add_argument("--memory", choices=("linear", "mlp"), default="linear")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--impls", default="kernel,chunked,scan" if on_accel else "chunked,scan")
    p.add_argument("--max_scan_length", type=int, default=16384 if on_accel else 4096)
    p.add_argument("--repeats", type=int, default=5 if on_accel else 2)
    p.add_argument("--grad", action="store_true", help="also time forward+backward")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="q/k/v dtype (AOT mode)")
    p.add_argument("--max_surprise_norm", type=float, default=None, help="per-chunk surprise clip (AOT mode)")
    p.add_argument("--modes", default="fwd,fwd_bwd", help="AOT mode: fwd and/or fwd_bwd")
    p.add_argument("--aot_impls", default="pallas,xla", help="AOT mode: pallas and/or xla")
    p.add_argument("--aot_topology", default="", help="e.g. v5e:2x2: AOT-compile for one chip of it, run nothing")
    p.add_argument("--name", default="", help="results go to runs/<name>/ (default bench_memory_update[_aot])")
    args = p.parse_args(argv)
    args.name = args.name or ("bench_memory_update_aot" if args.aot_topology else "bench_memory_update")
    if args.aot_topology:
        main_aot(args)
        return

    impls = args.impls.split(",")
    if "kernel" in impls and not on_accel:
        print("# kernel skipped: no TPU/GPU (interpret mode is not a speed measurement)", file=sys.stderr)
        impls.remove("kernel")
    fns = {
        "kernel": functools.partial(memory_update, chunk_size=args.chunk_size, memory=args.memory, impl="pallas"),
        "chunked": functools.partial(memory_update, chunk_size=args.chunk_size, memory=args.memory, impl="xla"),
        "scan": functools.partial(memory_update_reference, chunk_size=args.chunk_size, memory=args.memory),
    }
    device = jax.devices()[0].device_kind
    records = []
    for T in (int(t) for t in args.lengths.split(",")):
        inputs = make_inputs(args.batch, args.heads, T, args.d_k, args.d_v, args.memory, args.hidden)
        outs = {}
        for name in impls:
            if name == "scan" and T > args.max_scan_length:
                continue
            row = {"impl": name, "T": T}
            try:
                row.update(bench_one(fns[name], name, inputs, T, args, device))
                outs[name] = row.pop("_y")
            except Exception as e:  # e.g. out of memory at 128k, or impl="pallas" without a kernel for these sizes
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            print(json.dumps(row), flush=True)
            records.append(row)
        base = outs.get("scan")
        for name, y in outs.items():
            if name != "scan" and base is not None:
                err = float(jnp.max(jnp.abs(y.astype(jnp.float32) - base)))
                check = {"check": f"max|{name} - scan|", "T": T, "value": err}
                print(json.dumps(check), flush=True)
                records.append(check)
    table = results_table(records, impls, args, device)
    out = write_results(args.name, [table], records)
    print("\n" + table.markdown() + f"\n\nwrote {out / 'results.md'}", file=sys.stderr, flush=True)


def bench_one(fn, name: str, inputs, T: int, args, device: str) -> dict:
    """Times (and measures the compiled memory of) one implementation's forward, and with --grad its gradient."""
    choice = None
    if name != "scan":
        choice = which_impl(*inputs, chunk_size=args.chunk_size, memory=args.memory, impl=fn.keywords["impl"])
    sec, compile_s, compiled = timed(fn, inputs, args.repeats)
    row = {
        "kernel": None if choice is None else choice.impl,
        "B": args.batch,
        "H": args.heads,
        "d_k": args.d_k,
        "d_v": args.d_v,
        "chunk_size": args.chunk_size,
        "memory": args.memory,
        "device": device,
        "fwd_ms": round(sec * 1e3, 3),
        "compile_s": round(compile_s, 2),
        "fwd_tokens_per_s": round(args.batch * args.heads * T / sec),
        "fwd_temp_mib": mib(temp_bytes(compiled)),
        "_y": compiled(*inputs)[0],
    }
    if args.grad:
        loss = lambda *a: jnp.sum(fn(*a)[0].astype(jnp.float32))  # noqa: E731
        gsec, gcompile, gcompiled = timed(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5)), inputs, args.repeats)
        row.update(fwd_bwd_ms=round(gsec * 1e3, 3), fwd_bwd_compile_s=round(gcompile, 2))
        row.update(fwd_bwd_temp_mib=mib(temp_bytes(gcompiled)))
        if choice is not None:
            row["kernel_backward"] = choice.backward
    return row


def mib(n: int | None) -> float | None:
    return None if n is None else round(n / MIB, 2)


def results_table(records: list[dict], impls: list[str], args, device: str) -> Table:
    """Rows: sequence length; columns: forward (and forward+backward) milliseconds of each implementation."""
    timed = {(r["impl"], r["T"]): r for r in records if "impl" in r and "error" not in r}
    modes = [("fwd_ms", "forward")] + ([("fwd_bwd_ms", "fwd+bwd")] if args.grad else [])
    header = ["tokens"] + [f"{impl} {label} (ms)" for key, label in modes for impl in impls]
    rows = []
    for T in sorted({r["T"] for r in records if "impl" in r}):
        cells = [f"{T:,}"]
        for key, _ in modes:
            for impl in impls:
                r = timed.get((impl, T))
                cells.append("" if r is None else f"{r[key]:.1f}")
        rows.append(cells)
    caption = (
        f"{device}, B={args.batch}, H={args.heads}, d_k={args.d_k}, d_v={args.d_v}, chunk {args.chunk_size}, "
        f"{args.memory} memory; median of {args.repeats} runs after a warmup."
    )
    return Table(header, rows, title="Titans memory update timings", caption=caption)


def aot_structs(args, T: int, device) -> tuple:
    """Abstract inputs (q/k/v in ``args.dtype``, gates and state float32) placed on one topology device."""
    sharding = jax.sharding.SingleDeviceSharding(device)
    sds = lambda s, dt=jnp.float32: jax.ShapeDtypeStruct(s, dt, sharding=sharding)  # noqa: E731
    B, H, K, V, dt = args.batch, args.heads, args.d_k, args.d_v, jnp.dtype(args.dtype)
    dims = [K, V] if args.memory == "linear" else [K, args.hidden, V]
    ws = tuple(sds((B, H, a, b)) for a, b in zip(dims[:-1], dims[1:], strict=True))
    gate = sds((B, H, T))
    return (sds((B, H, T, K), dt), sds((B, H, T, K), dt), sds((B, H, T, V), dt), gate, gate, gate, MemoryState(ws, ws))


def aot_one(args, impl: str, mode: str, T: int, device) -> dict:
    """Compiles one case for a TPU topology device; its temp memory, or the memory the compiler asked for."""
    fn = functools.partial(
        memory_update, chunk_size=args.chunk_size, memory=args.memory, impl=impl, platform="tpu",
        max_surprise_norm=args.max_surprise_norm, **({"interpret": False} if impl == "pallas" else {}),
    )  # fmt: skip
    if mode == "fwd_bwd":
        loss = lambda *a, fwd=fn: jnp.sum(fwd(*a)[0].astype(jnp.float32))  # noqa: E731
        fn = jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5, 6))
    record = {"impl": impl, "mode": mode, "T": T, "dtype": args.dtype, "device_kind": device.device_kind}
    t0 = time.perf_counter()
    try:
        compiled = jax.jit(fn).lower(*aot_structs(args, T, device)).compile()
    except Exception as e:  # the compiler refuses a program that does not fit the chip
        msg = str(e).splitlines()[0][:300]
        if "memory" not in msg.lower() and "hbm" not in msg.lower():
            raise
        record["error"] = msg
        return record
    record["compile_s"] = round(time.perf_counter() - t0, 2)
    record["temp_bytes"] = temp_bytes(compiled)
    return record


def main_aot(args) -> None:
    """Compiles kernel and chunked XLA, forward and fwd+bwd, per length for one chip; tables the temp memory."""
    from looped_jax.aot import topology_devices

    device = topology_devices(args.aot_topology)[0]
    names = {"pallas": "kernel", "xla": "chunked XLA", "fwd": "forward", "fwd_bwd": "fwd+bwd"}
    cols = [(i, m) for i in args.aot_impls.split(",") for m in args.modes.split(",")]
    records = []
    for T in (int(t) for t in args.lengths.split(",")):
        for impl, mode in cols:
            r = aot_one(args, impl, mode, T, device)
            print(json.dumps(r), flush=True)
            records.append(r)
    by_key = {(r["impl"], r["mode"], r["T"]): r for r in records}
    rows = []
    for T in sorted({r["T"] for r in records}):
        cells = [f"{T:,}"]
        for key in cols:
            r = by_key[(*key, T)]
            mib = None if "error" in r or r["temp_bytes"] is None else r["temp_bytes"] / MIB
            cells.append("does not fit" if "error" in r else "n/a" if mib is None else f"{mib:,.0f} MiB")
        rows.append(cells)
    caption = (
        f"{args.aot_topology} AOT (one chip), q/k/v {args.dtype}, B={args.batch}, H={args.heads}, d_k={args.d_k}, "
        f"d_v={args.d_v}, {args.memory} memory (hidden {args.hidden}), chunk {args.chunk_size}, max_surprise_norm "
        f"{args.max_surprise_norm}: compiled temp memory per chip."
    )
    table = Table(["tokens"] + [f"{names[i]} {names[m]}" for i, m in cols], rows,
                  title="Titans memory update compiled memory", caption=caption)  # fmt: skip
    out = write_results(args.name, [table], records)
    print("\n" + table.markdown() + f"\n\nwrote {out / 'results.md'}", flush=True)


if __name__ == "__main__":
    main()

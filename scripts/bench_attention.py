"""Compiled memory of one self-attention layer on a TPU chip: Pallas splash attention vs the XLA path.

    python scripts/bench_attention.py --aot_topology v5e:2x2 --lengths 4096,32768

Nothing runs: the layer (``nn.Attention``: q/k/v projections with rotary embeddings, attention, output projection)
is AOT-compiled for one chip of the topology (needs libtpu, the ``tpu`` extra; works on a CPU-only machine), traced
for TPU with ``impl="splash"`` (the dispatch ``impl="auto"`` picks there) and with ``impl="xla"`` (the
``jax.nn.dot_product_attention`` XLA path, which materialises [heads, T, T] scores), forward and
forward + backward (gradients of the input and every weight), for causal, sliding-window and packed
(segment ids: causal inside each document) masks. The compiled temp memory per chip is tabled; a program the
compiler refuses for the chip's memory is reported with the memory it asked for.

The table goes to ``runs/<name>/results.md`` and every record to ``results.json``; one JSON line per case is
printed as it compiles.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from looped_jax.nn.attention import Attention  # noqa: E402
from looped_jax.results import MIB, Table, temp_bytes, write_results  # noqa: E402

MASKS = ("causal", "sliding", "packed")
IMPLS = ("splash", "xla")
MODES = ("fwd", "fwd_bwd")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--aot_topology", default="v5e:2x2", help="compile for one chip of this TPU topology")
    p.add_argument("--lengths", default="4096,32768", help="comma-separated sequence lengths T")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--d_model", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv_heads", type=int, default=16)
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--window", type=int, default=4096, help="sliding-window span (mask 'sliding')")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--masks", default=",".join(MASKS), help=f"comma-separated of {','.join(MASKS)}")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated of {','.join(IMPLS)}")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated of {','.join(MODES)}")
    p.add_argument("--name", default="bench_attention_aot", help="results go to runs/<name>/")
    a = p.parse_args(argv)
    for field, allowed in (("masks", MASKS), ("impls", IMPLS), ("modes", MODES)):
        bad = [x for x in getattr(a, field).split(",") if x not in allowed]
        if bad:
            p.error(f"--{field}: unknown {bad}; expected a comma-separated subset of {','.join(allowed)}")
    return a


def layer_fn(a: argparse.Namespace, mask: str, impl: str, mode: str):
    """(function of (params, x, positions, segment ids), abstract params) for one attention layer."""
    layer = Attention(
        a.d_model, a.heads, a.kv_heads, a.head_dim, init_std=0.02, out_init_std=0.02,
        mask_kind="sliding" if mask == "sliding" else "causal", window=a.window if mask == "sliding" else 0,
        dtype=jnp.dtype(a.dtype), impl=impl, rngs=nnx.Rngs(0),
    )  # fmt: skip
    graphdef, params = nnx.split(nnx.eval_shape(lambda: layer))

    def fwd(p, x_BTD, pos_BT, seg_BT):
        out_BTD, _ = nnx.merge(graphdef, p)(x_BTD, pos_BT, seg_BT if mask == "packed" else None)
        return out_BTD

    if mode == "fwd":
        return fwd, params
    return jax.grad(lambda p, x, pos, seg: fwd(p, x, pos, seg).astype(jnp.float32).sum(), argnums=(0, 1)), params


def aot_one(a: argparse.Namespace, mask: str, impl: str, mode: str, T: int, device) -> dict:
    """Compiles one case for ``device``; its temp memory, or the memory the compiler asked for."""
    from looped_jax.aot import oom_figures_gib
    from looped_jax.nn.platform import use_platform

    sh = jax.sharding.SingleDeviceSharding(device)
    record = {"mask": mask, "impl": impl, "mode": mode, "seq_len": T, "dtype": a.dtype, "device": device.device_kind}
    with use_platform("tpu"):
        fn, params = layer_fn(a, mask, impl, mode)
        params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), params)
        x = jax.ShapeDtypeStruct((a.batch, T, a.d_model), jnp.dtype(a.dtype), sharding=sh)
        ids = jax.ShapeDtypeStruct((a.batch, T), jnp.int32, sharding=sh)
        t0 = time.perf_counter()
        lowered = jax.jit(fn).trace(params, x, ids, ids).lower(lowering_platforms=("tpu",))
    record["mosaic_calls"] = lowered.as_text().count("tpu_custom_call")
    try:
        compiled = lowered.compile()
    except Exception as e:  # the TPU compiler refuses a program larger than the chip's memory
        figures = oom_figures_gib(str(e))
        if not figures:
            raise
        record["needed_gib"], record["available_gib"] = figures[0], figures[-1]
        record["error"] = str(e).splitlines()[0][:300]
        return record
    record["compile_s"] = round(time.perf_counter() - t0, 2)
    record["temp_mib"] = temp_bytes(compiled) / MIB
    return record


def cell(r: dict) -> str:
    if "temp_mib" in r:
        return f"{r['temp_mib']:,.0f} MiB"
    return f"does not fit ({r['needed_gib']:.1f} GiB)"


def memory_table(records: list[dict], a: argparse.Namespace) -> Table:
    cases = [(i, m) for i in a.impls.split(",") for m in a.modes.split(",")]
    header = ["tokens", "mask"] + [f"{i} {m.replace('_', '+')}" for i, m in cases]
    rows = []
    for T in [int(x) for x in a.lengths.split(",")]:
        for mask in a.masks.split(","):
            by = {(r["impl"], r["mode"]): r for r in records if r["seq_len"] == T and r["mask"] == mask}
            rows.append([f"{T:,}", mask] + [cell(by[c]) for c in cases])
    caption = (
        f"One attention layer, {a.aot_topology} AOT (one chip), {a.dtype}, batch {a.batch}, d_model {a.d_model}, "
        f"{a.heads} heads x {a.head_dim} ({a.kv_heads} kv heads); sliding window {a.window}; packed = causal "
        "inside documents given by segment ids (abstract: the compile does not depend on their values). "
        "Compiled temp memory per chip; fwd+bwd = gradients of the "
        "input and the weights."
    )
    return Table(header, rows, title="Attention layer memory: splash vs XLA", caption=caption)


def main(argv=None) -> list[dict]:
    a = parse(argv)
    from looped_jax.aot import topology_devices

    device = topology_devices(a.aot_topology)[0]
    records = []
    for T in [int(x) for x in a.lengths.split(",")]:
        for mask in a.masks.split(","):
            for mode in a.modes.split(","):
                for impl in a.impls.split(","):
                    r = aot_one(a, mask, impl, mode, T, device)
                    print(json.dumps(r), flush=True)
                    records.append(r)
    table = memory_table(records, a)
    out = write_results(a.name, [table], records)
    print("\n" + table.markdown() + f"\n\nwrote {out / 'results.md'}", flush=True)
    return records


if __name__ == "__main__":
    main()

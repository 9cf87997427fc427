"""Wall time and peak host memory of a huginn_raven export, against the parameter bytes (JSON).

    python scripts/bench_export_huginn.py --d_model 5280 --out /tmp/huginn_export   # the 3.5B config

Random float32 weights of configs/recurrent_depth_huginn.py's shapes (``--d_model`` etc. scale
it down where the host lacks memory). Peak RSS is read from the kernel (ru_maxrss); the
streaming exporter should need the source parameters plus about one shard.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    import dataclasses

    import jax
    import numpy as np

    from configs.recurrent_depth_huginn import get_config
    from looped_jax.export.huginn_raven import export_huginn_raven
    from looped_jax.export.params import abstract_params

    ap = argparse.ArgumentParser()
    ap.add_argument("--d_model", type=int, default=5280)
    ap.add_argument("--num_heads", type=int, default=55)
    ap.add_argument("--mlp_dim", type=int, default=17920)
    ap.add_argument("--max_shard_bytes", type=int, default=2**30)
    ap.add_argument("--out", default="/tmp/huginn_export_bench")
    a = ap.parse_args()
    cfg = dataclasses.replace(
        get_config().model,
        d_model=a.d_model,
        num_heads=a.num_heads,
        num_kv_heads=a.num_heads,
        head_dim=a.d_model // a.num_heads,
        mlp_dim=a.mlp_dim,
    )
    rng = np.random.default_rng(0)
    abstract = abstract_params(cfg)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape, dtype=np.float32), abstract)
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    out = export_huginn_raven(a.out, cfg, params, max_shard_bytes=a.max_shard_bytes)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    written = sum(p.stat().st_size for p in Path(out).glob("*.safetensors"))
    print(
        json.dumps(
            {
                "d_model": a.d_model,
                "num_params": sum(x.size for x in jax.tree.leaves(params)),
                "param_bytes": param_bytes,
                "written_bytes": written,
                "max_shard_bytes": a.max_shard_bytes,
                "wall_s": round(wall, 2),
                "peak_rss_bytes": peak,
                "rss_before_export_bytes": rss0,
                "peak_over_params": round(peak / param_bytes, 3),
                "export_extra_bytes": peak - rss0,
            }
        )
    )
    shutil.rmtree(out)


if __name__ == "__main__":
    main()

"""Needle-in-a-haystack table (sequence length x model) for Titans vs a sliding-window transformer.

Trains each model of ``--configs`` on in-memory S-NIAH / MQAR rows of ``data.seq_len`` tokens (looped_jax.data.niah,
the same generator as the TFDS builder), then measures exact-match retrieval accuracy (every answer token right) on
fresh problems at each length of ``data.niah_test_lens``, plus the compiled temporary memory of the one-shot eval
forward at each length and of one streaming chunk (constant in the sequence length).

    JAX_PLATFORMS=cpu python scripts/niah_eval.py --configs configs/titans_mac_cpu.py,configs/swa_niah_cpu.py \
        --steps 800 --out runs/niah_table.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from looped_jax.config import load_config  # noqa: E402
from looped_jax.data import niah  # noqa: E402
from looped_jax.models import count_params  # noqa: E402
from looped_jax.models.titans import TitansModel  # noqa: E402


def batches(data_cfg, length: int, batch: int, seed: int):
    rng = np.random.default_rng(seed)
    while True:
        yield niah.make_batch([niah.sample(data_cfg, rng, length) for _ in range(batch)])


def train(cfg, steps: int, batch_size: int, log_every: int):
    """AdamW (warmup + cosine) on in-memory rows of data.seq_len tokens; returns the trained model."""
    model = TitansModel(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
    graphdef, params = nnx.split(model, nnx.Param)
    o = cfg.optim
    sched = optax.warmup_cosine_decay_schedule(
        0.0,
        o.learning_rate,
        o.warmup_steps,
        max(steps, o.warmup_steps + 1),
        o.learning_rate * o.end_learning_rate_ratio,
    )
    tx = optax.chain(
        optax.clip_by_global_norm(o.grad_clip), optax.adamw(sched, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay)
    )
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        def loss_fn(p):
            return nnx.merge(graphdef, p).loss(batch, rng=jax.random.key(0))

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    data = batches(cfg.data, cfg.data.seq_len, batch_size, seed=cfg.train.seed + 1)
    t0 = time.time()
    for i in range(steps):
        params, opt_state, m = step(params, opt_state, next(data))
        if (i + 1) % log_every == 0 or i == 0:
            print(
                f"  step {i + 1:5d} loss {float(m['loss']):.3f} acc {float(m['accuracy']):.3f} "
                f"({time.time() - t0:.0f}s)",
                flush=True,
            )
    return nnx.merge(graphdef, params), time.time() - t0


def evaluate(model, data_cfg, length: int, num: int, batch: int, seed: int) -> tuple[float, float]:
    """Exact-match accuracy over ``num`` problems of ``length`` tokens, and the eval forward's temp memory (MiB)."""
    graphdef, params = nnx.split(model)
    fwd = jax.jit(lambda p, x, pos: nnx.merge(graphdef, p)(x, positions_BT=pos))
    rng = np.random.default_rng(seed)
    correct = total = 0
    compiled = None
    for _ in range(math.ceil(num / batch)):
        b = niah.make_batch([niah.sample(data_cfg, rng, length) for _ in range(batch)])
        if compiled is None:
            compiled = fwd.lower(params, b["inputs"], b["positions"]).compile()
        pred = np.asarray(jnp.argmax(compiled(params, b["inputs"], b["positions"]), -1))
        w = b["weights"] > 0
        ok = np.all((pred == b["targets"]) | ~w, axis=1)
        correct += int(ok.sum())
        total += len(ok)
    mem = compiled.memory_analysis().temp_size_in_bytes / 2**20
    return correct / total, mem


def stream_memory(model, chunk: int, batch: int) -> float:
    """Temp memory (MiB) of one compiled streaming chunk, independent of how many tokens came before."""
    graphdef, params = nnx.split(model)
    state = model.init_state(batch)
    fn = jax.jit(lambda p, x, s: nnx.merge(graphdef, p).stream(x, s))
    x = jnp.zeros((batch, chunk), jnp.int32)
    return fn.lower(params, x, state).compile().memory_analysis().temp_size_in_bytes / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", required=True, help="comma-separated config files")
    ap.add_argument("--steps", type=int, default=0, help="training steps (0 = train.num_steps of each config)")
    ap.add_argument("--batch", type=int, default=0, help="train batch (0 = train.global_batch_size)")
    ap.add_argument("--lengths", default="", help="comma-separated eval lengths (default: data.niah_test_lens)")
    ap.add_argument("--num_eval", type=int, default=200)
    ap.add_argument("--eval_batch", type=int, default=25)
    ap.add_argument("--log_every", type=int, default=100)
    ap.add_argument("--override", action="append", default=[], help="dotted config override key=value (all configs)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    overrides = dict(kv.split("=", 1) for kv in args.override)
    results = {}
    for path in args.configs.split(","):
        cfg = load_config(path, overrides)
        name = f"{cfg.model.variant}" + (f"-{cfg.model.memory_kind}" if cfg.model.variant != "swa" else "")
        lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else list(cfg.data.niah_test_lens)
        steps = args.steps or cfg.train.num_steps
        print(f"== {name} ({path}): training {steps} steps on length {cfg.data.seq_len}", flush=True)
        model, secs = train(cfg, steps, args.batch or cfg.train.global_batch_size, args.log_every)
        res = {"params": count_params(model), "train_seconds": round(secs, 1), "acc": {}, "temp_mib": {}}
        for length in lengths:
            acc, mem = evaluate(model, cfg.data, length, args.num_eval, args.eval_batch, seed=1000 + length)
            res["acc"][length], res["temp_mib"][length] = acc, round(mem, 2)
            print(f"  len {length:6d}: exact-match {acc:.3f}  eval temp {mem:.2f} MiB", flush=True)
        chunk = 4 * cfg.model.stream_multiple
        res["stream_chunk"], res["stream_temp_mib"] = chunk, round(stream_memory(model, chunk, args.eval_batch), 2)
        results[name] = res
    header = "model".ljust(12) + "params".rjust(9) + "".join(f"{n:>8d}" for n in lengths)
    print("\nexact-match accuracy (rows: model, columns: sequence length)\n" + header)
    for name, r in results.items():
        print(name.ljust(12) + f"{r['params']:9d}" + "".join(f"{r['acc'][n]:8.3f}" for n in lengths))
    print(f"\neval forward temp memory (MiB, batch {args.eval_batch})")
    for name, r in results.items():
        print(
            name.ljust(12)
            + " " * 9
            + "".join(f"{r['temp_mib'][n]:8.2f}" for n in lengths)
            + f"   stream chunk {r['stream_chunk']}: {r['stream_temp_mib']:.2f}"
        )
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

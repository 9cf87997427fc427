"""Exact-match evaluation of HRM / TRM (and other ACT reasoners) per ACT step.

Reports, on a puzzle split: exact (whole-grid) accuracy after every ACT step 1..max_steps,
token accuracy per step, the accuracy of the answer the halting rule picks and the mean
number of steps it uses. Parameters come from a Trainer checkpoint directory
(``--checkpoint_dir``, evaluates ``state.eval_params``, i.e. the EMA when one is kept) or from a
fresh training run with the papers' optimizer (``--train_steps``): AdamATan2 with linear warmup
on the network and sign-SGD on the puzzle embedding, deep supervision with the ACT carry and an
optional EMA (config ``optim.ema_decay``); the optimizer is the trainer's (``optim.name``,
``optim.puzzle_emb_learning_rate``, ``optim.puzzle_emb_weight_decay``). Training with
``scripts/train.py`` uses the same model carry and optimizer through the Trainer.

    python scripts/evaluate.py --config configs/trm_sudoku_cpu.py --train_steps 2000 --max_minutes 10
    python scripts/evaluate.py --config configs/hrm_sudoku.py --checkpoint_dir runs/hrm_sudoku
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from looped_jax.config import load_config, to_dict  # noqa: E402
from looped_jax.models import build_model, count_params  # noqa: E402
from looped_jax.train.optimizer import make_optimizer  # noqa: E402

EXAMPLE_KEYS = ("inputs", "targets", "weights", "puzzle_ids")


def example(batch: dict) -> dict:
    out = {k: jnp.asarray(batch[k]) for k in EXAMPLE_KEYS if k in batch}
    if "puzzle_ids" not in out:
        out["puzzle_ids"] = jnp.zeros(out["inputs"].shape[:1], jnp.int32)
    return out


def train(cfg, *, num_steps: int, max_seconds: float, log_every: int):
    """Deep-supervision training (one ACT segment per row per step); returns (graphdef, eval params, log)."""
    from looped_jax.data import make_pipeline, prepare

    prepare(cfg.data)
    model = build_model(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
    graphdef, params = nnx.split(model, nnx.Param)
    tx, _ = make_optimizer(cfg.optim, num_steps)
    opt_state = tx.init(params)
    decay = cfg.optim.ema_decay
    ema = jax.tree.map(jnp.copy, params) if decay > 0 else None
    batch_size = cfg.train.global_batch_size
    carry = model.initial_carry(batch_size)
    it = make_pipeline(cfg.data, split="train", global_batch_size=batch_size, seed=cfg.train.seed)
    base_key = jax.random.key(cfg.train.seed)

    @jax.jit
    def step(params, opt_state, ema, carry, batch, i):
        def loss_fn(p):
            return nnx.merge(graphdef, p).loss(batch, rng=jax.random.fold_in(base_key, i), train=True, carry=carry)

        (_, (metrics, carry)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if ema is not None:
            ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
        return params, opt_state, ema, carry, metrics

    log, start = [], time.perf_counter()
    done = 0
    for i in range(num_steps):
        params, opt_state, ema, carry, metrics = step(params, opt_state, ema, carry, example(next(it)), i)
        done = i + 1
        elapsed = time.perf_counter() - start
        if done % log_every == 0 or done == num_steps or elapsed > max_seconds:
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            log.append(dict(step=done, seconds=round(elapsed, 1), **m))
            print(json.dumps(log[-1]), flush=True)
        if elapsed > max_seconds:
            break
    return (
        graphdef,
        (ema if ema is not None else params),
        {"steps": done, "seconds": time.perf_counter() - start, "log": log},
    )


def restore(cfg, checkpoint_dir: str):
    """eval_params of the latest Trainer checkpoint in ``checkpoint_dir`` (or its checkpoints/)."""
    from looped_jax.checkpoint import Checkpointer
    from looped_jax.train.trainer import Trainer

    trainer = Trainer(cfg, log=False)
    directory = Path(checkpoint_dir).expanduser()
    if (directory / "checkpoints").is_dir():
        directory = directory / "checkpoints"
    ckpt = Checkpointer(directory, async_save=False)
    if ckpt.latest_step() is None:
        raise FileNotFoundError(f"no checkpoint in {str(directory)!r}")
    state, _, step = ckpt.restore(trainer.abstract_state(), config=to_dict(cfg))
    ckpt.close()
    return trainer.graphdef, state.eval_params, {"restored_step": step}


def evaluate(cfg, graphdef, params, *, split: str, batch_size: int, num_batches: int | None) -> dict:
    """Exact accuracy per ACT step, halted-answer accuracy and mean steps over a split."""
    from looped_jax.data import make_pipeline, prepare

    prepare(cfg.data)
    it = make_pipeline(cfg.data, split=split, global_batch_size=batch_size, seed=0, shuffle=False, num_epochs=1)
    run = jax.jit(lambda p, b: nnx.merge(graphdef, p).evaluate_steps(b))
    exact = token = halted = steps = 0.0
    n = 0
    for i, batch in enumerate(it):
        if num_batches is not None and i >= num_batches:
            break
        out = jax.device_get(run(params, example(batch)))
        valid = np.asarray(out["valid_B"], bool)
        exact = exact + out["exact_S_B"][:, valid].sum(-1)
        token = token + out["token_acc_S_B"][:, valid].sum(-1)
        halted += float(out["exact_at_halt_B"][valid].sum())
        steps += float(out["halt_step_B"][valid].sum())
        n += int(valid.sum())
    n = max(n, 1)
    return {
        "split": split,
        "num_puzzles": n,
        "exact_accuracy_per_step": [round(float(x) / n, 4) for x in np.atleast_1d(exact)],
        "token_accuracy_per_step": [round(float(x) / n, 4) for x in np.atleast_1d(token)],
        "exact_accuracy_at_halt": halted / n,
        "mean_halt_steps": steps / n,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint_dir", default="")
    parser.add_argument("--train_steps", type=int, default=0, help="train from scratch for this many steps")
    parser.add_argument("--max_minutes", type=float, default=1e9, help="stop fresh training after this long")
    parser.add_argument("--log_every", type=int, default=100)
    parser.add_argument("--split", default="test")
    parser.add_argument("--eval_batch_size", type=int, default=250)
    parser.add_argument("--eval_batches", type=int, default=0, help="0 = the whole split")
    parser.add_argument("--output", default="", help="write the results as JSON here")
    args, rest = parser.parse_known_args(argv)
    overrides = {}
    for item in rest:
        if not item.startswith("--config.") or "=" not in item:
            parser.error(f"unrecognised argument {item!r}; overrides look like --config.model.d_model=128")
        key, value = item[len("--config.") :].split("=", 1)
        overrides[key] = value
    if bool(args.checkpoint_dir) == bool(args.train_steps):
        parser.error("give exactly one of --checkpoint_dir or --train_steps")
    cfg = load_config(args.config, overrides)
    n_params = count_params(nnx.eval_shape(lambda: build_model(cfg.model, rngs=nnx.Rngs(0))))
    print(f"{cfg.model.name}: {n_params} parameters", flush=True)
    if args.checkpoint_dir:
        graphdef, params, info = restore(cfg, args.checkpoint_dir)
    else:
        graphdef, params, info = train(
            cfg,
            num_steps=args.train_steps,
            max_seconds=60 * args.max_minutes,
            log_every=args.log_every,
        )
    results = evaluate(
        cfg,
        graphdef,
        params,
        split=args.split,
        batch_size=args.eval_batch_size,
        num_batches=args.eval_batches or None,
    )
    results.update(
        config=args.config, model=cfg.model.name, num_params=n_params, **{k: v for k, v in info.items() if k != "log"}
    )
    print(json.dumps(results), flush=True)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(dict(results, train_log=info.get("log")), indent=1))
    return results


if __name__ == "__main__":
    main()

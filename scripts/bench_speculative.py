"""Self-speculative vs plain greedy decoding of a tiny random recurrent-depth model; prints JSON.

    .venv/bin/python scripts/bench_speculative.py --num-loops 16 --draft-loops 8 --draft-length 4

Times are after a compile-only warm-up run, best of ``--repeats``; tokens/s counts new tokens of
the whole batch. A random model's acceptance says little about a trained one's; the point is the
bookkeeping and the cost of a round (k cheap drafts + one k-token verify) against k full decodes.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np
from flax import nnx

from looped_jax.models import RecurrentDepthConfig, build_model
from looped_jax.models.generate import generate
from looped_jax.models.speculative import speculative_generate


def best_time(fn, repeats: int) -> tuple[float, object]:
    out = jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-loops", type=int, default=16)
    p.add_argument("--draft-loops", type=int, default=8)
    p.add_argument("--draft-length", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--prompt-length", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    cfg = RecurrentDepthConfig(
        vocab_size=256,
        d_model=args.d_model,
        num_heads=4,
        num_kv_heads=2,
        head_dim=args.d_model // 4,
        mlp_dim=4 * args.d_model,
        num_prelude_layers=1,
        num_core_layers=2,
        num_coda_layers=1,
        mean_loops=args.num_loops,
        init_scale=0.0,
    )
    model = build_model(cfg, rngs=nnx.Rngs(args.seed))
    prompt = jax.random.randint(jax.random.key(args.seed + 1), (args.batch, args.prompt_length), 0, cfg.vocab_size)
    t_plain, plain = best_time(
        lambda: generate(model, prompt, max_new_tokens=args.new_tokens, num_loops=args.num_loops), args.repeats
    )
    t_spec, spec = best_time(
        lambda: speculative_generate(
            model,
            prompt,
            max_new_tokens=args.new_tokens,
            draft_loops=args.draft_loops,
            draft_length=args.draft_length,
            num_loops=args.num_loops,
        ),
        args.repeats,
    )
    new = args.batch * args.new_tokens
    print(
        json.dumps(
            {
                "device": str(jax.devices()[0].platform),
                "num_loops": args.num_loops,
                "draft_loops": args.draft_loops,
                "draft_length": args.draft_length,
                "new_tokens": args.new_tokens,
                "batch": args.batch,
                "rounds": int(spec.num_rounds),
                "acceptance_rate": round(float(spec.acceptance_rate), 4),
                "tokens_match_plain_greedy": bool(np.array_equal(spec.tokens_BT, plain.tokens_BT)),
                "plain_tokens_per_s": round(new / t_plain, 1),
                "speculative_tokens_per_s": round(new / t_spec, 1),
                "speedup": round(t_plain / t_spec, 3),
            }
        )
    )


if __name__ == "__main__":
    main()

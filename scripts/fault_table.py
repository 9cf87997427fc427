"""The bad-input table of `scripts/train.py`'s command line and config checks (issue 15).

    python scripts/fault_table.py            # writes runs/fault_table/results.md (+ results.json)

Every case is the argument list a user might type; each is parsed and validated exactly as
``train.py`` does before it starts JAX (`parse_cli_overrides` + `load_config`), and the table
records the first line of the error (or "accepted"). Faults that need a running trainer (signals,
NaNs, damaged checkpoints, full disks) are covered by tests/train/test_robustness.py and
tests/test_checkpoint.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from looped_jax.config import load_config, parse_cli_overrides  # noqa: E402
from looped_jax.results import Table, write_results  # noqa: E402

C = "--config=configs/recurrent_depth_chains.py"
CASES: list[tuple[str, list[str]]] = [
    ("no arguments", []),
    ("--config without a value", ["--config"]),
    ("--config followed by a flag", ["--config", "--config.train.seed=1"]),
    ("--config= empty", ["--config="]),
    ("two --config flags", [C, "--config=configs/baseline_chains.py"]),
    ("config file that does not exist", ["--config=configs/nope.py"]),
    ("override without a value at the end", [C, "--config.train.seed"]),
    ("override whose value is the next flag", [C, "--config.train.seed", "--config.train.num_steps=3"]),
    ("the same override twice", [C, "--config.train.seed=1", "--config.train.seed=2"]),
    ("misspelt prefix", [C, "--confg.train.seed=1"]),
    ("positional argument", [C, "train.seed=1"]),
    ("override naming no field", [C, "--config..seed=1"]),
    ("unknown section", [C, "--config.trian.seed=1"]),
    ("unknown field", [C, "--config.train.num_step=10"]),
    ("unknown model field", [C, "--config.model.num_loop=8"]),
    ("override into a scalar", [C, "--config.train.seed.x=1"]),
    ("int field given text", [C, "--config.train.num_steps=ten"]),
    ("int field given a float", [C, "--config.train.num_steps=1.5"]),
    ("float field given text", [C, "--config.optim.learning_rate=fast"]),
    ("bool field given text", [C, "--config.checkpoint.resume=maybe"]),
    ("learning_rate=inf", [C, "--config.optim.learning_rate=inf"]),
    ("learning_rate=nan", [C, "--config.optim.learning_rate=nan"]),
    ("learning_rate=0", [C, "--config.optim.learning_rate=0"]),
    ("learning_rate<0", [C, "--config.optim.learning_rate=-1e-3"]),
    ("learning_rate=1e6 (accepted; the non-finite guard stops the run)", [C, "--config.optim.learning_rate=1e6"]),
    ("weight_decay<0", [C, "--config.optim.weight_decay=-0.1"]),
    ("weight_decay=inf", [C, "--config.optim.weight_decay=inf"]),
    ("eps=0", [C, "--config.optim.eps=0"]),
    ("eps=inf", [C, "--config.optim.eps=inf"]),
    ("b1=1", [C, "--config.optim.b1=1"]),
    ("b2<0", [C, "--config.optim.b2=-0.5"]),
    ("grad_clip<0", [C, "--config.optim.grad_clip=-1"]),
    ("warmup_steps<0", [C, "--config.optim.warmup_steps=-5"]),
    ("ema_decay=1", [C, "--config.optim.ema_decay=1"]),
    ("optim.name unknown", [C, "--config.optim.name=sgd"]),
    ("optim.name=adam_atan2 (valid)", [C, "--config.optim.name=adam_atan2"]),
    ("data.name unknown", [C, "--config.data.name=wikitext"]),
    ("model.name changed", [C, "--config.model.name=looped"]),
    ("num_steps=0", [C, "--config.train.num_steps=0"]),
    ("num_steps<0", [C, "--config.train.num_steps=-10"]),
    ("global_batch_size=0", [C, "--config.train.global_batch_size=0"]),
    ("seed<0", [C, "--config.train.seed=-1"]),
    ("seed>=2**32", [C, "--config.train.seed=4294967296"]),
    ("output_dir empty", [C, "--config.train.output_dir="]),
    ("output_dir blank", [C, "--config.train.output_dir= "]),
    ("eval_batches=0", [C, "--config.train.eval_batches=0"]),
    ("max_minutes<0", [C, "--config.train.max_minutes=-1"]),
    ("max_minutes=inf", [C, "--config.train.max_minutes=inf"]),
    ("nonfinite_policy unknown", [C, "--config.train.nonfinite_policy=ignore"]),
    ("max_consecutive_skips=0", [C, "--config.train.max_consecutive_skips=0"]),
    ("rollback_lr_factor=1", [C, "--config.train.rollback_lr_factor=1"]),
    ("rollback_lr_factor=0", [C, "--config.train.rollback_lr_factor=0"]),
    ("max_rollbacks=0", [C, "--config.train.max_rollbacks=0"]),
    ("profile_stop without start", [C, "--config.train.profile_stop=5"]),
    ("profile_start >= profile_stop", [C, "--config.train.profile_start=5", "--config.train.profile_stop=5"]),
    ("save_every<0", [C, "--config.checkpoint.save_every=-1"]),
    ("keep=0", [C, "--config.checkpoint.keep=0"]),
    ("mesh axis 0", [C, "--config.mesh.data=0"]),
    ("two mesh axes -1", [C, "--config.mesh.data=-1", "--config.mesh.fsdp=-1"]),
    ("model.d_model=0", [C, "--config.model.d_model=0"]),
    ("model.mean_loops=0", [C, "--config.model.mean_loops=0"]),
    ("model.loop_sigma=inf", [C, "--config.model.loop_sigma=inf"]),
    ("model.grad_steps<0", [C, "--config.model.grad_steps=-1"]),
    ("model.num_heads not a multiple of num_kv_heads", [C, "--config.model.num_heads=3"]),
    ("data.seq_len=0", [C, "--config.data.seq_len=0"]),
    ("data.chains_order unknown", [C, "--config.data.chains_order=sideways"]),
    ("data.test_hops not a tuple of ints", [C, "--config.data.test_hops=two"]),
    ("valid run (accepted)", [C, "--config.train.num_steps=10"]),
]


def outcome(argv: list[str]) -> str:
    try:
        path, overrides = parse_cli_overrides(argv)
        if path is None:
            return "usage: train.py --config configs/<name>.py [--config.section.field=value ...] (exit 2)"
        load_config(str(ROOT / path) if not Path(path).is_absolute() else path, overrides)
    except Exception as e:  # the table records whatever a user would see
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return f"{type(e).__name__}: {first}"
    return "accepted"


def main() -> int:
    rows = []
    for what, argv in CASES:
        msg = outcome(argv)
        rows.append([what, "`" + " ".join(a.replace(C, "--config=<rd chains>") for a in argv) + "`", msg])
        print(f"{what:60s} {msg}")
    table = Table(["case", "arguments", "what train.py says"], rows, title="Bad command lines and config values")
    out = write_results(
        "fault_table", [table], {"cases": [dict(zip(("case", "argv", "message"), r, strict=True)) for r in rows]}
    )
    print(f"\n{len(rows)} cases; wrote {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

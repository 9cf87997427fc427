"""scripts/exit_table.py on a briefly trained tiny recurrent-depth model over tiny chains data."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from looped_jax.checkpoint import Checkpointer
from looped_jax.config import load_config, parse_overrides, to_dict
from looped_jax.models.huginn_exit import EXIT_CRITERIA
from looped_jax.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "recurrent_depth_chains.py")
MAX_LOOPS = 6


def _load_script():
    spec = importlib.util.spec_from_file_location("exit_table", ROOT / "scripts" / "exit_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["exit_table"] = module
    spec.loader.exec_module(module)
    return module


exit_table = _load_script()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A recurrent-depth chains model checkpointed at initialisation (step 0), saved as the trainer
    saves (config in the metadata); the overrides that rebuild its config."""
    root = tmp_path_factory.mktemp("exit_table")
    overrides = [
        f"--config.data.data_dir={root / 'tfds'}", "--config.data.num_train=64", "--config.data.num_test=16",
        "--config.data.test_hops=2,8", "--config.train.global_batch_size=8", "--config.train.log_every=1",
        "--config.train.eval_every=0", f"--config.train.output_dir={root / 'run'}",
    ]  # fmt: skip
    cfg = load_config(CONFIG, parse_overrides(overrides))
    from looped_jax.data import prepare

    prepare(cfg.data)
    ckpt = Checkpointer(root / "run" / "checkpoints", async_save=False)
    ckpt.save(0, Trainer(cfg, log=False).init_state(), config=to_dict(cfg))
    ckpt.close()
    return root, overrides


def _run(root, overrides, *extra):
    argv = [
        *("--config", CONFIG, "--checkpoint_dir", str(root / "run"), "--splits", "test_h2,test_h8"),
        *("--max_examples", "16", "--max_loops", str(MAX_LOOPS), "--root", str(root / "out")),
        *extra,
        *overrides,
    ]
    assert exit_table.main(argv) == 0
    return json.loads((root / "out" / "exit_table" / "results.json").read_text())


def test_one_row_per_criterion_and_split_with_exit_steps_in_range(trained):
    root, overrides = trained
    # argmax-stability at threshold 0: the counter (0) is >= 0 after the first step, so every token
    # exits at exactly step 1; latent-diff at 1e9: ||s_1 - s_0|| / ||s_1|| = 1 < 1e9 exits at step 1 too.
    record = _run(root, overrides, "--threshold", "argmax-stability=0", "--threshold", "latent-diff=1e9")
    (table,) = record["tables"]
    rows = table["rows"]
    labels = ["fixed depth", *EXIT_CRITERIA]
    assert [(r[0], r[1]) for r in rows] == [(s, c) for s in ("test_h2", "test_h8") for c in labels]
    results = record["data"]["results"]
    for split in ("test_h2", "test_h8"):
        fixed = results[split]["fixed depth"]
        assert fixed["mean_step"] == fixed["min_step"] == fixed["max_step"] == MAX_LOOPS
        assert fixed["exited_early"] == 0.0
        for c in EXIT_CRITERIA:
            r = results[split][c]
            assert 1 <= r["min_step"] <= r["median_step"] <= r["max_step"] <= MAX_LOOPS, (split, c, r)
            assert r["tokens"] == fixed["tokens"] > 0
            assert 0.0 <= r["accuracy"] <= 1.0
        for c in ("argmax-stability", "latent-diff"):
            r = results[split][c]
            assert r["mean_step"] == r["max_step"] == 1 and r["exited_early"] == 1.0, (split, c, r)
        # Every row of a split shows that split's fixed-depth accuracy.
        assert {row[-1] for row in rows if row[0] == split} == {f"{fixed['accuracy']:.3f}"}
    assert (root / "out" / "exit_table" / "results.md").read_text().count("| test_h8 |") == len(labels)


def test_threshold_zero_never_exits_and_matches_fixed_depth(trained):
    """A 'value < 0' criterion never fires: every token runs max_loops steps, read out as fixed depth."""
    root, overrides = trained
    record = _run(root, overrides, "--criteria", "kl,cosine", "--per_sequence", "--threshold", "kl=0",
                  "--threshold", "cosine=0")  # fmt: skip
    results = record["data"]["results"]
    for split in ("test_h2", "test_h8"):
        assert list(results[split]) == ["fixed depth", "kl", "cosine", "kl (per sequence)", "cosine (per sequence)"]
        for label in ("kl", "cosine", "kl (per sequence)", "cosine (per sequence)"):
            r = results[split][label]
            assert r["min_step"] == r["max_step"] == MAX_LOOPS and r["exited_early"] == 0.0, (split, label, r)
            assert r["accuracy"] == pytest.approx(results[split]["fixed depth"]["accuracy"])


def test_refuses_other_families_and_missing_or_mismatched_checkpoints(trained, tmp_path):
    root, overrides = trained
    with pytest.raises(SystemExit, match="recurrent_depth"):
        exit_table.main(["--config", str(ROOT / "configs" / "baseline_chains.py"), "--root", str(tmp_path)])
    with pytest.raises(SystemExit, match="does not exist"):
        exit_table.main(["--config", CONFIG, "--checkpoint_dir", str(tmp_path / "nothing"), "--root", str(tmp_path),
                         *overrides])  # fmt: skip
    with pytest.raises(SystemExit, match="cannot use --checkpoint_dir"):
        exit_table.main(["--config", CONFIG, "--checkpoint_dir", str(root / "run"), "--root", str(tmp_path),
                         *overrides, "--config.model.mlp_dim=128"])  # fmt: skip

"""Smoke tests of scripts/bench_train.py on a tiny recurrent-depth model and byte corpus."""

import dataclasses
import importlib.util
import math
from pathlib import Path

import pytest

from looped_jax.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "scripts" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


@pytest.fixture(scope="module")
def corpus_args(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 40)
    return [
        "--quick",
        "--steps=2",
        "--warmup=1",
        f"--config.data.data_dir={root / 'tfds'}",
        f"--config.data.text_dir={corpus}",
        # 8 fake CPU devices (conftest): the batch must split over them.
        "--config.train.global_batch_size=8",
    ]


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_step_flops_formula():
    cfg = load_config(ROOT / "configs" / "recurrent_depth_512.py").model
    per = bench.flops_per_token(cfg, 256)
    k = cfg.grad_steps
    cfg = dataclasses.replace(cfg, remat_policy="")
    model, hardware = bench.step_flops(cfg, 256, 1, 3)  # r < k: masked grad steps still run
    assert model == 3 * per["once"] + (3 + 2 * 3) * per["core"]
    assert hardware == 3 * per["once"] + (k + 2 * k) * per["core"]
    model, hardware = bench.step_flops(cfg, 256, 1, 20)  # r > k: every computed FLOP is useful
    assert model == hardware == 3 * per["once"] + (20 + 2 * k) * per["core"]


def test_remat_flops_by_policy():
    cfg = load_config(ROOT / "configs" / "recurrent_depth_512.py").model
    per = bench.flops_per_token(cfg, 256)
    attention = 4 * 256 * cfg.num_heads * cfg.head_dim * cfg.num_core_layers
    expected = {
        "": 0.0,
        "dots_saveable": 0.0,
        "everything_saveable": 0.0,
        "dots_with_no_batch_dims_saveable": attention,
        "nothing_saveable": per["core"],
    }
    for policy, flops in expected.items():
        c = dataclasses.replace(cfg, remat_policy=policy)
        assert bench.remat_flops_per_token(c, 256) == flops
        model, hardware = bench.step_flops(c, 256, 1, 20)
        assert hardware - model == cfg.grad_steps * flops


def test_quick_train_benchmark(corpus_args):
    out = bench.run(corpus_args + ["--skip_compile_scan", "--skip_memory", "--skip_profile"])
    assert _positive(out["matmul_peak_flops"]["float32"]) and _positive(out["matmul_peak_flops"]["bfloat16"])
    assert _positive(out["tokens_per_s"]) and _positive(out["step_s"])
    assert 0 < out["mfu"] <= out["hfu"] and out["hfu"] < 10  # a generous bound: noisy shared CPUs
    assert len(out["num_loops"]) == 2 and all(r >= 1 for r in out["num_loops"])
    assert "flops_formula" in out and out["train"]["tokens_per_step"] == 8 * 32
    table = bench.results_table(out)  # the README table: only the measured rows
    assert [r[0] for r in table.rows][:1] == ["tokens/s"] and len(table.rows) == 2


def test_memory_is_flat_in_the_loop_count():
    """Fast sibling of the full benchmark's ratios, from the same helpers: the static forward (a scan)
    and the truncated-backprop loss gradient (grad_steps=2) compile to the same temp memory at 8 and
    64 loops (one device, batch 2, so the four compiles stay short)."""
    import jax
    import numpy as np

    from looped_jax.train.trainer import Trainer

    cfg = bench.quick_overrides(load_config(bench.DEFAULT_CONFIG))
    cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, enabled=False))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    trainer = Trainer(cfg, mesh=mesh, log=False)
    assert cfg.model.grad_steps == 2
    (fwd_s_8, fwd_bytes_8), (fwd_s_64, fwd_bytes_64) = (bench.compile_forward(trainer, n) for n in (8, 64))
    assert _positive(fwd_s_8) and _positive(fwd_s_64)
    assert fwd_bytes_8 > 0 and fwd_bytes_64 / fwd_bytes_8 == pytest.approx(1.0, abs=0.1)
    grad_bytes_8, grad_bytes_64 = (bench.static_loss_grad_temp_bytes(trainer, n) for n in (8, 64))
    assert grad_bytes_8 > 0 and grad_bytes_64 / grad_bytes_8 == pytest.approx(1.0, abs=0.1)


@pytest.mark.slow
def test_quick_full_benchmark(corpus_args):
    out = bench.run(corpus_args)
    c, mem = out["compile_s"], out["memory"]
    for key in ("train_compile_s_4", "train_compile_s_64", "forward_static_compile_s_4", "forward_static_compile_s_64"):
        assert _positive(c[key])
    assert _positive(c["train_ratio_64_over_4"]) and _positive(c["forward_static_ratio_64_over_4"])
    # Truncated backprop: the same compiled memory at 8 and 64 loops; full backprop grows.
    assert mem["train_step_ratio_64_over_8"] == pytest.approx(1.0, abs=0.1)
    assert mem["static_ratio_64_over_8"] == pytest.approx(1.0, abs=0.1)
    assert mem["full_backprop_static_ratio_64_over_8"] > 2
    assert _positive(out["profile"]["core_loop_fwd_s"]) and _positive(out["profile"]["optimizer_update_s"])

"""Smoke tests of scripts/bench_train.py on a tiny recurrent-depth model and byte corpus, of its per-family
timings (--families) and of --device (refused on CPU; the published-peak table)."""

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
def corpus_dirs(tmp_path_factory):
    """(TFDS data dir, text corpus dir) of a tiny byte corpus."""
    root = tmp_path_factory.mktemp("bench")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 40)
    return root / "tfds", corpus


@pytest.fixture(scope="module")
def corpus_args(corpus_dirs):
    data_dir, corpus = corpus_dirs
    return [
        "--quick",
        "--steps=2",
        "--warmup=1",
        f"--config.data.data_dir={data_dir}",
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


FAMILY_MODELS = {
    "transformer": "looped",
    "recurrent_depth": "recurrent_depth",
    "fam": "fam",
    "titans": "titans",
    "rmt": "rmt",
    "hrm": "hrm",
    "trm": "trm",
    "ltm": "latent_thought",
    "gram": "gram",
}


def test_families_all_names_every_family_config():
    """`--families all` is the nine families, each a CPU config file that builds its family's model."""
    assert bench.parse_families("all") == list(FAMILY_MODELS)
    assert bench.parse_families("hrm, transformer,hrm") == ["hrm", "transformer"]
    for family, model_name in FAMILY_MODELS.items():
        assert (ROOT / "configs" / bench.FAMILIES[family][0]).is_file()
        assert bench.load_family_config(family, {}).model.name == model_name


def test_families_benchmark_json(corpus_dirs):
    """One family through the real trainer: the JSON fields are positive and MFU is FLOPs / step time / peak."""
    data_dir, corpus = corpus_dirs
    out = bench.run(
        [
            "--families=transformer",
            "--families_only",
            "--quick",
            "--steps=2",
            "--warmup=1",
            f"--family.data.data_dir={data_dir}",
            f"--family.data.text_dir={corpus}",
            "--family.train.global_batch_size=8",  # 8 fake CPU devices (conftest)
        ]
    )
    assert "train" not in out and list(out["families"]) == ["transformer"]
    f = out["families"]["transformer"]
    for key in ("compile_total_s", "step_s_median", "tokens_per_s", "flops_per_step", "mfu"):
        assert _positive(f[key]), (key, f[key])
    assert f["config"] == "configs/ar_baseline_cpu.py" and f["tokens_per_step"] == 8 * 64
    assert (
        f["flops_per_step"]
        == f["xla_flops_per_step_per_device"] * f["devices"]
        == pytest.approx(f["xla_flops_per_step_per_device"] * 8)
    )
    assert f["tokens_per_s"] == pytest.approx(8 * 64 / f["step_s_median"])
    measured = out["matmul_peak_flops"]
    peak = max(measured["float32"], measured["float32_after"])  # a float32 model on CPU
    assert f["peak_used_for_mfu"]["source"] == "measured matmul"
    assert f["peak_used_for_mfu"]["flops_per_s"] == peak
    assert f["mfu"] == pytest.approx(f["flops_per_step"] / f["step_s_median"] / peak)
    assert f["mfu"] < 10  # a generous bound: noisy shared CPUs
    assert "XLA" in out["families_flops_note"]
    table = bench.families_table(out)
    assert [r[0] for r in table.rows] == ["transformer"] and "MFU" in table.header


def test_unknown_family_is_an_error_listing_the_valid_ones(capsys):
    with pytest.raises(bench.UsageError, match="unknown families \\['nope'\\]"):
        bench.parse_families("transformer,nope")
    with pytest.raises(bench.UsageError, match="unknown families \\['nope'\\]") as e:
        bench.run(["--families=transformer,nope"])
    assert all(name in str(e.value) for name in FAMILY_MODELS)
    assert bench.main(["--families=nope"]) == 2
    assert "valid: transformer, recurrent_depth" in capsys.readouterr().err
    with pytest.raises(bench.UsageError, match="--families_only needs --families"):
        bench.run(["--families_only"])


def test_device_refuses_without_an_accelerator(corpus_args, capsys):
    # Quick sizes, so that a broken refusal fails this test fast instead of running the full benchmark.
    argv = corpus_args + ["--device", "--skip_compile_scan", "--skip_memory", "--skip_profile"]
    with pytest.raises(bench.UsageError, match="no accelerator is visible: jax.default_backend\\(\\) is 'cpu'"):
        bench.run(argv)
    assert bench.main(["--device", "--families=hrm"]) == 2
    assert "no accelerator is visible" in capsys.readouterr().err


def test_published_peak_lookup():
    expected = {
        "NVIDIA H100 80GB HBM3": 989e12,  # SXM
        "NVIDIA H100 PCIe": 756e12,
        "NVIDIA H200": 989e12,
        "NVIDIA A100-SXM4-80GB": 312e12,
        "NVIDIA A100-SXM4-40GB": 312e12,
        "NVIDIA A100 80GB PCIe": 312e12,
        "TPU v4": 275e12,
        "TPU v5 lite": 197e12,
        "TPU v5e": 197e12,
        "TPU v5": 459e12,
        "TPU v5p": 459e12,
        "TPU v6 lite": 918e12,
        "TPU v6e": 918e12,
        # No checked figure: the measured peak is used instead.
        "NVIDIA H100 NVL": None,
        "NVIDIA H200 NVL": None,
        "NVIDIA GH200 480GB": None,
        "TPU v4 lite": None,
        "NVIDIA GeForce RTX 4090": None,
        "cpu": None,
    }
    for kind, flops in expected.items():
        found = bench.published_peak_flops(kind)
        assert (found and found[1]) == flops, (kind, found)


def test_device_mfu_peak(monkeypatch):
    """--device: the published peak times the chips; a kind not in the table falls back to the measured bf16
    matmul peak with a note. Without --device: the measured peak of the model's dtype (higher of the two)."""
    import jax

    measured = {"float32": 1e12, "float32_after": 2e12, "bfloat16": 3e12, "bfloat16_after": 4e12}
    assert bench.mfu_peak(measured, "float32", device=False)["flops_per_s"] == 2e12
    kind = "TPU v5 lite"
    device = type("Device", (), {"device_kind": property(lambda self: kind)})()
    monkeypatch.setattr(jax, "devices", lambda *a: [device] * 4)
    monkeypatch.setattr(jax, "device_count", lambda *a: 4)
    peak = bench.mfu_peak(measured, "float32", device=True)
    assert peak["source"] == "published" and peak["flops_per_s"] == 4 * 197e12 and "note" not in peak
    kind = "NVIDIA GeForce RTX 4090"
    peak = bench.mfu_peak(measured, "float32", device=True)
    assert peak["source"] == "measured matmul" and peak["flops_per_s"] == 4 * 4e12
    assert "not in PUBLISHED_PEAK_FLOPS" in peak["note"]


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

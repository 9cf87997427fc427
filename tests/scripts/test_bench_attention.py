"""scripts/bench_attention.py: one attention layer AOT-compiled for a v5e chip, splash vs the XLA path."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import jax
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import bench_attention  # noqa: E402

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="needs libtpu (pip install '.[tpu]')"
)


@pytest.mark.slow  # run by .ci/run after the default suite
def test_splash_layer_needs_far_less_memory_than_xla(tmp_path, monkeypatch):
    """At 4,096 tokens the XLA path holds [heads, T, T] f32 scores (2 x 4096^2 x 4 bytes = 128 MiB; at 2,048 XLA
    fuses them away) and the splash layer does not; the splash programs call Mosaic (1 kernel forward, 3 with the
    backward), the XLA ones none; the packed mask (segment ids) dispatches to splash too."""
    monkeypatch.chdir(tmp_path)
    with jax.default_matmul_precision("default"):  # conftest's "highest" is refused by Mosaic for bf16 (nn/flash.py)
        records = bench_attention.main([
            "--lengths", "4096", "--d_model", "128", "--heads", "2", "--kv_heads", "1", "--window", "512",
            "--masks", "causal,packed", "--name", "bench_attention_test",
        ])  # fmt: skip
    by = {(r["mask"], r["impl"], r["mode"]): r for r in records}
    assert len(by) == 8
    for mask in ("causal", "packed"):
        assert by[(mask, "splash", "fwd")]["mosaic_calls"] == 1
        assert by[(mask, "splash", "fwd_bwd")]["mosaic_calls"] == 3
        assert by[(mask, "xla", "fwd")]["mosaic_calls"] == by[(mask, "xla", "fwd_bwd")]["mosaic_calls"] == 0
        for mode in ("fwd", "fwd_bwd"):
            xla, splash = by[(mask, "xla", mode)]["temp_mib"], by[(mask, "splash", mode)]["temp_mib"]
            assert xla >= 128 and splash < xla / 16, (mask, mode, xla, splash)
    data = json.loads((tmp_path / "runs/bench_attention_test/results.json").read_text())
    assert "| 4,096 | packed |" in (tmp_path / "runs/bench_attention_test/results.md").read_text()
    assert len(data["data"]) == 8


def test_unknown_mask_is_refused():
    with pytest.raises(SystemExit):
        bench_attention.parse(["--masks", "causal,diagonal"])

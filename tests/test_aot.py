"""AOT tool and sharding helpers: topology names, batch/layout errors, HLO FLOPs x loop trip counts, activation
constraints and kernels under shard_map on 8 fake CPU devices; (slow) FAM / Titans train steps compiled for v5e
with the Mosaic kernels in the HLO."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from looped_jax import sharding as shd
from looped_jax.aot import check_batch, parse_topology
from looped_jax.aot_hlo import hlo_stats
from looped_jax.config import load_config, parse_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_topology_names_validated():
    assert parse_topology("v5e:16x16") == ("v5e", 256)
    assert parse_topology("v5p:8x8x8") == ("v5p", 512)
    with pytest.raises(ValueError, match="v5e: 1x1, 2x2"):
        parse_topology("v5e:32x32")


def test_batch_not_divisible_proposes_batches_and_layouts():
    cfg = load_config(os.path.join(ROOT, "configs/fam_passkey_cpu.py"), parse_overrides(["--config.mesh.data=-1"]))
    with pytest.raises(ValueError, match=r"global_batch_size=32 .* nearest valid batch sizes: 256"):
        check_batch(cfg, 256)
    with pytest.raises(ValueError, match="data=32 fsdp=1 tensor=8"):  # 256 / 8 = 32 divides the batch
        check_batch(cfg, 256)
    assert check_batch(cfg, 8) == (8, 1, 1)


def test_hlo_flops_multiply_loop_trip_counts():
    x = jnp.ones((64, 64))
    compiled = jax.jit(lambda x: jax.lax.fori_loop(0, 7, lambda i, y: y @ y, x)).lower(x).compile()
    stats = hlo_stats(compiled.as_text())
    assert stats["flops"] == 7 * 2 * 64**3
    assert stats["loops_without_trip_count"] == 0


def _mesh(data, fsdp, tensor):
    return jax.make_mesh((data, fsdp, tensor), shd.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def test_fsdp_moves_to_a_dim_it_divides_and_reports_replicated():
    mesh = _mesh(1, 8, 1)
    # embed 12 is not divisible by 8, mlp 64 is: fsdp goes there
    assert shd.param_spec(("embed", "mlp"), (12, 64), mesh) == P(None, "fsdp")
    assert shd.param_spec(("embed", "mlp"), (16, 64), mesh) == P("fsdp", None)

    class M(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.zeros((12, 6)), logical_axes=("embed", "heads"))

    rep = shd.replicated_params(nnx.state(M()), mesh)
    assert rep == [("w", (12, 6), "fsdp")]


def test_constrain_and_shard_kernel():
    mesh = _mesh(4, 2, 1)
    x = jnp.arange(8 * 6 * 4, dtype=jnp.float32).reshape(8, 6, 4)
    assert shd.constrain(x, ("batch", None, None)) is x  # no mesh: no-op
    seen = []

    def kernel(a, b):
        seen.append(a.shape)  # the per-shard shape inside shard_map
        return a * 2 + b

    @jax.jit
    def f(x):
        y = shd.constrain(x, ("batch", None, "embed"))
        return shd.shard_kernel(kernel, (y, y), (("batch", None, None),) * 2, ("batch", None, None), batch=8, heads=())

    with jax.set_mesh(mesh):
        out = f(x)
        text = f.lower(x).as_text()
    np.testing.assert_allclose(out, 3 * x)
    assert seen == [(1, 6, 4)]  # batch 8 over data x fsdp = 8
    assert "sharding_constraint" in text or "Sharding" in text


@pytest.mark.slow
@pytest.mark.parametrize("config,min_calls", [("fam_passkey_cpu.py", 1), ("titans_mac_cpu.py", 1)])
def test_train_step_aot_v5e_has_mosaic_kernels(config, min_calls):
    from looped_jax.aot import compile_train_step, topology_devices

    try:
        devices = topology_devices("v5e:2x2")
    except RuntimeError as e:
        pytest.skip(str(e))
    cfg = load_config(os.path.join(ROOT, "configs", config), parse_overrides(["--config.mesh.data=4"]))
    stats = compile_train_step(cfg, devices)
    assert stats["platform"] == "tpu" and stats["mesh"]["data"] == 4
    assert stats["mosaic_custom_calls"] >= min_calls, stats
    assert stats["fits"]


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (pip install '.[tpu]')")
def test_program_that_never_fits_is_reported_from_the_compiler_message(monkeypatch):
    """When even the raised-limit compile runs out of HBM, the figures come from libtpu's message."""
    from looped_jax import aot

    msg = "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used 22.55G of 15.75G hbm. Exceeded hbm capacity by 6.80G. (22.55G) exceeds available HBM (15.75G)"  # noqa: E501

    def never_fits(lowered, raise_limit_mib):
        raise RuntimeError(msg)

    monkeypatch.setattr(aot, "_compile", never_fits)
    cfg = load_config(os.path.join(ROOT, "configs/recurrent_depth_chains.py"), parse_overrides([]))
    stats = aot.compile_train_step(cfg, aot.topology_devices("v5e:2x2"))
    assert stats["measured_from"] == "oom_message" and stats["fits"] is False
    assert stats["peak_gib_per_chip"] == pytest.approx(22.55)
    assert stats["shortfall_gib_per_chip"] == pytest.approx(22.55 - stats["hbm_gib_per_chip"])


def test_hlo_stats_read_past_multi_line_kernel_metadata():
    """A Pallas call's frontend_attributes={kernel_metadata={...}} spans lines and the continuation starts with
    "}}": instructions after it still belong to the computation (they were dropped, hiding gradient all-reduces
    and dots of every program with a Mosaic kernel)."""
    text = "\n".join([
        "HloModule m",
        "",
        "ENTRY %main (p0: f32[8,16], p1: f32[16,4]) -> f32[8,4] {",
        "  %p0 = f32[8,16]{1,0} parameter(0)",
        "  %p1 = f32[16,4]{1,0} parameter(1)",
        "  %copy.1 = f32[8,16]{1,0} copy(%p0), frontend_attributes={kernel_metadata={",
        '"xprof_metadata":"{\\"block_q\\": 512}"',
        '}}, metadata={op_name="pallas_call"}',
        "  %dot.2 = f32[8,4]{1,0} dot(%copy.1, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}",
        "  ROOT %all-reduce.3 = f32[8,4]{1,0} all-reduce(%dot.2), replica_groups={}, to_apply=%add",
        "}",
        "",
    ])  # fmt: skip
    stats = hlo_stats(text)
    assert stats["flops"] == 2 * 8 * 4 * 16
    assert stats["collectives"] == {"all-reduce": 1}


def test_projection_takes_the_larger_lower_bound_where_a_loop_has_no_trip_count():
    from looped_jax.aot import projection

    base = {"peak_bf16_flops_per_chip": 100.0, "devices": 4, "model_flops_per_step": 800.0}
    fixed = projection({**base, "hlo_flops_per_chip": 250.0, "loops_without_trip_count": 0})
    assert fixed["projected_step_s"] == 2.5 and not fixed["projected_step_is_lower_bound"]
    assert fixed["projected_mfu"] == pytest.approx(800 / (4 * 100 * 2.5))
    # sampled depth: HLO counted the loop once (250 per chip) but the model FLOPs say 200 per chip -> 2.5 s
    hlo_larger = projection({**base, "hlo_flops_per_chip": 250.0, "loops_without_trip_count": 1})
    assert hlo_larger == {"projected_step_s": 2.5, "projected_step_is_lower_bound": True, "projected_mfu": None}
    model_larger = projection({**base, "hlo_flops_per_chip": 50.0, "loops_without_trip_count": 2})
    assert model_larger["projected_step_s"] == 2.0 and model_larger["projected_mfu"] is None


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (pip install '.[tpu]')")
def test_hlo_flops_of_tpu_convolutions_and_rewritten_loops_are_exact():
    """XLA:TPU writes multi-axis dot_generals as convolutions whose window runs over padding or a dilated base (a
    head axis as window={size=H pad=H-1_H-1}); only the taps on real input are work. Its loop rewrites also drop
    known_trip_count, which is then read from the loop's counter. Both were counted wrong (x heads, x 1/trip)."""
    from jax.sharding import SingleDeviceSharding

    from looped_jax.aot import topology_devices

    dev = SingleDeviceSharding(topology_devices("v5e:2x2")[0])
    B, T, D, H, K, L = 2, 256, 512, 8, 64, 5

    def f(x, wq, wo):
        def layer(x, _):
            q = jnp.einsum("btd,dhk->bthk", x, wq)  # projection to heads: contracting d, output (h, k)
            s = jnp.einsum("bqhk,bshk->bhqs", q, q)  # batched over (b, h)
            o = jnp.einsum("bhqs,bshk->bqhk", s, q)
            return x + jnp.einsum("bthk,hkd->btd", o, wo), None  # contracting (h, k)

        return jax.lax.scan(layer, x, None, length=L)[0].sum()

    shapes = (jax.ShapeDtypeStruct((B, T, D), jnp.bfloat16, sharding=dev),
              jax.ShapeDtypeStruct((D, H, K), jnp.bfloat16, sharding=dev),
              jax.ShapeDtypeStruct((H, K, D), jnp.bfloat16, sharding=dev))  # fmt: skip
    fwd = 2 * B * T * D * H * K * 2 + 2 * 2 * B * H * T * T * K  # two projections + two attention products
    for fn, want in ((f, fwd), (jax.grad(f, argnums=(0, 1, 2)), 3 * fwd)):
        text = jax.jit(fn).lower(*shapes).compile().as_text()
        assert " convolution(" in text  # the TPU form this test is about
        stats = hlo_stats(text)
        assert stats["loops_without_trip_count"] == 0
        assert stats["flops"] == L * want, (stats["flops"], L * want)


def test_restat_recomputes_stored_results_from_their_kept_hlo(tmp_path):
    """--reuse / --cached read a stored compile's statistics again from its hlo.txt.gz, so a fix to the counting
    reaches every stored row without a recompile."""
    import gzip

    from looped_jax.aot import restat

    text = "\n".join([
        "HloModule m",
        "ENTRY %main (p0: f32[8,16], p1: f32[16,4]) -> f32[8,4] {",
        "  %p0 = f32[8,16]{1,0} parameter(0)",
        "  %p1 = f32[16,4]{1,0} parameter(1)",
        "  %dot.2 = f32[8,4]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}",
        "  ROOT %all-gather.3 = f32[8,4]{1,0} all-gather(%dot.2), replica_groups={}, dimensions={0}",
        "}",
    ])  # fmt: skip
    path = tmp_path / "hlo.txt.gz"
    with gzip.open(path, "wt") as f:
        f.write(text)
    stored = {"devices": 4, "hlo_flops_per_chip": 1.0, "hlo_flops_per_step": 4.0, "collectives": {},
              "collectives_total": 0, "mosaic_custom_calls": 0, "loops_without_trip_count": 3,
              "peak_bf16_flops_per_chip": 1024.0, "model_flops_per_step": 2048.0, "params": 7}  # fmt: skip
    out = restat(stored, path)
    assert out["hlo_flops_per_chip"] == 2 * 8 * 4 * 16 and out["hlo_flops_per_step"] == 4 * 2 * 8 * 4 * 16
    assert out["collectives"] == {"all-gather": 1} and out["collectives_total"] == 1
    assert out["loops_without_trip_count"] == 0 and out["params"] == 7
    assert out["projected_step_s"] == 2 * 8 * 4 * 16 / 1024 and out["projected_mfu"] == pytest.approx(0.5)


def test_projection_adds_the_pallas_kernel_work_the_hlo_cannot_see():
    from looped_jax.aot import projection

    base = {
        "peak_bf16_flops_per_chip": 100.0,
        "devices": 4,
        "model_flops_per_step": 800.0,
        "loops_without_trip_count": 0,
    }
    with_kernels = projection({**base, "hlo_flops_per_chip": 150.0, "kernel_flops_per_step": 400.0})
    assert with_kernels["projected_step_s"] == 2.5  # (150 + 400 / 4) / 100
    assert with_kernels["projected_mfu"] == pytest.approx(800 / (4 * 100 * 2.5))

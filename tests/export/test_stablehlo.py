"""The serialized StableHLO serving artifact computes the live model's logits."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from looped_jax.export import load_serving
from looped_jax.export.stablehlo import export_serving
from looped_jax.models import build_model
from tests.export.test_params_export import tiny_rd


def test_artifact_equals_live_model_any_batch_length_and_loops(tmp_path):
    cfg = tiny_rd()
    model = build_model(cfg, rngs=nnx.Rngs(3))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    out = export_serving(tmp_path / "srv", cfg, params, platforms=("cpu",))
    # a fresh process with no model code loaded: only jax.export.deserialize
    code = (
        "import sys, numpy as np; sys.path.insert(0, '.');"
        "import looped_jax.export.stablehlo as s;"
        f"srv = s.load_serving({str(out)!r});"
        "assert not any(m.startswith('looped_jax.models') for m in sys.modules), 'model code was imported';"
        "print(srv.spec['platforms'])"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "cpu" in r.stdout
    serving = load_serving(out)
    live = nnx.jit(lambda m, x, n: m(x, num_loops=n))
    for (b, t), loops in (((2, 7), 1), ((3, 5), 6)):
        tokens = jax.random.randint(jax.random.key(b * t), (b, t), 0, cfg.vocab_size)
        want = np.asarray(live(model, tokens, jnp.int32(loops)))
        got = np.asarray(serving(tokens, loops))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert not np.allclose(np.asarray(serving(tokens, 1)), np.asarray(serving(tokens, 6)))
    assert jnp.asarray(serving(tokens, 6)).shape == (3, 5, cfg.vocab_size)


@pytest.mark.slow
def test_artifact_lowers_for_cpu_cuda_and_tpu(tmp_path):
    cfg = tiny_rd()
    params = nnx.to_pure_dict(nnx.state(build_model(cfg, rngs=nnx.Rngs(3)), nnx.Param))
    serving = load_serving(export_serving(tmp_path / "srv", cfg, params))
    assert set(serving.spec["platforms"]) == {"cpu", "cuda", "tpu"}

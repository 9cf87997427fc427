"""Params-only safetensors export: Orbax training checkpoint -> safetensors -> params, bit-exact."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from looped_jax.checkpoint import Checkpointer
from looped_jax.config import to_dict
from looped_jax.export import (
    ExportError,
    flatten_params,
    load_params_safetensors,
    read_safetensors,
    read_training_checkpoint,
    save_params_safetensors,
)
from looped_jax.export.safetensors_io import tensor_sha256
from looped_jax.models import MODEL_CONFIGS, build_model, count_params
from looped_jax.train.trainer import TrainState

REPO = Path(__file__).resolve().parents[2]


def tiny_rd():
    return MODEL_CONFIGS["recurrent_depth"](
        vocab_size=32,
        d_model=16,
        num_heads=2,
        num_kv_heads=2,
        head_dim=8,
        mlp_dim=32,
        num_prelude_layers=1,
        num_core_layers=1,
        num_coda_layers=1,
        mean_loops=2,
    )


def write_checkpoint(path, model_cfg, *, step=5, ema=True):
    model = build_model(model_cfg, rngs=nnx.Rngs(1))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    # make the weights distinguishable from a fresh init and the EMA from the params
    params = jax.tree.map(lambda x: x + 0.25, params)
    ema_params = jax.tree.map(lambda x: x * -0.5, params) if ema else None
    tx = optax.adam(1e-3)
    state = TrainState(jnp.asarray(step, jnp.int32), params, tx.init(params), None, ema_params)
    ck = Checkpointer(path, async_save=False)
    ck.save(step, state, config={"model": to_dict(model_cfg)})
    ck.close()
    return params, ema_params


def _equal_bits(a, b):
    fa, fb = flatten_params(a), flatten_params(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        x, y = np.asarray(fa[k]), np.asarray(fb[k])
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert x.tobytes() == y.tobytes(), k


HEAVY = {"titans", "hrm", "gram", "looped"}  # default configs take seconds to initialise on CPU


@pytest.mark.parametrize(
    "family", [pytest.param(f, marks=pytest.mark.slow) if f in HEAVY else f for f in sorted(MODEL_CONFIGS)]
)
def test_every_family_round_trips_bit_exact(tmp_path, family):
    cfg = tiny_rd() if family == "recurrent_depth" else MODEL_CONFIGS[family]()
    model = build_model(cfg, rngs=nnx.Rngs(0))
    params = jax.tree.map(lambda x: x * 1.5 + 0.1, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    out = save_params_safetensors(tmp_path / "x", cfg, params, step=3)
    cfg2, params2 = load_params_safetensors(out)
    assert cfg2 == cfg
    _equal_bits(params, params2)
    man = json.loads((out / "manifest.json").read_text())
    assert man["num_params"] == count_params(model) and man["source_step"] == 3 and man["family"] == family


def test_checkpoint_to_safetensors_cli_params_and_ema(tmp_path):
    cfg = tiny_rd()
    params, ema = write_checkpoint(tmp_path / "run" / "checkpoints", cfg, step=5)
    sys.path.insert(0, str(REPO / "scripts"))
    import export as export_cli

    for flag, want in (([], params), (["--ema"], ema)):
        out = tmp_path / f"out{len(flag)}"
        argv = ["--checkpoint_dir", str(tmp_path / "run"), "--format", "safetensors", "--out", str(out), *flag]
        if flag:  # once as a real command line
            subprocess.run(
                [sys.executable, str(REPO / "scripts/export.py"), *argv], check=True, cwd=REPO, capture_output=True
            )
        else:
            export_cli.main(argv)
        cfg2, got = load_params_safetensors(out)
        assert cfg2 == cfg
        _equal_bits(want, got)
        man = json.loads((out / "manifest.json").read_text())
        assert man["source_step"] == 5 and man["weights"] == ("ema_params" if flag else "params")
        f = read_safetensors(out / "model.safetensors")
        assert set(f) == set(man["tensors"]) and "opt_state" not in " ".join(f)
        assert all(man["tensors"][k]["sha256"] == tensor_sha256(np.asarray(f[k])) for k in f)


def test_files_are_readable_by_the_safetensors_package(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    cfg = tiny_rd()
    params = nnx.to_pure_dict(nnx.state(build_model(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    out = save_params_safetensors(tmp_path / "x", cfg, params)
    loaded = st.load_file(str(out / "model.safetensors"))
    flat = flatten_params(params)
    assert loaded.keys() == flat.keys()
    assert all(np.array_equal(loaded[k], np.asarray(flat[k])) for k in flat)


def test_tampered_tensor_and_missing_ema_are_clear_errors(tmp_path):
    cfg = tiny_rd()
    write_checkpoint(tmp_path / "ck", cfg, ema=False)
    with pytest.raises(ExportError, match="no EMA"):
        read_training_checkpoint(tmp_path / "ck", ema=True)
    with pytest.raises(ExportError, match="no checkpoint for step 9"):
        read_training_checkpoint(tmp_path / "ck", step=9)
    ck = read_training_checkpoint(tmp_path / "ck")
    out = save_params_safetensors(tmp_path / "x", cfg, ck.params)
    man = json.loads((out / "manifest.json").read_text())
    man["tensors"]["embed.table_VD"]["sha256"] = "0" * 64
    (out / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ExportError, match="embed.table_VD"):
        load_params_safetensors(out)

"""Official HRM / TRM checkpoints: import against the official code's outputs
(tests/fixtures/{hrm,trm/attention,trm/mlp_t}, made by scripts/make_parity_fixtures.py), export ->
import round trips, the restricted torch unpickler and the puzzle_emb size check."""

import json
import os
import pickle
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from looped_jax.export import ExportError, flatten_params, model_from_params
from looped_jax.export.hrm_trm import export_official, import_official
from looped_jax.export.params import abstract_params
from looped_jax.export.torch_pickle import TorchPickleError, read_state_dict, read_torch_pickle
from looped_jax.models.hrm import HRMConfig
from looped_jax.models.trm import TRMConfig

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CASES = {
    "hrm": FIXTURES / "hrm",
    "trm_attention": FIXTURES / "trm" / "attention",
    "trm_mlp_t": FIXTURES / "trm" / "mlp_t",
}


def _import(fix: Path, **kw):
    return import_official(fix, dataset=fix / "dataset.json", **kw)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    fix = CASES[request.param]
    imp = _import(fix)
    return fix, imp, model_from_params(imp.model_cfg, imp.params), np.load(fix / "official_outputs.npz")


def test_logits_and_q_values_match_official_every_act_step(case):
    """Steps 1..halt_max_steps (4) of the official ACT wrapper in eval mode, from its initial carry."""
    _, imp, model, ref = case
    data = {"inputs": jnp.asarray(ref["inputs"]), "puzzle_ids": jnp.asarray(ref["puzzle_identifiers"])}
    segment = nnx.jit(lambda m, z, d: m.segment(z, d))
    z = model.initial_states(ref["inputs"].shape[0])
    for step in range(1, imp.model_cfg.halt_max_steps + 1):
        z, logits, q_halt, q_cont = segment(model, z, data)
        for name, got in (("logits", logits), ("q_halt", q_halt), ("q_continue", q_cont)):
            np.testing.assert_allclose(
                np.asarray(got), ref[f"{name}_step{step}"], rtol=1e-5, atol=1e-5, err_msg=f"{name} step {step}"
            )
    if imp.model_cfg.name == "hrm":  # the public forward (num_loops ACT segments) gives the same logits
        forward = nnx.jit(lambda m, x, p: m(x, num_loops=4, puzzle_ids_B=p))
        got = forward(model, data["inputs"], data["puzzle_ids"])
        np.testing.assert_allclose(np.asarray(got), ref["logits_step4"], rtol=1e-5, atol=1e-5)


def test_imported_config_and_ema(case):
    fix, imp, _, _ = case
    cfg = imp.model_cfg
    assert (cfg.vocab_size, cfg.seq_len, cfg.num_puzzle_ids, cfg.d_model, cfg.dtype) == (10, 12, 5, 16, "float32")
    assert imp.step == int(json.loads((fix / "fixture.json").read_text())["checkpoint"].removeprefix("step_"))
    want_ema = json.loads((fix / "fixture.json").read_text()).get("ema", False)
    assert imp.weights == ("ema_params" if want_ema else "params")
    if cfg.name == "hrm":
        assert (cfg.num_h_layers, cfg.h_cycles, cfg.l_cycles, cfg.puzzle_emb_len) == (2, 2, 2, 2)
    else:
        assert (cfg.recursions, cfg.latent_steps, cfg.puzzle_emb_len) == (2, 3, 4)
        assert cfg.mixer == ("mlp" if "mlp_t" in fix.name else "attention")


def test_export_import_bit_exact_and_layout_equals_official(case, tmp_path):
    fix, imp, _, _ = case
    out = export_official(tmp_path / "x", imp.model_cfg, imp.params, step=imp.step, weights=imp.weights)
    back = import_official(out)  # seq_len etc. from the looped_jax section of all_config.yaml
    assert back.model_cfg == imp.model_cfg and back.weights == imp.weights and back.step == imp.step
    a, b = flatten_params(imp.params), flatten_params(back.params)
    assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)
    # the exported state_dict is the official one: same keys (with _orig_mod.), order, dtypes and bytes
    theirs = read_torch_pickle(fix / f"step_{imp.step}")
    mine = read_state_dict(out / f"step_{imp.step}.safetensors")
    assert list(mine) == list(theirs)
    for k in theirs:
        assert mine[k].dtype == theirs[k].dtype and mine[k].shape == theirs[k].shape, k
        assert mine[k].tobytes() == theirs[k].tobytes(), k
    import yaml

    arch_theirs = yaml.safe_load((fix / "all_config.yaml").read_text())["arch"]
    arch_mine = yaml.safe_load((out / "all_config.yaml").read_text())["arch"]
    assert {k: arch_mine[k] for k in arch_theirs} == arch_theirs
    assert json.loads((out / "manifest.json").read_text())["num_params"] > 0


@pytest.mark.parametrize(
    "cfg",
    [
        HRMConfig(vocab_size=7, seq_len=5, num_puzzle_ids=3, puzzle_emb_dim=40, d_model=16, num_heads=2, head_dim=8,
                  mlp_dim=256, num_h_layers=1, num_l_layers=2, pos_encoding="learned", init_state_seed=3),
        TRMConfig(vocab_size=7, seq_len=6, num_puzzle_ids=2, puzzle_emb_dim=16, puzzle_emb_len=2, d_model=16,
                  num_heads=2, head_dim=8, mlp_dim=256, num_layers=1, mixer="mlp", dtype="bfloat16"),
    ],
    ids=["hrm_learned", "trm_mlp_bf16"],
)  # fmt: skip
def test_our_models_round_trip_bit_exact(cfg, tmp_path):
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), abstract_params(cfg))
    out = export_official(tmp_path / "y", cfg, params, step=7, weights="ema_params", use_torch=False)
    back = import_official(out)
    assert back.model_cfg == cfg and back.weights == "ema_params" and back.step == 7
    a, b = flatten_params(params), flatten_params(back.params)
    assert all(np.asarray(a[k]).tobytes() == b[k].tobytes() for k in a)


class _Evil:
    def __reduce__(self):
        return os.system, ("touch " + str(_Evil.marker),)


def _torch_zip(path: Path, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")
    return path


def _s(text: str) -> bytes:  # BINUNICODE
    raw = text.encode()
    return b"X" + len(raw).to_bytes(4, "little") + raw


def _g(module: str, name: str) -> bytes:  # GLOBAL, written by hand: nothing is imported to make it
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def test_unpickler_refuses_code(tmp_path):
    _Evil.marker = tmp_path / "pwned"
    payload = pickle.dumps({"w": _Evil()}, protocol=2)
    with pytest.raises(TorchPickleError, match=r"refusing to unpickle global (posix|nt|os)\.system"):
        read_torch_pickle(_torch_zip(tmp_path / "evil.pt", payload))
    assert not _Evil.marker.exists()
    with pytest.raises(TorchPickleError, match=r"refusing to unpickle global builtins\.eval"):
        read_torch_pickle(
            _torch_zip(tmp_path / "eval.pt", b"\x80\x02" + _g("builtins", "eval") + b"(" + _s("1") + b"tR.")
        )
    # {"w": _rebuild_tensor_v2(storage of 4 floats, 0, (3, 3), (3, 1))}: overruns its storage
    pid = b"(" + _s("storage") + _g("torch", "FloatStorage") + _s("0") + _s("cpu") + b"K\x04tQ"
    tensor = _g("torch._utils", "_rebuild_tensor_v2") + b"(" + pid + b"K\x00K\x03K\x03\x86K\x03K\x01\x86tR"
    path = _torch_zip(tmp_path / "overrun.pt", b"\x80\x02}" + _s("w") + tensor + b"s.")
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("archive/data/0", np.arange(4, dtype=np.float32).tobytes())
    with pytest.raises(TorchPickleError, match="overruns its storage"):
        read_torch_pickle(path)
    # the same pickle with a (2, 2) view reads fine: the refusal is the bounds check, not the encoding
    ok = tensor.replace(b"K\x03K\x03\x86K\x03K\x01\x86", b"K\x02K\x02\x86K\x02K\x01\x86")
    path = _torch_zip(tmp_path / "ok.pt", b"\x80\x02}" + _s("w") + ok + b"s.")
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("archive/data/0", np.arange(4, dtype=np.float32).tobytes())
    np.testing.assert_array_equal(read_torch_pickle(path)["w"], [[0, 1], [2, 3]])


def test_puzzle_emb_size_mismatch_is_a_clear_error():
    fix = CASES["trm_attention"]
    meta = {**json.loads((fix / "dataset.json").read_text()), "num_puzzle_identifiers": 9}
    with pytest.raises(ExportError, match=r"puzzle_emb has 5 rows.*has 9 puzzle identifiers.*resize_puzzle_emb"):
        import_official(fix, dataset=meta)
    imp = import_official(fix, dataset=meta, resize_puzzle_emb=True)
    table = flatten_params(imp.params)["puzzle_emb"]
    orig = flatten_params(_import(fix).params)["puzzle_emb"]
    assert table.shape == (9, 16) and np.allclose(table, orig.mean(0, keepdims=True))
    with pytest.raises(ExportError, match="pass seq_len"):
        import_official(fix)  # RoPE: the puzzle length is only in the data set


def test_export_cli_orbax_checkpoint_to_official_trm(tmp_path):
    """scripts/export.py --format trm --ema: Orbax training checkpoint -> official layout -> import, bit-exact."""
    import sys

    import optax

    from looped_jax.checkpoint import Checkpointer
    from looped_jax.config import to_dict
    from looped_jax.train.trainer import TrainState

    imp = _import(CASES["trm_attention"])
    params = jax.tree.map(jnp.asarray, imp.params)
    ema = jax.tree.map(lambda x: x * 0.5, params)
    state = TrainState(jnp.asarray(9, jnp.int32), params, optax.sgd(1e-3).init(params), None, ema)
    ck = Checkpointer(tmp_path / "run" / "checkpoints", async_save=False)
    ck.save(9, state, config={"model": to_dict(imp.model_cfg), "optim": {"learning_rate": 3e-4}})
    ck.close()
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    import export as export_cli

    out = export_cli.main(
        ["--checkpoint_dir", str(tmp_path / "run"), "--format", "trm", "--out", str(tmp_path / "o"), "--ema"]
    )
    back = import_official(out)
    assert back.model_cfg == imp.model_cfg and back.weights == "ema_params" and back.step == 9
    a, b = flatten_params(ema), flatten_params(back.params)
    assert all(np.asarray(a[k]).tobytes() == b[k].tobytes() for k in a)
    import yaml

    assert yaml.safe_load((out / "all_config.yaml").read_text())["lr"] == 3e-4
    with pytest.raises(ExportError, match="needs a hrm checkpoint"):
        export_cli.main(["--checkpoint_dir", str(tmp_path / "run"), "--format", "hrm", "--out", str(tmp_path / "p")])

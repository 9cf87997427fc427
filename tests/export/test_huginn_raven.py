"""huginn_raven import/export against logits of the official modeling code (tests/fixtures/huginn_raven,
made by scripts/make_parity_fixtures.py huginn)."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from looped_jax.export import flatten_params, model_from_params, read_safetensors
from looped_jax.export.huginn_raven import export_huginn_raven, import_huginn_raven
from looped_jax.models.generate import generate

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "huginn_raven"


@pytest.fixture(scope="module")
def imported():
    cfg, params = import_huginn_raven(FIX / "checkpoint")
    return cfg, params, model_from_params(cfg, params), np.load(FIX / "official_outputs.npz")


@pytest.mark.parametrize("steps", [1, 4, 16])
def test_logits_match_official(imported, steps):
    _, _, model, ref = imported
    got = np.asarray(model(jnp.asarray(ref["input_ids"]), num_loops=steps))
    want = ref[f"logits_steps{steps}"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_cached_greedy_decode_matches_official(imported):
    _, _, model, ref = imported
    out = generate(model, jnp.asarray(ref["greedy_prompt"]), max_new_tokens=ref["greedy_tokens"].shape[1], num_loops=4)
    np.testing.assert_array_equal(np.asarray(out.tokens_BT), ref["greedy_tokens"])


def test_export_import_bit_exact_and_layout_equals_official(imported, tmp_path):
    cfg, params, _, _ = imported
    hf = json.loads((FIX / "checkpoint" / "config.json").read_text())
    out = export_huginn_raven(tmp_path / "x", cfg, params, block_size=hf["block_size"], max_shard_bytes=40_000)
    cfg2, params2 = import_huginn_raven(out)
    assert cfg2 == cfg
    a, b = flatten_params(params), flatten_params(params2)
    assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)

    def layout(d):
        idx = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
        specs = {}
        for fname in set(idx.values()):
            f = read_safetensors(d / fname)
            assert f.metadata == {"format": "pt"}
            specs.update({k: f.spec(k) for k in f})
        return specs

    assert layout(out) == layout(FIX / "checkpoint")
    # the official tensors themselves survive import -> export unchanged (freqs_cis to 1 ulp)
    for name in layout(out):
        mine = np.asarray(_tensor(out, name))
        theirs = np.asarray(_tensor(FIX / "checkpoint", name))
        if name == "freqs_cis":
            np.testing.assert_allclose(mine, theirs, rtol=1e-6, atol=1e-6)
        else:
            assert mine.tobytes() == theirs.tobytes(), name
    exported = json.loads((out / "config.json").read_text())
    for key in (
        "model_type",
        "n_embd",
        "n_heads",
        "intermediate_size",
        "n_layers_in_prelude",
        "n_layers_in_recurrent_block",
        "n_layers_in_coda",
        "mean_recurrence",
        "rope_base",
        "qk_bias",
        "tie_embeddings",
        "injection_type",
        "norm_eps",
        "vocab_size",
        "block_size",
    ):
        assert exported[key] == hf[key], key


def _tensor(d, name):
    idx = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    return read_safetensors(d / idx[name])[name]


@pytest.mark.parametrize(
    "field, value",
    [("norm_style", "pre"), ("tie_embeddings", False), ("coda_input_norm", False), ("stable_injection", True)],
)
def test_layouts_the_published_format_cannot_hold_are_refused(imported, tmp_path, field, value):
    import dataclasses

    from looped_jax.export.huginn_raven import ExportError

    cfg, params, _, _ = imported
    with pytest.raises(ExportError, match=rf"huginn_raven has no model.{field}={value!r}"):
        export_huginn_raven(tmp_path / "x", dataclasses.replace(cfg, **{field: value}), params)

"""looped_jax.results: exact-match accuracy, compiled temp memory, the results.md / results.json writer."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from looped_jax.results import (
    Table,
    compiled_temp_bytes,
    exact_match,
    exact_match_counts,
    fmt_bytes,
    tree_bytes,
    write_results,
)


def test_exact_match_needs_every_weighted_target_and_skips_padding_rows():
    targets_BT = np.array([[1, 2, 3], [1, 2, 3], [1, 2, 3], [0, 0, 0]])
    weights_BT = np.array([[0, 1, 1], [0, 1, 1], [0, 1, 1], [0, 0, 0]], np.float32)
    pred_BT = np.array(
        [
            [9, 2, 3],  # wrong only where the weight is 0: exact
            [1, 2, 4],  # one weighted token wrong: not exact
            [1, 2, 3],  # all right
            [0, 0, 0],  # padding row (no weighted target): not an answer
        ]
    )
    exact_B, answered_B = exact_match(pred_BT, targets_BT, weights_BT)
    np.testing.assert_array_equal(np.asarray(exact_B), [True, False, True, False])
    np.testing.assert_array_equal(np.asarray(answered_B), [True, True, True, False])
    assert exact_match_counts(pred_BT, targets_BT, weights_BT) == (2, 3)
    # jit-able, as a model's evaluate would use it.
    jitted = jax.jit(exact_match)(jnp.asarray(pred_BT), jnp.asarray(targets_BT), jnp.asarray(weights_BT))
    np.testing.assert_array_equal(np.asarray(jitted[0]), np.asarray(exact_B))
    with pytest.raises(ValueError, match="one shape"):
        exact_match(pred_BT[:, :2], targets_BT, weights_BT)


def test_compiled_temp_bytes_grows_with_the_intermediate():
    def f(x_N):  # an outer product: a [N, N] temporary that is reduced away
        return jnp.sum(jnp.sin(x_N[:, None] * x_N[None, :]), axis=0)

    small = compiled_temp_bytes(f, jax.ShapeDtypeStruct((256,), jnp.float32))
    large = compiled_temp_bytes(jax.jit(f), jax.ShapeDtypeStruct((1024,), jnp.float32))
    assert small is not None and large is not None
    assert large >= 8 * small > 0  # 16x the elements; allow the compiler some tiling slack
    assert tree_bytes({"a": jnp.zeros((4, 8), jnp.float32), "b": [jax.ShapeDtypeStruct((3,), jnp.int8)]}) == 131


def test_write_results_writes_markdown_and_json(tmp_path):
    table = Table(
        ["model", "1 hops", "2 hops"],
        [["a", "1.000", "0.500"], ["b", 0.25, 0.125]],
        title="toy",
        caption="Accuracy.",
    )
    out = write_results(
        "toy_run",
        [table],
        {"acc": np.float32(0.5), "n": np.arange(3)},
        root=tmp_path,
        command=["scripts/x.py", "--steps", "3"],
    )
    assert out == tmp_path / "toy_run"
    md = (out / "results.md").read_text()
    assert "<!-- written by: scripts/x.py --steps 3 -->" in md
    assert "### toy\n\nAccuracy.\n\n| model | 1 hops | 2 hops |\n|---|---|---|\n| a | 1.000 | 0.500 |\n" in md
    assert "| b | 0.25 | 0.125 |" in md
    record = json.loads((out / "results.json").read_text())
    assert record["command"] == "scripts/x.py --steps 3"
    assert record["tables"][0]["rows"][1] == ["b", "0.25", "0.125"]
    assert record["data"] == {"acc": 0.5, "n": [0, 1, 2]}


def test_table_and_writer_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="row 0 has 1 cells, the header has 2"):
        Table(["a", "b"], [["x"]])
    with pytest.raises(ValueError, match="relative name"):
        write_results("../elsewhere", [Table(["a"], [])], root=tmp_path)
    with pytest.raises(ValueError, match="at least one Table"):
        write_results("x", [], root=tmp_path)
    assert fmt_bytes(5.25 * 2**20) == "5.2 MiB" and fmt_bytes(1_048_708, "MB", 2) == "1.05 MB"
    with pytest.raises(ValueError, match="unit"):
        fmt_bytes(1, "mb")

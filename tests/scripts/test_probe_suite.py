"""scripts/probe_suite.py: a quick two-family run on the copy probe, bad names, and its pure helpers."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from looped_jax.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def _load_script():
    spec = importlib.util.spec_from_file_location("probe_suite", ROOT / "scripts" / "probe_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["probe_suite"] = module
    spec.loader.exec_module(module)
    return module


probe_suite = _load_script()


@pytest.mark.slow  # run by .ci/run after the default suite
def test_quick_run_writes_one_table_and_the_plot(tmp_path):
    argv = [
        *("--quick", "--families", "transformer,rmt,hrm", "--probes", "copy", "--steps", "2"),
        *("--name", "probes", "--root", str(tmp_path), "--eval_batch", "8"),
        f"--config.data.data_dir={tmp_path / 'tfds'}",
        "--config.train.global_batch_size=8",
    ]
    results = probe_suite.main(argv)
    out = tmp_path / "probes"
    assert (out / "probes.png").stat().st_size > 0
    md = (out / "results.md").read_text()
    assert md.startswith("<!-- written by: ")
    record = json.loads((out / "results.json").read_text())
    table = record["tables"][0]
    header = table["header"]
    assert header[:5] == ["probe", "test split", "size", "train range", "seen subgraphs"]
    assert [h.split(" (")[0] for h in header[5:]] == ["transformer", "rmt", "hrm"]
    # one row per quick copy test split (lengths 4 and 8; training strings up to 4)
    assert [r[:4] for r in table["rows"]] == [
        ["copy", "test_len4", "n=4", "in"],
        ["copy", "test_len8", "n=8", "beyond"],
    ]
    runs = record["data"]["runs"]
    assert set(runs) == {"transformer", "rmt", "hrm"}  # HRM trained and scored in place (fill-in)
    for row in table["rows"]:
        assert row[4] == "—"
        for family, cell in zip(("transformer", "rmt", "hrm"), row[5:8], strict=True):
            s = runs[family]["copy"]["scores"][row[1]]
            # fill-in rows score the same answer cells as the causal rows: the n copied symbols of 8 problems
            assert s["answered"] == 8 and s["tokens"] == 8 * int(row[1].removeprefix("test_len"))
            assert s["token_accuracy"] == pytest.approx(s["correct"] / s["tokens"])
            assert s["exact_match"] == pytest.approx(s["exact"] / s["answered"])
            assert cell == f"{s['token_accuracy']:.3f} / {s['exact_match']:.3f}"
    for family in ("transformer", "rmt", "hrm"):
        assert runs[family]["copy"]["steps"] == 2
        assert f"{runs[family]['copy']['params']:,}" in " ".join(header)
    # HRM's grid: the longest quick copy test problem (n = 8: BOS 8 SEP 8 = 18 tokens); causal rows: 2 * 4 + 1
    assert runs["hrm"]["copy"]["row_tokens"] == 18 and runs["transformer"]["copy"]["row_tokens"] == 9
    assert "fill-in accuracy, not next-token" in table["caption"] and "n/a" not in md
    assert results["param_deviation"]["transformer"] == 0.0


@pytest.mark.parametrize(
    "flag, bad, valid",
    [("--families", "transformer,lstm", "transformer, recurrent_depth"), ("--probes", "sort", "copy, phonebook")],
)
def test_unknown_family_or_probe_is_an_error_listing_the_valid_ones(tmp_path, capsys, flag, bad, valid):
    with pytest.raises(SystemExit):
        probe_suite.main([flag, bad, "--root", str(tmp_path)])
    err = capsys.readouterr().err
    assert bad.split(",")[-1] in err and valid in err
    assert not (tmp_path / "probe_suite").exists()


def test_parse_names():
    assert probe_suite.parse_names("rmt, fam,rmt", probe_suite.FAMILIES, "family") == ["rmt", "fam"]
    with pytest.raises(ValueError, match=r"unknown family \['gpt'\]; choose from transformer, recurrent_depth"):
        probe_suite.parse_names("fam,gpt", probe_suite.FAMILIES, "family")
    with pytest.raises(ValueError, match="unknown probe"):
        probe_suite.parse_names(",", probe_suite.PROBES, "probe")


def test_score_batch_and_accuracies_on_known_numbers():
    targets = np.array([[5, 6, 7, 0], [5, 6, 7, 8], [0, 0, 0, 0]])
    weights = np.array([[0, 1, 1, 0], [0, 1, 1, 1], [0, 0, 0, 0]], np.float32)  # last row: padding
    pred = np.array([[9, 6, 7, 3], [5, 6, 1, 8], [1, 1, 1, 1]])  # row 0 exact (unscored misses), row 1 one miss
    counts = probe_suite.score_batch(pred, targets, weights)
    assert counts == {"correct": 4, "tokens": 5, "exact": 1, "answered": 2}
    total = probe_suite.add_counts(counts, {"correct": 0, "tokens": 3, "exact": 0, "answered": 1})
    assert probe_suite.accuracies(total) == (pytest.approx(4 / 8), pytest.approx(1 / 3))
    assert probe_suite.accuracies({"correct": 0, "tokens": 0, "exact": 0, "answered": 0}) == (0.0, 0.0)


def test_pad_batch_rounds_up_with_unscored_zeros():
    batch = {k: np.ones((2, 33), np.int32) for k in ("inputs", "targets", "positions", "segment_ids")}
    batch["weights"] = np.ones((2, 33), np.float32)
    padded = probe_suite.pad_batch(batch, 32)
    assert all(v.shape == (2, 64) for v in padded.values())
    assert padded["weights"][:, 33:].sum() == 0 and padded["segment_ids"][:, 33:].sum() == 0
    np.testing.assert_array_equal(padded["inputs"][:, :33], batch["inputs"])
    assert probe_suite.pad_batch(padded, 32) is padded


def test_fill_in_batch_on_a_hand_made_causal_row():
    # copy "ab": tokens BOS a b SEP a b = 1 3 4 2 3 4, answer the last two; causal row of 7 inputs, then a
    # padding row
    causal = {
        "inputs": np.array([[1, 3, 4, 2, 3, 0, 0], [0] * 7]),
        "targets": np.array([[3, 4, 2, 3, 4, 0, 0], [0] * 7]),
        "weights": np.array([[0, 0, 0, 1, 1, 0, 0], [0] * 7], np.float32),
        "segment_ids": np.array([[1, 1, 1, 1, 1, 0, 0], [0] * 7]),
        "positions": np.array([[0, 1, 2, 3, 4, 0, 0], [0] * 7]),
    }
    from looped_jax.data.probes import copy_tokens, tokens_row

    built = tokens_row(*copy_tokens(np.array([0, 1])), 7)
    for k, v in built.items():
        np.testing.assert_array_equal(causal[k][0], v)
    grid = probe_suite.fill_in_batch(causal, 8)
    want = {
        "inputs": [[1, 3, 4, 2, 0, 0, 0, 0], [0] * 8],  # the answer cells blanked (PAD)
        "targets": [[1, 3, 4, 2, 3, 4, 0, 0], [0] * 8],  # the whole problem
        "weights": [[0, 0, 0, 0, 1, 1, 0, 0], [0] * 8],
        "segment_ids": [[1, 1, 1, 1, 1, 1, 0, 0], [0] * 8],
        "positions": [[0, 1, 2, 3, 4, 5, 0, 0], [0] * 8],
        "puzzle_ids": [0, 0],
    }
    assert set(grid) == set(want)
    for k, v in want.items():
        np.testing.assert_array_equal(grid[k], np.array(v), err_msg=k)
    assert grid["weights"].dtype == np.float32 and grid["inputs"].dtype == np.int32
    # a grid narrower than the causal row is fine when the problem fits; one that does not fit is an error
    assert probe_suite.fill_in_batch(causal, 6)["targets"].tolist() == [[1, 3, 4, 2, 3, 4], [0] * 6]
    with pytest.raises(ValueError, match="does not fit HRM's grid of 5"):
        probe_suite.fill_in_batch(causal, 5)
    bad = {**causal, "targets": np.array([[3, 0, 2, 3, 4, 0, 0], [0] * 7])}  # PAD inside the problem
    with pytest.raises(ValueError, match="blank token"):
        probe_suite.fill_in_batch(bad, 8)


def test_fill_in_batch_rebuilds_every_probe_problem_and_hides_its_answer(tmp_path):
    from looped_jax.data import make_eval_batches, prepare, split_names

    for probe, fields in probe_suite.QUICK_DATA.items():
        cfg = probe_suite.family_config(
            "hrm", {"data.name": probe, **fields, "data.num_test": "6", "data.data_dir": str(tmp_path)}
        )
        prepare(cfg.data)
        grid_len = cfg.model.seq_len
        for split in split_names(cfg.data):
            (batch,) = make_eval_batches(cfg.data, split, 6, max_batches=1)
            grid = probe_suite.fill_in_batch(batch, grid_len)
            real = batch["segment_ids"] > 0
            n = real.sum(1)
            for i in range(6):
                assert grid["targets"][i, 0] == batch["inputs"][i, 0]
                np.testing.assert_array_equal(grid["targets"][i, 1 : n[i] + 1], batch["targets"][i, : n[i]])
                np.testing.assert_array_equal(grid["weights"][i, 1 : n[i] + 1], batch["weights"][i, : n[i]] > 0)
                assert grid["weights"][i, 0] == 0 and grid["weights"][i, n[i] + 1 :].sum() == 0
            answer = grid["weights"] > 0
            assert answer.any() and (grid["inputs"][answer] == 0).all()
            np.testing.assert_array_equal(grid["inputs"][~answer], grid["targets"][~answer])


def test_train_row_len_and_split_size():
    from looped_jax.data import DataConfig

    rows = {
        "copy": (dict(copy_train_max_len=16), 33),  # BOS 16 SEP 16 -> 34 tokens, 33 inputs
        "phonebook": (dict(phonebook_train_entries=4), 39),  # BOS 4 x (2 + 1 + 4 + 1) 2 COLON 4
        "multiplication": (dict(mult_train_max_digits=3), 14),  # BOS 3 TIMES 3 EQUALS 6
        "dp": (dict(dp_train_max_len=8), 17),  # BOS 8 EQUALS 8
    }
    for name, (fields, want) in rows.items():
        cfg = DataConfig(name=name, seq_len=want, **fields)
        assert probe_suite.train_row_len(cfg) == want
        with pytest.raises(ValueError, match="seq_len"):
            DataConfig(name=name, seq_len=want - 1, **fields)  # the length is the smallest that fits
    mult = DataConfig(name="multiplication", seq_len=14, mult_train_max_digits=3)
    assert probe_suite.split_size(mult, "test_3x2") == ("3x2", 6.0, True)
    assert probe_suite.split_size(mult, "test_4x2") == ("4x2", 8.0, False)
    book = DataConfig(name="phonebook", seq_len=39, phonebook_train_entries=4)
    assert probe_suite.split_size(book, "test_e8") == ("E=8", 8.0, False)
    dp = DataConfig(name="dp", seq_len=17, dp_train_max_len=8)
    assert probe_suite.split_size(dp, "test_len8") == ("n=8", 8.0, True)


def test_param_deviation_on_known_numbers():
    dev = probe_suite.param_deviation({"transformer": 100_000, "rmt": 110_000, "fam": 95_000})
    assert dev == {"transformer": 0.0, "rmt": pytest.approx(0.10), "fam": pytest.approx(-0.05)}
    with pytest.raises(ValueError, match="reference family 'transformer'"):
        probe_suite.param_deviation({"rmt": 1})


def test_probe_configs_load_and_have_equal_parameter_counts():
    counts = {}
    for family in probe_suite.FAMILIES:
        cfg = load_config(ROOT / "configs" / "probes" / f"{family}.py")
        assert cfg.model.vocab_size >= 30  # every probe's vocabulary at the script's settings fits
        counts[family] = probe_suite.num_params(cfg.model)
    assert counts["transformer"] == 108_864
    deviation = probe_suite.param_deviation(counts)
    assert all(abs(d) <= 0.15 for d in deviation.values()), deviation

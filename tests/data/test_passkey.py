"""PassKey retrieval data: layout, answer = hidden key, weights only on the answer, deterministic builds."""

import numpy as np
import pytest

from looped_jax.data import DataConfig, make_eval_batches, prepare, split_names, vocab_size
from looped_jax.data import passkey as pk


def find_key(inputs_T: np.ndarray, digits: int) -> np.ndarray:
    """The digit tokens right after the KEY marker (parsed from the tokens, independent of the generator)."""
    (where,) = np.flatnonzero(inputs_T == pk.KEY)
    return inputs_T[where + 1 : where + 1 + digits]


def test_make_tokens_layout():
    rng = np.random.default_rng(0)
    for length in (14, 20, 57):
        for _ in range(20):
            rec = pk.sample_record(rng, length=length, digits=3, filler_vocab=5)
            tokens = pk.make_tokens(rec["key"], int(rec["key_position"]), length, int(rec["phase"]), 5)
            assert tokens.shape == (length + 1,) and tokens[0] == pk.BOS
            assert tokens[-4] == pk.QUERY and (tokens == pk.KEY).sum() == 1 and (tokens == pk.QUERY).sum() == 1
            np.testing.assert_array_equal(tokens[-3:], pk.DIGIT0 + rec["key"])
            np.testing.assert_array_equal(find_key(tokens, 3), tokens[-3:])
            key_at, query_at = np.flatnonzero(tokens == pk.KEY)[0], np.flatnonzero(tokens == pk.QUERY)[0]
            assert key_at == 1 + rec["key_position"]
            filler = np.concatenate([tokens[1:key_at], tokens[key_at + 4 : query_at]])
            assert len(filler) == length - 8
            assert ((filler >= pk.FILLER0) & (filler < pk.FILLER0 + 5)).all()  # no digits in the filler
    with pytest.raises(ValueError, match="layout"):
        pk.make_tokens(np.zeros(5, np.int32), 0, 11, 0, 4)


def test_row_weights_only_on_answer():
    rng = np.random.default_rng(1)
    rec = pk.sample_record(rng, length=30, digits=4, filler_vocab=3)
    row = pk.make_row(rec, 40, 3)
    assert row["weights"].sum() == 4
    weighted = np.flatnonzero(row["weights"])
    np.testing.assert_array_equal(weighted, np.arange(26, 30))
    np.testing.assert_array_equal(row["targets"][weighted], find_key(row["inputs"], 4))
    assert row["inputs"][weighted[0]] == pk.QUERY
    np.testing.assert_array_equal(row["segment_ids"], (np.arange(40) < 30).astype(np.int32))
    assert (row["inputs"][30:] == pk.PAD).all() and (row["positions"][:30] == np.arange(30)).all()
    empty = pk.make_row({"key": np.zeros(4, np.int32), "key_position": 0, "length": 0, "phase": 0}, 40, 3)
    assert empty["weights"].sum() == 0 and empty["segment_ids"].sum() == 0


def test_config_validation():
    with pytest.raises(ValueError, match="data.seq_len"):
        DataConfig(name="passkey", seq_len=8, passkey_digits=5)
    with pytest.raises(ValueError, match="data.passkey_test_lens"):
        DataConfig(name="passkey", seq_len=32, passkey_test_lens=(64, 64))
    with pytest.raises(ValueError, match="data.passkey_train_min_len"):
        DataConfig(name="passkey", seq_len=32, passkey_train_min_len=40)


def test_builder_splits_and_determinism(tmp_path):
    kw = dict(
        name="passkey", seq_len=24, passkey_train_min_len=16, passkey_test_lens=(32, 48), passkey_digits=3,
        passkey_filler_vocab=4, num_train=40, num_test=10,
    )  # fmt: skip
    cfg = DataConfig(data_dir=str(tmp_path / "a"), **kw)
    prepare(cfg)
    assert split_names(cfg) == ("train", "test_len32", "test_len48")
    assert vocab_size(cfg) == pk.FILLER0 + 4
    other = DataConfig(data_dir=str(tmp_path / "b"), **kw)
    prepare(other)
    for split, length in (("train", 24), ("test_len32", 32), ("test_len48", 48)):
        (batch,) = make_eval_batches(cfg, split, 64)
        (again,) = make_eval_batches(other, split, 64)
        for k in batch:
            np.testing.assert_array_equal(batch[k], again[k])  # same seed -> same data
        assert batch["inputs"].shape == (64, length)
        real = batch["weights"].sum(-1) > 0
        assert real.sum() == (40 if split == "train" else 10)
        lengths = batch["segment_ids"].sum(-1)[real]
        if split == "train":
            assert lengths.min() >= 16 and lengths.max() <= 24 and len(set(lengths)) > 1
        else:
            assert (lengths == length).all()
        assert (batch["weights"][real].sum(-1) == 3).all()
        assert batch["inputs"].max() < vocab_size(cfg)
        for row in np.flatnonzero(real):
            w = batch["weights"][row] > 0
            np.testing.assert_array_equal(batch["targets"][row][w], find_key(batch["inputs"][row], 3))

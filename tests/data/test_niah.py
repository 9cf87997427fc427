"""S-NIAH and MQAR generators (data/niah.py): layouts, answers, rows, config validation, the TFDS pipeline."""

from __future__ import annotations

import numpy as np
import pytest

from looped_jax.data import niah
from looped_jax.data.config import DataConfig
from looped_jax.data.pipeline import make_eval_batches, prepare, split_names, vocab_size

VOCAB = niah.Vocab(num_keys=8, num_words=12, filler_vocab=6)


@pytest.mark.parametrize("kind", niah.NIAH_KINDS)
def test_niah_layout_and_answer(kind):
    rng = np.random.default_rng(0)
    for length in (10, 33, 200):
        ex = niah.make_niah(rng, length=length, kind=kind, value_len=2, vocab=VOCAB)
        t, mask = ex["tokens"], ex["answer_mask"]
        assert t.shape == mask.shape == (length + 1,)
        assert t[0] == niah.BOS and t.min() >= 1 and t.max() < VOCAB.size
        p = int(ex["needle_position"])
        assert t[p] == niah.NEEDLE and t[p + 1] == ex["key"] and t[p + 2] == niah.IS
        np.testing.assert_array_equal(t[p + 3 : p + 5], ex["value"])
        np.testing.assert_array_equal(t[-5:], [niah.QUERY, ex["key"], niah.IS, *ex["value"]])
        np.testing.assert_array_equal(np.flatnonzero(mask), [length - 1, length])
        assert (t == niah.NEEDLE).sum() == 1 and (t == niah.QUERY).sum() == 1
        hay = np.concatenate([t[1:p], t[p + 5 : -5]])
        assert len(hay) == length - 10 and np.all(hay >= VOCAB.filler0)
        if kind == "word":
            assert np.all((ex["value"] >= VOCAB.word0) & (ex["value"] < VOCAB.filler0))
        else:
            assert np.all((ex["value"] >= niah.DIGIT0) & (ex["value"] < niah.KEY0))
        if kind == "passkey":
            assert ex["key"] == niah.KEY0
            assert np.all(np.diff(hay[: p - 1] - VOCAB.filler0) % VOCAB.filler_vocab == 1)  # periodic filler
        else:
            assert niah.KEY0 <= ex["key"] < VOCAB.word0


def test_niah_depth_and_length_errors():
    rng = np.random.default_rng(1)
    assert niah.make_niah(rng, length=50, kind="number", value_len=2, vocab=VOCAB, depth=0.0)["needle_position"] == 1
    deep = niah.make_niah(rng, length=50, kind="number", value_len=2, vocab=VOCAB, depth=1.0)
    assert deep["needle_position"] == 50 - 10 + 1
    with pytest.raises(ValueError, match="length must be >= 12"):
        niah.make_niah(rng, length=11, kind="number", value_len=3, vocab=VOCAB)
    with pytest.raises(ValueError, match="kind must be one of"):
        niah.make_niah(rng, length=50, kind="essay", value_len=2, vocab=VOCAB)


def test_assoc_recall_answers():
    rng = np.random.default_rng(2)
    for length in (20, 64, 300):
        ex = niah.make_assoc_recall(rng, length=length, num_pairs=4, vocab=VOCAB)
        t, mask = ex["tokens"], ex["answer_mask"]
        assert t.shape == mask.shape == (length + 1,)
        assert len(set(ex["keys"].tolist())) == 4
        table = dict(zip(ex["keys"].tolist(), ex["values"].tolist(), strict=True))
        queries = np.flatnonzero(t == niah.QUERY)
        assert len(queries) == 4 and queries[-1] == length - 2
        for q in queries:
            assert t[q + 2] == table[int(t[q + 1])] and mask[q + 2] == 1
        assert mask.sum() == 4
        body = t[1 : queries[0]]
        for k, v in table.items():  # each pair appears once, key then value
            (i,) = np.flatnonzero(body == k)
            assert body[i + 1] == v
    with pytest.raises(ValueError, match="distinct keys"):
        niah.make_assoc_recall(rng, length=100, num_pairs=9, vocab=VOCAB)


def test_rows_and_batch():
    rng = np.random.default_rng(3)
    cfg = DataConfig(name="niah", seq_len=40, niah_kind="word")
    ex = niah.sample(cfg, rng, 30)
    row = niah.make_row(ex, 40)
    assert row["inputs"].shape == (40,) and row["segment_ids"][:30].all() and not row["segment_ids"][30:].any()
    np.testing.assert_array_equal(row["targets"][row["weights"] > 0], ex["value"])
    np.testing.assert_array_equal(row["inputs"][1:30], row["targets"][:29])
    b = niah.make_batch([niah.sample(cfg, rng, 30) for _ in range(3)])
    assert b["inputs"].shape == (3, 30) and b["weights"].sum() == 6
    with pytest.raises(ValueError, match="does not fit"):
        niah.make_row(ex, 20)


def test_config_validation():
    with pytest.raises(ValueError, match="data.niah_kind"):
        DataConfig(name="niah", niah_kind="essay")
    with pytest.raises(ValueError, match="data.niah_num_pairs"):
        DataConfig(name="assoc_recall", niah_num_pairs=20, niah_num_keys=16, seq_len=200)
    with pytest.raises(ValueError, match="data.seq_len must be >= 20"):
        DataConfig(name="assoc_recall", niah_num_pairs=4, seq_len=19)
    with pytest.raises(ValueError, match="data.niah_test_lens"):
        DataConfig(name="niah", niah_test_lens=(5,))
    DataConfig(name="chains", niah_kind="essay")  # only validated for niah / assoc_recall


@pytest.mark.parametrize("name", ["niah", "assoc_recall"])
def test_tfds_pipeline(tmp_path, name):
    cfg = DataConfig(
        name=name, data_dir=str(tmp_path), seq_len=24, niah_test_lens=(40,), num_train=6, num_test=5, seed=3
    )
    assert split_names(cfg) == ("train", "test_len40")
    assert vocab_size(cfg) == niah.Vocab.from_data_config(cfg).size
    prepare(cfg)
    (train,) = make_eval_batches(cfg, "train", 8)
    assert train["inputs"].shape == (8, 24) and train["weights"][6:].sum() == 0  # 2 padding rows
    (test,) = make_eval_batches(cfg, "test_len40", 5)
    assert test["inputs"].shape == (5, 40)
    answers = 2 if name == "niah" else 4
    np.testing.assert_array_equal(test["weights"].sum(1), answers)
    # the builder is deterministic from the seed: regenerate the first test problem
    rng = np.random.default_rng([3, 1, 40])
    ex = niah.sample(cfg, rng, 40)
    rows = {tuple(r) for r in test["inputs"]}
    assert tuple(ex["tokens"][:-1]) in rows

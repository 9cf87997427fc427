"""Copy and phone-book probes (data/probes.py): the copy repeats the string, the phone-book answer is the queried
entry's number, weights only on the answer, config validation, deterministic TFDS builds."""

import numpy as np
import pytest

from looped_jax.data import DataConfig, make_eval_batches, prepare, probes, split_names, vocab_size
from looped_jax.results import exact_match_counts


def parse_copy(inputs_T: np.ndarray, targets_T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the string before SEP, the full copy after it), read off a row independently of the generator."""
    tokens = np.concatenate([inputs_T[:1], targets_T])
    (sep,) = np.flatnonzero(tokens == probes.SEP)
    n = sep - 1
    return tokens[1:sep], tokens[sep + 1 : sep + 1 + n]


def test_copy_tokens_repeat_the_string():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 40):
        string = rng.integers(0, 5, size=n)
        tokens, mask = probes.copy_tokens(string)
        assert tokens.shape == mask.shape == (2 * n + 2,) and tokens[0] == probes.BOS
        assert (tokens == probes.SEP).sum() == 1 and tokens[n + 1] == probes.SEP
        np.testing.assert_array_equal(tokens[1 : n + 1], probes.COPY_SYMBOL0 + string)
        np.testing.assert_array_equal(tokens[n + 2 :], tokens[1 : n + 1])  # the second half repeats the first
        np.testing.assert_array_equal(np.flatnonzero(mask), np.arange(n + 2, 2 * n + 2))  # loss on the copy only


def test_copy_row_weights_and_exact_match():
    string = np.array([3, 0, 4, 4, 1], np.int32)
    row = probes.copy_row({"string": string}, 16)
    assert row["weights"].sum() == 5 and row["segment_ids"].sum() == 11
    weighted = np.flatnonzero(row["weights"])
    np.testing.assert_array_equal(weighted, np.arange(6, 11))  # inputs SEP s_1..s_4 predict s_1..s_5
    assert row["inputs"][weighted[0]] == probes.SEP
    first, copy = parse_copy(row["inputs"][:11], row["targets"][:11])
    np.testing.assert_array_equal(row["targets"][weighted], first)
    np.testing.assert_array_equal(copy, first)
    # sequence-level exact match from the per-token weights: one wrong copied symbol fails the row,
    # a wrong prediction outside the copy does not count
    pred = np.stack([row["targets"]] * 3)
    pred[1, weighted[2]] += 1
    pred[2, 1] += 1
    weights = np.stack([row["weights"]] * 3)
    assert exact_match_counts(pred, np.stack([row["targets"]] * 3), weights) == (2, 3)
    with pytest.raises(ValueError, match="does not fit"):
        probes.copy_row({"string": string}, 10)


def parse_phonebook(tokens: np.ndarray, name_len: int) -> tuple[dict, tuple, np.ndarray]:
    """(book {name: number}, queried name, answer) from a problem's tokens, by splitting on SEP and COLON."""
    *entries, query = np.split(tokens[1:], np.flatnonzero(tokens[1:] == probes.SEP) + 1)
    book = {}
    for entry in entries:
        (colon,) = np.flatnonzero(entry == probes.COLON)
        assert colon == name_len and entry[-1] == probes.SEP
        name = tuple(entry[:colon])
        assert name not in book  # names in a book are distinct
        book[name] = entry[colon + 1 : -1]
    (colon,) = np.flatnonzero(query == probes.COLON)
    return book, tuple(query[:colon]), query[colon + 1 :]


def test_phonebook_answer_is_the_queried_number():
    rng = np.random.default_rng(1)
    for entries in (1, 3, 12):
        rec = probes.sample_phonebook(rng, entries=entries, name_len=2, name_vocab=4, number_len=3)
        tokens, mask = probes.phonebook_tokens(rec["names"], rec["numbers"], int(rec["query"]))
        assert len(tokens) == probes.phonebook_input_len(entries, 2, 3) + 1
        book, name, answer = parse_phonebook(tokens, 2)
        assert len(book) == entries and name in book
        np.testing.assert_array_equal(answer, book[name])
        np.testing.assert_array_equal(tokens[mask == 1], book[name])  # the loss is on the answer only
        assert mask.sum() == 3 and all(t < probes.phonebook_vocab_size(4) for t in tokens)
        numbers = np.concatenate(list(book.values()))
        assert np.all((numbers >= probes.PHONE_DIGIT0) & (numbers < probes.NAME0))
    with pytest.raises(ValueError, match="distinct names"):
        probes.sample_phonebook(rng, entries=17, name_len=2, name_vocab=4, number_len=3)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(name="copy", copy_train_max_len=20), "seq_len"),  # 2 * 20 + 1 > 40
        (dict(name="copy", copy_min_len=9, copy_train_max_len=8), "copy_min_len"),
        (dict(name="copy", copy_alphabet=0), "copy_alphabet"),
        (dict(name="copy", copy_test_lens=(8, 8)), "copy_test_lens"),
        (dict(name="copy", copy_test_lens=(0,)), "copy_test_lens"),
        (dict(name="phonebook", phonebook_train_entries=5), "seq_len"),
        (dict(name="phonebook", phonebook_test_entries=(300,)), "phonebook_name_vocab"),
        (dict(name="phonebook", phonebook_number_len=0), "phonebook_number_len"),
        (dict(name="phonebook", phonebook_test_entries=()), "phonebook_test_entries"),
    ],
)
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=rf"data\.{field}"):
        DataConfig(**kwargs)


def test_defaults_fit():
    DataConfig(name="copy", seq_len=33)  # 2 * 16 + 1
    DataConfig(name="phonebook", seq_len=39)  # BOS, 4 entries of 8, name COLON number: 40 tokens, 39 inputs
    with pytest.raises(ValueError, match=r"data\.seq_len must be >= 39"):
        DataConfig(name="phonebook", seq_len=38)


def build(tmp_path, sub, **kw):
    cfg = DataConfig(data_dir=str(tmp_path / sub), num_train=24, num_test=6, **kw)
    prepare(cfg)
    return cfg


def assert_same(cfg, other, split):
    (a,) = make_eval_batches(cfg, split, 32)
    (b,) = make_eval_batches(other, split, 32)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    return a


def test_copy_builder(tmp_path):
    kw = dict(name="copy", seq_len=17, copy_alphabet=5, copy_min_len=2, copy_train_max_len=8, copy_test_lens=(4, 12))
    cfg, other = build(tmp_path, "a", **kw), build(tmp_path, "b", **kw)
    assert split_names(cfg) == ("train", "test_len4", "test_len12") and vocab_size(cfg) == 8
    for split, n in (("train", None), ("test_len4", 4), ("test_len12", 12)):
        batch = assert_same(cfg, other, split)  # same seed -> same data
        real = batch["weights"].sum(-1) > 0
        assert real.sum() == (24 if split == "train" else 6)
        assert batch["inputs"].shape[1] == (17 if split == "train" else 2 * n + 1)
        assert batch["inputs"].max() < vocab_size(cfg)
        lengths = batch["weights"].sum(-1)[real]
        if n is None:
            assert lengths.min() >= 2 and lengths.max() <= 8 and len(set(lengths)) > 1
        else:
            assert (lengths == n).all()
        for r in np.flatnonzero(real):
            first, copy = parse_copy(batch["inputs"][r], batch["targets"][r])
            np.testing.assert_array_equal(copy, first)
            np.testing.assert_array_equal(batch["targets"][r][batch["weights"][r] > 0], first)
    (train,) = make_eval_batches(build(tmp_path, "c", **kw, seed=1), "train", 32)
    assert not np.array_equal(train["inputs"], assert_same(cfg, other, "train")["inputs"])  # seed changes the data


def test_phonebook_builder(tmp_path):
    kw = dict(
        name="phonebook", seq_len=40, phonebook_train_entries=4, phonebook_test_entries=(6,), phonebook_name_vocab=5
    )
    cfg, other = build(tmp_path, "a", **kw), build(tmp_path, "b", **kw)
    assert split_names(cfg) == ("train", "test_e6") and vocab_size(cfg) == probes.NAME0 + 5
    for split in ("train", "test_e6"):
        batch = assert_same(cfg, other, split)
        real = batch["weights"].sum(-1) > 0
        assert real.sum() == (24 if split == "train" else 6)
        assert batch["inputs"].shape[1] == (40 if split == "train" else probes.phonebook_input_len(6, 2, 4))
        assert batch["inputs"].max() < vocab_size(cfg)
        sizes = set()
        for r in np.flatnonzero(real):
            n = batch["segment_ids"][r].sum()
            tokens = np.concatenate([batch["inputs"][r][:1], batch["targets"][r][:n]])
            book, name, answer = parse_phonebook(tokens, 2)
            sizes.add(len(book))
            np.testing.assert_array_equal(batch["targets"][r][batch["weights"][r] > 0], book[name])
        assert sizes == {6} if split == "test_e6" else (max(sizes) <= 4 and len(sizes) > 1)

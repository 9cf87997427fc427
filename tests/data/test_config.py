"""DataConfig validation: errors name the field and the expected value."""

import pytest

from looped_jax.data import DataConfig, chains_min_seq_len


def test_defaults_are_valid():
    cfg = DataConfig()
    assert cfg.name == "chains" and cfg.seq_len >= chains_min_seq_len(cfg.num_assignments)
    assert DataConfig(name="bytes_text", seq_len=16).seq_len == 16


def test_unknown_name():
    with pytest.raises(ValueError, match=r"data\.name.*'chains', 'bytes_text'.*'nope'"):
        DataConfig(name="nope")


def test_seq_len_too_short_for_chains():
    minimum = chains_min_seq_len(10)
    with pytest.raises(ValueError, match=rf"data\.seq_len must be >= {minimum}"):
        DataConfig(seq_len=minimum - 1)
    DataConfig(seq_len=minimum)  # exactly enough
    DataConfig(name="bytes_text", seq_len=8)  # text has no such minimum


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(seq_len="40"), "seq_len"),
        (dict(seq_len=True), "seq_len"),
        (dict(test_hops=(1, "2")), "test_hops"),
        (dict(test_hops=(1, 11)), "test_hops"),
        (dict(test_hops=()), "test_hops"),
        (dict(num_vars=5), "num_vars"),
        (dict(train_min_hops=5, train_max_hops=4), "train_min_hops"),
        (dict(num_train=0), "num_train"),
        (dict(validation_fraction=1.5), "validation_fraction"),
        (dict(name="bytes_text", text_dir="/definitely/not/here"), "text_dir"),
    ],
)
def test_bad_fields_are_named(kwargs, field):
    with pytest.raises(ValueError, match=rf"data\.{field}"):
        DataConfig(**kwargs)


def test_list_becomes_tuple_and_config_is_frozen():
    cfg = DataConfig(test_hops=[2, 6])
    assert cfg.test_hops == (2, 6)
    with pytest.raises(AttributeError):
        cfg.seq_len = 64  # type: ignore[misc]

"""Variable chains: generator, reference resolver, and the TFDS builder."""

import numpy as np
import pytest

from looped_jax.data import DataConfig, chains, chains_problem_length, get_builder, prepare

SMALL = dict(num_train=300, num_test=40, test_hops=(1, 3, 6, 8))


def _records(builder, split):
    source = builder.as_data_source(split=split)
    return [source[i] for i in range(len(source))]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cfg = DataConfig(data_dir=str(tmp_path_factory.mktemp("tfds")), **SMALL)
    prepare(cfg)
    return cfg, get_builder(cfg)


def test_generator_and_resolver_agree():
    rng = np.random.default_rng(0)
    for _ in range(300):
        hops = int(rng.integers(1, 11))
        tokens = chains.generate_problem(rng, num_vars=20, num_assignments=10, hops=hops)
        assert tokens.shape == (chains_problem_length(10),)
        assert chains.solve(tokens) == (tokens[-1], hops)
        assert tokens.max() < chains.chains_vocab_size(20)


def test_resolver_rejects_malformed():
    tokens = chains.generate_problem(np.random.default_rng(1), num_vars=20, num_assignments=10, hops=3)
    broken = tokens.copy()
    broken[3] = chains.QUERY  # a separator replaced
    with pytest.raises(ValueError):
        chains.solve(broken)


def test_splits_answers_and_hops(built):
    cfg, builder = built
    assert set(builder.info.splits) == {"train", "test_h1", "test_h3", "test_h6", "test_h8"}
    length = chains_problem_length(cfg.num_assignments)
    for split in builder.info.splits:
        records = _records(builder, split)
        assert len(records) == (cfg.num_train if split == "train" else cfg.num_test)
        for record in records:
            tokens = record["tokens"]
            assert tokens.shape == (length,) and tokens.dtype == np.int32
            answer, hops = chains.solve(tokens)
            assert int(record["answer_position"]) == length - 1
            assert tokens[record["answer_position"]] == answer
            assert hops == record["hops"]
            if split == "train":
                assert cfg.train_min_hops <= hops <= cfg.train_max_hops
            else:
                assert hops == int(split.removeprefix("test_h"))
    train_hops = {int(r["hops"]) for r in _records(builder, "train")}
    assert train_hops == {1, 2, 3, 4}


def test_test_disjoint_from_train(built):
    _, builder = built
    train_keys = {chains.canonical_key(r["tokens"]) for r in _records(builder, "train")}
    for split in ("test_h1", "test_h3"):  # hop counts that also occur in train
        keys = [chains.canonical_key(r["tokens"]) for r in _records(builder, split)]
        assert len(set(keys)) == len(keys)
        assert not train_keys & set(keys)


def test_deterministic_from_seed(built, tmp_path):
    cfg, builder = built
    same = DataConfig(data_dir=str(tmp_path / "a"), **SMALL)
    other = DataConfig(data_dir=str(tmp_path / "b"), seed=1, **SMALL)
    prepare(same)
    prepare(other)
    for split in ("train", "test_h6"):
        ours = [r["tokens"].tolist() for r in _records(builder, split)]
        assert ours == [r["tokens"].tolist() for r in _records(get_builder(same), split)]
        assert ours != [r["tokens"].tolist() for r in _records(get_builder(other), split)]

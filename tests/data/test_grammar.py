"""Random hierarchy model (data/grammar.py): unambiguous rules, sentences derivable from the grammar with the stored
tree as their only parse, held-out sentences not in train, rows and probe labels, config validation, builds."""

import numpy as np
import pytest

from looped_jax.data import DataConfig, grammar, make_eval_batches, prepare, split_names, vocab_size

G = grammar


def parse(rules: np.ndarray, leaves: np.ndarray) -> list[np.ndarray] | None:
    """Bottom-up parse with the inverted productions: the levels root..leaves, or None if not derivable."""
    depth, vocab, m, s = rules.shape
    levels = [np.asarray(leaves)]
    for level in range(depth - 1, -1, -1):
        parent_of = {tuple(rules[level, a, r]): a for a in range(vocab) for r in range(m)}
        groups = levels[0].reshape(-1, s)
        parents = [parent_of.get(tuple(g)) for g in groups]
        if None in parents:
            return None
        levels.insert(0, np.array(parents))
    return levels


def test_rules_unambiguous_and_seeded():
    rules = G.make_rules(3, depth=3, vocab=5, rules=4, branching=2)
    assert rules.shape == (3, 5, 4, 2) and rules.min() >= 0 and rules.max() < 5
    for level in rules:
        productions = {tuple(p) for p in level.reshape(-1, 2)}
        assert len(productions) == 5 * 4  # no two (symbol, rule) pairs share a production
    np.testing.assert_array_equal(rules, G.make_rules(3, depth=3, vocab=5, rules=4, branching=2))
    assert not np.array_equal(rules, G.make_rules(4, depth=3, vocab=5, rules=4, branching=2))
    with pytest.raises(ValueError, match="unambiguous"):
        G.make_rules(0, depth=2, vocab=3, rules=4, branching=2)


def test_sentences_derivable_and_root_recoverable():
    rules = G.make_rules(0, depth=3, vocab=6, rules=3, branching=3)
    trees = G.sample_trees(np.random.default_rng(0), rules, 200)
    assert trees.shape == (200, 1 + 3 + 9 + 27)
    for tree in trees:
        levels = parse(rules, tree[G.level_slice(3, 3)])
        assert levels is not None
        np.testing.assert_array_equal(np.concatenate(levels), tree)  # the stored tree is the parse
    assert len(set(trees[:, 0].tolist())) == 6  # all roots occur
    corrupt = trees[0][G.level_slice(3, 3)].copy()
    corrupt[:3] = next(t for t in np.ndindex(6, 6, 6) if parse(rules[2:], np.array(t)) is None)
    assert parse(rules, corrupt) is None  # a leaf triple no symbol produces


def test_held_out_sentences_not_in_train_and_deterministic():
    G.split_trees.cache_clear()
    args = (1, 3, 4, 2, 2, 5, 200, 100)  # grammar_seed, L=3, v=4, m=2, s=2, seed, num_train, num_test: 4 * 2^7 = 512
    train, test = G.split_trees(*args)
    leaves = G.level_slice(3, 2)
    train_set = {t[leaves].tobytes() for t in train}
    test_set = {t[leaves].tobytes() for t in test}
    assert len(train_set) == 200 and len(test_set) == 100 and not train_set & test_set
    G.split_trees.cache_clear()
    again_train, again_test = G.split_trees(*args)
    np.testing.assert_array_equal(train, again_train)
    np.testing.assert_array_equal(test, again_test)
    other, _ = G.split_trees(*args[:5], 6, *args[6:])
    assert not np.array_equal(train, other)
    with pytest.raises(ValueError, match="sentences"):
        G.split_trees(1, 2, 3, 2, 2, 5, 20, 5)  # 3 * 2^3 = 24 sentences < 25


def test_row_and_probe_labels():
    rules = G.make_rules(0, depth=2, vocab=4, rules=2, branching=3)
    (tree,) = G.sample_trees(np.random.default_rng(1), rules, 1)
    row = G.make_row({"tree": tree}, 12, depth=2, branching=3)
    leaves = tree[G.level_slice(2, 3)]
    np.testing.assert_array_equal(row["inputs"][:9], np.concatenate([[G.BOS], G.LEAF0 + leaves[:-1]]))
    np.testing.assert_array_equal(row["targets"][:9], G.LEAF0 + leaves)
    np.testing.assert_array_equal(row["weights"], np.arange(12) < 9)  # every leaf is a target
    levels = parse(rules, leaves)
    assert row["root"] == levels[0][0] == tree[0]
    assert row["ancestors"].shape == (2, 12)
    for p in range(9):  # the level-l ancestor of leaf p: p // s^(L - l) in that level
        assert row["ancestors"][0, p] == levels[0][0] and row["ancestors"][1, p] == levels[1][p // 3]
    assert (row["ancestors"][:, 9:] == 0).all()
    with pytest.raises(ValueError, match="do not fit"):
        G.make_row({"tree": tree}, 8, depth=2, branching=3)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(grammar_rules=17), "grammar_rules"),  # > v^(s-1) = 16
        (dict(grammar_branching=1), "grammar_branching"),
        (dict(grammar_depth=0), "grammar_depth"),
        (dict(grammar_vocab=0), "grammar_vocab"),
        (dict(grammar_seed=-1), "grammar_seed"),
        (dict(grammar_depth=6), "seq_len"),  # 64 leaves > 40
        (dict(grammar_vocab=2, grammar_rules=1), "num_train"),  # 2 sentences
    ],
)
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=rf"data\.{field}"):
        DataConfig(name="hierarchy", **kwargs)


def test_builder(tmp_path):
    kw = dict(
        name="hierarchy", seq_len=10, grammar_depth=3, grammar_vocab=4, grammar_rules=2, grammar_branching=2,
        grammar_seed=2, num_train=40, num_test=12,
    )  # fmt: skip
    G.split_trees.cache_clear()
    cfg = DataConfig(data_dir=str(tmp_path / "a"), **kw)
    prepare(cfg)
    G.split_trees.cache_clear()
    other = DataConfig(data_dir=str(tmp_path / "b"), **kw)
    prepare(other)
    assert split_names(cfg) == ("train", "test") and vocab_size(cfg) == 6
    rules = G.make_rules(2, depth=3, vocab=4, rules=2, branching=2)
    sentences = {}
    for split, count in (("train", 40), ("test", 12)):
        (batch,) = make_eval_batches(cfg, split, 64)
        (again,) = make_eval_batches(other, split, 64)
        for k in batch:
            np.testing.assert_array_equal(batch[k], again[k])  # same seeds -> same data
        real = batch["weights"].sum(-1) > 0
        assert real.sum() == count and batch["inputs"].max() < 6
        assert (batch["weights"][real].sum(-1) == 8).all()
        sentences[split] = set()
        for r in np.flatnonzero(real):
            leaves = batch["targets"][r][:8] - G.LEAF0
            levels = parse(rules, leaves)
            assert levels is not None and batch["root"][r] == levels[0][0]
            np.testing.assert_array_equal(batch["ancestors"][r][1, :8], np.repeat(levels[1], 4))
            sentences[split].add(tuple(leaves))
        assert len(sentences[split]) == count
    assert not sentences["train"] & sentences["test"]

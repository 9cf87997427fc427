"""The random hierarchy model (Cagnetta, Petrini, Tomasini, Favero & Wyart 2024, "How Deep Neural Networks Learn
Compositional Data: The Random Hierarchy Model"; used as a language-modelling task by Korchinski, Favero &
Wyart 2026): sentences of a random, unambiguous probabilistic context-free grammar, for next-token prediction and
for probing whether a model's states carry the latent (root and intermediate) symbols.

The grammar (from ``grammar_seed``): levels l = 0 (root) .. L (leaves), v symbols per level (``grammar_vocab``);
each symbol of level l < L has m (``grammar_rules``) productions into s (``grammar_branching``) symbols of level
l + 1, and the v * m productions of a level are distinct s-tuples (so no two symbols share a production and every
sentence has exactly one parse; needs m <= v^(s-1)). ``rules[l, a, r]`` is production r of symbol a at level l.

A sentence: a uniform root, then every symbol replaced by one of its m productions chosen uniformly, level by
level, down to s^L leaves. Records store the whole tree, levels concatenated root first: level l occupies
``tree[(s^l - 1)/(s - 1) : (s^(l+1) - 1)/(s - 1)]`` (``level_slice``).

Token layout (vocabulary 2 + v)::

    PAD=0  BOS=1  leaf symbol i -> 2 + i

    BOS  leaf_1 .. leaf_{s^L}          (s^L inputs, rows padded to seq_len)

Next-token prediction on the leaves: every leaf target carries weight. Rows also carry, for probes, ``root``
(int32) and ``ancestors`` int32 [L, seq_len]: ``ancestors[l, p]`` is the level-l ancestor of the leaf that is the
target at position p (zero past the sentence). Splits (deterministic from data.seed): ``train`` (the first
num_train distinct sentences drawn) and ``test`` (the next num_test distinct sentences not in train).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import tensorflow_datasets as tfds

from looped_jax.data.config import DataConfig, config_digest
from looped_jax.data.pipeline import DatasetSpec, register_dataset

PAD, BOS = 0, 1
LEAF0 = 2


def grammar_vocab_size(vocab: int) -> int:
    return LEAF0 + vocab


def num_tree_nodes(depth: int, branching: int) -> int:
    """Symbols in one tree, root to leaves: 1 + s + ... + s^L."""
    return sum(branching**level for level in range(depth + 1))


def level_slice(level: int, branching: int) -> slice:
    """Where level ``level`` lies in a flat tree (levels concatenated root first)."""
    start = num_tree_nodes(level - 1, branching) if level > 0 else 0
    return slice(start, start + branching**level)


def num_sentences(depth: int, vocab: int, rules: int, branching: int) -> int:
    """Distinct sentences of the grammar: v roots times m choices at each internal node."""
    return vocab * rules ** num_tree_nodes(depth - 1, branching)


def make_rules(seed: int, depth: int, vocab: int, rules: int, branching: int) -> np.ndarray:
    """``rules`` int32 [L, v, m, s]: per level, v * m distinct s-tuples of symbols, drawn without replacement."""
    if rules * vocab > vocab**branching:
        raise ValueError(
            f"unambiguous rules need grammar_rules * grammar_vocab <= grammar_vocab ** grammar_branching, got "
            f"{rules} * {vocab} > {vocab}**{branching}"
        )
    rng = np.random.default_rng([seed, 7])
    powers = vocab ** np.arange(branching - 1, -1, -1)
    out = np.empty((depth, vocab, rules, branching), np.int32)
    for level in range(depth):
        codes = rng.choice(vocab**branching, size=vocab * rules, replace=False)
        out[level] = ((codes[:, None] // powers) % vocab).reshape(vocab, rules, branching)
    return out


def sample_trees(rng: np.random.Generator, rules: np.ndarray, count: int) -> np.ndarray:
    """``count`` random trees, int32 [count, num_tree_nodes]: uniform roots, uniform productions top-down."""
    depth, vocab, m, s = rules.shape
    level = rng.integers(0, vocab, size=(count, 1))
    levels = [level]
    for l in range(depth):
        choice = rng.integers(0, m, size=level.shape)
        level = rules[l][level, choice].reshape(count, -1)  # [count, s^l, s] -> [count, s^(l+1)]
        levels.append(level)
    return np.concatenate(levels, axis=1).astype(np.int32)


@functools.lru_cache(maxsize=4)
def split_trees(
    grammar_seed: int, depth: int, vocab: int, rules: int, branching: int, seed: int, num_train: int, num_test: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) trees: distinct sentences drawn in order from one stream, the first num_train for train, the
    next num_test (none of which is in train) for test."""
    total = num_sentences(depth, vocab, rules, branching)
    if num_train + num_test > total:
        raise ValueError(f"the grammar has {total} sentences, fewer than num_train + num_test = {num_train + num_test}")
    grammar = make_rules(grammar_seed, depth, vocab, rules, branching)
    rng = np.random.default_rng([seed, 0])
    leaves = level_slice(depth, branching)
    seen: set[bytes] = set()
    kept: list[np.ndarray] = []
    want = num_train + num_test
    while len(kept) < want:
        for tree in sample_trees(rng, grammar, max(64, 2 * (want - len(kept)))):
            key = tree[leaves].tobytes()
            if key not in seen:
                seen.add(key)
                kept.append(tree)
                if len(kept) == want:
                    break
    trees = np.stack(kept)
    return trees[:num_train], trees[num_train:]


def make_row(example: dict, seq_len: int, depth: int, branching: int) -> dict[str, np.ndarray]:
    """One record (``tree``) -> one row of seq_len inputs: BOS + leaves[:-1] -> leaves, with ``root`` and
    ``ancestors`` [L, seq_len] (level-l ancestor of each position's target leaf)."""
    tree = np.asarray(example["tree"], np.int32)
    leaves = tree[level_slice(depth, branching)]
    n = len(leaves)
    if n > seq_len:
        raise ValueError(f"sentences of {n} leaves do not fit a row of {seq_len}")
    tokens = np.concatenate([[BOS], LEAF0 + leaves]).astype(np.int32)
    row = {
        "inputs": np.zeros(seq_len, np.int32),
        "targets": np.zeros(seq_len, np.int32),
        "weights": np.zeros(seq_len, np.float32),
        "segment_ids": np.zeros(seq_len, np.int32),
        "positions": np.zeros(seq_len, np.int32),
        "root": np.int32(tree[0]),
        "ancestors": np.zeros((depth, seq_len), np.int32),
    }
    row["inputs"][:n] = tokens[:-1]
    row["targets"][:n] = tokens[1:]
    row["weights"][:n] = 1.0
    row["segment_ids"][:n] = 1
    row["positions"][:n] = np.arange(n, dtype=np.int32)
    for level in range(depth):
        row["ancestors"][level, :n] = np.repeat(tree[level_slice(level, branching)], branching ** (depth - level))
    return row


@dataclasses.dataclass
class HierarchyConfig(tfds.core.BuilderConfig):
    """Builder parameters (mirrors the grammar_* fields of DataConfig)."""

    depth: int = 3
    vocab: int = 16
    rules: int = 4
    branching: int = 2
    grammar_seed: int = 0
    num_train: int = 20_000
    num_test: int = 500
    seed: int = 0

    @classmethod
    def from_data_config(cls, cfg: DataConfig) -> HierarchyConfig:
        params = dict(
            depth=cfg.grammar_depth,
            vocab=cfg.grammar_vocab,
            rules=cfg.grammar_rules,
            branching=cfg.grammar_branching,
            grammar_seed=cfg.grammar_seed,
            num_train=cfg.num_train,
            num_test=cfg.num_test,
            seed=cfg.seed,
        )
        digest = config_digest(params)
        name = f"L{cfg.grammar_depth}_v{cfg.grammar_vocab}_m{cfg.grammar_rules}_s{cfg.grammar_branching}"
        return cls(name=f"{name}_g{cfg.grammar_seed}_n{cfg.num_train}_s{cfg.seed}_{digest}", **params)

    def rules_array(self) -> np.ndarray:
        return make_rules(self.grammar_seed, self.depth, self.vocab, self.rules, self.branching)


class RandomHierarchy(tfds.core.GeneratorBasedBuilder):
    """TFDS builder for random-hierarchy-model sentences (no download; generated from the seeds)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    code_path = None
    url_infos = None
    BUILDER_CONFIGS = [HierarchyConfig(name="default")]

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        nodes = num_tree_nodes(c.depth, c.branching)
        return tfds.core.DatasetInfo(
            builder=self,
            description="Random hierarchy model sentences with their parse trees (looped_jax).",
            features=tfds.features.FeaturesDict({"tree": tfds.features.Tensor(shape=(nodes,), dtype=np.int32)}),
        )

    def _split_generators(self, dl_manager):  # noqa: ARG002 (nothing to download)
        return {"train": self._generate_examples("train"), "test": self._generate_examples("test")}

    def _generate_examples(self, split: str):
        c = self.builder_config
        train, test = split_trees(
            c.grammar_seed, c.depth, c.vocab, c.rules, c.branching, c.seed, c.num_train, c.num_test
        )
        for i, tree in enumerate(train if split == "train" else test):
            yield f"{split}_{i}", {"tree": tree}


register_dataset(
    "hierarchy",
    DatasetSpec(
        builder=lambda cfg, **kw: RandomHierarchy(config=HierarchyConfig.from_data_config(cfg), **kw),
        splits=lambda cfg: ("train", "test"),
        vocab_size=lambda cfg: grammar_vocab_size(cfg.grammar_vocab),
        row=lambda cfg, example, split: make_row(example, cfg.seq_len, cfg.grammar_depth, cfg.grammar_branching),
    ),
)

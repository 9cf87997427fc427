"""Copy and phone-book probes (Jelassi et al. 2024, "Repeat After Me: Transformers are Better than State Space
Models at Copying"): can a model reproduce a string, or look up an entry, longer than any it was trained on?

Copy (``copy``), vocabulary 3 + copy_alphabet::

    PAD=0  BOS=1  SEP=2  symbol i -> 3 + i

    BOS  s_1 .. s_n  SEP  s_1 .. s_n                      (2n + 2 tokens, 2n + 1 inputs)

The string is i.i.d. uniform over the alphabet. Only the n copied symbols (the last n targets) carry weight,
so token accuracy is the copy's accuracy and ``looped_jax.results.exact_match`` on the weights is the
sequence-level exact match Jelassi et al. report (a row counts when all n symbols are right).

Phone book (``phonebook``), vocabulary 14 + phonebook_name_vocab::

    PAD=0  BOS=1  SEP=2  COLON=3  digits 0..9 -> 4..13  name token i -> 14 + i

    BOS  (name_1 COLON number_1 SEP) .. (name_E COLON number_E SEP)  name_q COLON number_q

The E names (phonebook_name_len tokens each) are distinct, the numbers phonebook_number_len random digits, the
queried entry q uniform; only the queried number's digits (the last phonebook_number_len targets) carry weight.

Splits (deterministic from data.seed): ``train`` (rows of seq_len inputs; copy lengths uniform in
[copy_min_len, copy_train_max_len], books of 1..phonebook_train_entries entries, each padded to seq_len), and one
test split per length: ``test_len{n}`` for n in copy_test_lens, ``test_e{E}`` for E in phonebook_test_entries,
whose rows are exactly as long as their problems. Stored records are the random choices; ``copy_tokens`` /
``phonebook_tokens`` rebuild the tokens.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from looped_jax.data.config import DataConfig, config_digest
from looped_jax.data.pipeline import DatasetSpec, register_dataset

PAD, BOS, SEP = 0, 1, 2
COPY_SYMBOL0 = 3
COLON = 3
PHONE_DIGIT0 = 4
NAME0 = 14


# -- rows shared by the probes -----------------------------------------------------------------------------


def tokens_row(tokens: np.ndarray, answer_mask: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """``tokens``/``answer_mask`` [L + 1] -> one batch row of seq_len inputs: inputs tokens[:-1], targets
    tokens[1:], weights answer_mask[1:] (zeros past the problem; an empty problem is a padding row)."""
    length = len(tokens) - 1
    row = {
        "inputs": np.zeros(seq_len, np.int32),
        "targets": np.zeros(seq_len, np.int32),
        "weights": np.zeros(seq_len, np.float32),
        "segment_ids": np.zeros(seq_len, np.int32),
        "positions": np.zeros(seq_len, np.int32),
    }
    if length <= 0:
        return row
    if length > seq_len:
        raise ValueError(f"a problem of {length} input tokens does not fit a row of {seq_len}")
    row["inputs"][:length] = tokens[:-1]
    row["targets"][:length] = tokens[1:]
    row["weights"][:length] = np.asarray(answer_mask, np.float32)[1:]
    row["segment_ids"][:length] = 1
    row["positions"][:length] = np.arange(length, dtype=np.int32)
    return row


def split_number(split: str, prefix: str) -> int:
    """The integer after ``prefix`` in a test split's name (``test_len32`` -> 32)."""
    return int(split.removeprefix(prefix))


# -- copy ----------------------------------------------------------------------------------------------------


def copy_vocab_size(alphabet: int) -> int:
    return COPY_SYMBOL0 + alphabet


def copy_input_len(n: int) -> int:
    """Input tokens of a copy problem of length n."""
    return 2 * n + 1


def copy_tokens(string: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, answer_mask) [2n + 2] of copying ``string`` (symbol indices)."""
    s = COPY_SYMBOL0 + np.asarray(string, np.int32)
    n = len(s)
    tokens = np.concatenate([[BOS], s, [SEP], s]).astype(np.int32)
    mask = np.zeros(2 * n + 2, np.int32)
    mask[n + 2 :] = 1
    return tokens, mask


def copy_row(example: dict, seq_len: int) -> dict[str, np.ndarray]:
    string = np.asarray(example["string"], np.int32)
    if len(string) == 0:  # padding record
        return tokens_row(np.zeros(1, np.int32), np.zeros(1, np.int32), seq_len)
    return tokens_row(*copy_tokens(string), seq_len)


def copy_row_len(cfg: DataConfig, split: str) -> int:
    return cfg.seq_len if split == "train" else copy_input_len(split_number(split, "test_len"))


# -- phone book ----------------------------------------------------------------------------------------------


def phonebook_vocab_size(name_vocab: int) -> int:
    return NAME0 + name_vocab


def phonebook_input_len(entries: int, name_len: int, number_len: int) -> int:
    """Input tokens of a book of ``entries`` entries (the tokens minus one)."""
    return 1 + entries * (name_len + number_len + 2) + name_len + 1 + number_len - 1


def sample_phonebook(
    rng: np.random.Generator, *, entries: int, name_len: int, name_vocab: int, number_len: int
) -> dict[str, np.ndarray]:
    """Random choices of one book: ``names`` [E, name_len] (distinct rows), ``numbers`` [E, number_len], ``query``."""
    num_names = name_vocab**name_len
    if entries > num_names:
        raise ValueError(f"{entries} distinct names need name_vocab**name_len >= {entries}, got {num_names}")
    codes = rng.choice(num_names, size=entries, replace=False)
    names = (codes[:, None] // name_vocab ** np.arange(name_len - 1, -1, -1)) % name_vocab
    return {
        "names": names.astype(np.int32),
        "numbers": rng.integers(0, 10, size=(entries, number_len)).astype(np.int32),
        "query": np.int32(rng.integers(0, entries)),
    }


def phonebook_tokens(names: np.ndarray, numbers: np.ndarray, query: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, answer_mask) of one book: the entries, then the queried name, COLON and its number."""
    names = NAME0 + np.asarray(names, np.int32)
    numbers = PHONE_DIGIT0 + np.asarray(numbers, np.int32)
    entries, name_len = names.shape
    colon = np.full((entries, 1), COLON, np.int32)
    sep = np.full((entries, 1), SEP, np.int32)
    book = np.concatenate([names, colon, numbers, sep], axis=1).reshape(-1)
    tokens = np.concatenate([[BOS], book, names[query], [COLON], numbers[query]]).astype(np.int32)
    mask = np.zeros(len(tokens), np.int32)
    mask[len(tokens) - numbers.shape[1] :] = 1
    return tokens, mask


def phonebook_row(example: dict, seq_len: int) -> dict[str, np.ndarray]:
    names = np.asarray(example["names"], np.int32)
    if names.shape[0] == 0:  # padding record
        return tokens_row(np.zeros(1, np.int32), np.zeros(1, np.int32), seq_len)
    return tokens_row(*phonebook_tokens(names, example["numbers"], int(example["query"])), seq_len)


def phonebook_row_len(cfg: DataConfig, split: str) -> int:
    if split == "train":
        return cfg.seq_len
    entries = split_number(split, "test_e")
    return phonebook_input_len(entries, cfg.phonebook_name_len, cfg.phonebook_number_len)


# -- builders ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ProbesConfig(tfds.core.BuilderConfig):
    """Builder parameters (mirrors the copy_* / phonebook_* fields of DataConfig)."""

    task: str = "copy"
    alphabet: int = 26
    min_len: int = 1
    train_max_len: int = 16
    test_lens: tuple[int, ...] = (16, 32, 64)
    train_entries: int = 4
    test_entries: tuple[int, ...] = (8, 16, 32)
    name_len: int = 2
    name_vocab: int = 16
    number_len: int = 4
    num_train: int = 20_000
    num_test: int = 500
    seed: int = 0

    @classmethod
    def from_data_config(cls, cfg: DataConfig) -> ProbesConfig:
        params = dict(
            task=cfg.name,
            alphabet=cfg.copy_alphabet,
            min_len=cfg.copy_min_len,
            train_max_len=cfg.copy_train_max_len,
            test_lens=tuple(cfg.copy_test_lens),
            train_entries=cfg.phonebook_train_entries,
            test_entries=tuple(cfg.phonebook_test_entries),
            name_len=cfg.phonebook_name_len,
            name_vocab=cfg.phonebook_name_vocab,
            number_len=cfg.phonebook_number_len,
            num_train=cfg.num_train,
            num_test=cfg.num_test,
            seed=cfg.seed,
        )
        digest = config_digest(params)
        return cls(name=f"{cfg.name}_n{cfg.num_train}_s{cfg.seed}_{digest}", **params)


def copy_examples(c: ProbesConfig, split: str):
    if split == "train":
        rng = np.random.default_rng([c.seed, 0])
        for i in range(c.num_train):
            n = int(rng.integers(c.min_len, c.train_max_len + 1))
            yield f"train_{i}", {"string": rng.integers(0, c.alphabet, size=n).astype(np.int32)}
        return
    n = split_number(split, "test_len")
    rng = np.random.default_rng([c.seed, 1, n])
    for i in range(c.num_test):
        yield f"{split}_{i}", {"string": rng.integers(0, c.alphabet, size=n).astype(np.int32)}


def phonebook_examples(c: ProbesConfig, split: str):
    kw = dict(name_len=c.name_len, name_vocab=c.name_vocab, number_len=c.number_len)
    if split == "train":
        rng = np.random.default_rng([c.seed, 0])
        for i in range(c.num_train):
            yield f"train_{i}", sample_phonebook(rng, entries=int(rng.integers(1, c.train_entries + 1)), **kw)
        return
    entries = split_number(split, "test_e")
    rng = np.random.default_rng([c.seed, 1, entries])
    for i in range(c.num_test):
        yield f"{split}_{i}", sample_phonebook(rng, entries=entries, **kw)


class LoopedProbes(tfds.core.GeneratorBasedBuilder):
    """TFDS builder for the copy and phone-book probes (no download; generated from a seed)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    code_path = None
    url_infos = None
    BUILDER_CONFIGS = [ProbesConfig(name="default")]

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        if c.task == "copy":
            features = {"string": tfds.features.Tensor(shape=(None,), dtype=np.int32)}
        else:
            features = {
                "names": tfds.features.Tensor(shape=(None, c.name_len), dtype=np.int32),
                "numbers": tfds.features.Tensor(shape=(None, c.number_len), dtype=np.int32),
                "query": np.int32,
            }
        return tfds.core.DatasetInfo(
            builder=self,
            description="Copy / phone-book probes (Jelassi et al. 2024) (looped_jax).",
            features=tfds.features.FeaturesDict(features),
        )

    def _split_generators(self, dl_manager):  # noqa: ARG002 (nothing to download)
        return {name: self._generate_examples(name) for name in probe_splits(self.builder_config)}

    def _generate_examples(self, split: str):
        c = self.builder_config
        yield from (copy_examples if c.task == "copy" else phonebook_examples)(c, split)


def probe_splits(c: ProbesConfig) -> tuple[str, ...]:
    if c.task == "copy":
        return ("train",) + tuple(f"test_len{n}" for n in c.test_lens)
    return ("train",) + tuple(f"test_e{e}" for e in c.test_entries)


def _builder(cfg: DataConfig, **kw) -> LoopedProbes:
    return LoopedProbes(config=ProbesConfig.from_data_config(cfg), **kw)


register_dataset(
    "copy",
    DatasetSpec(
        builder=_builder,
        splits=lambda cfg: probe_splits(ProbesConfig.from_data_config(cfg)),
        vocab_size=lambda cfg: copy_vocab_size(cfg.copy_alphabet),
        row=lambda cfg, example, split: copy_row(example, copy_row_len(cfg, split)),
    ),
)
register_dataset(
    "phonebook",
    DatasetSpec(
        builder=_builder,
        splits=lambda cfg: probe_splits(ProbesConfig.from_data_config(cfg)),
        vocab_size=lambda cfg: phonebook_vocab_size(cfg.phonebook_name_vocab),
        row=lambda cfg, example, split: phonebook_row(example, phonebook_row_len(cfg, split)),
    ),
)

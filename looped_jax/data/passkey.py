"""PassKey retrieval (Mohtashami & Jaggi 2023; used by TransformerFAM, Hwang et al. 2024, Sec. 4.2): a random
key hidden in filler text, asked for at the end. A model with a bounded attention window can only answer
when the key is inside the window, unless it carries the key in a memory (FAM, Titans, ...).

Token layout (vocabulary 14 + passkey_filler_vocab):

    PAD=0  BOS=1  digits 0..9 -> 2..11  KEY=12  QUERY=13  filler i -> 14 + i

    BOS  filler x a  KEY d_1..d_k  filler x b  QUERY d_1..d_k

The filler cycles through the filler tokens from a random phase; a row of T input tokens holds
T + 1 tokens, so a + b = T - 2 - 2k, and the key starts at a uniform random offset a in [0, a + b]. Inputs
are tokens[:-1], targets tokens[1:]; only the k answer digits (the last k targets) carry weight.

Stored records are the random choices (key digits, key offset, row length, filler phase); ``make_tokens``
rebuilds the tokens from them. Splits: ``train`` (rows of seq_len inputs, or lengths uniform in
[passkey_train_min_len, seq_len] padded to seq_len) and ``test_len{L}`` for each L in passkey_test_lens
(rows of exactly L inputs), all deterministic from data.seed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from looped_jax.data.config import DataConfig, config_digest
from looped_jax.data.pipeline import DatasetSpec, register_dataset

PAD = 0
BOS = 1
DIGIT0 = 2
KEY = 12
QUERY = 13
FILLER0 = 14
NUM_DIGITS = 10


def passkey_vocab_size(filler_vocab: int) -> int:
    return FILLER0 + filler_vocab


def make_tokens(key: np.ndarray, key_position: int, length: int, phase: int, filler_vocab: int) -> np.ndarray:
    """The length + 1 tokens of one problem: BOS, filler, KEY, key digits, filler, QUERY, key digits."""
    key = np.asarray(key, np.int32)
    k = len(key)
    num_filler = length - 2 - 2 * k
    if num_filler < 0 or not 0 <= key_position <= num_filler:
        raise ValueError(f"bad passkey layout: length={length}, digits={k}, key_position={key_position}")
    filler = FILLER0 + (phase + np.arange(num_filler)) % filler_vocab
    digits = DIGIT0 + key
    return np.concatenate([[BOS], filler[:key_position], [KEY], digits, filler[key_position:], [QUERY], digits]).astype(
        np.int32
    )


def sample_record(rng: np.random.Generator, *, length: int, digits: int, filler_vocab: int) -> dict:
    """Random choices of one problem with ``length`` input tokens."""
    num_filler = length - 2 - 2 * digits
    return {
        "key": rng.integers(0, NUM_DIGITS, size=digits).astype(np.int32),
        "key_position": np.int32(rng.integers(0, num_filler + 1)),
        "length": np.int32(length),
        "phase": np.int32(rng.integers(0, filler_vocab)),
    }


def make_row(example: dict, seq_len: int, filler_vocab: int) -> dict[str, np.ndarray]:
    """One record -> one batch row of seq_len inputs (zeros past the problem; an all-zero record gives a
    padding row of weight 0)."""
    length = int(example["length"])
    row = {
        "inputs": np.zeros(seq_len, np.int32),
        "targets": np.zeros(seq_len, np.int32),
        "weights": np.zeros(seq_len, np.float32),
        "segment_ids": np.zeros(seq_len, np.int32),
        "positions": np.zeros(seq_len, np.int32),
    }
    if length == 0:
        return row
    if length > seq_len:
        raise ValueError(f"passkey record of {length} input tokens does not fit a row of {seq_len}")
    tokens = make_tokens(example["key"], int(example["key_position"]), length, int(example["phase"]), filler_vocab)
    k = len(example["key"])
    row["inputs"][:length] = tokens[:-1]
    row["targets"][:length] = tokens[1:]
    row["weights"][length - k : length] = 1.0
    row["segment_ids"][:length] = 1
    row["positions"][:length] = np.arange(length, dtype=np.int32)
    return row


@dataclasses.dataclass
class PassKeyConfig(tfds.core.BuilderConfig):
    """Builder parameters (mirrors the passkey fields of DataConfig)."""

    seq_len: int = 64
    train_min_len: int = 0
    test_lens: tuple[int, ...] = (128, 256, 512)
    digits: int = 5
    filler_vocab: int = 8
    num_train: int = 20_000
    num_test: int = 500
    seed: int = 0

    @classmethod
    def from_data_config(cls, cfg: DataConfig) -> PassKeyConfig:
        params = dict(
            seq_len=cfg.seq_len,
            train_min_len=cfg.passkey_train_min_len,
            test_lens=tuple(cfg.passkey_test_lens),
            digits=cfg.passkey_digits,
            filler_vocab=cfg.passkey_filler_vocab,
            num_train=cfg.num_train,
            num_test=cfg.num_test,
            seed=cfg.seed,
        )
        digest = config_digest(params)
        return cls(name=f"t{cfg.seq_len}_k{cfg.passkey_digits}_n{cfg.num_train}_s{cfg.seed}_{digest}", **params)


class PassKey(tfds.core.GeneratorBasedBuilder):
    """TFDS builder for PassKey retrieval (no download; generated from a seed)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    code_path = None
    url_infos = None
    BUILDER_CONFIGS = [PassKeyConfig(name="default")]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="PassKey retrieval: a key hidden in filler, asked for at the end (looped_jax).",
            features=tfds.features.FeaturesDict(
                {
                    "key": tfds.features.Tensor(shape=(self.builder_config.digits,), dtype=np.int32),
                    "key_position": np.int32,
                    "length": np.int32,
                    "phase": np.int32,
                }
            ),
        )

    def _split_generators(self, dl_manager):  # noqa: ARG002 (nothing to download)
        splits = {"train": self._generate_examples("train")}
        for length in self.builder_config.test_lens:
            splits[f"test_len{length}"] = self._generate_examples(f"test_len{length}")
        return splits

    def _generate_examples(self, split: str):
        c = self.builder_config
        kw = dict(digits=c.digits, filler_vocab=c.filler_vocab)
        if split == "train":
            rng = np.random.default_rng([c.seed, 0])
            low = c.train_min_len or c.seq_len
            for i in range(c.num_train):
                yield f"train_{i}", sample_record(rng, length=int(rng.integers(low, c.seq_len + 1)), **kw)
            return
        length = int(split.removeprefix("test_len"))
        rng = np.random.default_rng([c.seed, 1, length])
        for i in range(c.num_test):
            yield f"{split}_{i}", sample_record(rng, length=length, **kw)


def split_length(cfg: DataConfig, split: str) -> int:
    """Row length (input tokens) of a split."""
    return cfg.seq_len if split == "train" else int(split.removeprefix("test_len"))


register_dataset(
    "passkey",
    DatasetSpec(
        builder=lambda cfg, **kw: PassKey(config=PassKeyConfig.from_data_config(cfg), **kw),
        splits=lambda cfg: ("train",) + tuple(f"test_len{n}" for n in cfg.passkey_test_lens),
        vocab_size=lambda cfg: passkey_vocab_size(cfg.passkey_filler_vocab),
        row=lambda cfg, example, split: make_row(example, split_length(cfg, split), cfg.passkey_filler_vocab),
    ),
)

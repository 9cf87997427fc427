"""Single needle in a haystack (S-NIAH, RULER: Hsieh et al. 2024; used by Titans, Behrouz et al. 2024, sec. 5.2)
and multi-query associative recall (MQAR, Arora et al. 2023 "Zoology"), as synthetic token tasks.

Token layout (vocabulary 15 + num_keys + num_words + filler_vocab)::

    PAD=0  BOS=1  NEEDLE=2  IS=3  QUERY=4  digits 0..9 -> 5..14  key i -> 15 + i
    word i -> 15 + num_keys + i  filler i -> 15 + num_keys + num_words + i

S-NIAH (``niah``), ``T`` input tokens = ``T + 1`` tokens::

    BOS  haystack[:a]  NEEDLE key IS v_1..v_n  haystack[a:]  QUERY key IS v_1..v_n

* ``passkey`` (S-NIAH-1): the haystack repeats the filler tokens cyclically from a random phase, the key is the
  fixed key 0 and the value is n digits;
* ``number`` (S-NIAH-2): i.i.d. random filler, a random key, n digits;
* ``word`` (S-NIAH-3): i.i.d. random filler, a random key, n value words.

The needle starts at a uniform offset ``a`` (depth ``a / len(haystack)``). Only the n answer tokens (the last n
targets) carry weight, so a model must carry the needle from depth ``a`` to the end.

MQAR (``assoc_recall``): ``p`` distinct keys with random word values, each pair ``key value`` placed at a random
offset in i.i.d. filler, then ``QUERY key value`` for every pair in random order; the p queried values are the
weighted targets::

    BOS  filler.. k_1 v_1 filler.. k_p v_p filler..  QUERY k_s1 v_s1 .. QUERY k_sp v_sp

Records store the tokens and the 0/1 answer mask (length ``T + 1``). Splits: ``train`` (rows of seq_len inputs)
and ``test_len{L}`` for each L in ``niah_test_lens``, deterministic from ``data.seed``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from looped_jax.data.config import DataConfig, config_digest
from looped_jax.data.pipeline import DatasetSpec, register_dataset

PAD, BOS, NEEDLE, IS, QUERY = 0, 1, 2, 3, 4
DIGIT0 = 5
NUM_DIGITS = 10
KEY0 = DIGIT0 + NUM_DIGITS
NIAH_KINDS = ("passkey", "number", "word")


@dataclasses.dataclass(frozen=True)
class Vocab:
    """Token offsets for given key / word / filler counts."""

    num_keys: int = 16
    num_words: int = 16
    filler_vocab: int = 16

    @property
    def word0(self) -> int:
        return KEY0 + self.num_keys

    @property
    def filler0(self) -> int:
        return self.word0 + self.num_words

    @property
    def size(self) -> int:
        return self.filler0 + self.filler_vocab

    @classmethod
    def from_data_config(cls, cfg: DataConfig) -> Vocab:
        return cls(cfg.niah_num_keys, cfg.niah_num_words, cfg.niah_filler_vocab)


def make_niah(
    rng: np.random.Generator, *, length: int, kind: str, value_len: int, vocab: Vocab, depth: float | None = None
) -> dict[str, np.ndarray]:
    """One S-NIAH problem with ``length`` input tokens: ``tokens``/``answer_mask`` ``[length + 1]``, ``needle_position``
    (index of NEEDLE in tokens) and ``key``/``value`` (token ids). ``depth`` in [0, 1] fixes the needle's depth."""
    if kind not in NIAH_KINDS:
        raise ValueError(f"kind must be one of {NIAH_KINDS}, got {kind!r}")
    n = value_len
    num_hay = length - 6 - 2 * n  # length + 1 tokens = BOS + hay + (NEEDLE k IS v) + (QUERY k IS v)
    if num_hay < 0:
        raise ValueError(f"length must be >= {6 + 2 * n} for value_len={n}, got {length}")
    if kind == "passkey":
        hay = vocab.filler0 + (rng.integers(0, vocab.filler_vocab) + np.arange(num_hay)) % vocab.filler_vocab
        key = KEY0
    else:
        hay = vocab.filler0 + rng.integers(0, vocab.filler_vocab, size=num_hay)
        key = KEY0 + int(rng.integers(0, vocab.num_keys))
    if kind == "word":
        value = vocab.word0 + rng.integers(0, vocab.num_words, size=n)
    else:
        value = DIGIT0 + rng.integers(0, NUM_DIGITS, size=n)
    a = int(rng.integers(0, num_hay + 1)) if depth is None else int(round(depth * num_hay))
    if not 0 <= a <= num_hay:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    tokens = np.concatenate([[BOS], hay[:a], [NEEDLE, key, IS], value, hay[a:], [QUERY, key, IS], value])
    mask = np.zeros(length + 1, np.int32)
    mask[-n:] = 1
    return {
        "tokens": tokens.astype(np.int32),
        "answer_mask": mask,
        "needle_position": np.int32(1 + a),
        "key": np.int32(key),
        "value": value.astype(np.int32),
    }


def make_assoc_recall(rng: np.random.Generator, *, length: int, num_pairs: int, vocab: Vocab) -> dict[str, np.ndarray]:
    """One MQAR problem with ``length`` input tokens: ``tokens``/``answer_mask`` ``[length + 1]``, ``keys``,
    ``values``."""
    p = num_pairs
    if p > vocab.num_keys:
        raise ValueError(f"num_pairs={p} needs as many distinct keys, vocab has {vocab.num_keys}")
    num_filler = length - 5 * p
    if num_filler < 0:
        raise ValueError(f"length must be >= {5 * p} for num_pairs={p}, got {length}")
    keys = KEY0 + rng.permutation(vocab.num_keys)[:p]
    values = vocab.word0 + rng.integers(0, vocab.num_words, size=p)
    filler = vocab.filler0 + rng.integers(0, vocab.filler_vocab, size=num_filler)
    cuts = np.sort(rng.integers(0, num_filler + 1, size=p))  # pair i goes before filler[cuts[i]]
    pieces, prev = [np.array([BOS])], 0
    for i in range(p):
        pieces += [filler[prev : cuts[i]], np.array([keys[i], values[i]])]
        prev = cuts[i]
    pieces.append(filler[prev:])
    order = rng.permutation(p)
    for i in order:
        pieces.append(np.array([QUERY, keys[i], values[i]]))
    tokens = np.concatenate(pieces).astype(np.int32)
    mask = np.zeros(length + 1, np.int32)
    mask[len(tokens) - 3 * p + 2 :: 3] = 1
    return {"tokens": tokens, "answer_mask": mask, "keys": keys.astype(np.int32), "values": values.astype(np.int32)}


def make_row(example: dict, seq_len: int) -> dict[str, np.ndarray]:
    """One record -> one batch row of seq_len inputs (zeros past the problem; an empty record is a padding row)."""
    tokens = np.asarray(example["tokens"], np.int32)
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
        raise ValueError(f"record of {length} input tokens does not fit a row of {seq_len}")
    row["inputs"][:length] = tokens[:-1]
    row["targets"][:length] = tokens[1:]
    row["weights"][:length] = np.asarray(example["answer_mask"], np.float32)[1:]
    row["segment_ids"][:length] = 1
    row["positions"][:length] = np.arange(length, dtype=np.int32)
    return row


def make_batch(examples: list[dict]) -> dict[str, np.ndarray]:
    """Stacks the rows of equal-length records (in-memory use, e.g. scripts/niah_eval.py)."""
    seq_len = len(examples[0]["tokens"]) - 1
    rows = [make_row(e, seq_len) for e in examples]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def sample(cfg: DataConfig, rng: np.random.Generator, length: int) -> dict[str, np.ndarray]:
    """One problem of the data set named by ``cfg.name`` with ``length`` input tokens."""
    vocab = Vocab.from_data_config(cfg)
    if cfg.name == "assoc_recall":
        return make_assoc_recall(rng, length=length, num_pairs=cfg.niah_num_pairs, vocab=vocab)
    return make_niah(rng, length=length, kind=cfg.niah_kind, value_len=cfg.niah_value_len, vocab=vocab)


@dataclasses.dataclass
class NiahConfig(tfds.core.BuilderConfig):
    """Builder parameters (mirrors the niah_* fields of DataConfig)."""

    task: str = "niah"
    kind: str = "number"
    seq_len: int = 64
    test_lens: tuple[int, ...] = (128, 256, 512)
    value_len: int = 2
    num_keys: int = 16
    num_words: int = 16
    filler_vocab: int = 16
    num_pairs: int = 4
    num_train: int = 20_000
    num_test: int = 500
    seed: int = 0

    @classmethod
    def from_data_config(cls, cfg: DataConfig) -> NiahConfig:
        params = dict(
            task=cfg.name,
            kind=cfg.niah_kind,
            seq_len=cfg.seq_len,
            test_lens=tuple(cfg.niah_test_lens),
            value_len=cfg.niah_value_len,
            num_keys=cfg.niah_num_keys,
            num_words=cfg.niah_num_words,
            filler_vocab=cfg.niah_filler_vocab,
            num_pairs=cfg.niah_num_pairs,
            num_train=cfg.num_train,
            num_test=cfg.num_test,
            seed=cfg.seed,
        )
        digest = config_digest(params)
        kind = cfg.niah_kind if cfg.name == "niah" else f"p{cfg.niah_num_pairs}"
        return cls(name=f"{cfg.name}_{kind}_t{cfg.seq_len}_n{cfg.num_train}_s{cfg.seed}_{digest}", **params)

    def data_config(self) -> DataConfig:
        return DataConfig(
            name=self.task,
            seq_len=self.seq_len,
            niah_kind=self.kind,
            niah_test_lens=self.test_lens,
            niah_value_len=self.value_len,
            niah_num_keys=self.num_keys,
            niah_num_words=self.num_words,
            niah_filler_vocab=self.filler_vocab,
            niah_num_pairs=self.num_pairs,
        )


class LoopedNiah(tfds.core.GeneratorBasedBuilder):
    """TFDS builder for S-NIAH and MQAR (no download; generated from a seed)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    code_path = None
    url_infos = None
    BUILDER_CONFIGS = [NiahConfig(name="default")]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Needle in a haystack / multi-query associative recall (looped_jax).",
            features=tfds.features.FeaturesDict(
                {
                    "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                    "answer_mask": tfds.features.Tensor(shape=(None,), dtype=np.int32),
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
        cfg = c.data_config()
        if split == "train":
            rng, length, count = np.random.default_rng([c.seed, 0]), c.seq_len, c.num_train
        else:
            length = int(split.removeprefix("test_len"))
            rng, count = np.random.default_rng([c.seed, 1, length]), c.num_test
        for i in range(count):
            ex = sample(cfg, rng, length)
            yield f"{split}_{i}", {"tokens": ex["tokens"], "answer_mask": ex["answer_mask"]}


def split_length(cfg: DataConfig, split: str) -> int:
    """Row length (input tokens) of a split."""
    return cfg.seq_len if split == "train" else int(split.removeprefix("test_len"))


for _name in ("niah", "assoc_recall"):
    register_dataset(
        _name,
        DatasetSpec(
            builder=lambda cfg, **kw: LoopedNiah(config=NiahConfig.from_data_config(cfg), **kw),
            splits=lambda cfg: ("train",) + tuple(f"test_len{n}" for n in cfg.niah_test_lens),
            vocab_size=lambda cfg: Vocab.from_data_config(cfg).size,
            row=lambda cfg, example, split: make_row(example, split_length(cfg, split)),
        ),
    )

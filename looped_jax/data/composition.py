"""Compositional tasks of Dziri et al. 2023 ("Faith and Fate: Limits of Transformers on Compositionality"):
multi-digit multiplication and a dynamic programme, trained small and tested larger.

Multiplication (``multiplication``), vocabulary 15::

    PAD=0  BOS=1  TIMES=2  EQUALS=3  PLUS=4  digits 0..9 -> 5..14

    BOS  a (i digits)  TIMES  b (j digits)  EQUALS  c_0 c_1 .. c_{i+j-1}

The operands are written most-significant digit first, as usual (an i-digit operand is uniform in
[10^(i-1), 10^i)); the product c = a * b is written LEAST-significant digit first with exactly i + j digits (zero
padded), so each answer digit depends only on earlier ones and on the operands (the order a carry flows). Only the
i + j answer digits carry weight. With ``mult_scratchpad`` the shifted partial products a * b_k * 10^k
(k = 0..j-1, each i + j digits, least-significant first) come first::

    BOS a TIMES b EQUALS  p_0 PLUS p_1 .. PLUS p_{j-1}  EQUALS  c_0 .. c_{i+j-1}

and the scratchpad's digits carry weight too (the model has to write them; exact match then covers the
scratchpad). Splits: ``train`` (digit counts i, j uniform in [1, mult_train_max_digits], rows of seq_len inputs)
and ``test_{i}x{j}`` for all 1 <= i, j <= mult_test_max_digits (rows exactly as long as the problem).

``SubgraphIndex`` / ``seen_subgraph_fraction`` give Dziri et al.'s "seen subgraph" statistic:
the computation graph of long multiplication has one node per digit product (a_l, b_k, carry in) -> (digit,
carry out) and one per column sum (column digits of the partial products, carry in) -> (digit, carry out); a
node's full sub-computation is the subgraph of it and all its ancestors down to the operand digits, compared by
structure and values (not by position). The statistic is the fraction of a test problem's nodes whose full
sub-computation occurs in some training problem; ``seen_subgraph_report(cfg)`` gives its mean over each built test
split.

Maximum-sum non-adjacent subsequence (``dp``, Dziri et al.'s DP task), vocabulary 15 + 2 dp_value_max + 1::

    PAD=0  BOS=1  EQUALS=2  NO=3  YES=4  digits 0..9 -> 5..14  value v -> 15 + v + dp_value_max

    BOS  x_1 .. x_n  EQUALS  y_1 .. y_n          (dp_answer="selection": y_t = YES where x_t is chosen)
    BOS  x_1 .. x_n  EQUALS  d_1 .. d_w          (dp_answer="sum": the maximum sum, w digits, most-significant
                                                  first, w = digits of dp_value_max * ceil(n / 2))

x_t is uniform in [-dp_value_max, dp_value_max]; the answer maximises the sum over selections with no two adjacent
entries (the empty selection, sum 0, is allowed). Among optimal selections the one that chooses earliest (the
lexicographically largest YES/NO vector, Dziri et al.'s "lexicographically smallest" in their 1 = chosen,
2 = not encoding) is the answer. Only the answer tokens carry weight. The DP depth is n: splits ``train`` (n uniform
in [dp_min_len, dp_train_max_len]) and ``test_len{n}`` for n in dp_test_lens. All data deterministic from data.seed.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow_datasets as tfds

from looped_jax.data.config import DataConfig, config_digest
from looped_jax.data.pipeline import DatasetSpec, get_builder, register_dataset, split_names
from looped_jax.data.probes import split_number, tokens_row

PAD, BOS = 0, 1
# multiplication
TIMES, EQUALS, PLUS = 2, 3, 4
MULT_DIGIT0 = 5
MULT_VOCAB_SIZE = 15
# dp
DP_EQUALS, NO, YES = 2, 3, 4
DP_DIGIT0 = 5
DP_VALUE0 = 15


# -- multiplication ------------------------------------------------------------------------------------------


def digits_msb(x: int, width: int) -> np.ndarray:
    """The ``width`` decimal digits of x, most-significant first (zero padded)."""
    return np.array([(x // 10**p) % 10 for p in range(width - 1, -1, -1)], np.int32)


def num_digits(x: int) -> int:
    return len(str(int(x)))


def mult_tokens(a: int, b: int, scratchpad: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, answer_mask) of a * b (layout in the module docstring)."""
    i, j = num_digits(a), num_digits(b)
    width = i + j
    head = [[BOS], MULT_DIGIT0 + digits_msb(a, i), [TIMES], MULT_DIGIT0 + digits_msb(b, j), [EQUALS]]
    answer = []
    if scratchpad:
        for k, bk in enumerate(digits_msb(b, j)[::-1]):
            answer += [MULT_DIGIT0 + digits_msb(a * int(bk) * 10**k, width)[::-1]]
            answer += [[PLUS] if k < j - 1 else [EQUALS]]
    answer.append(MULT_DIGIT0 + digits_msb(a * b, width)[::-1])
    head_t, answer_t = np.concatenate(head), np.concatenate(answer)
    tokens = np.concatenate([head_t, answer_t]).astype(np.int32)
    mask = np.zeros(len(tokens), np.int32)
    mask[len(head_t) :] = 1
    mask[(tokens == PLUS) | (tokens == EQUALS)] = 0
    return tokens, mask


def mult_input_len(i: int, j: int, scratchpad: bool = False) -> int:
    """Input tokens of an i-digit by j-digit problem."""
    n = 3 + i + j + (i + j)
    if scratchpad:
        n += j * (i + j) + j
    return n - 1


def sample_operand(rng: np.random.Generator, digits: int) -> int:
    return int(rng.integers(10 ** (digits - 1), 10**digits))


def mult_row(example: dict, seq_len: int, scratchpad: bool) -> dict[str, np.ndarray]:
    a, b = int(example["a"]), int(example["b"])
    if a == 0:  # padding record
        return tokens_row(np.zeros(1, np.int32), np.zeros(1, np.int32), seq_len)
    return tokens_row(*mult_tokens(a, b, scratchpad), seq_len)


def mult_split_digits(split: str) -> tuple[int, int]:
    """``test_3x5`` -> (3, 5)."""
    i, j = split.removeprefix("test_").split("x")
    return int(i), int(j)


def mult_row_len(cfg: DataConfig, split: str) -> int:
    if split == "train":
        return cfg.seq_len
    return mult_input_len(*mult_split_digits(split), cfg.mult_scratchpad)


def mult_graph(a: int, b: int) -> list[tuple]:
    """Dziri et al.'s computation graph of long multiplication a * b, in topological order.

    Nodes are ``(op, value, parents)`` with parents ``(index, port)`` (port 0: digit out, 1: carry out) or
    ``("in", digit)`` operand digits. ``mul`` node M[k, l]: a_l * b_k + carry of M[k, l-1] -> (digit, carry);
    ``add`` node S[t]: sum of column t of the shifted partial products + carry of S[t-1] -> (digit, carry)
    (partial product k has digits M[k, 0..i-1] and, at position k + i, the carry of M[k, i-1])."""
    a_d, b_d = digits_msb(a, num_digits(a))[::-1], digits_msb(b, num_digits(b))[::-1]
    i, j = len(a_d), len(b_d)
    nodes: list[tuple] = []
    out: dict[int, tuple[int, int]] = {}  # node index -> (digit, carry)
    mul: dict[tuple[int, int], int] = {}
    for k in range(j):
        for l in range(i):
            parents = [("in", int(a_d[l])), ("in", int(b_d[k]))]
            value = int(a_d[l]) * int(b_d[k])
            if l > 0:
                prev = mul[k, l - 1]
                parents.append((prev, 1))
                value += out[prev][1]
            mul[k, l] = len(nodes)
            out[len(nodes)] = (value % 10, value // 10)
            nodes.append(("mul", value, tuple(parents)))
    prev_sum = None
    for t in range(i + j):
        parents, value = [], 0
        for k in range(j):
            if 0 <= t - k < i:
                parents.append((mul[k, t - k], 0))
                value += out[mul[k, t - k]][0]
            elif t - k == i:
                parents.append((mul[k, i - 1], 1))
                value += out[mul[k, i - 1]][1]
        if prev_sum is not None:
            parents.append((prev_sum, 1))
            value += out[prev_sum][1]
        prev_sum = len(nodes)
        out[prev_sum] = (value % 10, value // 10)
        nodes.append(("add", value, tuple(parents)))
    return nodes


class SubgraphIndex:
    """The full sub-computations (node + all ancestors) of the training problems' computation graphs.

    Each node's sub-computation is interned bottom-up as ``(op, parent sub-computations with ports, operand
    digits)``, so two nodes share an id exactly when their subgraphs are equal in structure and values."""

    def __init__(self, train_records=()):
        self._ids: dict[tuple, int] = {}
        for record in train_records:
            self.add(int(record["a"]), int(record["b"]))

    def _keys(self, a: int, b: int, insert: bool) -> list[int | None]:
        ids: list[int | None] = []
        for op, _, parents in mult_graph(a, b):
            key_parents = []
            for p, q in parents:
                key_parents.append(("in", q) if p == "in" else (ids[p], q))
            key = (op, tuple(key_parents))
            if any(kp[0] is None for kp in key_parents):
                ids.append(None)  # an unseen ancestor: unseen
            elif insert:
                ids.append(self._ids.setdefault(key, len(self._ids)))
            else:
                ids.append(self._ids.get(key))
        return ids

    def add(self, a: int, b: int) -> None:
        self._keys(a, b, insert=True)

    def seen(self, record) -> list[bool]:
        """Per node of ``mult_graph(a, b)`` (same order): was its full sub-computation seen in training?"""
        return [x is not None for x in self._keys(int(record["a"]), int(record["b"]), insert=False)]

    def fraction(self, record) -> float:
        """Fraction of the record's computation-graph nodes whose full sub-computation was seen."""
        seen = self.seen(record)
        return sum(seen) / len(seen)


def seen_subgraph_fraction(train_records, test_record) -> float:
    """Dziri et al.'s seen-subgraph fraction of one test problem (``{"a", "b"}``) against training problems.
    For many test problems build one ``SubgraphIndex(train_records)`` and call ``.fraction``."""
    return SubgraphIndex(train_records).fraction(test_record)


def seen_subgraph_summary(train_records, test_splits: dict[str, list]) -> dict[str, float]:
    """Mean seen-subgraph fraction of each test split (split name -> records)."""
    index = SubgraphIndex(train_records)
    return {name: float(np.mean([index.fraction(r) for r in records])) for name, records in test_splits.items()}


def seen_subgraph_report(cfg: DataConfig) -> dict[str, float]:
    """Mean seen-subgraph fraction of every test split of a built ``multiplication`` data set against its train
    split (``looped_jax.data.prepare(cfg)`` first)."""
    builder = get_builder(cfg)
    if not builder.is_prepared():
        raise FileNotFoundError(f"{builder.name}/{builder.builder_config.name} is not built; call prepare(cfg) first")
    records = {split: list(builder.as_data_source(split=split)) for split in split_names(cfg)}
    train = records.pop("train")
    return seen_subgraph_summary(train, records)


# -- dynamic programme: maximum-sum non-adjacent subsequence --------------------------------------------------


def dp_vocab_size(value_max: int) -> int:
    return DP_VALUE0 + 2 * value_max + 1


def dp_solve(values: np.ndarray) -> tuple[np.ndarray, int]:
    """(selection 0/1 [n], sum): the maximum-sum selection with no two adjacent entries, choosing earliest on
    ties (suffix DP: best[t] = max(best[t + 1], x_t + best[t + 2]))."""
    x = [int(v) for v in values]
    n = len(x)
    best = [0] * (n + 2)
    for t in range(n - 1, -1, -1):
        best[t] = max(best[t + 1], x[t] + best[t + 2])
    chosen = np.zeros(n, np.int32)
    t = 0
    while t < n:
        if x[t] + best[t + 2] >= best[t + 1]:
            chosen[t] = 1
            t += 2
        else:
            t += 1
    return chosen, best[0]


def dp_sum_width(n: int, value_max: int) -> int:
    return num_digits(value_max * math.ceil(n / 2))


def dp_tokens(values: np.ndarray, value_max: int, answer: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, answer_mask) of one list (layout in the module docstring)."""
    values = np.asarray(values, np.int32)
    chosen, total = dp_solve(values)
    if answer == "selection":
        out = np.where(chosen == 1, YES, NO)
    else:
        out = DP_DIGIT0 + digits_msb(total, dp_sum_width(len(values), value_max))
    tokens = np.concatenate([[BOS], DP_VALUE0 + value_max + values, [DP_EQUALS], out]).astype(np.int32)
    mask = np.zeros(len(tokens), np.int32)
    mask[len(values) + 2 :] = 1
    return tokens, mask


def dp_input_len(n: int, value_max: int, answer: str) -> int:
    return n + 1 + (n if answer == "selection" else dp_sum_width(n, value_max))


def dp_row(example: dict, seq_len: int, value_max: int, answer: str) -> dict[str, np.ndarray]:
    values = np.asarray(example["values"], np.int32)
    if len(values) == 0:  # padding record
        return tokens_row(np.zeros(1, np.int32), np.zeros(1, np.int32), seq_len)
    return tokens_row(*dp_tokens(values, value_max, answer), seq_len)


def dp_row_len(cfg: DataConfig, split: str) -> int:
    if split == "train":
        return cfg.seq_len
    return dp_input_len(split_number(split, "test_len"), cfg.dp_value_max, cfg.dp_answer)


# -- builders ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CompositionConfig(tfds.core.BuilderConfig):
    """Builder parameters (mirrors the mult_* / dp_* fields of DataConfig; the stored records do not depend on
    mult_scratchpad or dp_answer, which only change the rows)."""

    task: str = "multiplication"
    train_max_digits: int = 3
    test_max_digits: int = 5
    min_len: int = 1
    train_max_len: int = 8
    test_lens: tuple[int, ...] = (8, 12, 16)
    value_max: int = 5
    num_train: int = 20_000
    num_test: int = 500
    seed: int = 0

    @classmethod
    def from_data_config(cls, cfg: DataConfig) -> CompositionConfig:
        params = dict(
            task=cfg.name,
            train_max_digits=cfg.mult_train_max_digits,
            test_max_digits=cfg.mult_test_max_digits,
            min_len=cfg.dp_min_len,
            train_max_len=cfg.dp_train_max_len,
            test_lens=tuple(cfg.dp_test_lens),
            value_max=cfg.dp_value_max,
            num_train=cfg.num_train,
            num_test=cfg.num_test,
            seed=cfg.seed,
        )
        digest = config_digest(params)
        return cls(name=f"{cfg.name}_n{cfg.num_train}_s{cfg.seed}_{digest}", **params)


def composition_splits(c: CompositionConfig) -> tuple[str, ...]:
    if c.task == "multiplication":
        d = range(1, c.test_max_digits + 1)
        return ("train",) + tuple(f"test_{i}x{j}" for i in d for j in d)
    return ("train",) + tuple(f"test_len{n}" for n in c.test_lens)


def mult_examples(c: CompositionConfig, split: str):
    if split == "train":
        rng = np.random.default_rng([c.seed, 0])
        for n in range(c.num_train):
            i, j = rng.integers(1, c.train_max_digits + 1, size=2)
            a, b = sample_operand(rng, int(i)), sample_operand(rng, int(j))
            yield f"train_{n}", {"a": np.int32(a), "b": np.int32(b)}
        return
    i, j = mult_split_digits(split)
    rng = np.random.default_rng([c.seed, 1, i, j])
    for n in range(c.num_test):
        yield f"{split}_{n}", {"a": np.int32(sample_operand(rng, i)), "b": np.int32(sample_operand(rng, j))}


def dp_examples(c: CompositionConfig, split: str):
    def values(rng, n):
        return {"values": rng.integers(-c.value_max, c.value_max + 1, size=n).astype(np.int32)}

    if split == "train":
        rng = np.random.default_rng([c.seed, 0])
        for i in range(c.num_train):
            yield f"train_{i}", values(rng, int(rng.integers(c.min_len, c.train_max_len + 1)))
        return
    n = split_number(split, "test_len")
    rng = np.random.default_rng([c.seed, 1, n])
    for i in range(c.num_test):
        yield f"{split}_{i}", values(rng, n)


class LoopedComposition(tfds.core.GeneratorBasedBuilder):
    """TFDS builder for multiplication and the DP task (no download; generated from a seed)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    code_path = None
    url_infos = None
    BUILDER_CONFIGS = [CompositionConfig(name="default")]

    def _info(self) -> tfds.core.DatasetInfo:
        if self.builder_config.task == "multiplication":
            features = {"a": np.int32, "b": np.int32}
        else:
            features = {"values": tfds.features.Tensor(shape=(None,), dtype=np.int32)}
        return tfds.core.DatasetInfo(
            builder=self,
            description="Multiplication / max-sum non-adjacent subsequence (Dziri et al. 2023) (looped_jax).",
            features=tfds.features.FeaturesDict(features),
        )

    def _split_generators(self, dl_manager):  # noqa: ARG002 (nothing to download)
        return {name: self._generate_examples(name) for name in composition_splits(self.builder_config)}

    def _generate_examples(self, split: str):
        c = self.builder_config
        yield from (mult_examples if c.task == "multiplication" else dp_examples)(c, split)


def _builder(cfg: DataConfig, **kw) -> LoopedComposition:
    return LoopedComposition(config=CompositionConfig.from_data_config(cfg), **kw)


register_dataset(
    "multiplication",
    DatasetSpec(
        builder=_builder,
        splits=lambda cfg: composition_splits(CompositionConfig.from_data_config(cfg)),
        vocab_size=lambda cfg: MULT_VOCAB_SIZE,
        row=lambda cfg, example, split: mult_row(example, mult_row_len(cfg, split), cfg.mult_scratchpad),
    ),
)
register_dataset(
    "dp",
    DatasetSpec(
        builder=_builder,
        splits=lambda cfg: composition_splits(CompositionConfig.from_data_config(cfg)),
        vocab_size=lambda cfg: dp_vocab_size(cfg.dp_value_max),
        row=lambda cfg, example, split: dp_row(example, dp_row_len(cfg, split), cfg.dp_value_max, cfg.dp_answer),
    ),
)

"""Variable chains: multi-hop pointer following, a task where test-time depth helps.

A problem assigns values to `num_assignments` distinct variables. The queried variable
heads a chain of `hops` assignments, v_h = v_{h-1}, ..., v_2 = v_1, v_1 = digit; the other
assignments form distractor chains (each also ending in a digit). Assignments appear in
random order, so answering needs `hops` sequential lookups: a looped model doing one
lookup per loop needs >= hops loops. Training on short chains and testing on longer ones
measures whether more loops at test time buy more reasoning.

Token layout (vocabulary size 15 + num_vars):

    PAD=0  BOS=1  digits 0..9 -> 2..11  QUERY=12  ANSWER=13  SEP=14  variable i -> 15 + i

    BOS  (LHS RHS SEP) x num_assignments  QUERY v_h ANSWER digit

LHS is a variable, RHS a variable or a digit. The length is fixed,
L = 3 * num_assignments + 5 (35 for 10 assignments); the answer digit is the last token,
at `answer_position = L - 1`. Features: `tokens` int32 [L], `answer_position` int32,
`hops` int32. Splits: `train` (hops uniform in [train_min_hops, train_max_hops]) and
`test_h{h}` for each h in `test_hops`; test problems never repeat a train problem or
each other (checked on a canonical form: sorted assignments plus the query).
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from looped_jax.data.config import DataConfig, chains_problem_length, config_digest

PAD = 0
BOS = 1
DIGIT0 = 2
QUERY = 12
ANSWER = 13
SEP = 14
VAR0 = 15
NUM_DIGITS = 10


def chains_vocab_size(num_vars: int) -> int:
    """Vocabulary size of the chains task."""
    return VAR0 + num_vars


def generate_problem(
    rng: np.random.Generator, *, num_vars: int, num_assignments: int, hops: int, order: str = "random"
) -> np.ndarray:
    """Samples one problem: int32 tokens [L] ending in the answer digit.

    ``order="topological"`` interleaves the chains at random but keeps each chain in order
    (v_1 = digit first), so every assignment comes after the ones it refers to and its value
    is defined by the prefix: a causal model can be supervised on every assignment.
    """
    if not 1 <= hops <= num_assignments <= num_vars:
        raise ValueError(f"need 1 <= hops ({hops}) <= num_assignments ({num_assignments}) <= num_vars ({num_vars})")
    var_ids = rng.permutation(num_vars)[:num_assignments] + VAR0
    # Chain lengths: the queried chain first, then distractors until all variables are used.
    lengths = [hops]
    remaining = num_assignments - hops
    max_distractor = max(1, num_assignments // 2)
    while remaining > 0:
        length = int(rng.integers(1, min(remaining, max_distractor) + 1))
        lengths.append(length)
        remaining -= length
    pairs = []  # (lhs, rhs) tokens
    start = 0
    for length in lengths:
        chain = var_ids[start : start + length]  # chain[0] = v_1 (holds the digit), chain[-1] = head
        start += length
        pairs.append((chain[0], DIGIT0 + int(rng.integers(NUM_DIGITS))))
        for k in range(1, length):
            pairs.append((chain[k], chain[k - 1]))
    query_var = var_ids[hops - 1]
    answer = pairs[0][1]
    if order == "random":
        emit = rng.permutation(num_assignments)
    elif order == "topological":
        # Uniformly random interleaving of the chains, each kept in dependency order.
        starts = np.cumsum([0] + lengths[:-1])
        owner = np.repeat(np.arange(len(lengths)), lengths)
        rng.shuffle(owner)
        taken = np.zeros(len(lengths), np.int64)
        emit = []
        for c in owner:
            emit.append(starts[c] + taken[c])
            taken[c] += 1
    else:
        raise ValueError(f"order must be 'random' or 'topological', got {order!r}")
    tokens = [BOS]
    for i in emit:
        tokens.extend([pairs[i][0], pairs[i][1], SEP])
    tokens.extend([QUERY, query_var, ANSWER, answer])
    return np.asarray(tokens, dtype=np.int32)


def solve(tokens: np.ndarray) -> tuple[int, int]:
    """Reference resolver: parses a problem and follows the query. Returns (answer, hops).

    Independent of the generator: reads assignments from the tokens, checks the layout
    and that every variable is assigned once, then follows pointers to a digit.
    """
    tokens = [int(t) for t in np.asarray(tokens).reshape(-1)]
    if tokens[0] != BOS or tokens[-4] != QUERY or tokens[-2] != ANSWER:
        raise ValueError(f"malformed problem: {tokens}")
    body = tokens[1:-4]
    if len(body) % 3:
        raise ValueError("assignment block length is not a multiple of 3")
    table: dict[int, int] = {}
    for i in range(0, len(body), 3):
        lhs, rhs, sep = body[i : i + 3]
        if sep != SEP or lhs < VAR0 or lhs in table:
            raise ValueError(f"bad assignment {body[i : i + 3]}")
        table[lhs] = rhs
    value, hops = tokens[-3], 0
    while value >= VAR0:
        value = table[value]
        hops += 1
        if hops > len(table):
            raise ValueError("cycle in assignments")
    if not DIGIT0 <= value < DIGIT0 + NUM_DIGITS:
        raise ValueError(f"chain ends in non-digit token {value}")
    return value, hops


def assignment_values(tokens: np.ndarray) -> np.ndarray:
    """Resolved digit token of each assignment's LHS, in order of appearance: int32 [A]."""
    body = np.asarray(tokens)[1:-4].reshape(-1, 3)
    table = {int(lhs): int(rhs) for lhs, rhs, _ in body}
    values = []
    for lhs, _, _ in body:
        value = table[int(lhs)]
        while value >= VAR0:
            value = table[value]
        values.append(value)
    return np.asarray(values, np.int32)


def pair_vocab_size(num_vars: int) -> int:
    """Vocabulary with one token per assignment (LHS, RHS): chains tokens + num_vars * (num_vars + 10)."""
    return chains_vocab_size(num_vars) + num_vars * (num_vars + NUM_DIGITS)


def to_pair_tokens(tokens: np.ndarray, num_vars: int) -> np.ndarray:
    """Rewrites each ``LHS RHS SEP`` triple as a single assignment token.

    ``BOS (LHS RHS SEP) x A QUERY v ANSWER digit`` becomes ``BOS P_1 .. P_A QUERY v ANSWER digit``
    with P = VAR0 + num_vars + lhs_index * (num_vars + 10) + rhs_code (rhs_code: digit d -> d,
    variable j -> 10 + j). A lookup then matches one token's RHS against another token's LHS
    directly, without first gathering the two halves of an assignment from neighbouring
    positions.
    """
    tokens = np.asarray(tokens, np.int32)
    triples = tokens[1:-4].reshape(-1, 3)
    lhs, rhs = triples[:, 0] - VAR0, triples[:, 1]
    rhs_code = np.where(rhs >= VAR0, NUM_DIGITS + rhs - VAR0, rhs - DIGIT0)
    pairs = chains_vocab_size(num_vars) + lhs * (num_vars + NUM_DIGITS) + rhs_code
    return np.concatenate([tokens[:1], pairs, tokens[-4:]]).astype(np.int32)


def canonical_key(tokens: np.ndarray) -> bytes:
    """Order-independent identity of a problem: sorted assignments plus the query."""
    tokens_L = np.asarray(tokens)
    pairs = tokens_L[1:-4].reshape(-1, 3)[:, :2]
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
    return pairs.astype(np.int32).tobytes() + tokens_L[-3:-2].astype(np.int32).tobytes()


@dataclasses.dataclass
class VariableChainsConfig(tfds.core.BuilderConfig):
    """Builder parameters (mirrors the chains fields of DataConfig)."""

    num_vars: int = 20
    num_assignments: int = 10
    train_min_hops: int = 1
    train_max_hops: int = 4
    test_hops: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    num_train: int = 20_000
    num_test: int = 500
    seed: int = 0
    order: str = "random"

    @classmethod
    def from_data_config(cls, cfg: DataConfig) -> "VariableChainsConfig":
        """A config named by its parameters, so different parameters build to different dirs."""
        params = dict(
            num_vars=cfg.num_vars,
            num_assignments=cfg.num_assignments,
            train_min_hops=cfg.train_min_hops,
            train_max_hops=cfg.train_max_hops,
            test_hops=tuple(cfg.test_hops),
            num_train=cfg.num_train,
            num_test=cfg.num_test,
            seed=cfg.seed,
        )
        if cfg.chains_order != "random":  # keeps the names of existing random-order builds
            params["order"] = cfg.chains_order
        digest = config_digest(params)
        name = (
            f"v{cfg.num_vars}_a{cfg.num_assignments}_h{cfg.train_min_hops}-{cfg.train_max_hops}"
            f"_n{cfg.num_train}_s{cfg.seed}{'_topo' if cfg.chains_order == 'topological' else ''}_{digest}"
        )
        return cls(name=name, **params)


class VariableChains(tfds.core.GeneratorBasedBuilder):
    """TFDS builder for the variable-chains task (no download; generated from a seed)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    # Nothing is downloaded: skip TFDS's checksum-file lookup, which needs the optional
    # `importlib_resources` package for builders that live inside a package.
    code_path = None
    url_infos = None
    BUILDER_CONFIGS = [VariableChainsConfig(name="default")]

    def _info(self) -> tfds.core.DatasetInfo:
        length = chains_problem_length(self.builder_config.num_assignments)
        return tfds.core.DatasetInfo(
            builder=self,
            description="Multi-hop variable-chain resolution (looped_jax).",
            features=tfds.features.FeaturesDict(
                {
                    "tokens": tfds.features.Tensor(shape=(length,), dtype=np.int32),
                    "answer_position": np.int32,
                    "hops": np.int32,
                }
            ),
        )

    def _split_generators(self, dl_manager):  # noqa: ARG002 (nothing to download)
        c = self.builder_config
        splits = {"train": self._generate_examples("train")}
        for hops in c.test_hops:
            splits[f"test_h{hops}"] = self._generate_examples(f"test_h{hops}")
        return splits

    def _problems(self, split: str):
        """Yields the token arrays of a split, deterministically from the seed."""
        c = self.builder_config
        kw = dict(num_vars=c.num_vars, num_assignments=c.num_assignments, order=c.order)
        if split == "train":
            rng = np.random.default_rng([c.seed, 0])
            for _ in range(c.num_train):
                hops = int(rng.integers(c.train_min_hops, c.train_max_hops + 1))
                yield generate_problem(rng, hops=hops, **kw)
            return
        hops = int(split.removeprefix("test_h"))
        # Problems with different hop counts always differ, so test splits are mutually
        # disjoint; only train (and repeats within the split) must be excluded.
        if getattr(self, "_train_keys", None) is None:
            self._train_keys = frozenset(canonical_key(t) for t in self._problems("train"))
        seen = set(self._train_keys)
        rng = np.random.default_rng([c.seed, 1, hops])
        count, attempts = 0, 0
        while count < c.num_test:
            attempts += 1
            if attempts > 100 * c.num_test:
                raise ValueError(f"cannot find {c.num_test} unseen {hops}-hop problems; use more num_vars")
            tokens = generate_problem(rng, hops=hops, **kw)
            key = canonical_key(tokens)
            if key in seen:
                continue
            seen.add(key)
            count += 1
            yield tokens

    def _generate_examples(self, split: str):
        for i, tokens in enumerate(self._problems(split)):
            _, hops = solve(tokens)
            yield (
                f"{split}_{i}",
                {
                    "tokens": tokens,
                    "answer_position": np.int32(len(tokens) - 1),
                    "hops": np.int32(hops),
                },
            )

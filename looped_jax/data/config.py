"""DataConfig: which data set, where it lives, and the parameters of its builder.

The defaults describe a tiny CPU run on the variable-chains task (see chains.py):
sequences of 35 tokens padded to `seq_len=40`, a 35-token vocabulary, training on 1-4
hops and testing on 1-8 hops. Every field has a plain type (int, float, str, bool,
tuple[int, ...]) so generic command-line overrides can set it by name.
"""

import dataclasses
import os

DATASET_NAMES = ("chains", "bytes_text", "passkey", "niah", "assoc_recall", "sudoku", "maze", "arc")


def chains_problem_length(num_assignments: int) -> int:
    """Tokens in one chains problem: BOS, 3 per assignment, QUERY var ANSWER digit."""
    return 1 + 3 * num_assignments + 4


def chains_min_seq_len(num_assignments: int) -> int:
    """Smallest model input length T: inputs must reach the ANSWER token (answer is its target)."""
    return chains_problem_length(num_assignments) - 1


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Data set choice and builder parameters; validated on construction."""

    name: str = "chains"  # one of DATASET_NAMES
    data_dir: str = "~/.cache/looped_jax/tfds"  # TFDS data directory (expanduser'd)
    seq_len: int = 40  # model input length T
    # Variable chains (chains.py).
    num_vars: int = 20  # variable tokens in the vocabulary
    num_assignments: int = 10  # assignments per problem (fixes the sequence length)
    train_min_hops: int = 1
    train_max_hops: int = 4
    test_hops: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)  # one test split per entry
    num_train: int = 20_000
    num_test: int = 500  # problems per test split
    seed: int = 0  # builder seed (data content), not the shuffle seed
    chains_order: str = "random"  # "random" or "topological" (each assignment after those it uses)
    chains_dense_labels: bool = False  # also supervise every assignment's value (needs topological)
    chains_pair_tokens: bool = False  # one token per assignment (LHS, RHS) instead of LHS RHS SEP
    # Byte-level text (text.py).
    text_dir: str = ""  # empty -> the Python standard library sources
    max_text_bytes: int = 4_000_000  # cap on the corpus size read from disk
    validation_fraction: float = 0.05  # documents sent to `validation` (by path hash)
    text_shuffle_window: int = 1024  # pieces shuffled together after cutting documents

    def __post_init__(self) -> None:
        if self.chains_order not in ("random", "topological"):
            raise ValueError(f"data.chains_order must be 'random' or 'topological', got {self.chains_order!r}")
        if self.chains_dense_labels and self.chains_order != "topological":
            raise ValueError("data.chains_dense_labels=True needs data.chains_order='topological'")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type in ("tuple[int, ...]", tuple[int, ...]):
                if isinstance(value, list):
                    value = tuple(value)
                    object.__setattr__(self, field.name, value)
                if not isinstance(value, tuple) or not all(
                    isinstance(v, int) and not isinstance(v, bool) for v in value
                ):
                    raise ValueError(f"data.{field.name} must be a tuple of ints, got {value!r}")
                continue
            expected = {"str": str, "int": int, "float": float, "bool": bool}.get(
                field.type if isinstance(field.type, str) else field.type.__name__
            )
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, field.name, float(value))
                continue
            if expected is not None and (
                not isinstance(value, expected) or (expected is int and isinstance(value, bool))
            ):
                raise ValueError(f"data.{field.name} must be of type {expected.__name__}, got {value!r}")

        if self.name not in DATASET_NAMES:
            raise ValueError(f"data.name must be one of {DATASET_NAMES}, got {self.name!r}")
        if not self.data_dir:
            raise ValueError("data.data_dir must be a non-empty path")
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len must be >= 2, got {self.seq_len}")
        if self.num_assignments < 1:
            raise ValueError(f"data.num_assignments must be >= 1, got {self.num_assignments}")
        if self.num_vars < self.num_assignments:
            raise ValueError(
                f"data.num_vars must be >= data.num_assignments={self.num_assignments} "
                f"(each assignment defines a distinct variable), got {self.num_vars}"
            )
        if not 1 <= self.train_min_hops <= self.train_max_hops:
            raise ValueError(
                f"data.train_min_hops must be in [1, data.train_max_hops={self.train_max_hops}], "
                f"got {self.train_min_hops}"
            )
        if self.train_max_hops > self.num_assignments:
            raise ValueError(
                f"data.train_max_hops must be <= data.num_assignments={self.num_assignments}, got {self.train_max_hops}"
            )
        if not self.test_hops or len(set(self.test_hops)) != len(self.test_hops):
            raise ValueError(f"data.test_hops must be a non-empty tuple of distinct ints, got {self.test_hops}")
        for hops in self.test_hops:
            if not 1 <= hops <= self.num_assignments:
                raise ValueError(
                    f"data.test_hops entries must be in [1, data.num_assignments={self.num_assignments}], got {hops}"
                )
        for field_name in ("num_train", "num_test", "max_text_bytes", "text_shuffle_window"):
            if getattr(self, field_name) < 1:
                raise ValueError(f"data.{field_name} must be >= 1, got {getattr(self, field_name)}")
        if self.seed < 0:
            raise ValueError(f"data.seed must be >= 0, got {self.seed}")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"data.validation_fraction must be in (0, 1), got {self.validation_fraction}")
        if self.name == "chains":
            min_len = chains_min_seq_len(self.num_assignments)
            if self.chains_pair_tokens:
                min_len = self.num_assignments + 4
            if self.seq_len < min_len:
                raise ValueError(
                    f"data.seq_len must be >= {min_len} for chains with "
                    f"num_assignments={self.num_assignments} (problem length "
                    f"{chains_problem_length(self.num_assignments)}), got {self.seq_len}"
                )
        if self.name == "bytes_text" and self.text_dir and not os.path.isdir(os.path.expanduser(self.text_dir)):
            raise ValueError(f"data.text_dir must be an existing directory, got {self.text_dir!r}")

    @property
    def resolved_data_dir(self) -> str:
        """`data_dir` with `~` expanded."""
        return os.path.expanduser(self.data_dir)

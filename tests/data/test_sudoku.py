"""Sudoku: solver, generator uniqueness, rating, symmetries, canonical forms, TFDS builder and pipeline."""

import itertools
from pathlib import Path

import numpy as np
import pytest

from looped_jax.config import load_config
from looped_jax.data import DataConfig, default_test_split, make_pipeline, prepare, split_names, sudoku, vocab_size

# A well-known hard 9x9 puzzle with a unique solution (needs guessing beyond singles).
HARD_9 = "800000000003600000070090200050007000000045700000100030001000068008500010090000400"


def _grid(text: str) -> np.ndarray:
    return np.asarray([int(ch) for ch in text], np.int32)


@pytest.mark.parametrize("size,num", [(4, 100), (6, 20), (9, 3)])
def test_generated_puzzles_unique_valid_and_minimal(size, num):
    puzzles, solutions, ratings = sudoku.generate_sudoku(size, num, seed=size)
    assert puzzles.shape == solutions.shape == (num, size * size) and ratings.shape == (num,)
    for puzzle, solution, rating in zip(puzzles, solutions, ratings, strict=True):
        assert sudoku.is_valid_solution(solution, puzzle)
        assert sudoku.count_solutions(puzzle, limit=5) == 1
        np.testing.assert_array_equal(sudoku.solve_sudoku(puzzle), solution)
        assert sudoku.rate_sudoku(puzzle) == rating >= 0
    # Minimal: removing any single given of the first puzzle makes the solution ambiguous.
    puzzle = puzzles[0]
    for cell in np.flatnonzero(puzzle):
        less = puzzle.copy()
        less[cell] = 0
        assert sudoku.count_solutions(less) == 2


def test_min_givens_and_min_rating():
    puzzles, _, _ = sudoku.generate_sudoku(6, 10, seed=1, min_givens=20)
    assert ((puzzles > 0).sum(1) >= 20).all()
    _, _, ratings = sudoku.generate_sudoku(6, 3, seed=2, min_rating=1)
    assert (ratings >= 1).all()


def test_solver_on_known_hard_puzzle_and_bad_inputs():
    puzzle = _grid(HARD_9)
    solution = sudoku.solve_sudoku(puzzle)
    assert sudoku.is_valid_solution(solution, puzzle)
    assert sudoku.rate_sudoku(puzzle) > 0
    # Singles alone solve a puzzle missing one cell: rating 0.
    easy = solution.copy()
    easy[5] = 0
    assert sudoku.rate_sudoku(easy) == 0
    assert sudoku.count_solutions(np.zeros(16, np.int32)) == 2  # the empty grid is ambiguous
    clash = np.zeros(16, np.int32)
    clash[0] = clash[1] = 1  # same digit twice in a row
    assert sudoku.count_solutions(clash) == 0 and sudoku.solve_sudoku(clash) is None
    with pytest.raises(ValueError, match="16, 36 or 81"):
        sudoku.solve_sudoku(np.zeros(25, np.int32))
    with pytest.raises(ValueError, match="cells must be in"):
        sudoku.count_solutions(np.full(16, 5, np.int32))


def test_is_valid_solution_rejects_broken_grids():
    _, solutions, _ = sudoku.generate_sudoku(9, 1, seed=0)
    solution = solutions[0]
    assert sudoku.is_valid_solution(solution)
    swapped = solution.copy()
    swapped[[0, 1]] = swapped[[1, 0]]  # rows stay permutations, columns break
    assert not sudoku.is_valid_solution(swapped)
    other = solution.copy()
    other[0] = other[0] % 9 + 1
    assert not sudoku.is_valid_solution(other)
    puzzle = np.zeros(81, np.int32)
    puzzle[0] = solution[0] % 9 + 1  # a given the solution disagrees with
    assert not sudoku.is_valid_solution(solution, puzzle)


@pytest.mark.parametrize("size", [4, 6, 9])
def test_symmetries_preserve_validity_and_map_puzzle_to_solution(size):
    rng = np.random.default_rng(size)
    puzzles, solutions, _ = sudoku.generate_sudoku(size, 3, seed=rng)
    for puzzle, solution in zip(puzzles, solutions, strict=True):
        for _ in range(5):
            sym = sudoku.random_symmetry(size, rng)
            assert sorted(sym[0].tolist()) == list(range(size * size))
            new_puzzle, new_solution = sudoku.apply_symmetry(puzzle, sym), sudoku.apply_symmetry(solution, sym)
            assert sudoku.is_valid_solution(new_solution, new_puzzle)
            np.testing.assert_array_equal(sudoku.solve_sudoku(new_puzzle), new_solution)
            assert sudoku.canonical_key(new_puzzle) == sudoku.canonical_key(puzzle)


def test_canonical_form_is_the_brute_force_minimum():
    """4x4: the fast form equals the minimum over all 128 cell maps x 24 digit relabellings."""
    perms = sudoku._all_cell_perms(4)
    assert len(perms) == 128
    puzzles, _, _ = sudoku.generate_sudoku(4, 15, seed=7)
    for puzzle in puzzles:
        best = None
        for digits in itertools.permutations(range(1, 5)):
            images = np.asarray((0,) + digits)[puzzle[perms]]
            candidate = tuple(images[np.lexsort(images.T[::-1])[0]].tolist())
            best = candidate if best is None or candidate < best else best
        assert tuple(sudoku.canonical_form(puzzle).tolist()) == best
    assert len({sudoku.canonical_key(p) for p in puzzles}) > 1  # distinguishes inequivalent puzzles
    assert len(sudoku._all_cell_perms(6)) == 3456  # 3! * 2^3 bands/rows, 2! * 3!^2 stacks/columns


def test_tokens_roundtrip():
    grid = np.arange(10, dtype=np.int32)
    np.testing.assert_array_equal(sudoku.decode(sudoku.encode(grid)), grid)
    assert sudoku.encode(grid)[0] == sudoku.BLANK and sudoku.sudoku_vocab_size(9) == 11


@pytest.fixture(scope="module")
def built_6(tmp_path_factory):
    cfg = DataConfig(
        name="sudoku", sudoku_size=6, seq_len=40, num_train=80, num_test=15, data_dir=str(tmp_path_factory.mktemp("s"))
    )
    prepare(cfg)
    return cfg


def _records(cfg, split):
    from looped_jax.data import get_builder

    source = get_builder(cfg).as_data_source(split=split)
    return [source[i] for i in range(len(source))]


def test_builder_splits_valid_and_inequivalent(built_6):
    cfg = built_6
    assert split_names(cfg) == ("train", "test", "test_hard") and vocab_size(cfg) == 8
    keys = {}
    for split in split_names(cfg):
        records = _records(cfg, split)
        assert len(records) == (cfg.num_train if split == "train" else cfg.num_test)
        for r in records:
            puzzle, solution = sudoku.decode(r["inputs"]), sudoku.decode(r["labels"])
            assert sudoku.is_valid_solution(solution, puzzle) and sudoku.count_solutions(puzzle) == 1
            assert int(r["rating"]) == sudoku.rate_sudoku(puzzle) and int(r["givens"]) == (puzzle > 0).sum()
            if split == "test_hard":
                assert r["rating"] >= sudoku.resolved_hard_rating(6, -1) == 1
        keys[split] = [sudoku.canonical_key(sudoku.decode(r["inputs"])) for r in records]
    for split in ("test", "test_hard"):
        assert not set(keys["train"]) & set(keys[split])
        assert len(set(keys[split])) == len(keys[split])


def test_builder_deterministic_and_augmented(built_6, tmp_path):
    cfg = built_6
    fields = dict(name="sudoku", sudoku_size=6, seq_len=36, num_train=80, num_test=15, sudoku_hard_rating=0)
    again = DataConfig(data_dir=str(tmp_path / "a"), **fields)
    prepare(again)
    assert split_names(again) == ("train", "test")
    for split in ("train", "test"):
        assert [r["inputs"].tolist() for r in _records(cfg, split)] == [
            r["inputs"].tolist() for r in _records(again, split)
        ]
    aug = DataConfig(data_dir=str(tmp_path / "b"), **{**fields, "num_train": 10, "sudoku_num_aug": 2})
    prepare(aug)
    records = _records(aug, "train")
    assert len(records) == 30
    for r in records:
        assert sudoku.is_valid_solution(sudoku.decode(r["labels"]), sudoku.decode(r["inputs"]))


def test_pipeline_batches_and_row_augmentation(built_6):
    cfg = built_6
    for split in split_names(cfg):
        batch = next(make_pipeline(cfg, split=split, global_batch_size=4, seed=0))
        assert batch["inputs"].shape == batch["targets"].shape == (4, 40)
        assert batch["puzzle_ids"].shape == (4,) and (batch["puzzle_ids"] == 0).all()
        np.testing.assert_array_equal(batch["weights"][:, :36], 1.0)
        np.testing.assert_array_equal(batch["weights"][:, 36:], 0.0)
        np.testing.assert_array_equal(batch["positions"][0, :36], np.arange(36))
        assert batch["inputs"][:, :36].min() >= 1 and batch["targets"][:, :36].min() >= 2
        assert batch["inputs"].max() < 8 and batch["targets"][:, 36:].max() == 0
    record = _records(cfg, "train")[0]
    augment = DataConfig(**{**cfg.__dict__, "sudoku_augment": True})
    spec_row = sudoku._row
    plain = spec_row(augment, record, "train")
    np.testing.assert_array_equal(plain["inputs"][:36], record["inputs"])
    rows = [spec_row(augment, record, "train", np.random.default_rng(i)) for i in range(4)]
    assert any(not np.array_equal(r["inputs"], plain["inputs"]) for r in rows)
    for r in rows:
        puzzle, solution = sudoku.decode(r["inputs"][:36]), sudoku.decode(r["targets"][:36])
        assert sudoku.is_valid_solution(solution, puzzle)
    np.testing.assert_array_equal(
        spec_row(augment, record, "test", np.random.default_rng(0))["inputs"], plain["inputs"]
    )


def test_4x4_build_keeps_train_and_test_classes_apart(tmp_path):
    """4x4 has few classes (all its puzzles rate 0): test may repeat a class, never one of train's."""
    cfg = DataConfig(name="sudoku", sudoku_size=4, seq_len=16, num_train=300, num_test=40, data_dir=str(tmp_path))
    prepare(cfg)
    assert split_names(cfg) == ("train", "test") and vocab_size(cfg) == 6
    train = {sudoku.canonical_key(sudoku.decode(r["inputs"])) for r in _records(cfg, "train")}
    test = [sudoku.canonical_key(sudoku.decode(r["inputs"])) for r in _records(cfg, "test")]
    assert len(test) == 40 and not train & set(test) and len(train) > 5


def test_9x9_invariant_key_separates_generated_puzzles():
    puzzles, _, _ = sudoku.generate_sudoku(9, 8, seed=11)
    assert len({sudoku.canonical_key(p) for p in puzzles}) == 8


def test_default_test_split_is_the_hard_one_where_built():
    """Evaluation reports test_hard for 6x6 / 9x9 (the plain test split is no harder than train); the 4x4 CPU
    configs have no hard split and keep reporting test."""
    configs = Path(__file__).resolve().parents[2] / "configs"
    want = {
        "hrm_sudoku.py": "test_hard",
        "trm_sudoku_mlp.py": "test_hard",
        "gram_sudoku.py": "test_hard",
        "hrm_sudoku_cpu.py": "test",
        "trm_sudoku_cpu.py": "test",
        "transformer_sudoku_cpu.py": "test",
        "gram_sudoku_cpu.py": "test",
    }
    for name, split in want.items():
        data = load_config(str(configs / name), {}).data
        assert default_test_split(data) == split, name
        assert split in split_names(data)
    assert default_test_split(DataConfig(name="sudoku", sudoku_size=6, seq_len=36)) == "test_hard"
    assert default_test_split(DataConfig(name="sudoku", sudoku_size=9, seq_len=81, sudoku_hard_rating=0)) == "test"
    assert default_test_split(DataConfig()) == "test_h1"  # chains: no plain test split, the first test split

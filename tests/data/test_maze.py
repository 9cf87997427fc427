"""Mazes: BFS shortest paths, deterministic tie-break, generators, TFDS builder and pipeline."""

import numpy as np
import pytest

from looped_jax.data import DataConfig, get_builder, make_pipeline, maze, prepare, split_names, vocab_size


def _all_shortest_paths(open_HW, start, goal):
    """Every shortest path by brute-force depth-first enumeration (small grids only)."""
    dist_HW = maze.bfs_distances(open_HW, start)
    target = dist_HW[goal]
    paths = []

    def walk(path):
        r, c = path[-1]
        if len(path) - 1 == target:
            if (r, c) == goal:
                paths.append(list(path))
            return
        for dr, dc in maze.MOVES:
            nxt = (r + dr, c + dc)
            if 0 <= nxt[0] < open_HW.shape[0] and 0 <= nxt[1] < open_HW.shape[1] and open_HW[nxt]:
                if dist_HW[nxt] == len(path) and nxt not in path:
                    walk(path + [nxt])

    walk([start])
    return paths


def _moves(path):
    return [maze.MOVES.index((b[0] - a[0], b[1] - a[1])) for a, b in zip(path, path[1:], strict=False)]


def test_tie_break_on_open_grid():
    open_HW = np.ones((3, 3), bool)
    # Up is impossible, so down first, down again, then right: D D R R.
    assert maze.shortest_path(open_HW, (0, 0), (2, 2)) == [(0, 0), (1, 0), (2, 0), (2, 1), (2, 2)]
    assert maze.shortest_path(open_HW, (2, 2), (0, 0)) == [(2, 2), (1, 2), (0, 2), (0, 1), (0, 0)]
    assert maze.count_shortest_paths(open_HW, (0, 0), (2, 2)) == 6  # C(4, 2)
    blocked = open_HW.copy()
    blocked[:, 1] = False
    assert maze.shortest_path(blocked, (0, 0), (0, 2)) is None
    assert maze.count_shortest_paths(blocked, (0, 0), (0, 2)) == 0
    with pytest.raises(ValueError, match="is a wall"):
        maze.bfs_distances(blocked, (0, 1))


def test_path_is_the_first_shortest_path_by_brute_force():
    rng = np.random.default_rng(0)
    for generator in ("iid", "tree"):
        for _ in range(15):
            open_HW, start, goal = maze.generate_maze(7, rng, min_path_len=4, generator=generator)
            path = maze.shortest_path(open_HW, start, goal)
            every = _all_shortest_paths(open_HW, start, goal)
            assert len(every) == maze.count_shortest_paths(open_HW, start, goal)
            assert _moves(path) == min(_moves(p) for p in every)
            assert maze.shortest_path(open_HW, start, goal) == path  # deterministic


@pytest.mark.parametrize("generator", ["iid", "tree"])
def test_generated_mazes_have_valid_shortest_paths(generator):
    size, min_len = 11, maze.auto_min_path_len(11)
    inputs, labels, lengths = maze.generate_mazes(size, 40, seed=1, min_path_len=min_len, generator=generator)
    assert inputs.shape == labels.shape == (40, size * size) and min_len == 15
    for inputs_N, labels_N, length in zip(inputs, labels, lengths, strict=True):
        open_HW, start, goal = maze.decode_maze(inputs_N)
        assert (inputs_N == maze.START).sum() == 1 and (inputs_N == maze.GOAL).sum() == 1
        assert length >= min_len and length == maze.bfs_distances(open_HW, start)[goal]
        walls = 1.0 - open_HW.mean()
        assert walls <= 0.5 + 1e-9 and (generator == "tree" or walls > 0.1)
        # The label marks exactly the interior of the tie-broken path; everything else is copied.
        path = maze.shortest_path(open_HW, start, goal)
        assert path[0] == start and path[-1] == goal and len(path) - 1 == length
        for a, b in zip(path, path[1:], strict=False):
            assert abs(a[0] - b[0]) + abs(a[1] - b[1]) == 1 and open_HW[b]
        labels_HW = labels_N.reshape(size, size)
        assert sorted(map(tuple, np.argwhere(labels_HW == maze.PATH))) == sorted(path[1:-1])
        keep = labels_N != maze.PATH
        np.testing.assert_array_equal(labels_N[keep], inputs_N[keep])


def test_canonical_key_is_dihedral_invariant():
    from looped_jax.data import puzzles

    inputs, _, _ = maze.generate_mazes(9, 2, seed=3, min_path_len=5)
    grid_HW = inputs[0].reshape(9, 9)
    keys = {maze.canonical_key(puzzles.dihedral(grid_HW, k).reshape(-1)) for k in range(8)}
    assert keys == {maze.canonical_key(inputs[0])}
    assert maze.canonical_key(inputs[1]) != maze.canonical_key(inputs[0])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cfg = DataConfig(
        name="maze", maze_size=9, seq_len=81, num_train=60, num_test=20, data_dir=str(tmp_path_factory.mktemp("m"))
    )
    prepare(cfg)
    return cfg


def test_builder_records_and_disjoint_splits(built):
    cfg = built
    assert split_names(cfg) == ("train", "test") and vocab_size(cfg) == maze.MAZE_VOCAB_SIZE == 6
    builder = get_builder(cfg)
    keys = {}
    for split in ("train", "test"):
        source = builder.as_data_source(split=split)
        records = [source[i] for i in range(len(source))]
        assert len(records) == (60 if split == "train" else 20)
        for r in records:
            open_HW, start, goal = maze.decode_maze(r["inputs"])
            path = maze.shortest_path(open_HW, start, goal)
            assert int(r["path_len"]) == len(path) - 1 >= maze.auto_min_path_len(9)
            assert int(r["num_paths"]) == maze.count_shortest_paths(open_HW, start, goal) >= 1
            np.testing.assert_array_equal(r["labels"], maze.encode_maze(open_HW, start, goal, path).reshape(-1))
        keys[split] = [maze.canonical_key(r["inputs"]) for r in records]
    assert not set(keys["train"]) & set(keys["test"]) and len(set(keys["test"])) == 20


def test_pipeline_batches(built):
    for split in ("train", "test"):
        batch = next(make_pipeline(built, split=split, global_batch_size=8, seed=0))
        assert batch["inputs"].shape == batch["targets"].shape == batch["weights"].shape == (8, 81)
        assert batch["puzzle_ids"].shape == (8,) and batch["inputs"].dtype == np.int32
        assert (batch["weights"] == 1).all() and (batch["segment_ids"] == 1).all()
        assert ((batch["inputs"] >= maze.WALL) & (batch["inputs"] <= maze.GOAL)).all()
        assert (batch["targets"] == maze.PATH).any(1).all()

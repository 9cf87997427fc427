"""Grid mazes with a shortest-path target (Searchformer / HRM "Maze-Hard" style) and their TFDS builder.

A maze is a square grid (`maze_size`, 30 by default; 9 or 11 for CPU runs) with a wall
fraction p ~ U[maze_min_wall_fraction, maze_max_wall_fraction] (30-50%) and a start and a
goal on open cells; moves are 4-connected. Walls come from one of two generators
(`maze_generator`): "iid" places each wall independently (Searchformer-style random walls);
"tree" carves a random spanning-tree maze (depth-first backtracker over rooms at even
coordinates, about half walls) and knocks out random walls down to p, adding loops.
Measured on 30x30 (50 mazes per p, longest BFS distance from a random start): i.i.d. walls
never reach the Maze-Hard length (max 100 moves over p in [0.3, 0.5]), tree mazes do at
p near 0.5 (mean 199, 98% >= 111) but not below 0.45 - hence "tree" is the default.

Start uniform among open cells; BFS from it; goal uniform among open cells at distance
>= `min_path_len` moves (the maze is redrawn if there is none), so every maze is solvable
and at least that hard. `maze_min_path_len = -1` picks the HRM threshold for 30x30 (path
> 110 moves, i.e. >= 111) scaled by area for other sizes: int(110 * size**2 / 900) + 1
(10 for 9x9, 15 for 11x11).

Target path, with a deterministic tie-break between equally short paths: BFS distances to
the goal are computed, then the path walks from the start, each step to the first neighbour
in the order up, down, left, right whose distance is one smaller. It is therefore the
shortest path whose move sequence is lexicographically first in (U, D, L, R) order. Records
also store `num_paths`, the number of distinct shortest paths (capped at 2**30), since the
tie-broken label is only one of them.

Tokens: PAD 0, wall 1, open 2, start 3, goal 4, path 5 (vocab 6). Inputs show walls, open
cells, start and goal; labels are the same grid with the path's cells strictly between start
and goal marked `path`. The loss is on every cell. Splits: `train` and `test`; no test maze
equals a train maze (or another test maze) under the 8 symmetries of the square.
"""

import collections
import dataclasses
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from looped_jax.data import puzzles
from looped_jax.data.config import DataConfig, config_digest
from looped_jax.data.pipeline import DatasetSpec, register_dataset

PAD, WALL, OPEN, START, GOAL, PATH = 0, 1, 2, 3, 4, 5
MAZE_VOCAB_SIZE = 6
MOVES = ((-1, 0), (1, 0), (0, -1), (0, 1))  # up, down, left, right: the tie-break order
_MAX_PATHS = 1 << 30


def auto_min_path_len(size: int) -> int:
    """HRM's Maze-Hard threshold (> 110 moves on 30x30) scaled by the grid area."""
    return int(110 * size * size / 900) + 1


def resolved_min_path_len(size: int, min_path_len: int) -> int:
    return auto_min_path_len(size) if min_path_len == -1 else min_path_len


def bfs_distances(open_HW: np.ndarray, source: tuple[int, int]) -> np.ndarray:
    """Moves from `source` to every cell through open cells (-1: unreachable or wall)."""
    open_HW = np.asarray(open_HW, bool)
    height, width = open_HW.shape
    dist_HW = np.full((height, width), -1, np.int32)
    if not open_HW[source]:
        raise ValueError(f"BFS source {source} is a wall")
    dist_HW[source] = 0
    queue = collections.deque([source])
    while queue:
        r, c = queue.popleft()
        d = dist_HW[r, c] + 1
        for dr, dc in MOVES:
            nr, nc = r + dr, c + dc
            if 0 <= nr < height and 0 <= nc < width and open_HW[nr, nc] and dist_HW[nr, nc] < 0:
                dist_HW[nr, nc] = d
                queue.append((nr, nc))
    return dist_HW


def shortest_path(open_HW: np.ndarray, start: tuple[int, int], goal: tuple[int, int]) -> list[tuple[int, int]] | None:
    """The tie-broken shortest path (cells from start to goal inclusive), or None if unreachable."""
    dist_HW = bfs_distances(open_HW, goal)
    if dist_HW[start] < 0:
        return None
    path = [tuple(start)]
    r, c = start
    height, width = dist_HW.shape
    while (r, c) != tuple(goal):
        for dr, dc in MOVES:
            nr, nc = r + dr, c + dc
            if 0 <= nr < height and 0 <= nc < width and dist_HW[nr, nc] == dist_HW[r, c] - 1:
                r, c = nr, nc
                break
        path.append((r, c))
    return path


def count_shortest_paths(open_HW: np.ndarray, start: tuple[int, int], goal: tuple[int, int]) -> int:
    """Number of distinct shortest start->goal paths (0 if unreachable), capped at 2**30."""
    dist_HW = bfs_distances(open_HW, start)
    if dist_HW[goal] < 0:
        return 0
    ways = {tuple(start): 1}
    height, width = dist_HW.shape
    for d in range(1, dist_HW[goal] + 1):
        for r, c in zip(*np.nonzero(dist_HW == d), strict=True):
            total = 0
            for dr, dc in MOVES:
                prev = (r - dr, c - dc)
                if 0 <= prev[0] < height and 0 <= prev[1] < width and dist_HW[prev] == d - 1:
                    total += ways.get(prev, 0)
            ways[(int(r), int(c))] = min(total, _MAX_PATHS)
    return ways[tuple(goal)]


def tree_walls(size: int, wall_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Open cells of a spanning-tree maze with walls knocked out down to `wall_fraction`.

    Rooms sit at even (row, column); a randomised depth-first search carves a spanning tree
    of them (a "perfect" maze, about half walls), then random wall cells are opened until
    the wall fraction is at most `wall_fraction`, adding loops. Fewer walls -> shorter paths.
    """
    open_HW = np.zeros((size, size), bool)
    rooms = (size + 1) // 2
    seen_RR = np.zeros((rooms, rooms), bool)
    first = (int(rng.integers(rooms)), int(rng.integers(rooms)))
    seen_RR[first] = True
    open_HW[2 * first[0], 2 * first[1]] = True
    stack = [first]
    while stack:
        r, c = stack[-1]
        fresh = [(r + dr, c + dc) for dr, dc in MOVES if 0 <= r + dr < rooms and 0 <= c + dc < rooms]
        fresh = [cell for cell in fresh if not seen_RR[cell]]
        if not fresh:
            stack.pop()
            continue
        nr, nc = fresh[rng.integers(len(fresh))]
        seen_RR[nr, nc] = True
        open_HW[2 * nr, 2 * nc] = open_HW[r + nr, c + nc] = True  # the room and the passage to it
        stack.append((nr, nc))
    walls = np.argwhere(~open_HW)
    extra = len(walls) - int(round(wall_fraction * size * size))
    if extra > 0:
        knock = walls[rng.permutation(len(walls))[:extra]]
        open_HW[knock[:, 0], knock[:, 1]] = True
    return open_HW


def generate_maze(
    size: int,
    rng: np.random.Generator,
    *,
    min_wall: float = 0.3,
    max_wall: float = 0.5,
    min_path_len: int = 1,
    generator: str = "tree",
    max_attempts: int = 10_000,
) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """One solvable maze: (open_HW bool, start, goal) with a shortest path of >= min_path_len moves.

    The wall fraction is drawn from U[min_wall, max_wall]; walls are i.i.d. per cell
    (generator="iid", Searchformer-style) or a knocked-through spanning-tree maze ("tree").
    """
    if size < 2 or not 0.0 <= min_wall <= max_wall < 1.0 or min_path_len < 1:
        raise ValueError(f"bad maze parameters: {size=} {min_wall=} {max_wall=} {min_path_len=}")
    if generator not in ("tree", "iid"):
        raise ValueError(f"maze generator must be 'tree' or 'iid', got {generator!r}")
    for _ in range(max_attempts):
        fraction = rng.uniform(min_wall, max_wall)
        if generator == "tree":
            open_HW = tree_walls(size, fraction, rng)
        else:
            open_HW = rng.random((size, size)) >= fraction
        cells = np.argwhere(open_HW)
        if len(cells) < 2:
            continue
        start = tuple(int(v) for v in cells[rng.integers(len(cells))])
        dist_HW = bfs_distances(open_HW, start)
        far = np.argwhere(dist_HW >= min_path_len)
        if len(far):
            goal = tuple(int(v) for v in far[rng.integers(len(far))])
            return open_HW, start, goal
    raise ValueError(
        f"no {size}x{size} maze with a path of >= {min_path_len} moves in {max_attempts} attempts; "
        "lower data.maze_min_path_len or the wall fraction"
    )


def encode_maze(open_HW: np.ndarray, start, goal, path=None) -> np.ndarray:
    """Token grid [H, W]: walls, open cells, start, goal and (labels) the path between them."""
    grid_HW = np.where(np.asarray(open_HW, bool), OPEN, WALL).astype(np.int32)
    for r, c in (path or [])[1:-1]:
        grid_HW[r, c] = PATH
    grid_HW[tuple(start)] = START
    grid_HW[tuple(goal)] = GOAL
    return grid_HW


def generate_mazes(
    size: int,
    num: int,
    seed: int | np.random.Generator,
    *,
    min_wall: float = 0.3,
    max_wall: float = 0.5,
    min_path_len: int = 1,
    generator: str = "tree",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`num` mazes as flattened tokens: (inputs [num, size*size], labels [num, size*size], path_len [num])."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    inputs, labels, lengths = [], [], []
    for _ in range(num):
        open_HW, start, goal = generate_maze(
            size, rng, min_wall=min_wall, max_wall=max_wall, min_path_len=min_path_len, generator=generator
        )
        path = shortest_path(open_HW, start, goal)
        inputs.append(encode_maze(open_HW, start, goal).reshape(-1))
        labels.append(encode_maze(open_HW, start, goal, path).reshape(-1))
        lengths.append(len(path) - 1)
    shape = (num, size * size)
    return (
        np.asarray(inputs, np.int32).reshape(shape),
        np.asarray(labels, np.int32).reshape(shape),
        np.asarray(lengths, np.int32),
    )


def decode_maze(tokens_N: np.ndarray) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """Input tokens [N] -> (open_HW, start, goal)."""
    tokens_N = np.asarray(tokens_N)
    size = int(round(len(tokens_N) ** 0.5))
    grid_HW = tokens_N.reshape(size, size)
    start = tuple(int(v) for v in np.argwhere(grid_HW == START)[0])
    goal = tuple(int(v) for v in np.argwhere(grid_HW == GOAL)[0])
    return grid_HW != WALL, start, goal


def canonical_key(tokens_N: np.ndarray) -> bytes:
    """Identity of a maze up to the 8 symmetries of the square (minimum over its images)."""
    tokens_N = np.asarray(tokens_N, np.int8)
    size = int(round(len(tokens_N) ** 0.5))
    grid_HW = tokens_N.reshape(size, size)
    return min(puzzles.dihedral(grid_HW, k).tobytes() for k in range(puzzles.NUM_DIHEDRAL))


@dataclasses.dataclass
class MazeConfig(tfds.core.BuilderConfig):
    """Builder parameters (mirrors the maze fields of DataConfig)."""

    size: int = 30
    num_train: int = 1000
    num_test: int = 1000
    seed: int = 0
    min_wall: float = 0.3
    max_wall: float = 0.5
    min_path_len: int = 111
    generator: str = "tree"

    @classmethod
    def from_data_config(cls, cfg: DataConfig) -> "MazeConfig":
        params = dict(
            size=cfg.maze_size,
            num_train=cfg.num_train,
            num_test=cfg.num_test,
            seed=cfg.seed,
            min_wall=cfg.maze_min_wall_fraction,
            max_wall=cfg.maze_max_wall_fraction,
            generator=cfg.maze_generator,
            min_path_len=resolved_min_path_len(cfg.maze_size, cfg.maze_min_path_len),
        )
        name = f"m{cfg.maze_size}_n{cfg.num_train}_p{params['min_path_len']}_s{cfg.seed}_{config_digest(params)}"
        return cls(name=name, **params)


class Maze(tfds.core.GeneratorBasedBuilder):
    """TFDS builder of shortest-path mazes (no download; generated from the seed)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    code_path = None  # nothing to download: skip TFDS's checksum lookup
    url_infos = None
    BUILDER_CONFIGS = [MazeConfig(name="default")]

    def _info(self) -> tfds.core.DatasetInfo:
        cells = self.builder_config.size**2
        return tfds.core.DatasetInfo(
            builder=self,
            description="Random-wall grid mazes with tie-broken BFS shortest paths (looped_jax).",
            features=tfds.features.FeaturesDict(
                {
                    "inputs": tfds.features.Tensor(shape=(cells,), dtype=np.int32),
                    "labels": tfds.features.Tensor(shape=(cells,), dtype=np.int32),
                    "path_len": np.int32,
                    "num_paths": np.int32,
                }
            ),
        )

    def _split_generators(self, dl_manager):  # noqa: ARG002 (nothing to download)
        return {"train": self._generate_examples("train"), "test": self._generate_examples("test")}

    def _mazes(self, split: str):
        c = self.builder_config
        rng = np.random.default_rng([c.seed, 0 if split == "train" else 1])
        total = c.num_train if split == "train" else c.num_test
        if split == "test" and getattr(self, "_train_keys", None) is None:
            self._train_keys = frozenset(canonical_key(m[0]) for m in self._mazes("train"))
        seen: set[bytes] = set() if split == "train" else set(self._train_keys)
        keys, done, attempts = [], 0, 0
        while done < total:
            attempts += 1
            if attempts > 100 * total + 1000:
                raise ValueError(f"cannot find {total} distinct {split} mazes of size {c.size}; use a larger maze_size")
            open_HW, start, goal = generate_maze(
                c.size,
                rng,
                min_wall=c.min_wall,
                max_wall=c.max_wall,
                min_path_len=c.min_path_len,
                generator=c.generator,
            )
            inputs_N = encode_maze(open_HW, start, goal).reshape(-1)
            key = canonical_key(inputs_N)
            if split != "train" and key in seen:
                continue
            seen.add(key)
            keys.append(key)
            done += 1
            if total >= 1000 and done % (total // 10) == 0:
                print(f"[maze] {split}: {done}/{total} mazes", flush=True)
            path = shortest_path(open_HW, start, goal)
            labels_N = encode_maze(open_HW, start, goal, path).reshape(-1)
            yield inputs_N, labels_N, len(path) - 1, count_shortest_paths(open_HW, start, goal)
        if split == "train":
            self._train_keys = frozenset(keys)

    def _generate_examples(self, split: str):
        for i, (inputs_N, labels_N, path_len, num_paths) in enumerate(self._mazes(split)):
            yield (
                f"{split}_{i}",
                {
                    "inputs": inputs_N,
                    "labels": labels_N,
                    "path_len": np.int32(path_len),
                    "num_paths": np.int32(num_paths),
                },
            )


def _row(cfg: DataConfig, example: dict[str, Any], split: str, rng: np.random.Generator | None = None):  # noqa: ARG001
    return puzzles.grid_row(example["inputs"], example["labels"], cfg.seq_len, puzzle_id=0)


register_dataset(
    "maze",
    DatasetSpec(
        builder=lambda cfg, **kw: Maze(config=MazeConfig.from_data_config(cfg), **kw),
        splits=lambda cfg: ("train", "test"),
        vocab_size=lambda cfg: MAZE_VOCAB_SIZE,
        row=_row,
    ),
)

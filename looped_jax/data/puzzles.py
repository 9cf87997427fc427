"""Shared helpers of the grid-puzzle data sets (sudoku.py, maze.py, arc.py).

Conventions of the HRM puzzle data (Wang et al. 2025, "Hierarchical Reasoning Model"): an
example is a fixed-size grid flattened row-major into T cells; `inputs` and `labels` are
token ids (PAD = 0); the loss is on every cell whose label is not PAD (`weights` = 1; a PAD
label is ignored with weight 0, as the public loader's `ignore_label_id = 0`: this drops the
ARC canvas outside the output grid from the loss, exact accuracy and the halting target),
`segment_ids` = 1 and `positions` = arange(T). Each batch row also carries `puzzle_ids`, an int32 scalar naming
the puzzle (variant) for a puzzle-identifier embedding; 0 means "no identifier".
"""

import numpy as np

Batch = dict[str, np.ndarray]

PAD = 0  # the padding token of every grid data set; a PAD label is ignored (weight 0)
NUM_DIHEDRAL = 8  # the symmetries of the square: 4 rotations x optional transpose


def check_seq_len(seq_len: int, cells: int, what: str) -> None:
    """Raises unless the model length T can hold a grid of `cells` tokens."""
    if seq_len < cells:
        raise ValueError(f"data.seq_len must be >= {cells} (the {what} grid has {cells} cells), got {seq_len}")


def grid_row(inputs_N: np.ndarray, labels_N: np.ndarray, seq_len: int, puzzle_id: int = 0) -> Batch:
    """One flattened grid pair -> a batch row of length seq_len (cells beyond N are padding).

    Real cells get segment id 1 and position = cell index, and weight 1 unless their label is PAD
    (ignored, weight 0); padding cells are all 0.
    """
    inputs_N = np.asarray(inputs_N, np.int32).reshape(-1)
    labels_N = np.asarray(labels_N, np.int32).reshape(-1)
    cells = inputs_N.shape[0]
    if labels_N.shape[0] != cells:
        raise ValueError(f"inputs and labels differ in length: {cells} vs {labels_N.shape[0]}")
    check_seq_len(seq_len, cells, "puzzle")
    inputs_T = np.zeros(seq_len, np.int32)
    targets_T = np.zeros(seq_len, np.int32)
    inputs_T[:cells] = inputs_N
    targets_T[:cells] = labels_N
    real_T = (np.arange(seq_len) < cells).astype(np.int32)
    return {
        "inputs": inputs_T,
        "targets": targets_T,
        "weights": (real_T * (targets_T != PAD)).astype(np.float32),
        "segment_ids": real_T,
        "positions": np.arange(seq_len, dtype=np.int32) * real_T,
        "puzzle_ids": np.int32(puzzle_id),
    }


def dihedral(grid_HW: np.ndarray, k: int) -> np.ndarray:
    """Symmetry k in [0, 8) of the square applied to a 2-D grid: rot90 by k % 4, then a transpose if k >= 4."""
    if not 0 <= k < NUM_DIHEDRAL:
        raise ValueError(f"dihedral index must be in [0, 8), got {k}")
    out = np.rot90(grid_HW, k % 4)
    if k >= 4:
        out = out.T
    return np.ascontiguousarray(out)


def inverse_dihedral(grid_HW: np.ndarray, k: int) -> np.ndarray:
    """Undoes `dihedral(., k)`: inverse_dihedral(dihedral(g, k), k) == g."""
    if not 0 <= k < NUM_DIHEDRAL:
        raise ValueError(f"dihedral index must be in [0, 8), got {k}")
    out = grid_HW.T if k >= 4 else grid_HW
    return np.ascontiguousarray(np.rot90(out, -(k % 4)))


def num_puzzle_ids(cfg) -> int:
    """Rows of the puzzle-identifier embedding a model needs for data set `cfg` (ids are < this).

    Sudoku and maze rows all carry id 0 (HRM uses a single blank identifier for them); ARC has
    one id per (task, augmentation variant) plus 0.
    """
    if cfg.name in ("sudoku", "maze"):
        return 1
    if cfg.name == "arc":
        from looped_jax.data import arc  # noqa: PLC0415 (arc imports this module)

        return arc.num_puzzle_ids(cfg)
    raise ValueError(f"data.name must be sudoku, maze or arc for puzzle identifiers, got {cfg.name!r}")

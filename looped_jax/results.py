"""Measurements the scripts share, and the one writer of their result tables.

* `exact_match`: whole-answer accuracy, a row counts only if every weighted target is right
  (a Sudoku grid, a passkey, a needle's value); rows with no weighted target are not answers.
* `temp_bytes` / `compiled_temp_bytes`: the compiled temporary (activation) memory XLA reports
  for a jitted function (``compiled.memory_analysis().temp_size_in_bytes``).
* `Table` and `write_results`: every README table is written by its script to
  ``runs/<name>/results.md`` (Markdown) and ``runs/<name>/results.json`` (the tables, the script's
  raw numbers and the command line that produced them), so each table has one reproducing command.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

MIB = 2**20


# -- whole-answer accuracy -------------------------------------------------------------------------


def exact_match(pred_BT: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(exact_B, answered_B): ``exact_B`` is True where every target with weight > 0 is predicted, on rows
    that have such a target; ``answered_B`` marks those rows (padding rows are neither)."""
    if pred_BT.shape != targets_BT.shape or weights_BT.shape != targets_BT.shape:
        raise ValueError(
            f"pred_BT {pred_BT.shape}, targets_BT {targets_BT.shape} and weights_BT {weights_BT.shape} must have "
            "one shape"
        )
    scored_BT = jnp.asarray(weights_BT) > 0
    answered_B = scored_BT.any(axis=-1)
    right_BT = jnp.asarray(pred_BT) == jnp.asarray(targets_BT)
    exact_B = answered_B & jnp.all(right_BT | ~scored_BT, axis=-1)
    return exact_B, answered_B


def exact_match_counts(pred_BT, targets_BT, weights_BT) -> tuple[int, int]:
    """(rows answered exactly, rows with an answer) of one batch, as Python ints (host-side sums)."""
    exact_B, answered_B = exact_match(pred_BT, targets_BT, weights_BT)
    return int(exact_B.sum()), int(answered_B.sum())


# -- compiled memory -------------------------------------------------------------------------------


def temp_bytes(compiled) -> int | None:
    """Temporary memory of a compiled executable in bytes; None where the backend does not report it."""
    try:
        analysis = compiled.memory_analysis()
    except NotImplementedError:
        return None
    return None if analysis is None else int(analysis.temp_size_in_bytes)


def compiled_temp_bytes(fn: Callable, *args: Any, **kwargs: Any) -> int | None:
    """Compiles ``fn`` (jitted here unless it already is) for ``args`` (arrays or ``jax.ShapeDtypeStruct``s)
    and returns its temporary memory in bytes (see `temp_bytes`). Nothing is run."""
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    return temp_bytes(jitted.lower(*args, **kwargs).compile())


def tree_bytes(tree: Any) -> int:
    """Bytes held by the array leaves of a pytree (arrays or ``jax.ShapeDtypeStruct``s), e.g. a decode cache."""
    return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


# -- result tables ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Table:
    """A Markdown table: ``header`` cells and ``rows`` of as many cells (str, or numbers written with str)."""

    header: Sequence[str]
    rows: Sequence[Sequence[Any]]
    title: str = ""
    caption: str = ""

    def __post_init__(self):
        if not self.header:
            raise ValueError("Table.header must name at least one column")
        for i, row in enumerate(self.rows):
            if len(row) != len(self.header):
                raise ValueError(
                    f"Table {self.title!r} row {i} has {len(row)} cells, the header has {len(self.header)}: {row!r}"
                )

    def markdown(self) -> str:
        cells = lambda row: "| " + " | ".join(str(c) for c in row) + " |"  # noqa: E731
        lines = [cells(self.header), "|" + "---|" * len(self.header)] + [cells(r) for r in self.rows]
        parts = ([f"### {self.title}"] if self.title else []) + ([self.caption] if self.caption else [])
        return "\n\n".join(parts + ["\n".join(lines)])

    def to_dict(self) -> dict:
        return {
            "title": self.title,
            "caption": self.caption,
            "header": [str(c) for c in self.header],
            "rows": [[str(c) for c in r] for r in self.rows],
        }


def write_results(
    name: str,
    tables: Sequence[Table],
    data: Any = None,
    *,
    root: str | Path = "runs",
    command: Sequence[str] | None = None,
) -> Path:
    """Writes ``<root>/<name>/results.md`` (the tables) and ``results.json`` (tables, ``data``, command).

    ``command`` defaults to this process's command line; it is written at the top of both files so
    a table always says how to make it again. Returns the directory.
    """
    if not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ValueError(f"results name must be a relative name under {str(root)!r}, got {name!r}")
    if not tables:
        raise ValueError("write_results needs at least one Table")
    out = Path(root) / name
    out.mkdir(parents=True, exist_ok=True)
    argv = list(sys.argv if command is None else command)
    if argv and Path(argv[0]).is_file():
        argv[0] = os.path.relpath(argv[0])  # scripts/x.py, as the README writes it
    cmd = shlex.join(argv)
    md = [f"<!-- written by: {cmd} -->"] + [t.markdown() for t in tables]
    (out / "results.md").write_text("\n\n".join(md) + "\n")
    record = {
        "command": cmd,
        "written": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "tables": [t.to_dict() for t in tables],
        "data": data,
    }
    (out / "results.json").write_text(json.dumps(record, indent=2, default=_json_default) + "\n")
    return out


def _json_default(x: Any) -> Any:
    """numpy / jax scalars and arrays in ``data`` become numbers and lists."""
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"results data holds a {type(x).__name__}, which JSON cannot write: {x!r}")


def fmt_bytes(n: float | None, unit: str = "MiB", digits: int = 1) -> str:
    """``n`` bytes in ``unit`` (MiB, GiB: powers of 2; MB, GB: powers of 10), e.g. ``fmt_bytes(5.2e6) == '5.0 MiB'``."""
    if n is None:
        return "n/a"
    scale = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "MB": 1e6, "GB": 1e9}
    if unit not in scale:
        raise ValueError(f"unit must be one of {sorted(scale)}, got {unit!r}")
    return f"{n / scale[unit]:,.{digits}f} {unit}"

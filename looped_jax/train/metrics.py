"""Metrics to stdout, a JSONL file and TensorBoard.

Paths go through ``etils.epath``, so ``gs://bucket/run`` works like a local directory (TensorBoard
events for a URL are written to a local staging directory and copied through epath at every flush and
at most every ``sync_every_s`` seconds: tensorboardX's own GCS writer needs credentials of its own). On a
terminal the train rows become one tqdm-style progress line (step/total, loss, tokens/s, ETA);
in a log file every row is a plain line. After a resume, `truncate_after` drops the rows of
steps the run will redo, and `read_metrics` keeps one row per (split, step) either way.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time

import numpy as np
from etils import epath


def _to_float(v) -> float:
    v = float(np.asarray(v))
    return v if math.isfinite(v) else float("nan")


def _as_path(path) -> epath.Path:
    if "://" in str(path):
        return epath.Path(path)
    return epath.Path(epath.Path(path).expanduser())


def read_metrics(path) -> list[dict]:
    """Rows of a metrics.jsonl (or of ``path``/metrics.jsonl), one per (split, step): the last written."""
    path = _as_path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    rows: dict[tuple, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[(row.get("split"), row.get("step"))] = row
    return sorted(rows.values(), key=lambda r: (r.get("step", 0), str(r.get("split"))))


class MetricsLogger:
    """Writes one JSON line per ``write`` call and the same scalars to TensorBoard (if installed)."""

    def __init__(
        self,
        output_dir,
        *,
        tensorboard: bool = True,
        stdout: bool = True,
        progress: bool | None = None,
        sync_every_s: float = 60.0,
    ):
        self.stdout = stdout
        self.progress = sys.stdout.isatty() if progress is None else progress
        self.path = None
        self.tb = None
        self._t0 = time.perf_counter()
        self._progress_open = False
        self._tb_remote = None  # (local staging dir, URL dir) when TensorBoard goes to a URL
        self._sync_every_s = sync_every_s
        self._last_sync = time.monotonic()
        if output_dir is not None:
            out = _as_path(output_dir)
            out.mkdir(parents=True, exist_ok=True)
            self.path = out / "metrics.jsonl"
            if tensorboard:
                try:
                    from tensorboardX import SummaryWriter

                    if "://" in str(out):
                        staging = tempfile.mkdtemp(prefix="looped_jax_tb_")
                        self._tb_remote = (staging, out / "tensorboard")
                        self.tb = SummaryWriter(staging)
                    else:
                        self.tb = SummaryWriter(str(out / "tensorboard"))
                except ImportError:  # TensorBoard output is optional
                    self.tb = None

    def _sync_tensorboard(self) -> None:
        """Copies the staged event files to the URL directory (whole files: they are small and append-only)."""
        if self._tb_remote is None:
            return
        staging, remote = self._tb_remote
        remote.mkdir(parents=True, exist_ok=True)
        for f in epath.Path(staging).iterdir():
            (remote / f.name).write_bytes(f.read_bytes())
        self._last_sync = time.monotonic()

    def truncate_after(self, step: int) -> int:
        """Drops rows with a step after ``step`` (a resumed run redoes them); returns how many."""
        if self.path is None or not self.path.exists():
            return 0
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        keep = [line for line in lines if json.loads(line).get("step", 0) <= step]
        if len(keep) != len(lines):
            tmp = self.path.parent / (self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            tmp.replace(self.path)
        return len(lines) - len(keep)

    def write(self, step: int, metrics: dict, *, prefix: str = "train", total: int | None = None) -> None:
        scalars = {k: _to_float(v) for k, v in metrics.items()}
        if self.path is not None:
            row = json.dumps({"step": step, "split": prefix, "time": time.time(), **scalars}) + "\n"
            with self.path.open("a") as f:  # opened per row: nothing is left buffered on a kill
                f.write(row)
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{prefix}/{k}", v, step)
            if self._tb_remote is not None and time.monotonic() - self._last_sync > self._sync_every_s:
                self.tb.flush()
                self._sync_tensorboard()
        if self.stdout:
            if self.progress and prefix == "train" and total:
                self._progress_line(step, total, scalars)
            else:
                self._end_progress()
                body = "  ".join(f"{k}={_fmt(v)}" for k, v in scalars.items())
                print(f"[{prefix}] step {step:>6d}  {body}", flush=True)

    def _progress_line(self, step: int, total: int, s: dict) -> None:
        frac = min(step / total, 1.0)
        bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
        rate = s.get("steps_per_s", 0.0)
        eta = (total - step) / rate if rate > 0 else float("nan")
        eta_s = "?" if not math.isfinite(eta) else time.strftime("%H:%M:%S", time.gmtime(eta))
        line = (
            f"\r[{bar}] {step}/{total}  loss={_fmt(s.get('loss', float('nan')))}  "
            f"tok/s={_fmt(s.get('tokens_per_s', 0.0))}  eta {eta_s}"
        )
        sys.stdout.write(line + "\033[K")
        sys.stdout.flush()
        self._progress_open = step < total
        if not self._progress_open:
            sys.stdout.write("\n")

    def _end_progress(self) -> None:
        if self._progress_open:
            sys.stdout.write("\n")
            self._progress_open = False

    def flush(self) -> None:
        self._end_progress()
        if self.tb is not None:
            self.tb.flush()
            self._sync_tensorboard()

    def close(self) -> None:
        self.flush()
        if self.tb is not None:
            self.tb.close()
            self._sync_tensorboard()
            if self._tb_remote is not None:
                shutil.rmtree(self._tb_remote[0], ignore_errors=True)
                self._tb_remote = None
            self.tb = None


def _fmt(v: float) -> str:
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.3e}"
    return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"

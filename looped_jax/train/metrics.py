"""Metrics to stdout, a JSONL file and TensorBoard."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np


def _to_float(v) -> float:
    v = float(np.asarray(v))
    return v if math.isfinite(v) else float("nan")


class MetricsLogger:
    """Writes one JSON line per ``write`` call and the same scalars to TensorBoard (if installed)."""

    def __init__(self, output_dir: str | Path | None, *, tensorboard: bool = True, stdout: bool = True):
        self.stdout = stdout
        self.jsonl = None
        self.tb = None
        if output_dir is not None:
            out = Path(output_dir)
            out.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(out / "metrics.jsonl", "a")
            if tensorboard:
                try:
                    from tensorboardX import SummaryWriter

                    self.tb = SummaryWriter(str(out / "tensorboard"))
                except ImportError:  # TensorBoard output is optional
                    self.tb = None

    def write(self, step: int, metrics: dict, *, prefix: str = "train") -> None:
        scalars = {k: _to_float(v) for k, v in metrics.items()}
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, "split": prefix, "time": time.time(), **scalars}) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{prefix}/{k}", v, step)
            self.tb.flush()
        if self.stdout:
            body = "  ".join(f"{k}={_fmt(v)}" for k, v in scalars.items())
            print(f"[{prefix}] step {step:>6d}  {body}", flush=True)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def _fmt(v: float) -> str:
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.3e}"
    return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"

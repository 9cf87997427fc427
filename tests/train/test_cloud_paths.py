"""``gs://`` output paths end to end (issue 16), against a local stand-in for Cloud Storage.

The stand-in maps ``gs://<bucket>/<path>`` to ``<tmp>/gcs/<bucket>/<path>`` in the two places a URL meets storage:
etils.epath's gpath backend (our metrics, checkpoint bookkeeping and Orbax's directory handling) and Orbax's
TensorStore GCS kvstore spec (the array bytes). Every path keeps its URL form up to those two points, so a
``gs:/bucket`` collapsed by pathlib on the way would miss the stand-in and land in the working directory instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
import pytest
from etils.epath import testing as epath_testing

from looped_jax.train.metrics import read_metrics
from looped_jax.train.trainer import Trainer
from tests.train.test_trainer import _cfg, _params, data_cfg  # noqa: F401  (data_cfg is a fixture)

PREFIX = "gs://"


@pytest.fixture
def gcs(tmp_path, monkeypatch):
    """Root directory of the stand-in bucket store; the test runs in a scratch working directory."""
    from orbax.checkpoint._src.path import gcs_utils

    root = tmp_path / "gcs"
    root.mkdir()
    monkeypatch.chdir(tmp_path / ".")
    calls = {"epath": 0, "tensorstore": 0}

    def local(path) -> str:
        path = os.fspath(path)
        if not path.startswith(PREFIX):
            return path
        calls["epath"] += 1
        return str(root / path[len(PREFIX) :])

    def mapped(fn, path, *args, **kwargs):
        return fn(local(path), *args, **kwargs)

    def mapped2(fn, path, dst, *args, **kwargs):
        return fn(local(path), local(dst), *args, **kwargs)

    def glob(fn, pattern):
        return (
            [PREFIX + os.path.relpath(p, root) for p in fn(local(pattern))]
            if str(pattern).startswith(PREFIX)
            else fn(pattern)
        )

    def walk(fn, top, **kwargs):
        for d, dirs, files in fn(local(top), **kwargs):
            yield (PREFIX + os.path.relpath(d, root) if str(top).startswith(PREFIX) else d), dirs, files

    def kvstore_for_gcs(path: str) -> dict:
        assert path.startswith(PREFIX), path
        calls["tensorstore"] += 1
        return {"driver": "file", "path": local(path)}

    class Bucket:  # what Orbax asks a bucket (google-cloud-storage): a flat namespace like a default bucket
        hierarchical_namespace_enabled = False

    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", kvstore_for_gcs)
    monkeypatch.setattr(gcs_utils, "get_bucket", lambda name: Bucket())
    fns = {n: mapped for n in ("exists", "isdir", "listdir", "makedirs", "mkdir", "open", "remove", "rmtree", "stat")}
    with epath_testing.mock_epath(**fns, rename=mapped2, replace=mapped2, copy=mapped2, glob=glob, walk=walk):
        yield root, calls


@pytest.mark.slow  # run by .ci/run after the default suite
def test_train_save_resume_metrics_and_tensorboard_on_gs(data_cfg, gcs, tmp_path):  # noqa: F811
    root, calls = gcs
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    straight, _ = Trainer(_cfg(data_cfg, tmp_path / "local"), mesh=mesh, log=False).fit()

    url = "gs://bucket/runs/exp1"
    Trainer(_cfg(data_cfg, url), mesh=mesh).fit(stop_at=3)
    run = root / "bucket" / "runs" / "exp1"
    assert (run / "metrics.jsonl").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["3"]
    assert calls["tensorstore"] > 0, "Orbax never built a GCS kvstore: the URL lost its form on the way"
    resumed, _ = Trainer(_cfg(data_cfg, url), mesh=mesh).fit()
    assert int(resumed.step) == int(straight.step) == 6
    jax.tree.map(np.testing.assert_array_equal, _params(resumed), _params(straight))

    steps = [r["step"] for r in read_metrics(url) if r["split"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 6
    events = list((run / "tensorboard").glob("events.out.tfevents*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    # nothing escaped the stand-in: a collapsed "gs:/bucket" would be a relative local directory here
    assert not Path("gs:").exists() and not (tmp_path / "gs:").exists()
    assert not any("gs:" in p.name for p in tmp_path.rglob("*") if root not in p.parents)

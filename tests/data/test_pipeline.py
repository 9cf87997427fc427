"""grain pipelines: batch layout, packing boundaries, sharding, exact resume."""

import collections

import numpy as np
import pytest

from looped_jax.data import (
    DataConfig,
    chains,
    encode_bytes,
    get_builder,
    make_eval_batches,
    make_pipeline,
    prepare,
    vocab_size,
)
from tests.data.test_text import write_corpus

KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")


@pytest.fixture(scope="module")
def chains_cfg(tmp_path_factory):
    cfg = DataConfig(data_dir=str(tmp_path_factory.mktemp("tfds")), num_train=200, num_test=37, test_hops=(2, 7))
    prepare(cfg)
    return cfg


@pytest.fixture(scope="module")
def text_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    docs = write_corpus(root / "corpus", num_docs=24, short=True)  # 16..190 bytes each
    cfg = DataConfig(
        name="bytes_text", seq_len=64, text_dir=str(root / "corpus"), data_dir=str(root / "tfds"), text_shuffle_window=8
    )
    prepare(cfg)
    return cfg, docs


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_chains_batch_layout(chains_cfg):
    cfg = chains_cfg
    batch = next(make_pipeline(cfg, split="train", global_batch_size=8, seed=0))
    for k in KEYS:
        assert batch[k].shape == (8, cfg.seq_len), k
    assert batch["weights"].dtype == np.float32 and batch["inputs"].dtype == np.int32
    np.testing.assert_array_equal(batch["weights"].sum(1), 1.0)
    length = chains.chains_problem_length(cfg.num_assignments)
    for row in range(8):
        t = int(np.argmax(batch["weights"][row]))
        assert batch["inputs"][row, t] == chains.ANSWER
        problem = np.append(batch["inputs"][row, : length - 1], batch["targets"][row, length - 2])
        answer, hops = chains.solve(problem)
        assert batch["targets"][row, t] == answer and hops == batch["hops"][row]
        np.testing.assert_array_equal(batch["targets"][row, :-1], batch["inputs"][row, 1:])
        np.testing.assert_array_equal(batch["segment_ids"][row], np.arange(cfg.seq_len) < length)
        np.testing.assert_array_equal(
            batch["positions"][row], np.where(np.arange(cfg.seq_len) < length, np.arange(cfg.seq_len), 0)
        )
    assert batch["inputs"].max() < vocab_size(cfg)


def test_chains_eval_covers_split_once_with_padding(chains_cfg):
    batches = make_eval_batches(chains_cfg, "test_h7", batch_size=8)
    assert len(batches) == 5  # ceil(37 / 8)
    weights = np.concatenate([b["weights"] for b in batches])
    assert weights.sum() == 37 and np.all(weights[37:] == 0)
    assert np.all(np.concatenate([b["hops"] for b in batches])[:37] == 7)
    rows = {b["inputs"][i].tobytes() for b in batches for i in range(8) if b["weights"][i].any()}
    assert len(rows) == 37


def test_chains_shards_form_the_global_batch(chains_cfg):
    def rows(batch):
        return sorted(batch["inputs"][i].tobytes() for i in range(len(batch["inputs"])))

    kw = dict(split="test_h2", global_batch_size=8, seed=3, num_epochs=1)
    whole = list(make_pipeline(chains_cfg, **kw))
    shards = [list(make_pipeline(chains_cfg, shard_index=i, shard_count=2, **kw)) for i in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(whole)
    for step, batch in enumerate(whole):
        assert shards[0][step]["inputs"].shape == (4, chains_cfg.seq_len)
        assert rows(batch) == sorted(rows(shards[0][step]) + rows(shards[1][step]))
    with pytest.raises(ValueError, match="multiple of shard_count"):
        make_pipeline(chains_cfg, split="train", global_batch_size=7, seed=0, shard_count=2)


@pytest.mark.parametrize("which", ["chains", "text"])
def test_state_restore_reproduces_batches(which, chains_cfg, text_setup):
    cfg = chains_cfg if which == "chains" else text_setup[0]
    kw = dict(split="train", global_batch_size=4, seed=7)
    iterator = make_pipeline(cfg, **kw)
    _take(iterator, 5)
    state = iterator.get_state()
    expected = _take(iterator, 6)  # for text, crosses packing-batch and shuffle-window edges
    fresh = make_pipeline(cfg, **kw)
    fresh.set_state(state)
    _assert_same(_take(fresh, 6), expected)
    # Epochs repeat forever with a different order each epoch.
    many = _take(make_pipeline(cfg, **kw), 60 if which == "chains" else 30)
    assert len(many) == (60 if which == "chains" else 30)


def test_text_packing_boundaries(text_setup):
    cfg, docs = text_setup
    iterator = make_pipeline(cfg, split="train", global_batch_size=4, seed=1, num_epochs=1)
    pairs = collections.Counter()
    multi_segment_rows = 0
    for batch in iterator:
        for k in KEYS:
            assert batch[k].shape == (4, cfg.seq_len)
        seg, pos, w = batch["segment_ids"], batch["positions"], batch["weights"]
        inputs, targets = batch["inputs"], batch["targets"]
        assert np.all(inputs[seg == 0] == 0) and np.all(w[seg == 0] == 0) and np.all(pos[seg == 0] == 0)
        same_next = np.zeros_like(w, dtype=bool)
        same_next[:, :-1] = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
        # Inside a row, a weighted target is the next input of the same segment.
        np.testing.assert_array_equal(targets[:, :-1][same_next[:, :-1]], inputs[:, 1:][same_next[:, :-1]])
        # The last token of a segment (followed by another segment or padding) has no target.
        ends = (seg[:, :-1] > 0) & ~same_next[:, :-1]
        assert np.all(w[:, :-1][ends] == 0) and np.all(targets[:, :-1][ends] == 0)
        # Positions count up from 0 within each segment.
        starts = np.ones_like(seg, dtype=bool)
        starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
        assert np.all(pos[starts & (seg > 0)] == 0)
        cont = ~starts & (seg > 0)
        np.testing.assert_array_equal(pos[:, 1:][cont[:, 1:]], pos[:, :-1][cont[:, 1:]] + 1)
        multi_segment_rows += sum(len(set(r[r > 0].tolist())) > 1 for r in seg)
        for row, t in zip(*np.nonzero(w), strict=True):
            pairs[(int(inputs[row, t]), int(targets[row, t]))] += 1
    assert multi_segment_rows > 0
    # Every next-token pair of every train document is trained exactly once per epoch.
    source = get_builder(cfg).as_data_source(split="train")
    expected = collections.Counter()
    for i in range(len(source)):
        ids = encode_bytes(source[i]["bytes"], add_bos=True, add_eos=True)
        expected.update(zip(ids[:-1].tolist(), ids[1:].tolist(), strict=True))
    assert pairs == expected


def test_text_eval_batches_and_vocab(text_setup):
    cfg, _ = text_setup
    batches = make_eval_batches(cfg, "validation", batch_size=3)
    assert batches and all(b["inputs"].shape == (3, cfg.seq_len) for b in batches)
    assert vocab_size(cfg) == 259
    assert len(make_eval_batches(cfg, "validation", batch_size=3, max_batches=1)) == 1


def test_missing_data_and_bad_split(tmp_path, chains_cfg):
    with pytest.raises(FileNotFoundError, match="prepare"):
        make_pipeline(DataConfig(data_dir=str(tmp_path)), split="train", global_batch_size=2, seed=0)
    with pytest.raises(ValueError, match="test_h2"):
        make_pipeline(chains_cfg, split="test_h5", global_batch_size=2, seed=0)


@pytest.fixture(scope="module")
def topo_cfg(tmp_path_factory):
    cfg = DataConfig(
        data_dir=str(tmp_path_factory.mktemp("tfds_topo")),
        num_train=64,
        num_test=16,
        test_hops=(3,),
        chains_order="topological",
        chains_dense_labels=True,
    )
    prepare(cfg)
    return cfg


def test_topological_order_and_dense_labels(topo_cfg):
    cfg = topo_cfg
    batch = next(make_pipeline(cfg, split="train", global_batch_size=16, seed=0, shuffle=False))
    length = chains.chains_problem_length(cfg.num_assignments)
    for row in range(16):
        problem = np.append(batch["inputs"][row, : length - 1], batch["targets"][row, length - 2])
        answer, hops = chains.solve(problem)
        assigned = set()
        for i in range(cfg.num_assignments):  # every RHS variable was assigned on an earlier line
            lhs, rhs = problem[1 + 3 * i], problem[2 + 3 * i]
            assert rhs < chains.VAR0 or rhs in assigned
            assigned.add(lhs)
        seps = 3 + 3 * np.arange(cfg.num_assignments)
        np.testing.assert_array_equal(batch["weights"][row, seps], 1.0)
        np.testing.assert_array_equal(batch["targets"][row, seps], chains.assignment_values(problem))
        t = length - 2  # the ANSWER input position is still supervised with the answer
        assert batch["weights"][row, t] == 1.0 and batch["targets"][row, t] == answer
        assert batch["weights"][row].sum() == cfg.num_assignments + 1
    # Test splits score one label per problem: the queried variable's own assignment, whose
    # value is the h-hop answer.
    test_batch = next(make_pipeline(cfg, split="test_h3", global_batch_size=16, seed=0, shuffle=False, num_epochs=1))
    np.testing.assert_array_equal(test_batch["weights"].sum(1), 1.0)
    for row in range(16):
        problem = np.append(test_batch["inputs"][row, : length - 1], test_batch["targets"][row, length - 2])
        answer, hops = chains.solve(problem)
        t = int(np.argmax(test_batch["weights"][row]))
        assert hops == 3 and test_batch["targets"][row, t] == answer
        assert t % 3 == 0 and problem[t - 2] == problem[-3]  # the SEP of the queried variable's line


def test_pair_tokens(topo_cfg):
    import dataclasses

    cfg = dataclasses.replace(topo_cfg, chains_pair_tokens=True, seq_len=16)
    assert vocab_size(cfg) == chains.pair_vocab_size(cfg.num_vars)
    plain = next(make_pipeline(topo_cfg, split="train", global_batch_size=8, seed=0, shuffle=False))
    pairs = next(make_pipeline(cfg, split="train", global_batch_size=8, seed=0, shuffle=False))
    a = cfg.num_assignments
    for row in range(8):
        # Same problems, same labels: the plain row's SEP labels sit on the pair tokens.
        np.testing.assert_array_equal(pairs["targets"][row, 1 : a + 1], plain["targets"][row, 3 : 3 * a + 1 : 3])
        np.testing.assert_array_equal(pairs["weights"][row, 1 : a + 1], 1.0)
        assert pairs["inputs"][row, a + 1] == chains.QUERY
        assert pairs["inputs"][row, 1 : a + 1].min() >= chains.chains_vocab_size(cfg.num_vars)
    assert pairs["inputs"].max() < vocab_size(cfg)
    test = next(make_pipeline(cfg, split="test_h3", global_batch_size=8, seed=0, shuffle=False, num_epochs=1))
    np.testing.assert_array_equal(test["weights"].sum(1), 1.0)
    assert (np.argmax(test["weights"], 1) <= a).all()
    with pytest.raises(ValueError, match="seq_len must be >= 14"):
        dataclasses.replace(cfg, seq_len=13)


def test_dense_labels_need_topological_order():
    with pytest.raises(ValueError, match="chains_dense_labels"):
        DataConfig(chains_dense_labels=True)
    with pytest.raises(ValueError, match="chains_order"):
        DataConfig(chains_order="sorted")


@pytest.mark.parametrize("hosts", [2, 3, 4])
def test_every_host_resumes_packed_text_to_its_own_next_batches(hosts, text_setup, tmp_path, monkeypatch):
    """Simulated hosts (shard_index / shard_count) read different shards of packed text, so their iterator
    states differ. Each host's state goes into the checkpoint (the allgather of a real multi-host run is
    stood in for), and each host, restored from it, continues with its own next batches."""
    import looped_jax.checkpoint as ck

    cfg = text_setup[0]
    kw = dict(split="train", global_batch_size=2 * hosts, seed=3, shard_count=hosts)
    states, expected = [], []
    for i in range(hosts):
        iterator = make_pipeline(cfg, shard_index=i, **kw)
        _take(iterator, 5)
        states.append(iterator.get_state())
        expected.append(_take(iterator, 4))
    assert len({repr(s) for s in states}) > 1  # the hosts' states differ: one shared state cannot serve all

    monkeypatch.setattr(ck, "gather_json", lambda value: states)  # what process_allgather returns on the hosts
    ckpt = ck.Checkpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(5, {"w": np.ones((2,), np.float32)}, config={}, data_state=states[0])
    ckpt.wait()
    meta = ckpt.read_meta(5)
    ckpt.close()

    monkeypatch.setattr(ck.jax, "process_count", lambda: hosts)
    for i in range(hosts):
        monkeypatch.setattr(ck.jax, "process_index", lambda i=i: i)
        fresh = make_pipeline(cfg, shard_index=i, **kw)
        fresh.set_state(ck.own_data_state(meta))
        _assert_same(_take(fresh, 4), expected[i])
    # and what went wrong before: host 1 resumed from host 0's state does not get its own batches
    wrong = make_pipeline(cfg, shard_index=1, **kw)
    wrong.set_state(states[0])
    with pytest.raises(AssertionError):
        _assert_same(_take(wrong, 4), expected[1])

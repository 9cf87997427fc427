"""Multiplication and the max-sum non-adjacent subsequence task (data/composition.py): answers equal a * b and a
brute-force solver, the seen-subgraph statistic, weights only on answers, config validation, deterministic builds."""

import itertools

import numpy as np
import pytest

from looped_jax.data import DataConfig, composition, make_eval_batches, prepare, split_names, vocab_size

C = composition


def parse_mult(tokens: np.ndarray) -> tuple[int, int, list[int], int]:
    """(a, b, scratchpad partial products, product) read off the tokens (answers are least-significant first)."""

    def number(ts, reverse=False):
        digits = [int(t) - C.MULT_DIGIT0 for t in ts]
        assert all(0 <= d <= 9 for d in digits)
        return int("".join(map(str, digits[::-1] if reverse else digits)))

    assert tokens[0] == C.BOS
    (times,) = np.flatnonzero(tokens == C.TIMES)
    equals = np.flatnonzero(tokens == C.EQUALS)
    a, b = number(tokens[1:times]), number(tokens[times + 1 : equals[0]])
    partials = []
    if len(equals) == 2:
        pad = tokens[equals[0] + 1 : equals[1]]
        partials = [number(p[p != C.PLUS], True) for p in np.split(pad, np.flatnonzero(pad == C.PLUS))]
    return a, b, partials, number(tokens[equals[-1] + 1 :], True)


@pytest.mark.parametrize("scratchpad", [False, True])
def test_mult_answer_is_the_product(scratchpad):
    rng = np.random.default_rng(0)
    for i, j in itertools.product(range(1, 6), repeat=2):
        a, b = C.sample_operand(rng, i), C.sample_operand(rng, j)
        assert len(str(a)) == i and len(str(b)) == j
        tokens, mask = C.mult_tokens(a, b, scratchpad)
        assert len(tokens) == C.mult_input_len(i, j, scratchpad) + 1 and tokens.max() < C.MULT_VOCAB_SIZE
        pa, pb, partials, product = parse_mult(tokens)
        assert (pa, pb, product) == (a, b, a * b)
        np.testing.assert_array_equal(
            tokens[-(i + j) :], C.MULT_DIGIT0 + np.array(list(f"{a * b:0{i + j}d}"[::-1]), int)
        )
        digits = (tokens >= C.MULT_DIGIT0) & (np.arange(len(tokens)) > np.flatnonzero(tokens == C.EQUALS)[0])
        np.testing.assert_array_equal(mask, digits)  # loss on every answer digit (and scratchpad digit), no other
        if scratchpad:
            assert partials == [a * int(d) * 10**k for k, d in enumerate(str(b)[::-1])] and sum(partials) == a * b
            assert mask.sum() == (j + 1) * (i + j)
        else:
            assert partials == [] and mask.sum() == i + j


def test_seen_subgraph_small_cases():
    assert C.seen_subgraph_fraction([{"a": 12, "b": 3}], {"a": 12, "b": 3}) == 1.0
    assert C.seen_subgraph_fraction([], {"a": 12, "b": 3}) == 0.0
    # 2 * 3 has nodes M(2*3), S0 (its digit), S1 (its carry + S0's carry); in 12 * 3, M(2*3) and S0 are the same
    # sub-computations but S1 adds the digit of M(1*3 + carry): 2 of 3 seen
    assert C.seen_subgraph_fraction([{"a": 12, "b": 3}], {"a": 2, "b": 3}) == pytest.approx(2 / 3)
    assert C.seen_subgraph_fraction([{"a": 12, "b": 3}], {"a": 2, "b": 4}) == 0.0


def test_seen_subgraph_matches_arithmetic():
    """A digit-product node M[k, l] is seen iff a training problem multiplies the same lowest l + 1 digits of a by
    the digit b_k; a column sum S[t] (t < both lengths) iff one has the same lowest t + 1 digits of a and of b."""
    rng = np.random.default_rng(1)
    train = [{"a": C.sample_operand(rng, int(i)), "b": C.sample_operand(rng, int(j))}
             for i, j in rng.integers(1, 4, size=(300, 2))]  # fmt: skip
    train += [{"a": x, "b": y} for x in range(1, 10) for y in range(1, 10)]  # all of 1x1: fully seen
    index = C.SubgraphIndex(train)
    fractions = {}
    for i, j in ((1, 1), (2, 2), (3, 3), (4, 4), (5, 5)):
        tests = [{"a": C.sample_operand(rng, i), "b": C.sample_operand(rng, j)} for _ in range(30)]
        for rec in tests:
            a, b = str(rec["a"])[::-1], str(rec["b"])[::-1]
            seen = index.seen(rec)
            assert len(seen) == i * j + i + j
            for k, l in itertools.product(range(j), range(i)):
                expect = any(str(t["a"])[::-1][: l + 1] == a[: l + 1] and b[k] in str(t["b"]) for t in train)
                assert seen[k * i + l] == expect, (rec, k, l)
            for t in range(min(i, j)):
                low = [(str(r["a"])[::-1][: t + 1], str(r["b"])[::-1][: t + 1]) for r in train
                       if min(len(str(r["a"])), len(str(r["b"]))) > t]  # fmt: skip
                assert seen[i * j + t] == ((a[: t + 1], b[: t + 1]) in low), (rec, t)
        fractions[i] = C.seen_subgraph_summary(train, {"s": tests})["s"]
    assert fractions[1] == 1.0 and fractions[5] < fractions[4] < fractions[3] <= fractions[2] <= 1.0
    assert fractions[5] > 0  # the lowest digit products are always seen


def test_seen_subgraph_report(tmp_path):
    cfg = DataConfig(
        name="multiplication", data_dir=str(tmp_path), mult_train_max_digits=2, mult_test_max_digits=3,
        num_train=40, num_test=6,
    )  # fmt: skip
    with pytest.raises(FileNotFoundError, match="prepare"):
        C.seen_subgraph_report(cfg)
    prepare(cfg)
    report = C.seen_subgraph_report(cfg)
    assert sorted(report) == sorted(split_names(cfg)[1:])
    c = C.CompositionConfig.from_data_config(cfg)
    train = [r for _, r in C.mult_examples(c, "train")]
    for split, fraction in report.items():  # the same as the statistic over the generator's records
        tests = [r for _, r in C.mult_examples(c, split)]
        assert fraction == pytest.approx(C.seen_subgraph_summary(train, {split: tests})[split])
    assert report["test_1x1"] > report["test_3x3"]


def brute_force_dp(values) -> tuple[tuple[int, ...], int]:
    """Max-sum selection with no two adjacent entries by enumeration; ties -> the lexicographically largest 0/1
    vector (the selection that chooses earliest)."""
    best = None
    for sel in itertools.product((1, 0), repeat=len(values)):  # lexicographically largest first
        if any(x and y for x, y in itertools.pairwise(sel)):
            continue
        total = sum(v for v, s in zip(values, sel, strict=True) if s)
        if best is None or total > best[1]:
            best = (sel, total)
    return best


def test_dp_matches_brute_force():
    rng = np.random.default_rng(2)
    for _ in range(300):
        values = rng.integers(-2, 3, size=int(rng.integers(1, 11)))  # small values: many ties
        chosen, total = C.dp_solve(values)
        assert (tuple(chosen.tolist()), total) == brute_force_dp(values.tolist())


@pytest.mark.parametrize("answer", ["selection", "sum"])
def test_dp_tokens(answer):
    rng = np.random.default_rng(3)
    for n in (1, 5, 9):
        values = rng.integers(-5, 6, size=n)
        tokens, mask = C.dp_tokens(values, 5, answer)
        assert len(tokens) == C.dp_input_len(n, 5, answer) + 1 and tokens.max() < C.dp_vocab_size(5)
        np.testing.assert_array_equal(tokens[1 : n + 1] - C.DP_VALUE0 - 5, values)
        assert tokens[n + 1] == C.DP_EQUALS and mask[: n + 2].sum() == 0 and mask[n + 2 :].all()
        sel, total = brute_force_dp(values.tolist())
        out = tokens[n + 2 :]
        if answer == "selection":
            np.testing.assert_array_equal(out, np.where(np.array(sel) == 1, C.YES, C.NO))
        else:
            assert int("".join(str(t - C.DP_DIGIT0) for t in out)) == total and len(out) == len(str(5 * ((n + 1) // 2)))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(name="multiplication", mult_train_max_digits=0), "mult_train_max_digits"),
        (dict(name="multiplication", mult_test_max_digits=10), "mult_test_max_digits"),
        (dict(name="multiplication", seq_len=13), "seq_len"),  # 3x3 needs 14 inputs
        (dict(name="multiplication", seq_len=34, mult_scratchpad=True), "seq_len"),  # 35 with the scratchpad
        (dict(name="dp", dp_answer="both"), "dp_answer"),
        (dict(name="dp", dp_min_len=9), "dp_min_len"),
        (dict(name="dp", dp_test_lens=(4, 4)), "dp_test_lens"),
        (dict(name="dp", seq_len=16), "seq_len"),  # BOS, 8 values, EQUALS, 8 answers: 17 inputs
        (dict(name="dp", dp_value_max=0), "dp_value_max"),
    ],
)
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=rf"data\.{field}"):
        DataConfig(**kwargs)
    DataConfig(name="multiplication", seq_len=14)
    DataConfig(name="multiplication", seq_len=35, mult_scratchpad=True)
    DataConfig(name="dp", seq_len=17)
    DataConfig(name="dp", seq_len=11, dp_answer="sum")  # 8 values, EQUALS, 2 digits (5 * 4 = 20)


def build(tmp_path, sub, **kw):
    cfg = DataConfig(data_dir=str(tmp_path / sub), num_train=24, num_test=5, **kw)
    prepare(cfg)
    return cfg


def rows(cfg, split):
    (batch,) = make_eval_batches(cfg, split, 32)
    return batch


@pytest.mark.parametrize("scratchpad", [False, True])
def test_multiplication_builder(tmp_path, scratchpad):
    kw = dict(name="multiplication", seq_len=40, mult_train_max_digits=2, mult_test_max_digits=2)
    cfg, other = build(tmp_path, "a", **kw, mult_scratchpad=scratchpad), build(tmp_path, "b", **kw)
    assert split_names(cfg) == ("train", "test_1x1", "test_1x2", "test_2x1", "test_2x2") and vocab_size(cfg) == 15
    for split in split_names(cfg):
        batch = rows(cfg, split)
        if not scratchpad:
            again = rows(other, split)  # same seed -> same data
            for k in batch:
                np.testing.assert_array_equal(batch[k], again[k])
        real = np.flatnonzero(batch["weights"].sum(-1) > 0)
        assert len(real) == (24 if split == "train" else 5) and batch["inputs"].max() < 15
        if split != "train":
            assert batch["inputs"].shape[1] == C.mult_input_len(*C.mult_split_digits(split), scratchpad)
        shapes = set()
        for r in real:
            n = batch["segment_ids"][r].sum()
            tokens = np.concatenate([batch["inputs"][r][:1], batch["targets"][r][:n]])
            a, b, _, product = parse_mult(tokens)
            assert product == a * b
            shapes.add((len(str(a)), len(str(b))))
            answer = batch["targets"][r][batch["weights"][r] > 0][-(len(str(a)) + len(str(b))) :]
            assert int("".join(str(t - C.MULT_DIGIT0) for t in answer[::-1])) == a * b
        assert shapes == ({(1, 1), (1, 2), (2, 1), (2, 2)} if split == "train" else {C.mult_split_digits(split)})


@pytest.mark.parametrize("answer", ["selection", "sum"])
def test_dp_builder(tmp_path, answer):
    kw = dict(name="dp", seq_len=20, dp_train_max_len=6, dp_test_lens=(10,), dp_value_max=3, dp_answer=answer)
    cfg, other = build(tmp_path, "a", **kw), build(tmp_path, "b", **kw)
    assert split_names(cfg) == ("train", "test_len10") and vocab_size(cfg) == C.DP_VALUE0 + 7
    for split in split_names(cfg):
        batch, again = rows(cfg, split), rows(other, split)
        for k in batch:
            np.testing.assert_array_equal(batch[k], again[k])
        real = np.flatnonzero(batch["weights"].sum(-1) > 0)
        assert len(real) == (24 if split == "train" else 5) and batch["inputs"].max() < vocab_size(cfg)
        lengths = set()
        for r in real:
            (eq,) = np.flatnonzero(batch["inputs"][r] == C.DP_EQUALS)
            values = (batch["inputs"][r][1:eq] - C.DP_VALUE0 - 3).tolist()
            lengths.add(len(values))
            sel, total = brute_force_dp(values)
            out = batch["targets"][r][batch["weights"][r] > 0]
            if answer == "selection":
                np.testing.assert_array_equal(out, np.where(np.array(sel) == 1, C.YES, C.NO))
            else:
                assert int("".join(str(t - C.DP_DIGIT0) for t in out)) == total
        assert lengths == {10} if split != "train" else (max(lengths) <= 6 and len(lengths) > 1)

"""Self-speculative decoding: greedy output equals plain greedy decoding with the verify loop
count, and the acceptance statistics add up."""

import numpy as np
import pytest
from flax import nnx

from looped_jax.models import build_model
from looped_jax.models.generate import generate
from looped_jax.models.speculative import speculative_generate
from tests.models.tiny_rd import PROMPT
from tests.models.tiny_rd import RD as CFG

NEW, LOOPS = 12, 6


@pytest.fixture(scope="module")
def model():
    return build_model(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def plain(model):
    return np.asarray(generate(model, PROMPT, max_new_tokens=NEW, num_loops=LOOPS).tokens_BT)


def check_stats(out, k):
    rounds = int(out.num_rounds)
    accepted, emitted = np.asarray(out.accepted_R), np.asarray(out.emitted_R)
    assert rounds >= 1 and (emitted[:rounds] >= 1).all() and (emitted[rounds:] == -1).all()
    assert ((accepted[:rounds] >= 0) & (accepted[:rounds] <= k)).all() and (accepted[rounds:] == -1).all()
    np.testing.assert_array_equal(emitted[:rounds], np.minimum(accepted[:rounds] + 1, k))
    total = 1 + emitted[:rounds].sum()  # the prefill's token, then each round's
    assert total >= NEW > total - emitted[rounds - 1]  # the last round is the one that reached NEW
    np.testing.assert_allclose(float(out.acceptance_rate), accepted[:rounds].sum() / (rounds * k), rtol=1e-6)
    return accepted[:rounds]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_speculative_equals_plain_greedy(model, plain, k):
    out = speculative_generate(model, PROMPT, max_new_tokens=NEW, draft_loops=4, draft_length=k, num_loops=LOOPS)
    np.testing.assert_array_equal(out.tokens_BT, plain)
    accepted = check_stats(out, k)
    if k > 1:
        assert accepted.min() < k and accepted.max() > 0  # both rejections and acceptances happen


def test_drafting_with_the_verify_loops_accepts_everything(model, plain):
    out = speculative_generate(model, PROMPT, max_new_tokens=NEW, draft_loops=LOOPS, draft_length=4, num_loops=LOOPS)
    np.testing.assert_array_equal(out.tokens_BT, plain)
    accepted = check_stats(out, 4)
    np.testing.assert_array_equal(accepted, 4)
    assert float(out.acceptance_rate) == 1.0


def test_speculative_errors(model):
    with pytest.raises(ValueError, match="draft_loops"):
        speculative_generate(model, PROMPT, max_new_tokens=4, draft_loops=7, num_loops=LOOPS)
    with pytest.raises(ValueError, match="draft_length"):
        speculative_generate(model, PROMPT, max_new_tokens=4, draft_loops=1, draft_length=0)
    with pytest.raises(ValueError, match="cache_lookup"):
        speculative_generate(model, PROMPT, max_new_tokens=4, draft_loops=1, cache_lookup="latest")

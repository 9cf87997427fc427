"""Byte tokenizer: round trips and special ids."""

import numpy as np
import pytest

from looped_jax.data import tokenizer


def test_round_trip_bytes_and_str():
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=1000, dtype=np.uint8).tobytes()
    ids = tokenizer.encode_bytes(raw, add_bos=True, add_eos=True)
    assert ids.dtype == np.int32 and len(ids) == len(raw) + 2
    assert ids[0] == tokenizer.BOS_ID and ids[-1] == tokenizer.EOS_ID
    assert ids[1:-1].min() >= 3 and ids[1:-1].max() <= 258
    assert tokenizer.decode_bytes(ids) == raw
    text = "héllo wörld ∑ 🙂\n"
    assert tokenizer.decode_text(tokenizer.encode_bytes(text)) == text
    as_array = np.frombuffer(text.encode(), np.uint8)
    np.testing.assert_array_equal(tokenizer.encode_bytes(as_array), tokenizer.encode_bytes(text))


def test_specials_dropped_and_bad_ids_rejected():
    ids = [tokenizer.BOS_ID, ord("a") + 3, tokenizer.PAD_ID, ord("b") + 3, tokenizer.EOS_ID]
    assert tokenizer.decode_bytes(ids) == b"ab"
    assert tokenizer.BYTE_VOCAB_SIZE == 259
    with pytest.raises(ValueError, match="259"):
        tokenizer.decode_bytes([259])

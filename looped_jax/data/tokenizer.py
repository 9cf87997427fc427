"""Byte-level tokenizer: every byte is a token, shifted past three special tokens.

Ids: PAD=0, BOS=1, EOS=2, byte b -> b + 3 (3..258); vocabulary size 259. Byte-level
models need no trained vocabulary, so the text pipeline works offline on any corpus.
"""

from collections.abc import Sequence

import numpy as np

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
BYTE_OFFSET = 3
BYTE_VOCAB_SIZE = 256 + BYTE_OFFSET


def encode_bytes(data: bytes | str | np.ndarray, *, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
    """Encodes bytes (or a str, as UTF-8, or a uint8 array) into int32 token ids [N]."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise ValueError(f"encode_bytes expects a uint8 array, got dtype {data.dtype}")
        byte_ids_N = data.astype(np.int32)
    else:
        byte_ids_N = np.frombuffer(bytes(data), dtype=np.uint8).astype(np.int32)
    parts = []
    if add_bos:
        parts.append(np.array([BOS_ID], np.int32))
    parts.append(byte_ids_N + BYTE_OFFSET)
    if add_eos:
        parts.append(np.array([EOS_ID], np.int32))
    return np.concatenate(parts)


def decode_bytes(ids: Sequence[int] | np.ndarray) -> bytes:
    """Decodes token ids back to bytes, dropping PAD/BOS/EOS; other ids are an error."""
    ids_N = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids_N.size and (ids_N.min() < 0 or ids_N.max() >= BYTE_VOCAB_SIZE):
        raise ValueError(f"token ids must lie in [0, {BYTE_VOCAB_SIZE}), got min {ids_N.min()} max {ids_N.max()}")
    byte_ids = ids_N[ids_N >= BYTE_OFFSET] - BYTE_OFFSET
    return byte_ids.astype(np.uint8).tobytes()


def decode_text(ids: Sequence[int] | np.ndarray) -> str:
    """Decodes token ids to a str (invalid UTF-8 replaced), for printing samples."""
    return decode_bytes(ids).decode("utf-8", errors="replace")

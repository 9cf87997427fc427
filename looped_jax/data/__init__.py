"""Data: TFDS builders generated offline (variable chains, byte text) and grain pipelines."""

from looped_jax.data.chains import VariableChains, VariableChainsConfig, chains_vocab_size, generate_problem, solve
from looped_jax.data.config import DATASET_NAMES, DataConfig, chains_min_seq_len, chains_problem_length
from looped_jax.data.pipeline import (
    DatasetSpec,
    dataset_spec,
    default_test_split,
    get_builder,
    make_eval_batches,
    make_pipeline,
    prepare,
    register_dataset,
    split_names,
    vocab_size,
)
from looped_jax.data.text import ByteText, ByteTextConfig
from looped_jax.data.tokenizer import BOS_ID, BYTE_VOCAB_SIZE, EOS_ID, PAD_ID, decode_bytes, decode_text, encode_bytes

__all__ = [
    "BOS_ID",
    "BYTE_VOCAB_SIZE",
    "DATASET_NAMES",
    "EOS_ID",
    "PAD_ID",
    "ByteText",
    "ByteTextConfig",
    "DataConfig",
    "DatasetSpec",
    "VariableChains",
    "VariableChainsConfig",
    "chains_min_seq_len",
    "chains_problem_length",
    "chains_vocab_size",
    "dataset_spec",
    "default_test_split",
    "decode_bytes",
    "decode_text",
    "encode_bytes",
    "generate_problem",
    "get_builder",
    "make_eval_batches",
    "make_pipeline",
    "prepare",
    "register_dataset",
    "solve",
    "split_names",
    "vocab_size",
]

"""grain pipelines over the TFDS builders: batches for training and evaluation.

Every batch is a dict of numpy arrays, B = global_batch_size // shard_count rows:

    inputs       int32 [B, T]   token ids fed to the model
    targets      int32 [B, T]   next token of each input in the same segment (PAD otherwise)
    weights      float32 [B, T] loss weights (chains: 1 at the answer; text: real targets)
    segment_ids  int32 [B, T]   >= 1 on real tokens, 0 on padding
    positions    int32 [B, T]   position inside the token's own segment
    hops         int32 [B]      chains only: hop count of the row (0 on padding rows)

Text rows are packed: documents become BOS + bytes + EOS, are cut into pieces of T + 1
tokens overlapping by one (every next-token pair is trained exactly once; pieces after
the first start mid-document, without BOS, at position 0), and pieces are packed into
rows of T + 1 tokens by grain's first-fit packing. A row's inputs are its first T
tokens and its targets the last T; the last token of a segment has weight 0 and target
PAD, so no target crosses a segment boundary.

Multi-host: host `shard_index` of `shard_count` reads records shard_index::shard_count,
so the hosts' slices together form one global batch. With `num_epochs` set, chains
splits are padded to whole global batches with weight-0 rows so every host yields the
same number of batches; text hosts pack their own documents, so their batch counts can
differ (cap evaluation steps across hosts). The last partial batch of a finite pipeline
is always padded (weights 0), never dropped. Iterators support get_state/set_state.
"""

import dataclasses
import importlib
import inspect
import logging
import math
from collections.abc import Callable
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds
from grain.experimental import (
    FirstFitPackIterDataset,
    FlatMapIterDataset,
    FlatMapTransform,
    WindowShuffleIterDataset,
)

from looped_jax.data import chains, text, tokenizer
from looped_jax.data.config import DataConfig, chains_problem_length

Batch = dict[str, np.ndarray]

_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=128)


class _CustomConfigFilter(logging.Filter):
    """Drops TFDS's "Using custom data configuration" warning.

    Every looped_jax data set is built from a BuilderConfig made from the DataConfig (named by its
    digest), never from one listed in BUILDER_CONFIGS, so TFDS logs that warning each time a builder
    is made: dozens of lines per run (every split and every evaluation). `prepare` already prints
    which build is used.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Using custom data configuration")


if not any(isinstance(f, _CustomConfigFilter) for f in logging.getLogger("absl").filters):
    logging.getLogger("absl").addFilter(_CustomConfigFilter())


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How the pipeline reads one data set of fixed-length records (puzzles, retrieval tasks ...).

    builder(cfg, **tfds_kwargs) -> the TFDS builder; splits(cfg) -> split names (known without
    building); vocab_size(cfg) -> token vocabulary size; row(cfg, example, split) -> one batch row:
    a dict of fixed-shape numpy arrays holding at least the BATCH fields of the module docstring
    (extra fields, e.g. ``puzzle_ids``, are passed through). Padding rows are all zeros (weight 0).
    A ``row`` with an ``rng`` keyword gets a ``np.random.Generator`` on training rows (on-the-fly
    augmentation, reproducible per record and epoch).
    """

    builder: Callable[..., tfds.core.DatasetBuilder]
    splits: Callable[[DataConfig], tuple[str, ...]]
    vocab_size: Callable[[DataConfig], int]
    row: Callable[[DataConfig, dict[str, Any], str], Batch]
    test_split: Callable[[DataConfig], str] | None = None  # default evaluation split (None: see default_test_split)


# Data sets that live in their own module register a DatasetSpec there with `register_dataset`;
# the pipeline imports the module on first use of the name.
_DATASET_MODULES: dict[str, str] = {
    "passkey": "looped_jax.data.passkey",
    "niah": "looped_jax.data.niah",
    "assoc_recall": "looped_jax.data.niah",
    "sudoku": "looped_jax.data.sudoku",
    "maze": "looped_jax.data.maze",
    "arc": "looped_jax.data.arc",
    "copy": "looped_jax.data.probes",
    "phonebook": "looped_jax.data.probes",
    "multiplication": "looped_jax.data.composition",
    "dp": "looped_jax.data.composition",
    "hierarchy": "looped_jax.data.grammar",
}
_REGISTRY: dict[str, DatasetSpec] = {}


def register_dataset(name: str, spec: DatasetSpec) -> None:
    """Makes data set `name` (listed in config.DATASET_NAMES) readable by the pipeline."""
    _REGISTRY[name] = spec


def dataset_spec(name: str) -> DatasetSpec | None:
    """The registered spec of `name`, or None for the built-in chains / bytes_text pipelines."""
    if name in ("chains", "bytes_text"):
        return None
    if name not in _REGISTRY and name in _DATASET_MODULES:
        importlib.import_module(_DATASET_MODULES[name])
    if name not in _REGISTRY:
        raise ValueError(f"data.name={name!r} has no registered pipeline; known: {sorted(_DATASET_MODULES)}")
    return _REGISTRY[name]


def get_builder(cfg: DataConfig) -> tfds.core.DatasetBuilder:
    """The TFDS builder for `cfg` (array_record files under cfg.data_dir)."""
    kwargs = dict(data_dir=cfg.resolved_data_dir, file_format="array_record")
    if cfg.name == "chains":
        return chains.VariableChains(config=chains.VariableChainsConfig.from_data_config(cfg), **kwargs)
    if cfg.name == "bytes_text":
        return text.ByteText(config=text.ByteTextConfig.from_data_config(cfg), **kwargs)
    return dataset_spec(cfg.name).builder(cfg, **kwargs)


def split_names(cfg: DataConfig) -> tuple[str, ...]:
    """Names of the splits `cfg` builds (known without building)."""
    if cfg.name == "chains":
        return ("train",) + tuple(f"test_h{h}" for h in cfg.test_hops)
    if cfg.name == "bytes_text":
        return ("train", "validation")
    return tuple(dataset_spec(cfg.name).splits(cfg))


def default_test_split(cfg: DataConfig) -> str:
    """The split evaluation scripts report unless told otherwise (their ``--split``): the data set's choice
    (``DatasetSpec.test_split``; sudoku: ``test_hard`` where that split is built), else ``test``, else the first
    split that is not ``train``. Training still evaluates every split."""
    names = split_names(cfg)
    spec = dataset_spec(cfg.name)
    if spec is not None and spec.test_split is not None:
        return spec.test_split(cfg)
    if "test" in names:
        return "test"
    return next(n for n in names if n != "train")


def prepare(cfg: DataConfig) -> None:
    """Builds the data set into cfg.data_dir unless already there (idempotent)."""
    builder = get_builder(cfg)
    if builder.is_prepared():
        print(f"[data] {builder.name}/{builder.builder_config.name} ready at {builder.data_dir}")
        return
    print(f"[data] building {builder.name}/{builder.builder_config.name} into {builder.data_dir} ...")
    builder.download_and_prepare()
    sizes = {name: info.num_examples for name, info in builder.info.splits.items()}
    print(f"[data] built {builder.name}: {sizes}")


def vocab_size(cfg: DataConfig) -> int:
    """Vocabulary size of the data set's token ids."""
    if cfg.name == "chains":
        if cfg.chains_pair_tokens:
            return chains.pair_vocab_size(cfg.num_vars)
        return chains.chains_vocab_size(cfg.num_vars)
    if cfg.name == "bytes_text":
        return tokenizer.BYTE_VOCAB_SIZE
    return int(dataset_spec(cfg.name).vocab_size(cfg))


def _data_source(cfg: DataConfig, split: str):
    builder = get_builder(cfg)
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"data set {builder.name}/{builder.builder_config.name} is not built in "
            f"{cfg.resolved_data_dir}; call looped_jax.data.prepare(cfg) first"
        )
    if split not in builder.info.splits:
        raise ValueError(f"split must be one of {sorted(builder.info.splits)}, got {split!r}")
    return builder.as_data_source(split=split)


def _chains_row(
    example: dict[str, Any],
    seq_len: int,
    dense_labels: bool = False,
    pair_tokens_vars: int = 0,
    score_query_line: bool = False,
) -> Batch:
    """One problem -> one padded row; the loss is on the answer digit only.

    With ``dense_labels`` (topological order) every assignment is supervised too: at each
    assignment's last token (SEP, or its pair token) the target is the resolved value of its
    LHS instead of the next token, a sequence-labelling signal with hop depths 1..h inside
    every problem. ``pair_tokens_vars > 0`` rewrites assignments as single tokens
    (``chains.to_pair_tokens`` with that many variables). ``score_query_line`` (evaluation of
    dense-label models) puts the only weight on the assignment of the queried variable, whose
    label is the h-hop answer, instead of on the final answer token.
    """
    tokens_L = np.asarray(example["tokens"], np.int32)
    real = example["answer_position"] > 0
    values = chains.assignment_values(tokens_L) if (dense_labels or score_query_line) and real else None
    query_line = int(np.flatnonzero(tokens_L[1:-4:3] == tokens_L[-3])[0]) if score_query_line and real else -1
    stride = 3
    if pair_tokens_vars:
        stride = 1
        if example["answer_position"] > 0:
            tokens_L = chains.to_pair_tokens(tokens_L, pair_tokens_vars)
        else:  # an all-PAD filler row
            tokens_L = tokens_L[: len(tokens_L) - 2 * ((len(tokens_L) - 5) // 3)]
    num_assignments = (len(tokens_L) - 5) // stride
    row_S = np.zeros(seq_len + 1, np.int32)  # S = T + 1
    row_S[: len(tokens_L)] = tokens_L
    inputs_T, targets_T = row_S[:-1], row_S[1:].copy()
    segment_ids_T = (inputs_T != chains.PAD).astype(np.int32)
    targets_T *= segment_ids_T
    weights_T = np.zeros(seq_len, np.float32)
    answer_position = len(tokens_L) - 1 if int(example["answer_position"]) > 0 else 0
    if answer_position > 0:
        last_positions = stride + stride * np.arange(num_assignments)
        if score_query_line:
            pos = last_positions[query_line]
            targets_T[pos] = values[query_line]
            weights_T[pos] = 1.0
        else:
            weights_T[answer_position - 1] = 1.0
            if values is not None:
                targets_T[last_positions] = values
                weights_T[last_positions] = 1.0
    return {
        "inputs": inputs_T,
        "targets": targets_T,
        "weights": weights_T,
        "segment_ids": segment_ids_T,
        "positions": np.arange(seq_len, dtype=np.int32) * segment_ids_T,
        "hops": np.int32(example["hops"]),
    }


def _packed_row(packed: dict[str, np.ndarray]) -> Batch:
    """A packed row of T + 1 tokens -> inputs/targets/weights with segment boundaries."""
    tokens_S = packed["tokens"].astype(np.int32)
    segments_S = packed["tokens_segment_ids"].astype(np.int32)
    positions_S = packed["tokens_positions"].astype(np.int32)
    same_segment_T = (segments_S[:-1] != 0) & (segments_S[1:] == segments_S[:-1])
    return {
        "inputs": tokens_S[:-1],
        "targets": np.where(same_segment_T, tokens_S[1:], tokenizer.PAD_ID).astype(np.int32),
        "weights": same_segment_T.astype(np.float32),
        "segment_ids": segments_S[:-1],
        "positions": positions_S[:-1] * (segments_S[:-1] != 0),
    }


class _CutPieces(FlatMapTransform):
    """Tokenizes a document and cuts it into pieces of <= piece_len tokens, overlapping by 1."""

    max_fan_out = 1 << 20

    def __init__(self, piece_len: int):
        self.piece_len = piece_len

    def flat_map(self, element: dict[str, Any]) -> list[dict[str, np.ndarray]]:
        ids_N = tokenizer.encode_bytes(np.asarray(element["bytes"], np.uint8), add_bos=True, add_eos=True)
        step = self.piece_len - 1
        return [{"tokens": ids_N[s : s + self.piece_len]} for s in range(0, len(ids_N) - 1, step)]


def _pad_batch(batch: Batch, batch_size: int) -> Batch:
    """Pads a partial batch with zero rows (weights 0, segment_ids 0)."""
    rows = len(batch["inputs"])
    if rows == batch_size:
        return batch
    return {k: np.concatenate([v, np.zeros((batch_size - rows,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}


def make_pipeline(
    cfg: DataConfig,
    *,
    split: str,
    global_batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.DatasetIterator:
    """An iterator of this host's batches (see the module docstring for the fields).

    num_epochs=None repeats forever (training); a finite num_epochs ends with a padded
    partial batch. `seed` drives shuffling only (the data content comes from cfg.seed).
    """
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index=} {shard_count=}")
    if global_batch_size < 1 or global_batch_size % shard_count:
        raise ValueError(
            f"global_batch_size must be a positive multiple of shard_count={shard_count}, got {global_batch_size}"
        )
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None or >= 1, got {num_epochs}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    host_batch = global_batch_size // shard_count
    source = _data_source(cfg, split)
    shard = slice(shard_index, None, shard_count)
    if cfg.name == "chains":
        ds = _chains_dataset(cfg, source, global_batch_size, host_batch, seed, shuffle, num_epochs, shard, split)
    elif cfg.name == "bytes_text":
        ds = _text_dataset(cfg, source, host_batch, seed, shuffle, num_epochs, shard)
    else:
        spec = dataset_spec(cfg.name)
        ds = _fixed_rows_dataset(
            cfg, spec, source, global_batch_size, host_batch, seed, shuffle, num_epochs, shard, split
        )
    return iter(ds)


def _pad_to_global_batches(ds: grain.MapDataset, global_batch: int, empty: Any) -> grain.MapDataset:
    """`ds` followed by copies of `empty` up to a whole number of global batches, so every host of
    a finite pass yields the same number of batches."""
    total = len(ds)
    padded = math.ceil(total / global_batch) * global_batch
    return grain.MapDataset.range(padded).map(lambda i: ds[i] if i < total else empty)


def _fixed_rows_dataset(
    cfg: DataConfig,
    spec: DatasetSpec,
    source: Any,
    global_batch: int,
    host_batch: int,
    seed: int,
    shuffle: bool,
    num_epochs: int | None,
    shard: slice,
    split: str,
) -> grain.IterDataset:
    """Records -> rows by spec.row; a finite pass is padded to whole global batches of zero rows."""
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    if split == "train" and "rng" in inspect.signature(spec.row).parameters:
        # Rows that augment on the fly get a numpy Generator seeded by (seed, record index):
        # deterministic for a resumed run, different across epochs.
        ds = ds.random_map(lambda example, rng: spec.row(cfg, example, split, rng=rng), seed=seed)
    else:
        ds = ds.map(lambda example: spec.row(cfg, example, split))
    if num_epochs is not None:
        if len(ds) % global_batch:
            ds = _pad_to_global_batches(ds, global_batch, {k: np.zeros_like(v) for k, v in ds[0].items()})
    ds = ds[shard].batch(host_batch, drop_remainder=False)
    return ds.to_iter_dataset(_READ_OPTIONS)


def _chains_dataset(
    cfg: DataConfig,
    source: Any,
    global_batch: int,
    host_batch: int,
    seed: int,
    shuffle: bool,
    num_epochs: int | None,
    shard: slice,
    split: str,
) -> grain.IterDataset:
    """Problems -> padded rows; a finite pass is padded to whole global batches first."""
    seq_len = cfg.seq_len
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    if num_epochs is not None:
        empty = {
            "tokens": np.zeros(chains_problem_length(cfg.num_assignments), np.int32),
            "answer_position": np.int32(0),
            "hops": np.int32(0),
        }
        ds = _pad_to_global_batches(ds, global_batch, empty)
    ds = ds[shard]
    pair_vars = cfg.num_vars if cfg.chains_pair_tokens else 0
    # Dense labels train on every assignment; their test splits score the queried variable's
    # own assignment (its label needs exactly h lookups), one weight per problem.
    dense = cfg.chains_dense_labels and split == "train"
    score_query_line = cfg.chains_dense_labels and split != "train"
    ds = ds.map(lambda example: _chains_row(example, seq_len, dense, pair_vars, score_query_line))
    ds = ds.batch(host_batch, drop_remainder=False)
    return ds.to_iter_dataset(_READ_OPTIONS)


def _text_dataset(
    cfg: DataConfig,
    source: Any,
    host_batch: int,
    seed: int,
    shuffle: bool,
    num_epochs: int | None,
    shard: slice,
) -> grain.IterDataset:
    """Documents -> pieces of T + 1 tokens -> (window shuffle) -> first-fit packed rows."""
    docs = grain.MapDataset.source(source)[shard]
    if shuffle:
        docs = docs.shuffle(seed=seed)
    ds = docs.repeat(num_epochs).to_iter_dataset(_READ_OPTIONS)
    ds = FlatMapIterDataset(ds, _CutPieces(cfg.seq_len + 1))
    if shuffle:
        ds = WindowShuffleIterDataset(ds, window_size=cfg.text_shuffle_window, seed=seed)
    ds = FirstFitPackIterDataset(
        ds,
        length_struct={"tokens": cfg.seq_len + 1},
        num_packing_bins=host_batch,
        shuffle_bins=shuffle,
        seed=seed,
    )
    ds = ds.map(_packed_row).batch(host_batch, drop_remainder=False)
    return ds.map(lambda batch: _pad_batch(batch, host_batch))


def make_eval_batches(cfg: DataConfig, split: str, batch_size: int, *, max_batches: int | None = None) -> list[Batch]:
    """All batches of one pass over `split`, unshuffled, the last padded with weight-0 rows."""
    iterator = make_pipeline(cfg, split=split, global_batch_size=batch_size, seed=0, shuffle=False, num_epochs=1)
    batches = []
    for batch in iterator:
        batches.append(batch)
        if max_batches is not None and len(batches) >= max_batches:
            break
    return batches

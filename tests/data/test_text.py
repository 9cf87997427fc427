"""Byte text builder: documents from a directory, deterministic split, default corpus."""

import numpy as np

from looped_jax.data import DataConfig, get_builder, prepare


def write_corpus(root, num_docs=12, short=False):
    """Text files of several kinds (some nested), plus files the builder must skip."""
    docs = {}
    for i in range(num_docs):
        suffix = (".txt", ".md", ".py", ".rst")[i % 4]
        rel = f"sub{i % 3}/doc{i}{suffix}" if i % 2 else f"doc{i}{suffix}"
        repeats = 1 + (7 * i) % 12 if short else 5 + 13 * i
        body = (f"document {i} ✓ " * repeats).encode()
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
        docs[rel] = body
    (root / "skip.bin").write_bytes(b"\x00\x01")
    (root / "empty.txt").write_bytes(b"")
    return docs


def _all(builder, split):
    source = builder.as_data_source(split=split)
    return [source[i] for i in range(len(source))]


def test_builds_from_directory(tmp_path):
    docs = write_corpus(tmp_path / "corpus")
    cfg = DataConfig(name="bytes_text", seq_len=32, text_dir=str(tmp_path / "corpus"), data_dir=str(tmp_path / "tfds"))
    prepare(cfg)
    builder = get_builder(cfg)
    seen = {}
    for split in ("train", "validation"):
        records = _all(builder, split)
        assert records, f"{split} is empty"
        for record in records:
            path = record["path"].decode() if isinstance(record["path"], bytes) else record["path"]
            assert record["bytes"].dtype == np.uint8
            seen[path] = (split, record["bytes"].tobytes())
    assert {p: b for p, (_, b) in seen.items()} == docs

    # Same files -> same split assignment when rebuilt elsewhere.
    cfg2 = DataConfig(
        name="bytes_text", seq_len=32, text_dir=str(tmp_path / "corpus"), data_dir=str(tmp_path / "tfds2")
    )
    prepare(cfg2)
    builder2 = get_builder(cfg2)
    for split in ("train", "validation"):
        paths2 = sorted(str(r["path"]) for r in _all(builder2, split))
        assert paths2 == sorted(str(r["path"]) for r in _all(builder, split))


def test_default_corpus_is_the_stdlib(tmp_path):
    cfg = DataConfig(name="bytes_text", seq_len=32, max_text_bytes=100_000, data_dir=str(tmp_path))
    prepare(cfg)
    builder = get_builder(cfg)
    splits = builder.info.splits
    total = sum(splits[s].num_examples for s in ("train", "validation"))
    assert total >= 2 and splits["validation"].num_examples >= 1
    paths = [str(r["path"]) for r in _all(builder, "train")]
    assert any(".py" in p for p in paths)
    assert not any("site-packages" in p for p in paths)

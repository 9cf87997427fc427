"""Byte-level text corpus: documents read from local files, no download.

Documents are the files under `text_dir` (recursively: *.txt, *.md, *.py, *.rst) or, when
`text_dir` is empty, the sources and text files of the Python standard library, which
every Python install carries. Files are taken in an order set by the hash of their
relative path until `max_text_bytes` is reached, and each goes to `validation` when its
path hash falls below `validation_fraction` (else `train`), so the split is stable when
files are added. Features: `bytes` uint8 [N] (the raw file), `path` text (relative path).
A built corpus is cached under its config name (a hash of source directory and limits):
editing files in `text_dir` later does not rebuild it; delete the directory to do so.
"""

import dataclasses
import hashlib
import os
import sysconfig

import numpy as np
import tensorflow_datasets as tfds

from looped_jax.data.config import DataConfig

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", ".git"}


def default_text_dir() -> str:
    """The Python standard library directory (the default corpus)."""
    return sysconfig.get_paths()["stdlib"]


def _path_hash(rel_path: str, salt: str) -> int:
    """64-bit hash of a path; different salts give independent orders and splits."""
    digest = hashlib.sha1(f"{salt}:{rel_path}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def list_documents(root: str, max_bytes: int) -> list[tuple[str, str]]:
    """(relative path, absolute path) of the files taken, in path-hash order, up to max_bytes."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for filename in filenames:
            if filename.endswith(TEXT_SUFFIXES):
                full = os.path.join(dirpath, filename)
                found.append((os.path.relpath(full, root), full))
    found.sort(key=lambda item: (_path_hash(item[0], "order"), item[0]))
    taken, total = [], 0
    for rel, full in found:
        try:
            size = os.path.getsize(full)
        except OSError:
            continue
        if size == 0:
            continue
        if total >= max_bytes:
            break
        taken.append((rel, full))
        total += size
    return taken


def split_documents(docs: list[tuple[str, str]], validation_fraction: float) -> dict[str, list[tuple[str, str]]]:
    """Assigns documents to train/validation by path hash; both splits get >= 1 document."""
    if len(docs) < 2:
        raise ValueError(f"the text corpus needs at least 2 non-empty files, found {len(docs)}")
    threshold = int(validation_fraction * 2**64)
    splits = {"train": [], "validation": []}
    for doc in docs:
        splits["validation" if _path_hash(doc[0], "split") < threshold else "train"].append(doc)
    if not splits["validation"]:
        splits["validation"].append(splits["train"].pop(0))
    if not splits["train"]:
        splits["train"].append(splits["validation"].pop())
    return splits


@dataclasses.dataclass
class ByteTextConfig(tfds.core.BuilderConfig):
    """Builder parameters (mirrors the text fields of DataConfig)."""

    text_dir: str = ""
    max_text_bytes: int = 4_000_000
    validation_fraction: float = 0.05

    @classmethod
    def from_data_config(cls, cfg: DataConfig) -> "ByteTextConfig":
        """A config named by a hash of its resolved source directory and limits."""
        text_dir = os.path.abspath(os.path.expanduser(cfg.text_dir)) if cfg.text_dir else ""
        source = text_dir or f"stdlib:{default_text_dir()}"
        digest = hashlib.sha1(repr((source, cfg.max_text_bytes, cfg.validation_fraction)).encode()).hexdigest()[:10]
        prefix = "dir" if text_dir else "stdlib"
        return cls(
            name=f"{prefix}_{digest}",
            text_dir=text_dir,
            max_text_bytes=cfg.max_text_bytes,
            validation_fraction=cfg.validation_fraction,
        )


class ByteText(tfds.core.GeneratorBasedBuilder):
    """TFDS builder for a byte-level corpus of local text files."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    # Nothing is downloaded: skip TFDS's checksum-file lookup, which needs the optional
    # `importlib_resources` package for builders that live inside a package.
    code_path = None
    url_infos = None
    BUILDER_CONFIGS = [ByteTextConfig(name="default")]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Byte-level text from local files (looped_jax).",
            features=tfds.features.FeaturesDict(
                {
                    "bytes": tfds.features.Tensor(shape=(None,), dtype=np.uint8),
                    "path": tfds.features.Text(),
                }
            ),
        )

    def _split_generators(self, dl_manager):  # noqa: ARG002 (nothing to download)
        c = self.builder_config
        root = c.text_dir or default_text_dir()
        docs = split_documents(list_documents(root, c.max_text_bytes), c.validation_fraction)
        return {name: self._generate_examples(split_docs) for name, split_docs in docs.items()}

    def _generate_examples(self, docs: list[tuple[str, str]]):
        for rel, full in docs:
            with open(full, "rb") as f:
                data = f.read()
            if data:
                yield rel, {"bytes": np.frombuffer(data, dtype=np.uint8), "path": rel}

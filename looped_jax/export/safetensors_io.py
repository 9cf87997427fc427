"""The safetensors file format, read and written with numpy alone (no torch, no copies).

A file is an 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``
(padded with spaces to a multiple of 8) and then the tensors' raw little-endian bytes, in
row-major order, at the given offsets from the end of the header. Reading memory-maps the
file, so a tensor is only paged in when it is used; writing streams one tensor at a time.
bfloat16 (``ml_dtypes``) is supported, which the ``safetensors`` package's numpy API lacks.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

_TO_NUMPY = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_FROM_NUMPY = {v: k for k, v in _TO_NUMPY.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's limit


class ExportError(ValueError):
    """A checkpoint or exported directory cannot be converted as asked."""


class SafetensorsError(ExportError):
    """A safetensors file is malformed or does not hold what was asked for."""


def dtype_name(dtype) -> str:
    """The safetensors dtype string ("F32", "BF16", ...) of a numpy / JAX dtype."""
    dt = np.dtype(dtype)
    if dt not in _FROM_NUMPY:
        raise SafetensorsError(f"dtype {dt} has no safetensors equivalent; expected one of {sorted(_TO_NUMPY)}")
    return _FROM_NUMPY[dt]


def numpy_dtype(name: str) -> np.dtype:
    if name not in _TO_NUMPY:
        raise SafetensorsError(f"unsupported safetensors dtype {name!r}; expected one of {sorted(_TO_NUMPY)}")
    return _TO_NUMPY[name]


def tensor_sha256(array: np.ndarray) -> str:
    """sha256 of the tensor's bytes exactly as stored (row-major, little-endian)."""
    return hashlib.sha256(np.ascontiguousarray(array).view(np.uint8).reshape(-1).data).hexdigest()


def write_safetensors(path: str | Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None):
    """Writes ``tensors`` (in the given order) to ``path`` atomically (temp file + rename)."""
    path = Path(path)
    header: dict = {}
    offset = 0
    arrays = []
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise SafetensorsError(f"tensor names must be non-empty strings, got {name!r}")
        arr = np.asarray(value)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        nbytes = arr.size * arr.dtype.itemsize
        header[name] = {
            "dtype": dtype_name(arr.dtype),
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
        arrays.append(arr)
    if metadata:
        bad = {k: v for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
        if bad:
            raise SafetensorsError(f"safetensors metadata must map str -> str, got {bad}")
        header = {"__metadata__": dict(metadata), **header}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            if arr.size:
                f.write(np.ascontiguousarray(arr).view(np.uint8).reshape(-1).data)
    os.replace(tmp, path)


class SafetensorsFile(Mapping):
    """Read-only, memory-mapped view of one safetensors file: ``f[name]`` is a numpy array."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SafetensorsError(f"{self.path}: too short to be a safetensors file")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise SafetensorsError(f"{self.path}: header length {n} is invalid for a {size}-byte file")
            try:
                header = json.loads(f.read(n))
            except json.JSONDecodeError as e:
                raise SafetensorsError(f"{self.path}: header is not valid JSON: {e}") from e
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.header: dict[str, dict] = header
        self._data_start = 8 + n
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if size > self._data_start else None
        data_len = size - self._data_start
        for name, info in header.items():
            b, e = info["data_offsets"]
            dt = numpy_dtype(info["dtype"])
            want = int(np.prod(info["shape"], dtype=np.int64)) * dt.itemsize
            if not (0 <= b <= e <= data_len) or e - b != want:
                raise SafetensorsError(f"{self.path}: tensor {name!r} has offsets {[b, e]} inconsistent with its shape")

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.header:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        info = self.header[name]
        dt = numpy_dtype(info["dtype"])
        b, e = info["data_offsets"]
        if b == e:
            return np.zeros(info["shape"], dt)
        return self._map[self._data_start + b : self._data_start + e].view(dt).reshape(info["shape"])

    def __iter__(self) -> Iterator[str]:
        return iter(self.header)

    def __len__(self) -> int:
        return len(self.header)

    def spec(self, name: str) -> tuple[tuple[int, ...], str]:
        """(shape, safetensors dtype string) of a tensor, without reading it."""
        info = self.header[name]
        return tuple(info["shape"]), info["dtype"]


def read_safetensors(path: str | Path) -> SafetensorsFile:
    return SafetensorsFile(path)

"""torch ``state_dict`` checkpoints read without torch, through a restricted unpickler.

``torch.save`` (torch >= 1.6) writes a zip archive ``<name>/data.pkl`` + ``<name>/data/<key>``
(+ ``byteorder``, ``version``): ``data.pkl`` is a pickle whose tensors are
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)`` calls and
whose storages are persistent ids ``("storage", torch.<Dtype>Storage, key, location, numel)``
naming the raw little-endian bytes in ``data/<key>``.

Unpickling a downloaded file can run any code the file names (``os.system``, ``eval``...). The
unpickler here resolves exactly these globals and nothing else -- any other global raises
``TorchPickleError`` before it is looked up:

    collections.OrderedDict                   plain container (state_dict, its _metadata, hooks)
    torch._utils._rebuild_tensor_v2           -> a numpy array viewing the storage (bounds-checked)
    torch._utils._rebuild_parameter           -> its tensor
    torch.{Float,Double,Half,BFloat16,Long,Int,Short,Char,Byte,Bool}Storage, torch.UntypedStorage
                                              storage dtype tags (never called)

which is what torch's own ``weights_only=True`` intends. Tensors come back as numpy arrays
(bfloat16 via ``ml_dtypes``); the loaded object may only hold dicts, lists, tuples, strings,
numbers, None and tensors.

Writing: ``write_state_dict`` uses ``torch.save`` when torch is importable (the file the official
code loads); without torch it writes ``<name>.safetensors`` (same names, same dtypes), which
``read_state_dict`` reads back as well.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from looped_jax.export.safetensors_io import ExportError, read_safetensors, write_safetensors

STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "UntypedStorage": np.dtype(np.uint8),
}


class TorchPickleError(ExportError):
    """A torch checkpoint is malformed or asks the unpickler for something it refuses to build."""


class _StorageType:
    __slots__ = ("name", "dtype")

    def __init__(self, name: str):
        self.name, self.dtype = name, STORAGE_DTYPES[name]


class _Storage:
    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array


class _Tensor:
    """A rebuilt tensor until loading ends (no ``__dict__`` / ``__setstate__``: BUILD on it fails)."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, *rest):
    del requires_grad, backward_hooks, rest
    if not isinstance(storage, _Storage):
        raise TorchPickleError(f"_rebuild_tensor_v2 got {type(storage).__name__}, expected a storage")
    ints = lambda t: isinstance(t, tuple) and all(isinstance(i, int) and i >= 0 for i in t)
    if not (isinstance(storage_offset, int) and storage_offset >= 0 and ints(size) and ints(stride)):
        raise TorchPickleError(f"bad tensor geometry: offset {storage_offset!r}, size {size!r}, stride {stride!r}")
    if len(size) != len(stride):
        raise TorchPickleError(f"tensor size {size} and stride {stride} differ in rank")
    base = storage.array
    if 0 not in size:
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= base.size:
            raise TorchPickleError(f"tensor of size {size} stride {stride} overruns its storage of {base.size}")
    else:
        return _Tensor(np.zeros(size, base.dtype))
    view = np.lib.stride_tricks.as_strided(
        base[storage_offset:], shape=size, strides=tuple(s * base.itemsize for s in stride), writeable=False
    )
    return _Tensor(np.array(view))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *rest):
    del requires_grad, backward_hooks, rest
    if not isinstance(data, _Tensor):
        raise TorchPickleError(f"_rebuild_parameter got {type(data).__name__}, expected a tensor")
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.byteorder = archive, prefix, byteorder
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module in ("torch", "torch.storage") and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise TorchPickleError(
            f"refusing to unpickle global {module}.{name}: a checkpoint may only hold tensors, storages and plain "
            "containers (dict, list, tuple, str, numbers); this file asks for code to run"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise TorchPickleError(f"unknown persistent id {pid!r:.100}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType) or not isinstance(key, str) or not isinstance(numel, int):
            raise TorchPickleError(f"malformed storage id {pid!r:.100}")
        if key not in self.storages:
            name = f"{self.prefix}/data/{key}"
            try:
                raw = self.archive.read(name)
            except KeyError as e:
                raise TorchPickleError(f"storage {name!r} is missing from the archive") from e
            dtype = stype.dtype.newbyteorder("<" if self.byteorder == "little" else ">")
            if len(raw) < numel * dtype.itemsize:
                raise TorchPickleError(f"storage {name!r} has {len(raw)} bytes, needs {numel * dtype.itemsize}")
            arr = np.frombuffer(raw, dtype=dtype, count=numel)
            self.storages[key] = _Storage(arr.astype(stype.dtype) if self.byteorder != "little" else arr)
        return self.storages[key]


def _finish(obj: Any, where: str) -> Any:
    """Tensors -> numpy arrays; anything but plain containers and scalars is an error."""
    if isinstance(obj, _Tensor):
        return obj.array
    if isinstance(obj, dict):
        out = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            out[_finish(k, where)] = _finish(v, where)
        return out
    if isinstance(obj, list | tuple):
        return type(obj)(_finish(v, where) for v in obj)
    if obj is None or isinstance(obj, str | bytes | int | float | bool):
        return obj
    raise TorchPickleError(f"{where}: unexpected object of type {type(obj).__name__} in the checkpoint")


def read_torch_pickle(path: str | Path) -> Any:
    """The object ``torch.save`` wrote to ``path`` (zip format), tensors as numpy arrays; no torch needed."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise TorchPickleError(
            f"{path} is not a torch zip checkpoint (torch >= 1.6 torch.save); legacy tar / raw pickles are not read "
            "-- re-save it with a recent torch"
        )
    with zipfile.ZipFile(path) as archive:
        pkls = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise TorchPickleError(f"{path}: expected one <name>/data.pkl in the archive, found {pkls}")
        prefix = pkls[0].split("/")[0]
        names = set(archive.namelist())
        byteorder = "little"
        if f"{prefix}/byteorder" in names:
            byteorder = archive.read(f"{prefix}/byteorder").decode().strip()
            if byteorder not in ("little", "big"):
                raise TorchPickleError(f"{path}: unknown byteorder {byteorder!r}")
        unpickler = _RestrictedUnpickler(archive.read(pkls[0]), archive, prefix, byteorder)
        try:
            obj = unpickler.load()
        except TorchPickleError:
            raise
        except Exception as e:  # noqa: BLE001 - any malformed pickle becomes one clear error
            raise TorchPickleError(f"{path}: cannot unpickle data.pkl: {type(e).__name__}: {e}") from e
    return _finish(obj, str(path))


def is_safetensors(path: str | Path) -> bool:
    try:
        read_safetensors(path)
        return True
    except (ExportError, OSError, ValueError):
        return False


def read_state_dict(path: str | Path) -> Any:
    """A torch zip checkpoint (restricted unpickler) or a safetensors file, tensors as numpy arrays."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        return read_torch_pickle(path)
    if is_safetensors(path):
        f = read_safetensors(path)
        return collections.OrderedDict((k, np.array(f[k])) for k in f)
    raise TorchPickleError(f"{path} is neither a torch zip checkpoint nor a safetensors file")


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def write_state_dict(path: str | Path, tensors: dict[str, np.ndarray], *, use_torch: bool | None = None) -> Path:
    """Writes ``tensors`` (insertion order kept) with ``torch.save`` to ``path`` when torch is
    importable (``use_torch=None``) or asked for; otherwise to ``path`` + ``.safetensors``.
    Atomic: a temp file renamed into place. Returns the path written."""
    path = Path(path)
    if use_torch is None:
        use_torch = torch_available()
    if not use_torch:
        out = path.with_name(path.name + ".safetensors")
        write_safetensors(out, tensors, {"format": "pt"})
        return out
    import torch

    state = collections.OrderedDict()
    for name, value in tensors.items():
        arr = np.ascontiguousarray(value)
        if arr.dtype == np.dtype(ml_dtypes.bfloat16):
            state[name] = torch.from_numpy(arr.view(np.int16).copy()).view(torch.bfloat16)
        else:
            state[name] = torch.from_numpy(arr.copy())
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
    tmp.replace(path)
    return path

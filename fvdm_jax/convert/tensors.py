"""Reading and writing tensors of other codebases' checkpoints, shared by every converter.

.safetensors files are read with `safetensors.numpy.load_file` when that package is installed and
knows every dtype in the file, else by the numpy reader here (the format is an 8-byte
little-endian header length, a JSON header of {name: {dtype, shape, data_offsets}}, then the raw
little-endian bytes), so neither safetensors nor torch is a requirement. `ConversionError` is the
one error of a checkpoint that does not fit (a ConfigError: one line).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from fvdm_jax.errors import ConfigError


class ConversionError(ConfigError):
    """A checkpoint does not match the model it is converted to (one line, a ConfigError)."""


def listed(keys, limit: int = 12) -> str:
    """'a, b, c' for up to `limit` keys, then how many more."""
    keys = sorted(keys)
    text = ", ".join(keys[:limit])
    return text + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().float().numpy()
    return np.asarray(value)


SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
# The dtypes safetensors.numpy can return (it has no bfloat16).
_PACKAGE_DTYPES = ("F64", "F32", "F16", "I64", "I32", "I16", "I8", "U8", "BOOL")


def _read_safetensors_header(path: str) -> tuple[dict, int]:
    """Returns (header without __metadata__, offset of the data buffer)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ConversionError(f"{path} is not a safetensors file: shorter than 8 bytes")
        header_len = int.from_bytes(prefix, "little")
        if header_len > size - 8:
            raise ConversionError(
                f"{path} is not a safetensors file: header length {header_len} > file size"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversionError(
                f"{path} is not a safetensors file: bad JSON header ({e})"
            ) from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path} is not a safetensors file: header is not a JSON object")
    header.pop("__metadata__", None)
    return header, 8 + header_len


def read_safetensors(path: str, *, use_package: bool | None = None) -> dict[str, np.ndarray]:
    """Loads every tensor of a .safetensors file as numpy arrays in their stored dtype.

    use_package: None uses `safetensors.numpy` when installed and able to read the file's dtypes
    (not bfloat16), True insists on it, False always uses the numpy reader here.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"safetensors file {path} does not exist")
    header, data_start = _read_safetensors_header(path)
    dtypes = {info.get("dtype") for info in header.values() if isinstance(info, dict)}
    if use_package is not False:
        try:
            from safetensors.numpy import load_file
        except ImportError:
            if use_package:
                raise ImportError("use_package=True needs `pip install safetensors`") from None
            load_file = None
        if load_file is not None and (use_package or dtypes <= set(_PACKAGE_DTYPES)):
            return dict(load_file(path))
    size = os.path.getsize(path)
    tensors = {}
    with open(path, "rb") as f:
        for name, info in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ConversionError(
                    f"{path}: tensor {name!r} has an unreadable header entry {info!r} (dtypes "
                    f"read here: {sorted(SAFETENSORS_DTYPES)})"
                ) from None
            count = math.prod(shape)
            if end - begin != count * dtype.itemsize or begin < 0 or data_start + end > size:
                raise ConversionError(
                    f"{path}: tensor {name!r} byte range [{begin}, {end}) does not fit shape "
                    f"{shape} {info['dtype']} or the file; the file is truncated or corrupt"
                )
            f.seek(data_start + begin)
            tensors[name] = np.fromfile(f, dtype=dtype, count=count).reshape(shape)
    return tensors


def write_safetensors(
    path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
):
    """Writes numpy arrays as a .safetensors file (sorted names, contiguous little-endian data)."""
    codes = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    arrays, offset = [], 0
    for name in sorted(tensors):
        array = np.asarray(tensors[name])
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        if dtype not in codes:
            raise ValueError(
                f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot store here"
            )
        array = np.asarray(array, dtype=dtype, order="C")  # (ascontiguousarray would make 0-d 1-d)
        header[name] = {
            "dtype": codes[dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        arrays.append(array)
        offset += array.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data buffer starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for array in arrays:
            f.write(array.reshape(-1).view(np.uint8).data if array.size else b"")

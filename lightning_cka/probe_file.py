"""The ``.npz`` layout of a probe: fields encoded by kind, read back within bounds and checked against declarations.

What a file holds is checked against the fields its analyses declare (kinds, dtypes and shapes that agree with the
layer lists) before anything else sees it.

A file is a zip of ``.npy`` members; every member's header (shape and dtype) is read and checked against the bytes the
member holds before its array is allocated, so a 300-byte file that declares a 10¹²-element array is refused at once.
Arrays of Python objects (pickles) are never read.
"""

import math
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lightning_cka.engine.analysis import Field

FORMAT_VERSION = 3
MAX_BYTES = 2 << 30  # arrays read from one file at most: a probe file of a 200-layer model holds well under 1 GiB


class FieldError(ValueError):
    """A field whose value does not match its declaration (its ``key`` is the field's name)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"field '{key}' {message}")
        self.key = key


def read_arrays(path: str | os.PathLike, max_bytes: int = MAX_BYTES) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file by name, each checked against the size of its member before it is read.

    Raises:
        ValueError: not a zip of ``.npy`` members, a member cut short or declaring more than it holds, object arrays,
            or more than ``max_bytes`` of arrays.
    """
    arrays: dict[str, np.ndarray] = {}
    total = 0
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                key = info.filename.removesuffix(".npy")
                if not info.filename.endswith(".npy") or not key:
                    raise ValueError(f"member {info.filename!r} is not an .npy array")
                with archive.open(info) as member:
                    shape, dtype = _header(member, info.filename)
                    header_bytes = member.tell()
                nbytes = math.prod(shape) * dtype.itemsize
                if header_bytes + nbytes > info.file_size:
                    raise ValueError(
                        f"member {info.filename!r} declares a {dtype} array of shape {shape} ({nbytes} bytes) but "
                        f"holds {info.file_size - header_bytes}"
                    )
                total += nbytes
                if total > max_bytes:
                    raise ValueError(f"its arrays take more than {max_bytes} bytes")
                with archive.open(info) as member:
                    arrays[key] = np.lib.format.read_array(member, allow_pickle=False)
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise ValueError(f"cannot be read ({type(err).__name__}: {err}); it may be cut short") from err
    return arrays


def _header(member: Any, name: str) -> tuple[tuple[int, ...], np.dtype]:
    try:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(member)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(member)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except ValueError as err:
        raise ValueError(f"member {name!r} has no valid .npy header ({err})") from err
    if dtype.hasobject:
        raise ValueError(f"member {name!r} holds Python objects (a pickle), which are never read")
    return tuple(int(s) for s in shape), dtype


def write_arrays(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> Path:
    """Write ``arrays`` as ``.npz`` atomically: a temporary file, flushed to disk, renamed into place.

    A kill mid-write leaves the temporary file (``.<name>.<pid>.tmp``), never a truncated file under the final name;
    parent directories are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def encode(f: Field, value: Any) -> np.ndarray:
    """A field value as the array stored for it."""
    kind = f.kind
    if kind == "names":
        return np.asarray([str(v) for v in value], dtype=str).reshape(-1)
    if kind == "text":
        return np.asarray(str(value), dtype=str)
    if kind == "int":
        return np.asarray(int(value), dtype=np.int64)
    if kind == "ints":
        array = np.asarray(value, dtype=np.int64)
        return array.reshape(-1) if array.ndim == 0 else array
    if kind == "float":
        return np.asarray(float(value), dtype=np.float64)
    return np.asarray(value, dtype=np.float64)


def decode(f: Field, key: str, value: np.ndarray) -> Any:
    """A stored array as its field value (``None`` for what files of format 1 wrote for "absent").

    Raises:
        FieldError: the array is not of the field's kind (strings where numbers belong, an array for a number, ...).
    """
    kind = f.kind
    if kind in ("names", "text"):
        if value.dtype.kind != "U":
            raise FieldError(key, f"holds {value.dtype} values, not text")
        if kind == "text":
            if value.ndim != 0:
                raise FieldError(key, f"is text, stored as one string, not an array of shape {value.shape}")
            return str(value) or None
        if value.ndim != 1:
            raise FieldError(key, f"is a list of names, stored 1-D, not an array of shape {value.shape}")
        return [str(v) for v in value] if value.size else None
    if value.dtype.kind not in "biuf":
        raise FieldError(key, f"holds {value.dtype} values, not numbers")
    if kind in ("int", "float"):
        if value.ndim != 0:
            raise FieldError(key, f"is one number, not an array of shape {value.shape}")
        if kind == "int":
            if value.dtype.kind == "f":
                raise FieldError(key, f"is an integer, not {value.dtype}")
            return int(value)
        return None if np.isnan(value) else float(value)
    if kind == "ints":
        if value.dtype.kind == "f":
            raise FieldError(key, f"holds integers, not {value.dtype} values")
        return value.astype(np.int64) if value.size else None
    return value.astype(np.float64, copy=False) if value.size else None


def check_shapes(schema: Mapping[str, Field], values: Mapping[str, Any]) -> None:
    """Check that every array field's shape agrees with the fields its declaration names.

    Args:
        schema: the declaration of every key (per-model fields also under ``reference_<key>``).
        values: the decoded field values.

    Raises:
        FieldError: naming the field, its shape and what it should be.
    """
    free: dict[str, int] = {}
    for key, value in values.items():
        f = schema.get(key)
        if f is None or f.shape is None or not isinstance(value, np.ndarray):
            continue
        prefix = key[: len(key) - len(f.key)]
        if value.ndim != len(f.shape):
            raise FieldError(key, f"has shape {value.shape}; it should have {len(f.shape)} dims {_spec(f.shape)}")
        for axis, (dim, size) in enumerate(zip(f.shape, value.shape, strict=True)):
            expected = _dim(dim, prefix, schema, values, free)
            if expected is None:
                continue
            if isinstance(expected, str):  # a free name, seen here first
                free[expected] = size
            elif size != expected:
                raise FieldError(
                    key,
                    f"has shape {value.shape}, but axis {axis} should be {expected}, {_what(dim, prefix, schema)} "
                    f"{_spec(f.shape)}",
                )


def _dim(dim: Any, prefix: str, schema: Mapping[str, Field], values: Mapping[str, Any], free: dict) -> int | str | None:
    """The size ``dim`` must have, ``None`` for any, or the name of a free dim not yet seen."""
    if dim is None:
        return None
    if isinstance(dim, int):
        return dim
    name = prefix + dim if (prefix + dim) in schema or dim not in schema else dim
    declared = schema.get(name)
    if declared is not None and declared.kind == "names":
        if values.get(name) is None:
            raise FieldError(name, "is missing, but the fields shaped by it are there")
        return len(values[name])
    if declared is not None and declared.kind == "int":
        return int(values[name]) if values.get(name) is not None else None
    return free.get(name, name)


def _what(dim: Any, prefix: str, schema: Mapping[str, Field]) -> str:
    if isinstance(dim, int):
        return "always"
    name = prefix + dim if (prefix + dim) in schema or dim not in schema else dim
    kind = schema[name].kind if name in schema else ""
    return {"names": f"the length of '{name}'", "int": f"the value of '{name}'"}.get(kind, f"as '{dim}' elsewhere")


def _spec(shape: tuple) -> str:
    return "(" + ", ".join("any" if d is None else str(d) for d in shape) + ")"

"""The ``.npz`` layout of a probe: fields encoded by kind, read back within bounds and checked against declarations.

What a file holds is checked against the fields its analyses declare (kinds, dtypes and shapes that agree with the
layer lists) before anything else sees it.

A file is a zip of ``.npy`` members; every member's header (shape and dtype) is read and checked against the bytes the
member holds before its array is allocated, so a 300-byte file that declares a 10¹²-element array is refused at once.
Arrays of Python objects (pickles) are never read.
"""

import io
import math
import os
import re
import zipfile
import zlib
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


def read_arrays(
    path: str | os.PathLike, max_bytes: int = MAX_BYTES, headers_only: bool = False
) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file by name, each checked against the size of its member before it is read.

    With ``headers_only``, numeric arrays larger than 4 KiB are not read: each is a read-only array of zeros of its
    shape (float64 or int64, taking no memory), enough to check the file's shapes and kinds without its data.

    The file is read once; each stored (uncompressed, as ``np.savez`` writes them) member is sliced from it, checked
    against its CRC, and its header parsed by a pattern of the canonical header numpy writes (numpy's own parser for
    any other), which makes reading a run of many probes several times faster than ``np.load``.

    Raises:
        ValueError: not a zip of ``.npy`` members, a member cut short or declaring more than it holds, object arrays,
            or more than ``max_bytes`` of arrays.
    """
    arrays: dict[str, np.ndarray] = {}
    total = 0
    try:
        if os.path.getsize(path) > max_bytes + (64 << 20):  # zip and .npy headers are small beside the arrays
            raise ValueError(f"its arrays take more than {max_bytes} bytes")
        raw = memoryview(Path(path).read_bytes())
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            for info in archive.infolist():
                key = info.filename.removesuffix(".npy")
                if not info.filename.endswith(".npy") or not key:
                    raise ValueError(f"member {info.filename!r} is not an .npy array")
                member = _member_bytes(archive, info, raw)
                shape, dtype, fortran, header_bytes = _header(member, info.filename)
                nbytes = math.prod(shape) * dtype.itemsize
                if header_bytes + nbytes > len(member):
                    raise ValueError(
                        f"member {info.filename!r} declares a {dtype} array of shape {shape} ({nbytes} bytes) but "
                        f"holds {len(member) - header_bytes}"
                    )
                total += nbytes
                if total > max_bytes:
                    raise ValueError(f"its arrays take more than {max_bytes} bytes")
                if headers_only and nbytes > 4096 and dtype.kind in "biuf":
                    zero = np.zeros((), dtype=np.float64 if dtype.kind == "f" else np.int64)
                    arrays[key] = np.broadcast_to(zero, shape)
                    continue
                array = np.frombuffer(bytearray(member[header_bytes : header_bytes + nbytes]), dtype=dtype)
                arrays[key] = array.reshape(shape[::-1]).T if fortran else array.reshape(shape)
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise ValueError(f"cannot be read ({type(err).__name__}: {err}); it may be cut short") from err
    return arrays


def _member_bytes(archive: zipfile.ZipFile, info: zipfile.ZipInfo, raw: memoryview) -> memoryview | bytes:
    """A member's bytes: sliced from the file when stored (checked against its CRC), else decompressed."""
    if info.compress_type != zipfile.ZIP_STORED:
        with archive.open(info) as member:
            return member.read()
    local = raw[info.header_offset : info.header_offset + 30]
    if len(local) < 30 or bytes(local[:4]) != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"member {info.filename!r} has no local header")
    start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
    data = raw[start : start + info.compress_size]
    if len(data) != info.compress_size or zlib.crc32(data) != info.CRC:
        raise zipfile.BadZipFile(f"member {info.filename!r} is cut short or corrupt (CRC)")
    return data


# The header numpy writes: {'descr': '<f8', 'fortran_order': False, 'shape': (12, 12), } padded with spaces, "\n".
_CANONICAL_HEADER = re.compile(
    r"\{'descr': '([^']+)', 'fortran_order': (True|False), 'shape': \(([0-9, ]*)\), \} *\n?$"
)
_HEADER_LENGTH_BYTES = {1: 2, 2: 4, 3: 4}  # bytes of the header length, by .npy format version


def _header(member: memoryview | bytes, name: str) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """``(shape, dtype, fortran order, header bytes)`` of an ``.npy`` member."""
    try:
        if len(member) < 8 or bytes(member[:6]) != b"\x93NUMPY":
            raise ValueError("the magic string is missing")
        version = member[6]
        width = _HEADER_LENGTH_BYTES.get(version)
        if width is None:
            raise ValueError(f"unsupported .npy version {(version, member[7])}")
        length = int.from_bytes(member[8 : 8 + width], "little")
        start = 8 + width
        if len(member) < start + length:
            raise ValueError("the header is cut short")
        text = bytes(member[start : start + length]).decode("utf8" if version == 3 else "latin1")
        found = _CANONICAL_HEADER.match(text)
        if found:
            dtype = np.dtype(found[1])
            shape = tuple(int(s) for s in found[3].split(",") if s.strip())
            fortran = found[2] == "True"
        else:  # any other header numpy accepts: its own (slower, literal_eval-based) parser
            stream = io.BytesIO(bytes(member[: start + length]))
            np.lib.format.read_magic(stream)
            read = np.lib.format.read_array_header_1_0 if version == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(stream)
    except ValueError as err:
        raise ValueError(f"member {name!r} has no valid .npy header ({err})") from err
    if dtype.hasobject:
        raise ValueError(f"member {name!r} holds Python objects (a pickle), which are never read")
    return tuple(int(s) for s in shape), dtype, bool(fortran), start + length


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

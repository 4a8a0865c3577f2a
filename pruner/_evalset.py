"""Eval sets: one array per model input plus optional labels, from a ``.npz``."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import math
import os
import sys
import traceback
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, TypeVar

import numpy as np
import onnx

from ._errors import InvalidEvalSetError, ResourceLimitError
from ._graph import declared_shape

__all__ = ["EvalSet", "InputSpec", "load_eval_set", "model_inputs", "verify_eval_set"]

T = TypeVar("T")

LABELS_KEY = "labels"
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK"


@dataclass(frozen=True)
class InputSpec:
    """A model input: name, numpy dtype, and shape with ``None`` for symbolic dims."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]

    @property
    def fixed_batch(self) -> int | None:
        return self.shape[0] if self.shape else None


@dataclass(frozen=True)
class EvalSet:
    """Arrays keyed by model input name, sample axis first; ``labels`` optional."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        first = next(iter(self.inputs.values()), None)
        return 0 if first is None else int(first.shape[0])

    def subset(self, indices: np.ndarray) -> EvalSet:
        return EvalSet(
            {k: v[indices] for k, v in self.inputs.items()},
            None if self.labels is None else self.labels[indices],
        )


def load_eval_set(source: str | os.PathLike[str] | bytes, *, max_bytes: int | None = None) -> EvalSet:
    """Read an ``.npz`` (never unpickling anything), refusing decompression bombs up front.

    Every member's ``.npy`` header is read and checked before any array is allocated: its
    declared size must agree with the zip directory, and the sum of the declared sizes must
    stay within ``max_bytes`` (decoded bytes, not compressed ones). Without ``max_bytes``,
    the sum must still fit in the memory the machine has free.

    Raises:
        InvalidEvalSetError: unreadable file, pickled object arrays, a header that does not
            match the member's size, or no arrays.
        ResourceLimitError: the decoded arrays would exceed ``max_bytes`` or the free memory
            (``subject`` is ``"max_eval_bytes"``).
    """
    arrays = _open_npz(source, max_bytes, _read_arrays)
    labels = arrays.pop(LABELS_KEY, None)
    return EvalSet(arrays, labels)


def verify_eval_set(source: str | os.PathLike[str] | bytes | bytearray, *, max_bytes: int | None = None) -> int:
    """Check an ``.npz`` as :func:`load_eval_set` does, without keeping its arrays: every member is
    decompressed a chunk at a time (its length and CRC checked) and dropped, so the memory it takes
    is a chunk's, whatever the arrays' size. Returns the arrays' decoded bytes.

    Raises:
        InvalidEvalSetError, ResourceLimitError: as :func:`load_eval_set`.
    """
    return _open_npz(source, max_bytes, _verify_members)


def _open_npz(
    source: str | os.PathLike[str] | bytes | bytearray,
    max_bytes: int | None,
    read: Callable[[zipfile.ZipFile, list[_Member], str], T],
) -> T:
    """``read(archive, members, what)`` on the ``.npz`` ``source`` once its headers passed (see
    :func:`load_eval_set`); the archive's errors become ``InvalidEvalSetError``."""
    what = "the eval set bytes" if isinstance(source, (bytes, bytearray)) else repr(str(source))
    try:
        if isinstance(source, (bytes, bytearray)):
            handle: io.BufferedIOBase | io.BytesIO = io.BytesIO(source)  # shares a bytes object's memory
        else:
            handle = open(source, "rb")
    except FileNotFoundError as e:
        raise InvalidEvalSetError(f"eval set file {what} does not exist") from e
    except OSError as e:
        raise InvalidEvalSetError(f"cannot read eval set file {what}: {e.strerror or e}") from e
    with handle:
        magic = handle.read(len(_NPY_MAGIC))
        handle.seek(0)
        if magic == _NPY_MAGIC:
            raise InvalidEvalSetError(
                f"{what} is a single .npy array; expected an .npz archive with one array per model input"
            )
        if magic[:2] != _ZIP_MAGIC:
            raise InvalidEvalSetError(f"{what} is not a readable .npz archive (no zip header)")
        try:
            with zipfile.ZipFile(handle) as archive:
                members = _headers(archive, what, max_bytes)
                if not members:
                    raise InvalidEvalSetError(f"{what} holds no arrays")
                return read(archive, members, what)
        except NotImplementedError as e:  # zipfile: a compression method it does not know
            raise InvalidEvalSetError(f"{what} uses a zip compression numpy cannot read: {e}") from e
        except (OSError, zipfile.BadZipFile, EOFError, ValueError, zlib.error) as e:
            raise InvalidEvalSetError(f"{what} is not a readable .npz archive: {e}") from e


@dataclass(frozen=True)
class _Member:
    """One ``.npy`` member of an archive, as its header declares it."""

    info: zipfile.ZipInfo
    key: str
    shape: tuple[int, ...]
    fortran: bool
    dtype: np.dtype
    data_offset: int
    """Bytes of magic and header before the array data."""

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


READ_CHUNK = 8 << 20
"""Bytes decompressed at a time straight into an array's memory."""
MAX_HEADER = 10_000
"""Largest ``.npy`` header read (numpy's own default)."""


def _headers(archive: zipfile.ZipFile, what: str, max_bytes: int | None) -> list[_Member]:
    """Every member's header, checked, before anything is allocated for its data."""
    members = []
    total = 0
    available = None if max_bytes is not None else available_memory()
    for info in archive.infolist():
        if info.is_dir():
            continue
        if not info.filename.endswith(".npy"):
            raise InvalidEvalSetError(f"{what}: member {info.filename!r} is not a .npy array")
        with archive.open(info) as stream:
            member = _header(stream, info, what)
        declared = member.nbytes
        total += declared
        if max_bytes is not None and total > max_bytes:
            raise _limit_error(
                f"{what}: member {info.filename!r} declares {_shape_text(member.shape)} {member.dtype}, "
                f"{_size_text(declared)} decoded, which takes the eval set to {_size_text(total)}, over the "
                f"limit of {_size_text(max_bytes)} (the limit counts decoded bytes, not compressed ones)"
            )
        if available is not None and total > available:
            raise _limit_error(
                f"{what}: member {info.filename!r} declares {_shape_text(member.shape)} {member.dtype}, "
                f"{_size_text(declared)} decoded, which takes the eval set to {_size_text(total)}, more than "
                f"the {_size_text(available)} of memory this machine has free"
            )
        # after the limits: a claim too large to allocate is refused as such, whatever the directory says
        if member.data_offset + declared != info.file_size:
            raise InvalidEvalSetError(
                f"{what}: member {info.filename!r} declares {_shape_text(member.shape)} {member.dtype} "
                f"({declared} bytes of data) but the zip directory gives it {info.file_size - member.data_offset}: "
                "the archive is truncated or inconsistent"
            )
        members.append(member)
    return members


def _header(stream: IO[bytes], info: zipfile.ZipInfo, what: str) -> _Member:
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream, max_header_size=MAX_HEADER)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream, max_header_size=MAX_HEADER)
        elif version == (3, 0):
            shape, fortran, dtype = _read_header_3_0(stream)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except (ValueError, EOFError, SyntaxError, TypeError) as e:
        raise InvalidEvalSetError(f"{what}: member {info.filename!r} has no valid .npy header ({e})") from e
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise InvalidEvalSetError(
            f"{what} contains pickled object arrays (member {info.filename!r}), which are never loaded; "
            "store plain numeric arrays"
        )
    if any(not isinstance(d, int) or d < 0 for d in shape):
        raise InvalidEvalSetError(f"{what}: member {info.filename!r} declares an invalid shape {shape!r}")
    return _Member(info, info.filename[: -len(".npy")], tuple(shape), bool(fortran), dtype, stream.tell())


def _read_header_3_0(stream: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Version 3.0 (a UTF-8 header): numpy has no public reader for it."""
    from numpy.lib import _format_impl

    read = getattr(_format_impl, "_read_array_header")  # noqa: B009 (private: not in numpy's stubs)
    shape, fortran, dtype = read(stream, (3, 0), MAX_HEADER)
    return tuple(shape), bool(fortran), np.dtype(dtype)


def _read_arrays(archive: zipfile.ZipFile, members: list[_Member], what: str) -> dict[str, np.ndarray]:
    """The members' arrays. On any failure nothing read so far stays referenced (the error's
    traceback keeps no frame holding an array)."""
    arrays: dict[str, np.ndarray] = {}
    try:
        for member in members:
            arrays[member.key] = _read_array(archive, member, what)
    except BaseException as e:
        arrays.clear()
        traceback.clear_frames(e.__traceback__)
        if isinstance(e, MemoryError):
            raise _limit_error(
                f"{what}: not enough memory to read member {member.info.filename!r} "
                f"({_size_text(member.nbytes)} decoded)"
            ) from None
        raise
    return arrays


def _read_array(archive: zipfile.ZipFile, member: _Member, what: str) -> np.ndarray:
    """One member's array, decompressed chunk by chunk into its memory (one allocation)."""
    array = np.empty(member.shape, dtype=member.dtype, order="F" if member.fortran else "C")
    try:
        with archive.open(member.info) as stream:
            stream.seek(member.data_offset)
            if array.nbytes:
                view = array.reshape(-1, order="A").view(np.uint8)
                done = 0
                while done < len(view):
                    chunk = stream.read(min(READ_CHUNK, len(view) - done))
                    if not chunk:
                        raise InvalidEvalSetError(
                            f"{what}: member {member.info.filename!r} ends after {done} of its "
                            f"{array.nbytes} bytes of data: the archive is truncated"
                        )
                    view[done : done + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
                    done += len(chunk)
                del view, chunk
            if stream.read(1):  # also makes zipfile check the member's CRC
                raise InvalidEvalSetError(f"{what}: member {member.info.filename!r} holds more data than declared")
    except BaseException:
        del array
        raise
    return array


def _verify_members(archive: zipfile.ZipFile, members: list[_Member], what: str) -> int:
    """Decompress every member a chunk at a time, keeping nothing: its data must be as long as its
    header declares (zipfile checks the CRC at the end). Returns the decoded bytes."""
    for member in members:
        with archive.open(member.info) as stream:
            stream.seek(member.data_offset)
            done = 0
            while done < member.nbytes:
                chunk = stream.read(min(READ_CHUNK, member.nbytes - done))
                if not chunk:
                    raise InvalidEvalSetError(
                        f"{what}: member {member.info.filename!r} ends after {done} of its "
                        f"{member.nbytes} bytes of data: the archive is truncated"
                    )
                done += len(chunk)
            if stream.read(1):
                raise InvalidEvalSetError(f"{what}: member {member.info.filename!r} holds more data than declared")
    return sum(member.nbytes for member in members)


def _limit_error(message: str) -> ResourceLimitError:
    return ResourceLimitError(message, subject="max_eval_bytes")


def available_memory() -> int:
    """Bytes of memory the machine can give a new allocation now: MemAvailable of /proc/meminfo
    (free memory plus reclaimable caches), else the free pages ``sysconf`` reports."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return sys.maxsize


def process_memory() -> tuple[int, int]:
    """This process's resident memory now and its peak, in bytes (Linux ``/proc``; zeros elsewhere)."""
    found = {"VmRSS:": 0, "VmHWM:": 0}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(maxsplit=1)[0] if line.strip() else ""
                if key in found:
                    found[key] = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return found["VmRSS:"], found["VmHWM:"]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc
        return None
    return trim


def release_freed_memory() -> None:
    """Give the memory freed so far back to the system (glibc only; elsewhere nothing happens).

    glibc keeps freed blocks below its mmap threshold (which grows to 32 MiB as onnxruntime and numpy
    free large buffers) for reuse: after calibration or a batch's activations the process would
    hold hundreds of MiB it no longer uses, and the next phase would stack its own on top.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _size_text(size: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift:
            return f"{size / (1 << shift):.1f} {unit} ({size} bytes)"
    return f"{size} bytes"


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The real inputs of the model (initializers listed as inputs excluded)."""
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        ttype = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            specs.append(InputSpec(value.name, np.dtype(object), ()))
            continue
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type))
        specs.append(InputSpec(value.name, dtype, declared_shape(value)))
    return specs


def validate_eval_set(evalset: EvalSet, specs: list[InputSpec]) -> None:
    """Check that ``evalset`` can be fed to a model with ``specs``.

    Raises:
        InvalidEvalSetError: naming the first mismatch (names, dtypes, shapes,
            sample counts, NaN/Inf, emptiness).
    """
    names = {s.name for s in specs}
    for spec in specs:
        if spec.dtype == np.dtype(object):
            raise InvalidEvalSetError(f"model input {spec.name!r} is not a tensor; only tensor inputs are supported")
    missing = [s.name for s in specs if s.name not in evalset.inputs]
    if missing:
        raise InvalidEvalSetError(
            f"eval set lacks model input(s) {', '.join(map(repr, missing))}; it has "
            f"{', '.join(map(repr, sorted(evalset.inputs))) or 'no arrays'}"
        )
    extra = sorted(set(evalset.inputs) - names)
    if extra:
        raise InvalidEvalSetError(
            f"eval set has array(s) {', '.join(map(repr, extra))} that are not model inputs "
            f"(inputs: {', '.join(map(repr, sorted(names)))}; labels go in {LABELS_KEY!r})"
        )
    counts = {}
    for spec in specs:
        array = evalset.inputs[spec.name]
        if array.dtype != spec.dtype:
            raise InvalidEvalSetError(
                f"eval input {spec.name!r} has dtype {array.dtype}, the model expects {spec.dtype}"
            )
        if array.ndim != len(spec.shape) or array.ndim == 0:
            raise InvalidEvalSetError(
                f"eval input {spec.name!r} has shape {list(array.shape)}, the model expects "
                f"{_shape_text(spec.shape)} (sample axis first)"
            )
        for axis, (got, want) in enumerate(zip(array.shape, spec.shape, strict=True)):
            if axis > 0 and want is not None and got != want:
                raise InvalidEvalSetError(
                    f"eval input {spec.name!r} has shape {list(array.shape)}, the model expects "
                    f"{_shape_text(spec.shape)}: axis {axis} must be {want}"
                )
        counts[spec.name] = int(array.shape[0])
        if array.dtype.kind in "fc" and not all_finite(array):
            raise InvalidEvalSetError(f"eval input {spec.name!r} contains NaN or Inf")
    if evalset.labels is not None:
        counts[LABELS_KEY] = int(evalset.labels.shape[0]) if evalset.labels.ndim else -1
        if evalset.labels.dtype.kind not in "biuf":
            raise InvalidEvalSetError(f"labels have dtype {evalset.labels.dtype}; expected integers or floats")
        if evalset.labels.dtype.kind == "f" and not all_finite(evalset.labels):
            raise InvalidEvalSetError("labels contain NaN or Inf")
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"{k}: {v}" for k, v in counts.items())
        raise InvalidEvalSetError(f"eval set arrays differ in sample count ({detail})")
    if not counts or next(iter(counts.values())) <= 0:
        raise InvalidEvalSetError("eval set is empty (0 samples)")


FINITE_CHUNK = 1 << 22
"""Elements tested for NaN/Inf at a time (a mask of the whole set would cost a byte per element)."""


def all_finite(array: np.ndarray) -> bool:
    """Whether ``array`` holds no NaN or Inf, tested a slice of samples at a time."""
    if array.ndim == 0 or array.size <= FINITE_CHUNK:
        return bool(np.isfinite(array).all())
    rows = max(1, FINITE_CHUNK // max(1, array.size // array.shape[0]))
    return all(bool(np.isfinite(array[i : i + rows]).all()) for i in range(0, array.shape[0], rows))


def _shape_text(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"

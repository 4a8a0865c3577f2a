"""Loading, validating and writing ONNX models.

A model is accepted only when it parses, passes ``onnx.checker`` with
``full_check=True`` (strict shape inference) and, where it uses external data,
every data file lies inside the model's own folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError, EncodeError
from onnx import TensorProto

from ._errors import InvalidConfigError, InvalidModelError

__all__ = ["check_output_path", "load_model", "save_model", "session_source"]

logger = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2_000_000_000
"""Models whose serialized size exceeds this are written with external data."""


def load_model(source: str | os.PathLike[str] | bytes) -> onnx.ModelProto:
    """Load and fully validate a model from a path or from its serialized bytes.

    Raises:
        InvalidModelError: the file is missing, not ONNX, truncated, fails the
            checker, or references external data it may not use.
    """
    start = time.perf_counter()
    if isinstance(source, (bytes, bytearray, memoryview)):
        model = _parse(bytes(source), "the model bytes")
        external = _external_tensors(model)
        if external:
            raise InvalidModelError(
                f"the model references external data (tensor {external[0].name!r}); a model sent as "
                "bytes must be self-contained: save it with all tensors inside the .onnx file"
            )
        _check(model, bytes(source))
        _log_loaded(model, "the model bytes", len(source), 0, start)
        return model

    path = Path(source)
    if not path.is_file():
        raise InvalidModelError(f"model file {str(path)!r} does not exist or is not a file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InvalidModelError(f"cannot read model file {str(path)!r}: {e.strerror}") from e
    model = _parse(data, repr(str(path)))
    size = len(data)
    del data
    external = _external_tensors(model)
    if external:
        _check_external_locations(external, path.parent)
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except Exception as e:  # onnx raises several types here
            raise InvalidModelError(f"cannot load the external data of {str(path)!r}: {e}") from e
    # by path: the checker reads the file itself instead of a serialization of the model
    _check(model, path)
    _log_loaded(model, repr(str(path)), size, len(external), start)
    return model


def _log_loaded(model: onnx.ModelProto, what: str, size: int, external: int, start: float) -> None:
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "loaded %s: %d bytes (%d tensors in external data), opset %s, %d nodes, %d initializers; "
            "parsed and checked in %.3f s",
            what,
            size,
            external,
            ",".join(f"{o.domain or 'ai.onnx'}:{o.version}" for o in model.opset_import),
            len(model.graph.node),
            len(model.graph.initializer),
            time.perf_counter() - start,
        )


def _parse(data: bytes, what: str) -> onnx.ModelProto:
    if not data:
        raise InvalidModelError(f"{what} is empty, not an ONNX model")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise InvalidModelError(f"{what} is not an ONNX model or is truncated (protobuf parse failed: {e})") from e
    if not model.HasField("graph") or not model.graph.node:
        raise InvalidModelError(f"{what} is not an ONNX model or is truncated: it has no graph nodes")
    return model


def _check(model: onnx.ModelProto, source: Path | bytes | None = None) -> None:
    """Full checker run on ``model``; ``source`` (its file, or its serialized bytes)
    spares the checker a serialization of its own."""
    if not model.opset_import:
        raise InvalidModelError("the model declares no opset (opset_import is empty)")
    if not model.graph.output:
        raise InvalidModelError(
            "the model's graph declares no outputs, so there is nothing to run or measure: "
            "list the tensors the model computes as graph outputs"
        )
    try:
        if isinstance(source, Path):
            onnx.checker.check_model(str(source), full_check=True)
        else:
            onnx.checker.check_model(model if source is None else source, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InvalidModelError(f"the model fails the ONNX checker: {first}") from e
    except ValueError as e:  # e.g. a model over 2 GB given in memory
        raise InvalidModelError(f"the model cannot be checked: {e}") from e


def _iter_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _iter_tensors(attr.g)
            for sub in attr.graphs:
                yield from _iter_tensors(sub)


def _external_tensors(model: onnx.ModelProto) -> list[TensorProto]:
    return [t for t in _iter_tensors(model.graph) if t.data_location == TensorProto.EXTERNAL]


def _check_external_locations(tensors: list[TensorProto], folder: Path) -> None:
    root = folder.resolve()
    for tensor in tensors:
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        if not location:
            raise InvalidModelError(f"tensor {tensor.name!r} has external data without a location")
        rel = Path(location)
        if rel.is_absolute() or location.startswith(("/", "\\")) or ".." in rel.parts or ":" in location:
            raise InvalidModelError(
                f"tensor {tensor.name!r} points to external data {location!r} outside the model's "
                "folder; only relative paths inside that folder are allowed"
            )
        if "\x00" in location:
            raise InvalidModelError(
                f"tensor {tensor.name!r}: external data location {location[:80]!r} holds a NUL byte"
            )
        try:
            target = (root / rel).resolve()
            inside = target.is_relative_to(root)
            size = target.stat().st_size if inside and target.is_file() else None
        except OSError as e:  # a name too long, a loop of links
            raise InvalidModelError(
                f"tensor {tensor.name!r}: external data location {location[:80]!r} cannot be used: {e.strerror or e}"
            ) from e
        if not inside:
            raise InvalidModelError(
                f"tensor {tensor.name!r}: external data {location!r} resolves outside the model's folder"
            )
        if size is None:
            raise InvalidModelError(f"tensor {tensor.name!r}: external data file {location!r} is missing")
        offset, length = _external_int(tensor, info, "offset"), _external_int(tensor, info, "length")
        if offset < 0 or length < 0 or offset + length > size:
            raise InvalidModelError(
                f"tensor {tensor.name!r}: external data range {offset}+{length} exceeds {location!r} ({size} bytes)"
            )


def _external_int(tensor: TensorProto, info: dict[str, str], key: str) -> int:
    text = info.get(key, "0") or "0"
    try:
        return int(text)
    except ValueError:
        raise InvalidModelError(
            f"tensor {tensor.name!r}: external data {key} {text[:40]!r} is not a whole number"
        ) from None


def _serialized(model: onnx.ModelProto) -> bytes | None:
    """``model`` serialized, or None when it is over protobuf's 2 GB. One serialization where its
    initializers are well under the limit (``ByteSize()`` is a serialization of its own)."""
    if sum(int(np.prod(t.dims)) for t in model.graph.initializer) * 8 < PROTOBUF_LIMIT:
        try:
            return model.SerializeToString()
        except EncodeError:  # Constant nodes or attributes took it over
            pass
    return model.SerializeToString() if model.ByteSize() < PROTOBUF_LIMIT else None


@contextlib.contextmanager
def session_source(model: onnx.ModelProto) -> Iterator[str | bytes]:
    """What onnxruntime should load: bytes, or a temporary path for models over 2 GB."""
    data = _serialized(model)
    if data is not None:
        yield data
        return
    with tempfile.TemporaryDirectory(prefix="onnx-pruner-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        _write_external(model, path)
        yield path


def check_output_path(
    path: str | os.PathLike[str],
    what: str = "output",
    *,
    others: Sequence[tuple[str | os.PathLike[str], str]] = (),
) -> None:
    """Check up front that a file can be written at ``path``; ``what`` names it in errors.

    ``others`` are ``(path, what)`` pairs of files that ``path`` must not be: the
    run's other outputs, and its inputs. Two paths are the same file when they
    reach it by any route (``./a`` and ``a``, relative and absolute, symlinks,
    a symlinked folder, hard links), whether or not it exists yet.

    Raises:
        InvalidConfigError: the path is an existing folder, its folder is
            missing or not writable, or it is the same file as one of ``others``.
    """
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        raise InvalidConfigError(f"{what} path {str(target)!r} is a folder; give a file name")
    identity = _file_identity(target)
    for other, other_what in others:
        if _file_identity(Path(other)) == identity:
            mine, theirs = os.fspath(path), os.fspath(other)  # as the caller spelled them
            names = (
                f"{what} and {other_what} are the same file {mine!r}"
                if mine == theirs
                else f"{what} {mine!r} and {other_what} {theirs!r} are the same file"
            )
            raise InvalidConfigError(f"{names}: one would overwrite the other")
    if not folder.is_dir():
        raise InvalidConfigError(f"{what} folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise InvalidConfigError(f"{what} folder {str(folder)!r} is not writable")


def _file_identity(path: Path) -> tuple[object, ...]:
    """Equal for two paths exactly when they name the same file: its device and inode,
    or, for a file not there yet, its folder's and its name (after following symlinks)."""
    try:
        resolved = path.resolve()  # follows symlinks, dangling ones too
    except (OSError, RuntimeError):  # a symlink loop
        resolved = Path(os.path.abspath(path))
    with contextlib.suppress(OSError):
        st = resolved.stat()
        return (st.st_dev, st.st_ino)
    with contextlib.suppress(OSError):
        st = resolved.parent.stat()
        return (st.st_dev, st.st_ino, resolved.name)
    return (str(resolved),)


def save_model(
    model: onnx.ModelProto | bytes,
    path: str | os.PathLike[str],
    *,
    companions: Sequence[tuple[str | os.PathLike[str], bytes]] = (),
) -> None:
    """Write a model (or its serialized bytes), and companion files such as its report, all or nothing.

    Models over 2 GB get an external-data file ``<name>.data`` beside them. Files
    get the mode any new file of the user gets (0666 less the umask). Everything
    is written to temporary files first and renamed at the end, so a failure
    leaves no file behind and never replaces an existing one with half a file.

    Raises:
        InvalidConfigError: see :func:`check_output_path`; also when a companion is
            the model's file (or its external data file) or another companion's, by
            any route: checked before anything is written.
    """
    start = time.perf_counter()
    target = Path(path)
    external = not isinstance(model, bytes) and model.ByteSize() >= PROTOBUF_LIMIT
    data_path = target.parent / (target.name + ".data")
    check_output_path(target, "model")
    taken: list[tuple[str | os.PathLike[str], str]] = [(target, "model")]
    if external:
        check_output_path(data_path, "the model's external data", others=taken)
        taken.append((data_path, "the model's external data"))
    for companion, _ in companions:
        check_output_path(companion, "companion", others=taken)
        taken.append((companion, "companion"))
    staged: list[tuple[str, Path]] = []
    try:
        if isinstance(model, bytes):
            staged.append((_temp_file(target, model), target))
        elif external:
            tmp_data = _temp_file(data_path)
            staged.append((tmp_data, data_path))
            tmp_model = _temp_file(target)
            staged.append((tmp_model, target))
            _write_external(model, tmp_model, location=Path(tmp_data).name)
            # the model must refer to the final data name, not the temporary one
            _relocate_external(tmp_model, Path(tmp_data).name, data_path.name)
        else:
            staged.append((_temp_file(target, model.SerializeToString()), target))
        for companion, data in companions:
            staged.append((_temp_file(Path(companion), data), Path(companion)))
        for tmp, final in staged:
            os.replace(tmp, final)
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    if logger.isEnabledFor(logging.DEBUG):
        with contextlib.suppress(OSError):  # a log line never fails a save
            files = ", ".join(f"{str(final)!r} ({final.stat().st_size} bytes)" for _, final in staged)
            logger.debug("wrote %s in %.3f s", files, time.perf_counter() - start)


def _temp_file(final: Path, data: bytes | None = None) -> str:
    """A new file beside ``final`` with the user's default mode, holding ``data``."""
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            if data is not None:
                f.write(data)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise
    return name


def _umask() -> int:
    # os.umask can only be read by setting it; /proc avoids the race where it can
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_external(model: onnx.ModelProto, path: str, location: str = "model.onnx.data") -> None:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(
        copy,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=1024,
    )


def _relocate_external(model_path: str, old: str, new: str) -> None:
    model = onnx.load(model_path, load_external_data=False)
    for tensor in _external_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    with open(model_path, "wb") as f:
        f.write(model.SerializeToString())

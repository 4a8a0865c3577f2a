"""Eval sets: one array per model input plus optional labels, from a ``.npz``."""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass

import numpy as np
import onnx

from ._errors import InvalidEvalSetError
from ._graph import declared_shape

__all__ = ["EvalSet", "InputSpec", "load_eval_set", "model_inputs"]

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


def load_eval_set(source: str | os.PathLike[str] | bytes) -> EvalSet:
    """Read an ``.npz`` (never unpickling anything).

    Raises:
        InvalidEvalSetError: unreadable file, pickled object arrays, or no arrays.
    """
    what = "the eval set bytes" if isinstance(source, (bytes, bytearray)) else repr(str(source))
    try:
        if isinstance(source, (bytes, bytearray)):
            handle: io.BufferedIOBase | io.BytesIO = io.BytesIO(bytes(source))
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
            with np.load(handle, allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
        except ValueError as e:
            if "pickle" in str(e).lower():
                raise InvalidEvalSetError(
                    f"{what} contains pickled object arrays, which are never loaded; store plain numeric arrays"
                ) from e
            raise InvalidEvalSetError(f"{what} is not a readable .npz archive: {e}") from e
        except (OSError, zipfile.BadZipFile, EOFError) as e:
            raise InvalidEvalSetError(f"{what} is not a readable .npz archive: {e}") from e
    if not arrays:
        raise InvalidEvalSetError(f"{what} holds no arrays")
    labels = arrays.pop(LABELS_KEY, None)
    return EvalSet(arrays, labels)


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
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            raise InvalidEvalSetError(f"eval input {spec.name!r} contains NaN or Inf")
    if evalset.labels is not None:
        counts[LABELS_KEY] = int(evalset.labels.shape[0]) if evalset.labels.ndim else -1
        if evalset.labels.dtype.kind not in "biuf":
            raise InvalidEvalSetError(f"labels have dtype {evalset.labels.dtype}; expected integers or floats")
        if evalset.labels.dtype.kind == "f" and not np.isfinite(evalset.labels).all():
            raise InvalidEvalSetError("labels contain NaN or Inf")
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"{k}: {v}" for k, v in counts.items())
        raise InvalidEvalSetError(f"eval set arrays differ in sample count ({detail})")
    if not counts or next(iter(counts.values())) <= 0:
        raise InvalidEvalSetError("eval set is empty (0 samples)")


def _shape_text(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"

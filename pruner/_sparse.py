"""Storing zeroed weights as ONNX ``sparse_initializer`` (COO, linear indices)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["to_sparse_initializers"]

INDEX_BYTES = 8


def to_sparse_initializers(model: onnx.ModelProto, names: list[str]) -> list[str]:
    """Move the named initializers to ``sparse_initializer`` where that is smaller; in place.

    Returns the names converted.
    """
    wanted = set(names)
    keep = []
    converted = []
    for tensor in model.graph.initializer:
        if tensor.name not in wanted:
            keep.append(tensor)
            continue
        dense = numpy_helper.to_array(tensor)
        flat = dense.reshape(-1)
        nz = np.flatnonzero(flat)
        if len(nz) * (dense.itemsize + INDEX_BYTES) >= 0.9 * dense.nbytes:
            keep.append(tensor)
            continue
        values = numpy_helper.from_array(flat[nz], tensor.name)
        indices = numpy_helper.from_array(nz.astype(np.int64), "")
        model.graph.sparse_initializer.append(onnx.helper.make_sparse_tensor(values, indices, list(dense.shape)))
        converted.append(tensor.name)
    if converted:
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return converted

"""Pruning plans: what a run did to a model, to replay it exactly or to transfer it to other weights.

A plan has two parts:

* its description: per layer (a weight tensor, or a channel family in remove mode), how many of
  its units were pruned under which criterion. Small and JSON (the report embeds it).
* its replay: exactly what was zeroed (packed bit masks) or removed (channel positions per
  family), the values recovery refit, and the sha256 of the model the plan was made from and of
  the model it gives. Saved with the description as one ``.npz`` file (:meth:`PruningPlan.save`).

:func:`apply_plan` rebuilds the run's model byte for byte from the model it was made from, and
refuses any other. :func:`transfer_plan` applies the description to another model of the same
architecture (a retrained one): it re-scores each layer's weights and prunes the same amounts.
"""

from __future__ import annotations

import enum
import hashlib
import io
import json
import os
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from ._analysis import PrunableWeight, analyze, tensor_proto
from ._errors import InternalError, InvalidInputError, InvalidModelError, PlanMismatchError
from ._evaluate import ModelBuilder, SplitModel
from ._graph import GraphIndex
from ._model import _check_external_locations, _external_tensors, _parse
from ._nm import nm_mask
from ._options import Criterion, Mode, Recovery
from ._remove import removal_problems, replay_removal
from ._score import Granularity, granularity, lowest, unit_scores
from ._sparse import to_sparse_initializers
from ._static import fold_layouts, static_reshapes
from ._structure import analyze_structure, remove_components, set_params

__all__ = [
    "LayerPlan",
    "Layout",
    "PlanIssue",
    "PruningPlan",
    "Replay",
    "TensorEdit",
    "apply_plan",
    "check_plan",
    "element_mask",
    "model_sha256",
    "pruned_weight",
    "replayable",
    "transfer_plan",
    "zero_lowest",
]

SELF_CHECK_ELEMENTS = 16 << 20
"""Up to this many tensor elements (64 MB of float32), a run checks that its plan replays to the
model it returns."""
FORMAT = "onnx-pruner plan 1"
"""The ``format`` of a saved plan's ``plan.json`` member."""


@dataclass(frozen=True)
class LayerPlan:
    """Zero the ``amount`` lowest-scoring of ``units`` units of ``tensor``."""

    tensor: str
    amount: int
    units: int
    channel_axis: int = 0


class Layout(enum.Enum):
    """How the run wrote the model a plan replays."""

    UNCHANGED = "unchanged"
    """Nothing pruned: the model as given."""
    WEIGHTS = "weights"
    """Zero and N:M modes: layout ops of constants folded, the pruned weights (and the biases
    recovery shifts) written back as raw initializers after the others."""
    CHANNELS = "channels"
    """Remove mode: the channels removed from the model as the run analysed it."""


@dataclass(frozen=True)
class TensorEdit:
    """What a run changed in one tensor, as the tensor is before the change (zero and N:M modes)
    or after the channels were removed (remove mode)."""

    tensor: str
    zeroed: bytes = b""
    """``numpy.packbits`` of the elements (C order) the run set to zero that were not zero; empty: none."""
    refit: bytes = b""
    """The values recovery gave the other elements, as little-endian raw bytes of the tensor's
    type (C order); empty: those elements kept their values."""


@dataclass(frozen=True)
class Replay:
    """What :func:`apply_plan` needs besides the source model to rebuild the run's model."""

    layout: Layout
    tensors: tuple[str, ...] = ()
    """``WEIGHTS``: the tensors written back, in the order they are written."""
    removed: tuple[tuple[str, tuple[int, ...]], ...] = ()
    """``CHANNELS``: per channel family, the positions (in the family's channel order) removed."""
    sparse: tuple[str, ...] = ()
    """``WEIGHTS``: the weights stored as ``sparse_initializer``."""
    edits: tuple[TensorEdit, ...] = ()


@dataclass(frozen=True)
class PruningPlan:
    """What a run pruned: a description per layer, and (from a run) what replays it exactly.

    Two plans are equal when they describe the same pruning of the same source model to the
    same result: the digests pin the replay data down, so it is not compared.
    """

    mode: Mode
    criterion: Criterion
    layers: tuple[LayerPlan, ...]
    nm: tuple[int, int] | None = None
    """N:M mode: the N and M every converted layer keeps."""
    recover: Recovery = Recovery.NONE
    """How the run refit the weights it kept (the refit values are in the replay; a transfer does not refit)."""
    static_reshapes: bool = True
    """Remove mode: whether the run made computed Reshape targets constants before finding the
    channels (not when the constants changed the model's outputs on the eval set)."""
    source_sha256: str = ""
    """:func:`model_sha256` of the model the plan was made from; empty for a plan made by hand."""
    result_sha256: str = ""
    """:func:`model_sha256` of the model :func:`apply_plan` gives."""
    replay: Replay | None = field(default=None, compare=False, repr=False)
    """Exactly what was zeroed, removed and refit; None for a plan read from JSON or made by hand."""

    @property
    def granularity(self) -> Granularity:
        return granularity(self.criterion)

    def to_dict(self) -> dict[str, Any]:
        """The description and the digests (not the replay data: see :meth:`to_bytes`)."""
        out: dict[str, Any] = {
            "mode": self.mode.value,
            "criterion": self.criterion.value,
            "layers": [vars(layer).copy() for layer in self.layers],
        }
        if self.nm is not None:
            out["nm"] = list(self.nm)
        out["recover"] = self.recover.value
        if self.mode is Mode.REMOVE:
            out["static_reshapes"] = self.static_reshapes
        if self.source_sha256:
            out["source_sha256"] = self.source_sha256
            out["result_sha256"] = self.result_sha256
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PruningPlan:
        """A plan from :meth:`to_dict` (without replay data: :func:`apply_plan` needs :meth:`from_bytes`).

        Raises:
            InvalidInputError: ``data`` is not a plan.
        """
        try:
            nm = data.get("nm")
            criterion = Criterion(data["criterion"])
            if criterion is Criterion.AUTO:
                raise ValueError("criterion auto: a plan names the criterion that ran")
            return cls(
                Mode(data["mode"]),
                criterion,
                tuple(
                    LayerPlan(str(la["tensor"]), int(la["amount"]), int(la["units"]), int(la.get("channel_axis", 0)))
                    for la in data["layers"]
                ),
                None if nm is None else (int(nm[0]), int(nm[1])),
                Recovery(data.get("recover", Recovery.NONE.value)),
                bool(data.get("static_reshapes", True)),
                str(data.get("source_sha256", "")),
                str(data.get("result_sha256", "")),
            )
        except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
            raise InvalidInputError(f"not a pruning plan: {type(e).__name__} {e}") from e

    @classmethod
    def from_json(cls, text: str) -> PruningPlan:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise InvalidInputError(f"not a pruning plan: invalid JSON ({e})") from e
        if not isinstance(data, dict):
            raise InvalidInputError("not a pruning plan: the JSON is not an object")
        return cls.from_dict(data)

    def to_bytes(self) -> bytes:
        """The whole plan (description, digests, replay data) as one ``.npz`` file: a ``plan.json``
        member and the masks, channel positions and refit values as ``.npy`` arrays."""
        arrays: dict[str, np.ndarray] = {}

        def key(data: bytes) -> str | None:
            if not data:
                return None
            name = f"a{len(arrays)}"
            arrays[name] = np.frombuffer(data, dtype=np.uint8)
            return name

        meta: dict[str, Any] = {"format": FORMAT, **self.to_dict()}
        replay = self.replay
        if replay is not None:
            removed = []
            for family, positions in replay.removed:
                name = f"a{len(arrays)}"
                arrays[name] = np.asarray(positions, dtype=np.int64)
                removed.append([family, name])
            meta["replay"] = {
                "layout": replay.layout.value,
                "tensors": list(replay.tensors),
                "removed": removed,
                "sparse": list(replay.sparse),
                "edits": [{"tensor": e.tensor, "zeroed": key(e.zeroed), "refit": key(e.refit)} for e in replay.edits],
            }
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
            archive.writestr("plan.json", json.dumps(meta, indent=2))
            for name, array in arrays.items():
                member = io.BytesIO()
                np.lib.format.write_array(member, array, allow_pickle=False)
                archive.writestr(f"{name}.npy", member.getvalue())
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> PruningPlan:
        """A plan from :meth:`to_bytes`.

        Raises:
            InvalidInputError: ``data`` is not a saved plan.
        """
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                meta = json.loads(archive.read("plan.json"))
                if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                    raise InvalidInputError(f"not a pruning plan: plan.json does not say format {FORMAT!r}")
                arrays = {
                    name[: -len(".npy")]: np.lib.format.read_array(io.BytesIO(archive.read(name)), allow_pickle=False)
                    for name in archive.namelist()
                    if name.endswith(".npy")
                }
            plan = cls.from_dict(meta)
            raw = meta.get("replay")
            if raw is None:
                return plan

            def blob(name: str | None) -> bytes:
                return b"" if name is None else arrays[name].astype(np.uint8, copy=False).tobytes()

            replay = Replay(
                Layout(raw["layout"]),
                tuple(str(t) for t in raw["tensors"]),
                tuple((str(f), tuple(int(i) for i in arrays[k])) for f, k in raw["removed"]),
                tuple(str(t) for t in raw["sparse"]),
                tuple(TensorEdit(str(e["tensor"]), blob(e["zeroed"]), blob(e["refit"])) for e in raw["edits"]),
            )
        except InvalidInputError:
            raise
        except (zipfile.BadZipFile, KeyError, ValueError, TypeError, IndexError, AttributeError, OSError) as e:
            raise InvalidInputError(f"not a saved pruning plan: {type(e).__name__} {e}") from e
        return replace(plan, replay=replay)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_bytes` to ``path`` (e.g. ``pruned.plan.npz``).

        Raises:
            InvalidInputError: the file cannot be written.
        """
        try:
            with open(path, "wb") as f:
                f.write(self.to_bytes())
        except OSError as e:
            raise InvalidInputError(f"cannot write the plan to {os.fspath(path)!r}: {e.strerror}") from e

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PruningPlan:
        """A plan written by :meth:`save`.

        Raises:
            InvalidInputError: the file cannot be read or is not a saved plan.
        """
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise InvalidInputError(f"cannot read the plan {os.fspath(path)!r}: {e.strerror}") from e
        return cls.from_bytes(data)


@dataclass(frozen=True)
class PlanIssue:
    """Why (part of) a plan cannot be applied to a model."""

    tensor: str
    reason: str


def check_plan(plan: PruningPlan, model: onnx.ModelProto) -> list[PlanIssue]:
    """Reasons :func:`transfer_plan` cannot apply the plan's layers to ``model``; empty when it can.

    :func:`apply_plan` takes only the model the plan was made from, and checks its digest instead.
    """
    if plan.mode is Mode.REMOVE:
        if plan.criterion is Criterion.ACTIVATION:
            return [PlanIssue("", "an activation-scored removal needs the run's calibration data to replay")]
        triples = [(layer.tensor, layer.amount, layer.units) for layer in plan.layers]
        return [PlanIssue(name, why) for name, why in removal_problems(model, triples, plan.static_reshapes)]
    index = GraphIndex.build(model.graph)
    if plan.mode is Mode.NM:
        missing = [layer.tensor for layer in plan.layers if tensor_proto(index, layer.tensor) is None]
        issues = [PlanIssue(name, "no initializer or Constant of this name") for name in missing]
        issues += [PlanIssue(la.tensor, "N:M amount must be 0 or 1") for la in plan.layers if la.amount not in (0, 1)]
        if plan.nm is None:
            issues.append(PlanIssue("", "an N:M plan needs its N and M"))
        return issues
    issues = []
    for layer in plan.layers:
        tensor = tensor_proto(index, layer.tensor)
        if tensor is None:
            issues.append(PlanIssue(layer.tensor, "no initializer or Constant of this name"))
            continue
        dims = tuple(tensor.dims)
        if plan.granularity is Granularity.CHANNEL:
            if not -len(dims) <= layer.channel_axis < len(dims):
                issues.append(PlanIssue(layer.tensor, f"channel axis {layer.channel_axis} out of range"))
                continue
            units = dims[layer.channel_axis]
        else:
            units = int(np.prod(dims))
        if units != layer.units:
            issues.append(PlanIssue(layer.tensor, f"has {units} units, the plan expects {layer.units}"))
        elif not 0 <= layer.amount <= layer.units:
            issues.append(PlanIssue(layer.tensor, f"amount {layer.amount} outside [0, {layer.units}]"))
    return issues


def zero_lowest(
    weight: np.ndarray,
    scores: np.ndarray,
    amount: int,
    gran: Granularity,
    channel_axis: int,
    hint: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Zero, in place, the ``amount`` lowest-scoring units of ``weight``; returns ``weight``."""
    if amount:
        mask = lowest(scores, amount, hint)
        if gran is Granularity.ELEMENT:
            weight[mask.reshape(weight.shape)] = 0
        else:
            np.moveaxis(weight, channel_axis, 0)[mask] = 0
    return weight


def element_mask(shape: tuple[int, ...], units: np.ndarray, gran: Granularity, channel_axis: int) -> np.ndarray:
    """Per-element mask (True = pruned) of a unit mask from :func:`lowest`."""
    if gran is Granularity.ELEMENT:
        return units.reshape(shape)
    mask = np.zeros(shape, dtype=bool)
    np.moveaxis(mask, channel_axis, 0)[units] = True
    return mask


def pruned_weight(
    plan: PruningPlan, layer: LayerPlan, weight: np.ndarray, found: PrunableWeight | None = None
) -> np.ndarray:
    """``weight`` (any float dtype) pruned as ``layer`` of ``plan`` says, in place; ``found``: the
    weight as analysis finds it in the model (its reduction axis and scoring blocks)."""
    if layer.amount == 0:
        return weight
    info = PrunableWeight(layer.tensor, "", (), tuple(weight.shape), "", layer.channel_axis)
    if found is not None and found.shape == info.shape and found.channel_axis == layer.channel_axis % weight.ndim:
        info = replace(info, input_axis=found.input_axis, blocks=found.blocks)
    scores = unit_scores(plan.criterion, info, weight)
    if plan.mode is Mode.NM:
        assert plan.nm is not None
        mask = nm_mask(info, scores, *plan.nm)
        if mask is not None:
            weight[mask] = 0
        return weight
    return zero_lowest(weight, scores, layer.amount, plan.granularity, layer.channel_axis)


def model_sha256(model: onnx.ModelProto) -> str:
    """Hex sha256 of a model, hashed in parts so that no part is serialized whole: each node,
    initializer and sparse initializer (length-prefixed ``SerializeToString()``), then the rest
    of the model. Any model has one, over 2 GB too, at the memory of its largest tensor."""
    digest = hashlib.sha256(b"onnx-pruner model sha256 1\0")
    graph = model.graph
    for part in (*graph.node, *graph.initializer, *graph.sparse_initializer):
        data = part.SerializeToString()
        digest.update(len(data).to_bytes(8, "little") + data)
    shell = onnx.ModelProto()
    _copy_fields(shell, model, skip={"graph"})
    _copy_fields(shell.graph, graph, skip={"node", "initializer", "sparse_initializer"})
    digest.update(shell.SerializeToString())
    return digest.hexdigest()


def _copy_fields(target: Any, source: Any, skip: set[str]) -> None:
    for descriptor, value in source.ListFields():
        if descriptor.name in skip:
            continue
        if descriptor.is_repeated:
            getattr(target, descriptor.name).extend(value)
        elif descriptor.message_type is not None:
            getattr(target, descriptor.name).CopyFrom(value)
        else:
            setattr(target, descriptor.name, value)


def replayable(
    plan: PruningPlan,
    source: str | os.PathLike[str] | bytes | onnx.ModelProto,
    result: onnx.ModelProto,
    written: Replay,
) -> PruningPlan:
    """``plan`` with what replays it: the digests of ``source`` (the run's input) and ``result``
    (the model the run returns), and the edits read off the two. ``written`` says how the run
    wrote ``result`` (its edits are found here).

    Raises:
        InternalError: the replay does not give ``result`` (a bug of ours).
    """
    model = _reload(source)
    if not any(layer.amount for layer in plan.layers):
        written = Replay(Layout.UNCHANGED)
    edits: tuple[TensorEdit, ...] = ()
    sparse: tuple[str, ...] = ()
    if written.layout is Layout.WEIGHTS:
        edits = _weight_edits(model, result, written.tensors)
        sparse = tuple(t.values.name for t in result.graph.sparse_initializer)
    elif written.layout is Layout.CHANNELS:
        edits = _refit_edits(_removed(model, written.removed, plan.static_reshapes), result)
    out = replace(
        plan,
        source_sha256=model_sha256(model),
        result_sha256=model_sha256(result),
        replay=replace(written, sparse=sparse, edits=edits),
    )
    # the self-check costs a few copies of the model: above this size the tests' guarantee and
    # apply_plan's own check of the result stand in for it
    if _elements(result) < SELF_CHECK_ELEMENTS and model_sha256(_rebuild(out, model)) != out.result_sha256:
        raise InternalError("the plan does not replay to the pruned model")
    return out


def _elements(model: onnx.ModelProto) -> int:
    """Elements of the model's initializers (``ByteSize()`` would serialize the model to count)."""
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def _reload(source: str | os.PathLike[str] | bytes | onnx.ModelProto) -> onnx.ModelProto:
    """The run's model again, as ``load_model`` read it but not checked again (the run did: the
    checker would hold one more copy of a large model)."""
    if isinstance(source, onnx.ModelProto):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _parse(source if isinstance(source, bytes) else bytes(source), "the model bytes")
    path = Path(source)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InvalidModelError(f"cannot read model file {str(path)!r} again: {e.strerror}") from e
    model = _parse(data, repr(str(path)))
    del data
    external = _external_tensors(model)
    if external:
        _check_external_locations(external, path.parent)
        onnx.load_external_data_for_model(model, str(path.parent))
    return model


def apply_plan(plan: PruningPlan, model: onnx.ModelProto) -> onnx.ModelProto:
    """The model the plan's run returned, rebuilt byte for byte from ``model``, the model the run
    was given (``SerializeToString()`` of the two is the same). ``model`` is never changed.

    To prune another model of the same architecture (e.g. retrained weights) the same amounts,
    use :func:`transfer_plan`.

    Raises:
        PlanMismatchError: ``model`` is not the model the plan was made from, or the plan carries
            no replay data (read from JSON or made by hand: load it with :meth:`PruningPlan.load`).
        InternalError: the rebuilt model is not the one the run returned (a bug of ours).
    """
    if plan.replay is None or not plan.source_sha256:
        raise PlanMismatchError(
            "the plan carries no replay data (a plan read from JSON or made by hand); load the file "
            "PruningPlan.save wrote, or use transfer_plan to prune the same amounts of a model's own weights"
        )
    digest = model_sha256(model)
    if digest != plan.source_sha256:
        raise PlanMismatchError(
            f"the model (sha256 {digest[:12]}...) is not the one the plan was made from "
            f"(sha256 {plan.source_sha256[:12]}...); use transfer_plan to prune the same amounts of other weights"
        )
    out = _rebuild(plan, model)
    if model_sha256(out) != plan.result_sha256:
        raise InternalError("the replayed model is not the one the plan's run returned")
    return out


def transfer_plan(plan: PruningPlan, model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (e.g. the same architecture retrained) pruned by the same amounts per layer:
    each layer's weights are scored again under the plan's criterion and its ``amount`` lowest
    units zeroed (N:M: its N of every M kept) or, in remove mode, its channels removed. Nothing
    is refit (the run's calibration data is not in the plan), and the activation criterion
    scores zeroed weights by magnitude. ``model`` is never changed.

    Raises:
        PlanMismatchError: the plan's layers do not fit ``model`` (see :func:`check_plan`), or
            it is an activation-scored removal (its scores need the run's calibration data).
    """
    issues = check_plan(plan, model)
    if issues:
        listed = "; ".join(f"{i.tensor}: {i.reason}" if i.tensor else i.reason for i in issues)
        raise PlanMismatchError(f"the plan does not fit the model: {listed}")
    if plan.mode is Mode.REMOVE:
        amounts = {layer.tensor: layer.amount for layer in plan.layers}
        return replay_removal(model, plan.criterion, amounts, plan.static_reshapes)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    index = GraphIndex.build(out.graph)
    found = {la.name: la for la in analyze(out, index=index).layers}
    for layer in plan.layers:
        if layer.amount == 0:
            continue
        tensor = tensor_proto(index, layer.tensor)
        if tensor is None:  # check_plan found every one
            raise InternalError(f"tensor {layer.tensor!r} vanished after the plan was checked")
        weight = pruned_weight(plan, layer, numpy_helper.to_array(tensor).copy(), found.get(layer.tensor))
        tensor.CopyFrom(numpy_helper.from_array(weight, tensor.name))
    return out


def _rebuild(plan: PruningPlan, model: onnx.ModelProto) -> onnx.ModelProto:
    """The run's model from its source, as the replay says; PlanMismatchError for replay data
    that does not fit the model (a damaged plan), InternalError for a failure of ours."""
    replay = plan.replay
    if replay is None:
        raise PlanMismatchError("the plan carries no replay data")
    try:
        if replay.layout is Layout.UNCHANGED:
            out = onnx.ModelProto()
            out.CopyFrom(model)
            return out
        if replay.layout is Layout.CHANNELS:
            out = _removed(model, replay.removed, plan.static_reshapes)
            arrays = _dense_tensors(out, {e.tensor for e in replay.edits})
            refit = {e.tensor: _edited(e, arrays.get(e.tensor)) for e in replay.edits}
            set_params(out, refit)
            return out
        split = _split(model, replay.tensors)
        weights = dict(split.weights)
        for edit in replay.edits:
            weights[edit.tensor] = _edited(edit, weights.get(edit.tensor))
        builder = ModelBuilder(split)
        if builder.large:
            return builder.to_proto(weights)
        out = onnx.ModelProto.FromString(builder.to_bytes(weights))
        if replay.sparse:
            converted = to_sparse_initializers(out, list(replay.sparse))
            if converted != list(replay.sparse):
                raise PlanMismatchError(f"the plan stores {', '.join(replay.sparse)} as sparse, the replay {converted}")
        return out
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise InternalError(f"replaying the plan failed: {type(e).__name__} {e}") from e


def _split(model: onnx.ModelProto, names: Iterable[str]) -> SplitModel:
    """The folded model with ``names`` split out, as the run wrote it."""
    names = tuple(names)
    folded = fold_layouts(model)
    if folded is model:
        folded = onnx.ModelProto()
        folded.CopyFrom(model)
    split = SplitModel.take(folded, set(names))
    if tuple(split.weights) != names:
        missing = sorted(set(names) - set(split.weights))
        raise PlanMismatchError(f"the plan writes tensors the model does not have: {', '.join(missing)}")
    return split


def _removed(model: onnx.ModelProto, removed: tuple[tuple[str, tuple[int, ...]], ...], static: bool) -> onnx.ModelProto:
    """The folded model (with computed Reshape targets made constants if ``static``) without the
    ``removed`` channel positions of each family, as the run analysed it."""
    folded = fold_layouts(model)
    analysed = static_reshapes(folded)[0] if static else folded
    structure = analyze_structure(analysed)
    families = {f.name: f for f in structure.families}
    parts = []
    for name, positions in removed:
        family = families.get(name)
        if family is None:
            raise PlanMismatchError(f"the plan removes channels of {name!r}, not a channel family of the model")
        if positions and not 0 <= min(positions) <= max(positions) < len(family.components):
            raise PlanMismatchError(
                f"the plan removes channel positions of {name!r} beyond its {len(family.components)}"
            )
        parts.append(family.components[list(positions)])
    ids = [int(i) for i in np.concatenate(parts)] if parts else []
    return remove_components(analysed, structure, ids)


def _dense_tensors(model: onnx.ModelProto, names: set[str]) -> dict[str, np.ndarray]:
    """The named initializers, Constant values and sparse initializers of ``model`` as dense arrays."""
    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in names}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] in names:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                out[node.output[0]] = numpy_helper.to_array(value)
    for sparse in model.graph.sparse_initializer:
        if sparse.values.name in names:
            values = numpy_helper.to_array(sparse.values)
            dense = np.zeros(int(np.prod(sparse.dims)), dtype=values.dtype)
            dense[numpy_helper.to_array(sparse.indices).reshape(-1)] = values
            out[sparse.values.name] = dense.reshape(tuple(sparse.dims))
    return out


def _bits(array: np.ndarray) -> np.ndarray:
    """The elements of ``array`` as unsigned integers of their size (bit patterns, C order)."""
    return np.ascontiguousarray(array).reshape(-1).view(np.dtype(f"u{array.dtype.itemsize}"))


def _weight_edits(model: onnx.ModelProto, result: onnx.ModelProto, names: tuple[str, ...]) -> tuple[TensorEdit, ...]:
    """What the run did to each weight it wrote back, bit for bit, read one tensor at a time."""
    source = GraphIndex.build(fold_layouts(model).graph)
    written = {t.name: t for t in result.graph.initializer}
    edits = []
    for name in names:
        tensor = source.tensor(name)
        if tensor is None:
            raise InternalError(f"the run wrote back {name!r}, which its model does not have")
        before = numpy_helper.to_array(tensor)
        after = _dense_tensors(result, {name}) if name not in written else {name: numpy_helper.to_array(written[name])}
        edit = _weight_edit(name, before, after.get(name))
        if edit is not None:
            edits.append(edit)
    return tuple(edits)


def _weight_edit(name: str, before: np.ndarray, after: np.ndarray | None) -> TensorEdit | None:
    """What the run did to weight ``name`` (None: nothing), bit for bit."""
    if after is None or after.shape != before.shape or after.dtype != before.dtype:
        raise InternalError(f"the pruned model's {name!r} is not the original's shape and type")
    old, new = _bits(before), _bits(after)
    if np.array_equal(old, new):
        return None
    zeroed = (new == 0) & (old != 0)
    kept_old, kept_new = old[~zeroed], new[~zeroed]
    refit = b"" if np.array_equal(kept_old, kept_new) else kept_new.astype(kept_new.dtype.newbyteorder("<")).tobytes()
    return TensorEdit(name, np.packbits(zeroed).tobytes() if zeroed.any() else b"", refit)


def _refit_edits(base: onnx.ModelProto, result: onnx.ModelProto) -> tuple[TensorEdit, ...]:
    """The tensors of ``result`` written differently from ``base`` (the same removal, not refit)."""

    def tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
        out = {t.name: t for t in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type == "Constant" and node.output:
                value = next((a.t for a in node.attribute if a.name == "value"), None)
                if value is not None:
                    out[node.output[0]] = value
        return out

    old, new = tensors(base), tensors(result)
    edits = []
    for name, tensor in new.items():
        if name in old and old[name].SerializeToString() == tensor.SerializeToString():
            continue
        array = numpy_helper.to_array(tensor)
        bits = _bits(array)
        edits.append(TensorEdit(name, b"", bits.astype(bits.dtype.newbyteorder("<")).tobytes()))
    return tuple(edits)


def _edited(edit: TensorEdit, weight: np.ndarray | None) -> np.ndarray:
    """``weight`` with ``edit`` applied (a new array)."""
    if weight is None:
        raise PlanMismatchError(f"the plan edits {edit.tensor!r}, which the model does not have")
    out = np.array(weight, copy=True, order="C")
    bits = out.reshape(-1).view(np.dtype(f"u{out.dtype.itemsize}"))
    zeroed = np.zeros(bits.size, dtype=bool)
    if edit.zeroed:
        if len(edit.zeroed) != (bits.size + 7) // 8:
            raise PlanMismatchError(f"the plan's mask of {edit.tensor!r} is not of its {bits.size} elements")
        zeroed = np.unpackbits(np.frombuffer(edit.zeroed, dtype=np.uint8), count=bits.size).astype(bool)
        bits[zeroed] = 0
    if edit.refit:
        kept = int(bits.size - np.count_nonzero(zeroed))
        if len(edit.refit) != kept * bits.dtype.itemsize:
            raise PlanMismatchError(f"the plan's refit values of {edit.tensor!r} are not its {kept} kept elements")
        bits[~zeroed] = np.frombuffer(edit.refit, dtype=bits.dtype.newbyteorder("<"))
    return out

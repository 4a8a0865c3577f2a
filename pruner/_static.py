"""Reshape targets computed at run time, made constants where every size tried agrees.

Exporters write ``x.view(x.size()[:-1] + (heads, head_dim))`` as Shape -> Gather ->
Unsqueeze -> Concat -> Reshape. The channel rules cannot see through that arithmetic
(a Shape reads every dim, the channel count too), so the heads, the projections and
the residual stream of such a model would all stay frozen. This pass runs the model
on small synthetic inputs: twice at base sizes with different values, then once more
per dynamic input dim; then the same with the dims past each input's first (image sides,
sequence lengths) wide enough for strided layers to show how a computed dim follows them,
where the model runs at those sizes. It reads every computed Reshape target and writes it as the
constant that gives the same shape in every run: a dim that never changes as is, one
that follows the input's dim at the same position as 0 (copy), at most one other as -1
(inferred). Nodes left computing nothing used are dropped. Where anything does not fit
(a run fails, two dims vary independently, allowzero) the Reshape is left alone.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from ._graph import Attributes, GraphIndex, declared_shape, keep_needed
from ._model import session_source

__all__ = ["fold_layouts", "static_reshapes"]

BASE_SIZE = 2
"""Size of every dynamic input dim in the base run (one more in the run that varies it)."""
WIDE_SIZE = 64
"""Size of the dynamic dims past an input's first in the wide runs (then 96, or 32 where 96
does not run, in the run that varies one): at 2 and 3 an image's width is one position after
any downsampling, and a sequence length computed from it looked constant (PaddleOCR's
recognizer wrote 1 for its 40 positions, and no removal from it ran on real lines)."""


FOLDED = frozenset({"Reshape", "Unsqueeze", "Squeeze", "Flatten", "Transpose"})
"""Layout ops whose result is a constant when their inputs are: folded before the channel rules."""


def fold_layouts(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with the layout ops (``FOLDED``) that read only constants replaced by their results
    (a copy if any is). Exporters write a conv's bias as Reshape(b, [1, C, 1, 1]) -> Add
    (paddle2onnx does for every squeeze-and-excitation conv); the channel rules follow a
    parameter's axes, not arithmetic on it, so such a bias would freeze the channels it adds to."""
    if model.ir_version < 4:  # an initializer must be a graph input there too
        return model
    graph = model.graph
    index = GraphIndex.build(graph)
    folded: dict[int, onnx.TensorProto] = {}
    made: dict[str, onnx.TensorProto] = {}

    def value(name: str) -> onnx.TensorProto | None:  # an input with a default is no constant
        return made.get(name) or (None if name in index.graph_inputs else index.tensor(name))

    def named(name: str) -> onnx.TensorProto:  # a Constant node's tensor is named by its output
        tensor = onnx.TensorProto()
        tensor.CopyFrom(value(name))
        tensor.name = name
        return tensor

    outputs = {o.name for o in graph.output}
    for k, node in enumerate(graph.node):
        if node.op_type not in FOLDED or node.domain not in ("", "ai.onnx") or len(node.output) != 1:
            continue
        if node.output[0] in outputs:  # a model output stays computed by a node
            continue
        if not all(value(name) is not None for name in node.input if name):
            continue
        single = helper.make_model(
            helper.make_graph(
                [node],
                "fold",
                [],
                [helper.make_empty_tensor_value_info(node.output[0])],
                [named(name) for name in dict.fromkeys(n for n in node.input if n)],
            ),
            opset_imports=model.opset_import,
            ir_version=model.ir_version,
        )
        try:
            (result,) = ReferenceEvaluator(single).run(None, {})
        except Exception:  # anything the reference runtime will not run stays as it is
            continue
        made[node.output[0]] = folded[k] = numpy_helper.from_array(np.asarray(result), node.output[0])
    if not folded:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for k in sorted(folded, reverse=True):
        del out.graph.node[k]
    out.graph.initializer.extend(folded.values())
    keep_needed(out.graph, [o.name for o in out.graph.output])
    return out


def static_reshapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """``model`` with layouts of constants folded (``fold_layouts``) and its computed Reshape
    targets made constants (a copy if anything changed), and how many targets were."""
    model = fold_layouts(model)
    index = GraphIndex.build(model.graph)
    dynamic = [
        node
        for node in model.graph.node
        if node.op_type == "Reshape"
        and not index.is_constant(node.input[1])
        and not Attributes(node).get_int("allowzero", 0)
    ]
    if not dynamic:
        return model, 0
    runs = _runs(model, dynamic)
    if runs is None:
        return model, 0
    out = onnx.ModelProto()
    out.CopyFrom(model)
    names = {t.name for t in out.graph.initializer} | {o for n in out.graph.node for o in n.output}
    rewritten = 0
    dynamic_ids = {id(node) for node in dynamic}
    for node, original in zip(out.graph.node, model.graph.node, strict=True):
        if id(original) not in dynamic_ids:
            continue
        shapes = [(run[original.input[0]], run[original.input[1]]) for run in runs]
        target = _constant_target(shapes)
        if target is None:
            continue
        name = f"{node.output[0]}__static_shape"
        while name in names:
            name += "_"
        names.add(name)
        out.graph.initializer.append(numpy_helper.from_array(target, name))
        node.input[1] = name
        rewritten += 1
    if rewritten:
        keep_needed(out.graph, [o.name for o in out.graph.output])
    return out, rewritten


def _runs(model: onnx.ModelProto, reshapes: list[onnx.NodeProto]) -> list[dict[str, np.ndarray]] | None:
    """Input shapes (as int64 vectors) and targets of ``reshapes`` at base sizes and each dim varied."""
    symbols: list[str] = []
    leading: set[str] = set()
    for value in model.graph.input:
        for k, (dim, size) in enumerate(zip(value.type.tensor_type.shape.dim, declared_shape(value), strict=True)):
            if size is None:
                symbol = dim.dim_param or f"{value.name}:{k}"
                if symbol not in symbols:
                    symbols.append(symbol)
                if k == 0:
                    leading.add(symbol)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    wanted: list[str] = []
    for node in reshapes:
        shape_of = f"{node.input[0]}__static_probe"
        probe.graph.node.append(helper.make_node("Shape", [node.input[0]], [shape_of]))
        wanted += [node.input[1], shape_of]
    wanted = list(dict.fromkeys(wanted))
    existing = {v.name for v in probe.graph.output}
    for name in wanted:
        if name not in existing:
            probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None))
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 4  # a wide size the model does not take is expected
        options.intra_op_num_threads = 1
        with session_source(probe) as source:  # over 2 GB: through a temporary file
            session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception:  # a model onnxruntime will not load keeps its Reshapes
        return None

    def run(sizes: dict[str, int], seed: int) -> dict[str, np.ndarray] | None:
        try:
            results = session.run(wanted, _feed(model, sizes, seed))
        except Exception:
            return None
        by_name = dict(zip(wanted, results, strict=True))
        return {node.input[0]: by_name[f"{node.input[0]}__static_probe"] for node in reshapes} | by_name

    out = []
    # twice at base sizes with other values (a target that depends on them is no constant),
    # then once per dynamic dim; a model that does not run at these sizes keeps its Reshapes
    for varied, seed in [(None, 0), (None, 1), *((s, 0) for s in symbols)]:
        done = run({s: BASE_SIZE + (s == varied) for s in symbols}, seed)
        if done is None:
            return None
        out.append(done)
    wide = [s for s in symbols if s not in leading]
    base = {s: WIDE_SIZE if s in wide else BASE_SIZE for s in symbols}
    done = run(base, 0) if wide else None
    if done is not None:
        out.append(done)
        for symbol in wide:
            done = run(base | {symbol: WIDE_SIZE * 3 // 2}, 0) or run(base | {symbol: WIDE_SIZE // 2}, 0)
            if done is not None:
                out.append(done)
    return out


def _feed(model: onnx.ModelProto, sizes: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    feed = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        shape = [
            sizes[d.dim_param or f"{value.name}:{k}"] if size is None else size
            for k, (d, size) in enumerate(zip(tensor.shape.dim, declared_shape(value), strict=True))
        ]
        dtype = helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        if np.issubdtype(dtype, np.floating):
            feed[value.name] = rng.standard_normal(shape).astype(dtype)
        else:  # ids, masks: 0 and 1 are valid for every lookup
            feed[value.name] = np.full(shape, seed, dtype=dtype)
    return feed


def _resolve(target: np.ndarray, shape: np.ndarray) -> list[int] | None:
    """The shape Reshape(x of ``shape``, ``target``) gives (allowzero 0), None if it is invalid."""
    out = [int(shape[k]) if t == 0 else int(t) for k, t in enumerate(target)]
    if out.count(-1) > 1:
        return None
    if -1 in out:
        known = int(np.prod([d for d in out if d != -1]))
        if known == 0 or int(np.prod(shape)) % known:
            return None
        out[out.index(-1)] = int(np.prod(shape)) // known
    return out if int(np.prod(out)) == int(np.prod(shape)) else None


def _constant_target(runs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray | None:
    """A constant target giving every run's output shape, or None."""
    outputs = [_resolve(target, shape) for shape, target in runs]
    if any(o is None for o in outputs) or len({len(o) for o in outputs if o is not None}) != 1:
        return None
    first = runs[0][1]
    constant = []
    for k in range(len(first)):
        values = {int(target[k]) for _, target in runs}
        resolved = [o[k] for o in outputs if o is not None]
        if len(values) == 1:
            constant.append(int(first[k]))
        elif all(k < len(shape) and o == shape[k] for (shape, _), o in zip(runs, resolved, strict=True)):
            constant.append(0)
        else:
            constant.append(-1)
    target = np.array(constant, dtype=np.int64)
    if constant.count(-1) > 1 or any(_resolve(target, shape) != o for (shape, _), o in zip(runs, outputs, strict=True)):
        return None
    return target

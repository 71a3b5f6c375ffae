"""Place explicit INT8 QuantizeLinear/DequantizeLinear in an ONNX graph, one pair per QuantEdge.

The float graph comes from paddle2onnx, which keeps Paddle's tensor names; each QuantEdge
names the tensor and the Paddle op type that read it through Q/DQ in training, so the
Q/DQ go exactly where training simulated them and nowhere else.

Weights are int8 with zero point 0. Activations are int8 with zero point 0 for TensorRT;
for ONNX Runtime they are uint8, the type its x86 INT8 kernels take: zero point 128 for a
signed quantizer (the same 256 levels as int8) and 0 for an unsigned one.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from ..errors import QATError, UnsupportedOpError
from .quant_map import QuantEdge

# Paddle consumer op type -> the ONNX op types paddle2onnx translates it to.
ONNX_CONSUMERS: dict[str, frozenset[str]] = {
    "conv2d": frozenset({"Conv"}),
    "depthwise_conv2d": frozenset({"Conv"}),
    "conv2d_transpose": frozenset({"ConvTranspose"}),
    "mul": frozenset({"MatMul", "Gemm"}),
    "matmul": frozenset({"MatMul", "Gemm"}),
    "matmul_v2": frozenset({"MatMul", "Gemm"}),
    "elementwise_add": frozenset({"Add"}),
    "elementwise_mul": frozenset({"Mul"}),
    "concat": frozenset({"Concat"}),
    "pool2d": frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"}),
    "relu": frozenset({"Relu"}),
    "sigmoid": frozenset({"Sigmoid"}),
    "leaky_relu": frozenset({"LeakyRelu"}),
    "hard_swish": frozenset({"HardSwish"}),
    "hard_sigmoid": frozenset({"HardSigmoid"}),
    # paddle2onnx's nodes that read the activation's input
    "swish": frozenset({"Sigmoid", "Mul"}),
    "silu": frozenset({"Sigmoid", "Mul"}),
    "gelu": frozenset({"Div", "Mul", "Pow"}),  # erf form; tanh form (paddle2onnx_fixes)
    "mish": frozenset({"Softplus", "Mul"}),
    "tanh": frozenset({"Tanh"}),
    "softplus": frozenset({"Softplus"}),
    "elu": frozenset({"Elu"}),
}


def quantize_weight(weight: np.ndarray, edge: QuantEdge) -> np.ndarray:
    """Paddle's quantize_linear on a weight, as int8: round-half-even, [-qmax - 1, qmax]."""
    qmax = np.float32(edge.qmax)
    scale = edge.scale.astype(np.float32)
    if edge.axis >= 0:
        shape = [1] * weight.ndim
        shape[edge.axis] = -1
        scale = scale.reshape(shape)
    q = np.round(qmax * (np.float32(1) / scale) * weight.astype(np.float32))
    return np.clip(q, -qmax - 1, qmax).astype(np.int8)


class _Graph:
    def __init__(self, model):
        from onnx import numpy_helper

        self.model = model
        self.graph = model.graph
        self.numpy_helper = numpy_helper
        self.consumers = defaultdict(list)
        for node in self.graph.node:
            for index, name in enumerate(node.input):
                self.consumers[name].append((node, index))
        self.constants = {n.output[0]: n for n in self.graph.node if n.op_type == "Constant"}
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.new_nodes = []

    def weight_value(self, name: str) -> np.ndarray:
        if name in self.initializers:
            return self.numpy_helper.to_array(self.initializers[name])
        node = self.constants.get(name)
        if node is None:
            raise QATError(f"weight {name!r} is neither an initializer nor a Constant in ONNX")
        (attr,) = [a for a in node.attribute if a.name == "value"]
        return self.numpy_helper.to_array(attr.t)

    def add_initializer(self, name: str, value: np.ndarray) -> str:
        self.graph.initializer.append(self.numpy_helper.from_array(value, name))
        return name

    def drop_unused_constants(self):
        used = {name for node in list(self.graph.node) + self.new_nodes for name in node.input}
        used |= {o.name for o in self.graph.output}
        keep = [n for n in self.graph.node if n.op_type != "Constant" or n.output[0] in used]
        del self.graph.node[:]
        self.graph.node.extend(keep)


def zero_point(edge: QuantEdge, target: str) -> np.ndarray:
    """The ONNX zero point (its dtype is the quantized type) of ``edge`` for ``target``."""
    shape = edge.scale.shape if edge.axis >= 0 else ()
    if edge.is_weight or target == "tensorrt":
        return np.zeros(shape, np.int8)
    return np.full(shape, 0 if edge.unsigned else 128, np.uint8)


def _dq_node(g: _Graph, source: str, edge: QuantEdge, tag: str, target: str):
    from onnx import helper

    shape = edge.scale.shape if edge.axis >= 0 else ()
    scale = (edge.scale / np.float32(edge.qmax)).astype(np.float32).reshape(shape)
    scale_name = g.add_initializer(f"{edge.tensor}.{tag}.scale", scale)
    zero_name = g.add_initializer(f"{edge.tensor}.{tag}.zero_point", zero_point(edge, target))
    out = f"{edge.tensor}.{tag}.dequantized"
    kwargs = {"axis": edge.axis} if edge.axis >= 0 else {}
    node = helper.make_node("DequantizeLinear", [source, scale_name, zero_name], [out],
                            name=f"{edge.tensor}.{tag}.DequantizeLinear", **kwargs)
    return node, scale_name, zero_name, out


def _place(g: _Graph, edge: QuantEdge, tag: str, target: str) -> str:
    from onnx import helper

    if edge.is_weight:
        q = quantize_weight(g.weight_value(edge.tensor), edge)
        source = g.add_initializer(f"{edge.tensor}.{tag}.int8", q)
        dq, _, _, out = _dq_node(g, source, edge, tag, target)
        g.new_nodes.append(dq)
        return out
    dq, scale_name, zero_name, out = _dq_node(g, f"{edge.tensor}.{tag}.quantized", edge, tag,
                                              target)
    q = helper.make_node("QuantizeLinear", [edge.tensor, scale_name, zero_name],
                         [f"{edge.tensor}.{tag}.quantized"],
                         name=f"{edge.tensor}.{tag}.QuantizeLinear")
    g.new_nodes.extend([q, dq])
    return out


def insert_qdq(model, edges: list[QuantEdge], target: str = "tensorrt"):
    """Return ``model`` with a Q/DQ (or int8 weight + DQ) on every edge; raises if one has
    no place in the graph, so no simulated quantization can vanish. ``target`` is
    ``"tensorrt"`` or ``"onnxruntime"`` (see the module doc)."""
    g = _Graph(model)
    groups: dict[tuple[str, frozenset], QuantEdge] = {}
    for edge in edges:
        if edge.consumer not in ONNX_CONSUMERS:
            raise UnsupportedOpError(
                f"cannot export Q/DQ on input {edge.tensor!r} of Paddle op {edge.consumer!r}: "
                f"no ONNX mapping; supported consumers: {sorted(ONNX_CONSUMERS)}")
        if not edge.is_weight and edge.integer_bits != 8:
            raise UnsupportedOpError(
                f"activation {edge.tensor!r} is quantized to {edge.integer_bits} bits; ONNX "
                f"INT8 QuantizeLinear saturates at 8 bits, so only 8-bit activations export "
                f"faithfully (weights may use fewer bits)")
        if edge.unsigned and target == "tensorrt":
            raise QATError(
                f"activation {edge.tensor!r} was trained unsigned (QATConfig(target="
                f"'onnxruntime')), which TensorRT's signed INT8 cannot run: export with "
                f"target='onnxruntime', or train with target='tensorrt' for TensorRT")
        key = (edge.tensor, ONNX_CONSUMERS[edge.consumer])
        seen = groups.setdefault(key, edge)
        if not np.array_equal(seen.scale, edge.scale):
            raise QATError(f"tensor {edge.tensor!r} feeds several {edge.consumer} ops with "
                           f"different scales")
    for index, ((tensor, onnx_types), edge) in enumerate(groups.items()):
        targets = [(n, i) for n, i in g.consumers.get(tensor, []) if n.op_type in onnx_types]
        if not targets:
            raise QATError(
                f"training quantized input {tensor!r} of {edge.consumer}, but the ONNX graph "
                f"has no {sorted(onnx_types)} reading {tensor!r}; refusing to drop that Q/DQ")
        tag = f"{edge.consumer}{index}"
        out = _place(g, edge, tag, target)
        for node, input_index in targets:
            node.input[input_index] = out
    g.drop_unused_constants()
    sort_nodes(g.graph, g.new_nodes)
    return model


def sort_nodes(graph, new_nodes=()) -> None:
    """Put ``graph``'s nodes (plus ``new_nodes``) in topological order; each pass keeps the
    original order, so an already sorted graph is unchanged."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    remaining = list(graph.node) + list(new_nodes)
    ordered = []
    while remaining:
        rest = []
        for node in remaining:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(remaining):
            raise QATError(f"cannot order ONNX nodes; inputs missing for {rest[0].name!r}")
        remaining = rest
    del graph.node[:]
    graph.node.extend(ordered)

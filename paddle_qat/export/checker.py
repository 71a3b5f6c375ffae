"""Static checks of an ONNX model against TensorRT's explicit-quantization rules.

Each finding names the node. Rule numbers follow shared/TRT_QDQ_RULES.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .onnx_file import load_onnx

INT8_COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
ACTIVATIONS = ("Relu", "LeakyRelu", "Sigmoid", "Clip", "HardSwish", "HardSigmoid", "Tanh",
               "Elu", "Selu", "Softplus", "PRelu")
# Ops that TensorRT moves Q/DQ through: their input and output must share one scale.
SCALE_PRESERVING_OPS = ("MaxPool", "GlobalMaxPool")
FORBIDDEN_OPS = ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger",
                 "DynamicQuantizeLinear")


@dataclass(frozen=True)
class Violation:
    rule: int
    node: str
    message: str

    def __str__(self):
        return f"rule {self.rule} [{self.node}]: {self.message}"


def check_model(model_or_path) -> list[Violation]:
    """Every rule violation found in the model (an empty list means TensorRT-ready)."""
    from onnx import numpy_helper

    model = load_onnx(model_or_path)
    graph = model.graph
    found: list[Violation] = []
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(attr.t)
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                default=0)

    for node in graph.node:
        name = node.name or node.output[0]
        if node.op_type in FORBIDDEN_OPS:
            found.append(Violation(11, name, f"{node.op_type} is not accepted by TensorRT"))
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), None)
        scale = consts.get(node.input[1]) if len(node.input) > 1 else None
        zero = consts.get(node.input[2]) if len(node.input) > 2 else None
        if axis is not None and opset < 13:
            found.append(Violation(1, name, f"per-channel axis needs opset >= 13, have {opset}"))
        if zero is None:
            found.append(Violation(2, name, "zero point missing or not a constant"))
        else:
            if zero.dtype != np.int8:
                found.append(Violation(2, name, f"zero point is {zero.dtype}, must be int8"))
            if np.any(zero != 0):
                found.append(Violation(2, name, "zero point must be all zeros (symmetric)"))
        if scale is None:
            found.append(Violation(3, name, "scale is not a constant"))
            continue
        if scale.dtype != np.float32:
            found.append(Violation(3, name, f"scale is {scale.dtype}, must be float32"))
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            found.append(Violation(3, name, "scale must be finite and > 0"))
        if zero is not None and zero.shape != scale.shape:
            found.append(Violation(3, name, "scale and zero point shapes differ"))
        source = node.input[0]
        if node.op_type == "DequantizeLinear":
            if source in consts:
                if consts[source].dtype != np.int8:
                    found.append(Violation(11, name, "DequantizeLinear input must be int8"))
                if scale.size > 1:
                    dims = consts[source].shape
                    if axis is None or axis >= len(dims) or dims[axis] != scale.size:
                        found.append(Violation(4, name, f"{scale.size} scales do not match "
                                               f"weight dims {list(dims)} on axis {axis}"))
            else:
                if source not in producer or producer[source].op_type != "QuantizeLinear":
                    found.append(Violation(10, name, "DequantizeLinear not fed by "
                                           "QuantizeLinear or an int8 initializer"))
                if scale.size > 1:
                    found.append(Violation(4, name, "per-channel scale on an activation"))
        else:  # QuantizeLinear
            if not any(c.op_type == "DequantizeLinear" for c in consumers.get(node.output[0], [])):
                found.append(Violation(10, name, "dangling QuantizeLinear (no DequantizeLinear)"))
            if scale.size > 1 and source not in consts:
                found.append(Violation(4, name, "per-channel scale on an activation"))

    for node in graph.node:
        if node.op_type not in INT8_COMPUTE_OPS:
            continue
        fed = [i in producer and producer[i].op_type == "DequantizeLinear"
               for i in node.input[:2]]
        if any(fed) and not all(fed):
            missing = "weight" if fed[0] else "data"
            found.append(Violation(5, node.name or node.output[0],
                                   f"{node.op_type} has DequantizeLinear on one input only; "
                                   f"its {missing} input runs in float"))
    found += _placement_violations(_Index(graph, consts, producer, consumers))
    return found


class _Index:
    """Lookups over one graph for the placement rules (6 to 9)."""

    def __init__(self, graph, consts, producer, consumers):
        self.graph, self.consts = graph, consts
        self.producer, self.consumers = producer, consumers

    def op(self, tensor: str):
        node = self.producer.get(tensor)
        return node.op_type if node is not None else None

    def dequantized(self, tensor: str):
        """(QuantizeLinear node, its float input) when ``tensor`` is a DQ of an activation."""
        dq = self.producer.get(tensor)
        if dq is None or dq.op_type != "DequantizeLinear":
            return None
        q = self.producer.get(dq.input[0])
        return (q, q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None

    def scale(self, qdq_node):
        return self.consts.get(qdq_node.input[1])

    def output_quantizers(self, tensor: str):
        return [n for n in self.consumers.get(tensor, []) if n.op_type == "QuantizeLinear"]

    def int8_conv(self, tensor: str):
        """The INT8 Conv whose output is ``tensor``, directly or through a BatchNormalization."""
        node = self.producer.get(tensor)
        if node is not None and node.op_type == "BatchNormalization":
            node = self.producer.get(node.input[0])
        if node is None or node.op_type not in ("Conv", "ConvTranspose"):
            return None
        data = self.producer.get(node.input[0])
        return node if data is not None and data.op_type == "DequantizeLinear" else None


def _name(node) -> str:
    return node.name or node.output[0]


def _same(a, b) -> bool:
    return a is not None and b is not None and a.shape == b.shape and bool(np.all(a == b))


def _placement_violations(ix: _Index) -> list[Violation]:
    found = []
    for node in ix.graph.node:
        if node.op_type == "QuantizeLinear":  # rule 6
            source = ix.op(node.input[0])
            if source in ("Conv", "ConvTranspose", "BatchNormalization"):
                for dq in ix.consumers.get(node.output[0], []):
                    for user in ix.consumers.get(dq.output[0], []):
                        if user.op_type == "BatchNormalization" or user.op_type in ACTIVATIONS:
                            found.append(Violation(6, _name(node), (
                                f"Q/DQ between {source} and {user.op_type} {_name(user)!r}: "
                                f"TensorRT fuses them; quantize after the activation")))
        elif node.op_type == "Add":  # rule 7
            found += _residual_add(ix, node)
        elif node.op_type == "Concat":  # rule 8
            scales = [ix.dequantized(i) for i in node.input]
            if not any(scales):
                continue
            if not all(scales):
                found.append(Violation(8, _name(node), "Concat has Q/DQ on some inputs only; "
                                       "TensorRT inserts reformats"))
                continue
            values = [ix.scale(q) for q, _ in scales] + [
                ix.scale(q) for q in ix.output_quantizers(node.output[0])]
            if not all(_same(values[0], v) for v in values[1:]):
                found.append(Violation(8, _name(node), "Concat inputs and output have different "
                                       "scales; TensorRT needs one shared scale"))
        elif node.op_type in SCALE_PRESERVING_OPS:  # rule 9
            before = ix.dequantized(node.input[0])
            for q in ix.output_quantizers(node.output[0]):
                if before is not None and not _same(ix.scale(before[0]), ix.scale(q)):
                    found.append(Violation(9, _name(node), f"{node.op_type} input scale differs "
                                           f"from its output scale ({_name(q)!r})"))
    return found


def _residual_add(ix: _Index, node) -> list[Violation]:
    inputs = [i for i in node.input if i not in ix.consts]
    if len(inputs) != 2:
        return []
    direct = [i for i in inputs if ix.int8_conv(i) is not None]
    through_qdq = [i for i in inputs if ix.dequantized(i) is not None
                   and ix.int8_conv(ix.dequantized(i)[1]) is not None]
    if not direct and not through_qdq:
        return []  # not a residual add after an INT8 conv
    if not direct:
        return [Violation(7, _name(node), "Q/DQ between every Conv and this residual Add: "
                          "TensorRT cannot fuse the Add into a convolution")]
    other = [i for i in inputs if i != direct[0]][0]
    if ix.dequantized(other) is None:
        return [Violation(7, _name(node), f"identity branch {other!r} of the residual Add has "
                          f"no Q/DQ: the Add runs in float after the INT8 conv")]
    return []

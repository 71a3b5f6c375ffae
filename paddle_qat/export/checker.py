"""Static checks of an ONNX model against TensorRT's explicit-quantization rules.

Each finding names the node. Rule numbers follow shared/TRT_QDQ_RULES.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INT8_COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
FORBIDDEN_OPS = ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger",
                 "DynamicQuantizeLinear")


@dataclass(frozen=True)
class Violation:
    rule: int
    node: str
    message: str

    def __str__(self):
        return f"rule {self.rule} [{self.node}]: {self.message}"


def _load(model_or_path):
    import onnx

    if isinstance(model_or_path, (str, bytes)) or hasattr(model_or_path, "__fspath__"):
        return onnx.load(str(model_or_path))
    return model_or_path


def check_model(model_or_path) -> list[Violation]:
    """Every rule violation found in the model (an empty list means TensorRT-ready)."""
    from onnx import numpy_helper

    model = _load(model_or_path)
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
    return found

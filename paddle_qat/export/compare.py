"""Put quantized ONNX models of one float model side by side, node by node.

For every compute node (matched across models by its output tensor, which paddle2onnx and
ONNX Runtime's quantizer both keep) it says in which precision each model runs it (int8:
every data input comes through a DequantizeLinear; mixed; float) and the scale of its first
data input, flags the nodes where the models differ, and counts Q/DQ nodes per model and the
problems of the deployment target: TensorRT rule violations, or (``target="onnxruntime"``)
the quantized ops ONNX Runtime would still run in float.

Example::

    report = compare_models({"QAT": "qat.onnx", "ORT PTQ": "ptq.onnx"})
    print(format_comparison(report))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Concat", "MaxPool",
               "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Relu")


@dataclass(frozen=True)
class NodePrecision:
    op_type: str
    precision: str  # "int8", "mixed" or "float"
    scale: str  # the first data input's scale ("-" when float, "per-channel" for vectors)


@dataclass
class ModelSummary:
    path: Path
    quantize: int = 0
    dequantize: int = 0
    # the target's problems: TensorRT rule violations, or ops ONNX Runtime runs in float
    problems: list = field(default_factory=list)
    nodes: dict[str, NodePrecision] = field(default_factory=dict)
    target: str = "tensorrt"


def _constants(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            (attr,) = [a for a in node.attribute if a.name == "value"]
            values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def summarize(path, target: str = "tensorrt") -> ModelSummary:
    """Precision of every compute node of one ONNX model, and its problems for ``target``."""
    from .onnx_file import load_onnx
    from .target_check import target_problems

    path = Path(path)
    model = load_onnx(path)
    graph = model.graph
    constants = _constants(graph)
    producer = {o: n for n in graph.node for o in n.output}
    summary = ModelSummary(path, problems=target_problems(model, target)[0], target=target)
    for node in graph.node:
        summary.quantize += node.op_type == "QuantizeLinear"
        summary.dequantize += node.op_type == "DequantizeLinear"
        if node.op_type not in COMPUTE_OPS:
            continue
        data = [i for i in node.input if i and i not in constants]
        fed = [producer.get(i) is not None and producer[i].op_type == "DequantizeLinear"
               for i in data]
        precision = "int8" if fed and all(fed) else "mixed" if any(fed) else "float"
        scale = "-"
        if fed and fed[0]:
            value = constants.get(producer[data[0]].input[1])
            scale = ("per-channel" if value is not None and value.size > 1
                     else f"{float(value):.4g}" if value is not None else "computed")
        summary.nodes[node.output[0]] = NodePrecision(node.op_type, precision, scale)
    return summary


def compare_models(models: dict[str, str | Path], target: str = "tensorrt"
                   ) -> dict[str, ModelSummary]:
    """``{name: ModelSummary}`` in the order given."""
    return {name: summarize(path, target) for name, path in models.items()}


def format_comparison(report: dict[str, ModelSummary]) -> str:
    names = list(report)
    nodes: dict[str, str] = {}
    for summary in report.values():
        for output, node in summary.nodes.items():
            nodes.setdefault(output, node.op_type)
    width = max([len(o) for o in nodes] + [4])
    header = f"{'node (output)':<{width}}  {'op':<17}" + "".join(
        f"  {n[:24]:<24}" for n in names) + "  differs"
    lines = [header, "-" * len(header)]
    differing = 0
    for output, op_type in nodes.items():
        cells = []
        for name in names:
            node = report[name].nodes.get(output)
            cells.append("absent" if node is None else
                         node.precision if node.scale == "-" else
                         f"{node.precision} {node.scale}")
        precisions = {c.split()[0] for c in cells}
        differs = len(precisions) > 1
        differing += differs
        lines.append(f"{output:<{width}}  {op_type:<17}" + "".join(
            f"  {c[:24]:<24}" for c in cells) + ("  <--" if differs else ""))
    lines.append("")
    for name, summary in report.items():
        int8 = sum(n.precision == "int8" for n in summary.nodes.values())
        head = f"{name}: {summary.quantize} Q / {summary.dequantize} DQ, {int8} int8 compute nodes"
        if summary.target == "onnxruntime":
            lines.append(f"{head}, {len(summary.problems)} quantized op(s) ONNX Runtime runs "
                         f"in float")
            continue
        rules = sorted({v.rule for v in summary.problems})
        lines.append(f"{head}, {len(summary.problems)} TensorRT rule violation(s)"
                     + (f" (rules {', '.join(map(str, rules))})" if rules else ""))
    lines.append(f"{differing} node(s) run in a different precision across the models")
    return "\n".join(lines)

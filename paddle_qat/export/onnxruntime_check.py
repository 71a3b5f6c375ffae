"""Ask ONNX Runtime which quantized ops it would still run in float.

The check for ``target="onnxruntime"`` exports, as :mod:`~paddle_qat.export.checker` is for
TensorRT's rules: ONNX Runtime's own optimizer runs on the model (the CPU provider, the
fusions every session applies) and every compute op left in float although all its data
inputs are dequantized is reported. Such an op computes in float between the Q/DQ, which
costs more than FP32.

Example::

    for problem in float_ops("qat_cpu.onnx"):
        print(problem)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

# ONNX ops that have an INT8 kernel in ONNX Runtime's CPU provider when fed by Q/DQ.
COMPUTE_OPS = frozenset({"Conv", "FusedConv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul",
                         "AveragePool", "GlobalAveragePool", "Concat"})


def optimized_model(model):
    """The graph ONNX Runtime runs for ``model`` (an ``onnx.ModelProto`` or a path)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="paddle_qat_ort_") as tmp:
        source = model if isinstance(model, (str, Path)) else Path(tmp) / "model.onnx"
        if not isinstance(model, (str, Path)):
            onnx.save_model(model, str(source))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath)


def float_ops(model) -> list[str]:
    """One line per op that reads a dequantized tensor but stays float after ONNX Runtime's
    optimizations; empty when every quantized op got an INT8 kernel. An op that computes the
    model's output (see :func:`float_output_ops`) is not counted."""
    return float_op_report(model)[0]


def float_output_ops(model) -> list[str]:
    """The ops that read dequantized tensors and stay float because they compute the model's
    output: only ops in ``OUTPUT_TAIL_OPS`` lie between them and a graph output (a
    segmentation head's last conv, SqueezeNet's final pool). ONNX Runtime fuses an INT8 op
    only with a quantizer on its output, and there that would quantize what the model
    returns, which training does not simulate (nor ONNX Runtime's own PTQ of the classifier
    matmul); they cost one float op each."""
    return float_op_report(model)[1]


# Ops that only reshape, normalize or pick from the model's output on its way out.
OUTPUT_TAIL_OPS = frozenset({"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose",
                             "Identity", "Cast", "Softmax", "LogSoftmax", "Sigmoid", "ArgMax",
                             "Resize"})


def float_op_report(model) -> tuple[list[str], list[str]]:
    """(:func:`float_ops`, :func:`float_output_ops`) from one optimized graph."""
    graph = optimized_model(model).graph
    constants = {t.name for t in graph.initializer} | {
        o for n in graph.node if n.op_type == "Constant" for o in n.output}
    constants |= {n.output[0] for n in graph.node  # an int8 weight or int32 bias
                  if n.op_type == "DequantizeLinear" and n.input[0] in constants}
    dequantized = {n.output[0] for n in graph.node
                   if n.op_type == "DequantizeLinear" and n.output[0] not in constants}
    at_output = _computing_only_outputs(graph)
    problems, outputs = [], []
    for node in graph.node:
        if node.op_type not in COMPUTE_OPS:
            continue
        inputs = [name for name in node.input if name and name not in constants]
        data = [name for name in inputs if name in dequantized]
        # Every data input dequantized and still float: a missed INT8 kernel. (An op also
        # fed by a float op, e.g. the Mul of a decomposed HardSwish, follows from that one.)
        if not data or len(data) != len(inputs):
            continue
        if all(o in at_output for o in node.output if o):
            outputs.append(f"{node.op_type} {node.name!r} computes the model's output in "
                           f"float from dequantized {data}")
        else:
            problems.append(f"{node.op_type} {node.name!r} runs in float on dequantized "
                            f"{data}: no QuantizeLinear on its output for ONNX Runtime to fuse")
    return problems, outputs


def _computing_only_outputs(graph) -> set[str]:
    """Tensors every one of whose paths reaches a graph output through ``OUTPUT_TAIL_OPS``
    alone (graph outputs themselves included)."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}
    memo: dict[str, bool] = {}

    def only_outputs(name: str) -> bool:
        if name not in memo:
            memo[name] = False  # a cycle is no path to the output
            readers = consumers.get(name, [])
            memo[name] = (name in graph_outputs or bool(readers)) and all(
                n.op_type in OUTPUT_TAIL_OPS and all(only_outputs(o) for o in n.output if o)
                for n in readers)
        return memo[name]

    tensors = {o for n in graph.node for o in n.output if o}
    return {name for name in tensors if only_outputs(name)}

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
    optimizations; empty when every quantized op got an INT8 kernel."""
    graph = optimized_model(model).graph
    constants = {t.name for t in graph.initializer} | {
        o for n in graph.node if n.op_type == "Constant" for o in n.output}
    constants |= {n.output[0] for n in graph.node  # an int8 weight or int32 bias
                  if n.op_type == "DequantizeLinear" and n.input[0] in constants}
    dequantized = {n.output[0] for n in graph.node
                   if n.op_type == "DequantizeLinear" and n.output[0] not in constants}
    problems = []
    for node in graph.node:
        if node.op_type not in COMPUTE_OPS:
            continue
        inputs = [name for name in node.input if name and name not in constants]
        data = [name for name in inputs if name in dequantized]
        # Every data input dequantized and still float: a missed INT8 kernel. (An op also
        # fed by a float op, e.g. the Mul of a decomposed HardSwish, follows from that one.)
        if data and len(data) == len(inputs):
            problems.append(f"{node.op_type} {node.name!r} runs in float on dequantized "
                            f"{data}: no QuantizeLinear on its output for ONNX Runtime to fuse")
    return problems

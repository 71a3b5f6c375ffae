"""QAT eval program -> ONNX with explicit INT8 Q/DQ (TensorRT explicit quantization, ORT)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import QATError
from .atomic import atomic_path
from .qdq_insert import insert_qdq
from .quant_map import QuantEdge, read_quant_edges, strip_quant_ops

DEFAULT_OPSET = 13  # per-channel DequantizeLinear (axis) needs >= 13


@dataclass(frozen=True)
class OnnxExport:
    path: Path
    edges: tuple[QuantEdge, ...]


def _float_onnx(program, feed_vars, fetch_vars, scope, opset: int):
    import onnx
    import paddle
    import paddle2onnx

    float_program = strip_quant_ops(program)
    with tempfile.TemporaryDirectory(prefix="paddle_qat_export_") as tmp, \
            paddle.static.scope_guard(scope):
        exe = paddle.static.Executor(paddle.CPUPlace())
        prefix = str(Path(tmp) / "float")
        feed = [float_program.global_block().var(v.name) for v in feed_vars]
        fetch = [float_program.global_block().var(v.name) for v in fetch_vars]
        paddle.static.save_inference_model(prefix, feed, fetch, exe, program=float_program)
        onnx_bytes = paddle2onnx.export(f"{prefix}.pdmodel", f"{prefix}.pdiparams",
                                        opset_version=opset, auto_upgrade_opset=False,
                                        verbose=False, enable_onnx_checker=True)
    return onnx.load_model_from_string(onnx_bytes)


def export_onnx(program, feed_vars, fetch_vars, path, *, scope=None, opset: int = DEFAULT_OPSET,
                check: bool = True) -> OnnxExport:
    """Export a quantized eval program (with trained scales in ``scope``) to ONNX.

    Operators are translated by paddle2onnx from the program with its Q/DQ removed; then a
    QuantizeLinear/DequantizeLinear pair (an int8 initializer + DequantizeLinear for weights)
    is put on exactly the inputs that training quantized. The result is checked against
    TensorRT's explicit-quantization rules and written atomically.

    Example::

        paddle_qat.export.export_onnx(eval_prog, [image], [logits], "model.onnx")
    """
    import onnx
    import paddle

    from .checker import check_model

    if opset < 13:
        raise QATError(f"opset {opset} is too old: per-channel Q/DQ needs opset >= 13")
    scope = paddle.static.global_scope() if scope is None else scope
    edges = read_quant_edges(program, scope)
    model = insert_qdq(_float_onnx(program, feed_vars, fetch_vars, scope, opset), edges)
    onnx.checker.check_model(model)
    violations = tuple(check_model(model)) if check else ()
    if violations:
        listing = "\n".join(f"  - {v}" for v in violations)
        raise QATError(f"exported ONNX breaks TensorRT's Q/DQ rules:\n{listing}")
    path = Path(path)
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp))
    return OnnxExport(path, tuple(edges))


def export_float_onnx(program, feed_vars, fetch_vars, path, *, scope=None,
                      opset: int = DEFAULT_OPSET) -> Path:
    """Export an FP32 (unquantized) eval program to ONNX with paddle2onnx, atomically."""
    import onnx
    import paddle

    scope = paddle.static.global_scope() if scope is None else scope
    model = _float_onnx(program, feed_vars, fetch_vars, scope, opset)
    path = Path(path)
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp))
    return path

"""Read what a quantized (eval) program simulates: one QuantEdge per quantized op input."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import QATError, ScaleError


@dataclass(frozen=True)
class QuantEdge:
    """``consumer`` (a Paddle op type) reads ``tensor`` through quantize -> dequantize.

    ``scale`` is Paddle's abs-max range (ONNX's scale is ``scale / qmax``); ``axis`` is -1 for
    a per-tensor scale. ``bits`` is Paddle's ``bit_length``; an ``unsigned`` quantizer (a
    non-negative tensor, ``target="onnxruntime"``) has ``bit_length`` one more than its
    integer width and the range ``[0, qmax]``.
    """

    tensor: str
    consumer: str
    consumer_output: str
    scale: np.ndarray
    axis: int
    bits: int
    is_weight: bool
    unsigned: bool = False

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def qmin(self) -> int:
        return 0 if self.unsigned else -self.qmax - 1

    @property
    def integer_bits(self) -> int:
        """Width of the integer type that holds the quantized values."""
        return self.bits - 1 if self.unsigned else self.bits


def _value(scope, name: str) -> np.ndarray:
    var = scope.find_var(name)
    if var is None or not var.get_tensor()._is_initialized():
        raise ScaleError(
            f"scale variable {name!r} is not in the scope: load the QAT checkpoint (or run the "
            f"startup program and train) before exporting"
        )
    return np.array(var.get_tensor())


def read_quant_edges(program, scope) -> list[QuantEdge]:
    """Every quantized input of every op in ``program``'s global block, with its scale.

    Raises :class:`ScaleError` naming the tensor when a scale is missing, non-finite or <= 0.
    """
    block = program.global_block()
    made_by = {name: op for op in block.ops for name in op.output_arg_names}
    edges = []
    for op in block.ops:
        if op.type in ("quantize_linear", "dequantize_linear"):
            continue
        for name in op.input_arg_names:
            dq = made_by.get(name)
            if dq is None or dq.type != "dequantize_linear":
                continue
            q = made_by.get(dq.input("X")[0])
            if q is None or q.type != "quantize_linear":
                raise QATError(f"dequantize_linear {name!r} is not fed by a quantize_linear")
            tensor = q.input("X")[0]
            scale_name = q.input("Scale")[0]
            scale = _value(scope, scale_name).astype(np.float32).reshape(-1)
            if not np.all(np.isfinite(scale)) or not np.all(scale > 0):
                bad = scale[~(np.isfinite(scale) & (scale > 0))][:4]
                raise ScaleError(
                    f"scale {scale_name!r} of tensor {tensor!r} (input of {op.type}) holds "
                    f"{bad.tolist()}: scales must be finite and > 0. The tensor never saw data "
                    f"in training, or training diverged; retrain or recalibrate it"
                )
            var = block._find_var_recursive(tensor)
            edges.append(QuantEdge(
                tensor=tensor,
                consumer=op.type,
                consumer_output=op.output_arg_names[0],
                scale=scale,
                axis=int(q.attr("quant_axis")),
                bits=int(q.attr("bit_length")),
                is_weight=bool(var is not None and var.persistable),
                unsigned=int(q.attr("qmin")) == 0,
            ))
    if not edges:
        raise QATError(
            "the program holds no quantize_linear/dequantize_linear ops: it is not a QAT "
            "program. Quantize the eval program with fleet.qat_init / quantize_program first; "
            "a dygraph model with paddle_qat.dygraph.quantize_model (Paddle's own dygraph "
            "quanters save fused fake-quant ops that INT8 ONNX cannot reproduce exactly)"
        )
    return edges


def strip_quant_ops(program):
    """A clone of ``program`` with every Q/DQ pair removed and consumers reading float again."""
    float_program = program.clone(for_test=True)
    block = float_program.global_block()
    made_by = {name: op for op in block.ops for name in op.output_arg_names}
    for op in block.ops:
        if op.type in ("quantize_linear", "dequantize_linear"):
            continue
        for name in op.input_arg_names:
            dq = made_by.get(name)
            if dq is not None and dq.type == "dequantize_linear":
                op._rename_input(name, made_by[dq.input("X")[0]].input("X")[0])
    for index in reversed(range(len(block.ops))):
        if block.ops[index].type in ("quantize_linear", "dequantize_linear"):
            block._remove_op(index, sync=False)  # one sync below, not one per op
    float_program._sync_with_cpp()
    return float_program

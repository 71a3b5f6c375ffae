"""QAT eval program -> ONNX with explicit INT8 Q/DQ (TensorRT explicit quantization, ORT)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import QATError, UnsupportedOpError
from .atomic import atomic_path
from .qdq_insert import insert_qdq
from .quant_map import QuantEdge, read_quant_edges, strip_quant_ops

DEFAULT_OPSET = 13  # per-channel DequantizeLinear (axis) needs >= 13; paddle2onnx raises it for
# ops that need more (HardSwish: 14) instead of aborting the process


@dataclass(frozen=True)
class OnnxExport:
    path: Path
    edges: tuple[QuantEdge, ...]
    target: str = "tensorrt"


def trained_target(edges) -> str:
    """The deployment target a program was trained for: unsigned quantizers exist only with
    ``QATConfig(target="onnxruntime")``."""
    return "onnxruntime" if any(e.unsigned for e in edges) else "tensorrt"


# how to get past each target's refusal
_FIXES = {"tensorrt": "A model trained with QATConfig(target='onnxruntime') exports with "
                      "target='onnxruntime' (CLI: --target onnxruntime)",
          "onnxruntime": "Train with QATConfig(target='onnxruntime') for this placement, or "
                         "pass check=False to write it anyway"}


def _check(model, target: str) -> None:
    from .target_check import target_problems

    violations, what = target_problems(model, target)
    if violations:
        listing = "\n".join(f"  - {v}" for v in violations)
        raise QATError(f"the exported ONNX has {len(violations)} {what}:\n{listing}\n"
                       f"{_FIXES[target]}")


def _onnx_names(edges, float_program, model) -> list[QuantEdge]:
    """``edges`` with each tensor under its ONNX name. paddle2onnx keeps Paddle's names
    except for some op outputs: a conv's bias add is folded into the Conv, which keeps the
    conv's output name; a concat output becomes ``Concat.1``, the output of the ONNX node that
    reads exactly the Paddle producer's inputs."""
    import dataclasses

    produced = {o for n in model.graph.node for o in n.output}
    known = produced | {i.name for i in model.graph.input}
    block = float_program.global_block()
    made_by = {out: op for op in block.ops for out in op.output_arg_names}
    onnx_producer = {o: n for n in model.graph.node for o in n.output}
    renamed = []
    for edge in edges:
        op = made_by.get(edge.tensor)
        if edge.tensor in known or edge.is_weight or op is None:
            renamed.append(edge)
            continue
        if op.type == "elementwise_add":  # a bias add paddle2onnx folded into its Conv
            params = [n for n in op.input_arg_names if block._find_var_recursive(n).persistable]
            data = [n for n in op.input_arg_names if n not in params]
            node = onnx_producer.get(data[0]) if params and len(data) == 1 else None
            if node is not None and params[0] in node.input:
                renamed.append(dataclasses.replace(edge, tensor=data[0]))
                continue
        inputs = [name for name in op.input_arg_names if name in known]
        matches = [n for n in model.graph.node
                   if inputs and [i for i in n.input if i in known] == inputs]
        # No single counterpart: keep the name; insert_qdq refuses it, naming the op.
        renamed.append(dataclasses.replace(edge, tensor=matches[0].output[0])
                       if len(matches) == 1 else edge)
    return renamed


def _computing(program, fetch_names) -> set[str]:
    """The tensors ``fetch_names`` are computed from (ops that only feed the loss are not)."""
    needed = set(fetch_names)
    for op in reversed(program.global_block().ops):
        if any(name in needed for name in op.output_arg_names):
            needed.update(op.input_arg_names)
    return needed


def _check_translatable(program, fetch_names) -> None:
    """paddle2onnx aborts the whole process on an op it cannot translate: name it first."""
    import paddle2onnx
    from paddle2onnx.paddle2onnx_cpp2py_export import get_all_supported_operators

    supported = set(get_all_supported_operators()) | {"feed", "fetch"}
    needed = _computing(program, fetch_names)
    used = {op.type for op in program.global_block().ops
            if any(name in needed for name in op.output_arg_names)}
    missing = sorted(used - supported)
    if missing:
        raise UnsupportedOpError(
            f"paddle2onnx {paddle2onnx.__version__} cannot translate the Paddle op(s) "
            f"{missing} that compute {fetch_names}, so the model cannot go to ONNX. Replace "
            f"them in the model with supported ops, or deploy the Paddle inference model "
            f"(export_inference_model) with Paddle Inference instead")


def _float_onnx(program, feed_vars, fetch_vars, scope, opset: int):
    """(paddle2onnx's model of ``program`` without its Q/DQ, that float program)."""
    import onnx
    import paddle
    import paddle2onnx

    float_program = strip_quant_ops(program)
    _check_translatable(float_program, [v.name for v in fetch_vars])
    with tempfile.TemporaryDirectory(prefix="paddle_qat_export_") as tmp, \
            paddle.static.scope_guard(scope):
        exe = paddle.static.Executor(paddle.CPUPlace())
        prefix = str(Path(tmp) / "float")
        feed = [float_program.global_block().var(v.name) for v in feed_vars]
        fetch = [float_program.global_block().var(v.name) for v in fetch_vars]
        paddle.static.save_inference_model(prefix, feed, fetch, exe, program=float_program)
        onnx_bytes = paddle2onnx.export(f"{prefix}.pdmodel", f"{prefix}.pdiparams",
                                        opset_version=opset, auto_upgrade_opset=True,
                                        verbose=False, enable_onnx_checker=True)
    if not onnx_bytes:
        raise QATError("paddle2onnx returned no model (its messages above say why)")
    return onnx.load_model_from_string(onnx_bytes), float_program


def export_onnx(program, feed_vars, fetch_vars, path, *, scope=None, opset: int = DEFAULT_OPSET,
                check: bool = True, target: str | None = None) -> OnnxExport:
    """Export a quantized eval program (with trained scales in ``scope``) to ONNX.

    Operators are translated by paddle2onnx from the program with its Q/DQ removed; then a
    QuantizeLinear/DequantizeLinear pair (an int8 initializer + DequantizeLinear for weights)
    is put on exactly the inputs that training quantized. The result is checked and written
    atomically.

    ``target`` (default: the one the program was trained for, see ``QATConfig.target``):
    ``"tensorrt"`` writes signed INT8 Q/DQ checked against TensorRT's explicit-quantization
    rules; ``"onnxruntime"`` writes uint8 activations, folds batch norms into the convs
    (:mod:`~paddle_qat.export.onnxruntime_graph`) and checks that ONNX Runtime runs every
    quantized op in INT8.

    Example::

        paddle_qat.export.export_onnx(eval_prog, [image], [logits], "model.onnx")
    """
    import onnx
    import paddle

    from ..config import TARGETS
    from .onnxruntime_graph import prepare_for_onnxruntime

    if target is not None and target not in TARGETS:
        raise QATError(f"export target {target!r}: use one of {list(TARGETS)}")
    if opset < 13:
        raise QATError(f"opset {opset} is too old: per-channel Q/DQ needs opset >= 13")
    scope = paddle.static.global_scope() if scope is None else scope
    edges = read_quant_edges(program, scope)  # first: names a non-QAT program or bad scale
    needed = _computing(program, [v.name for v in fetch_vars])
    edges = [e for e in edges if e.consumer_output in needed]  # not the loss's quantizers
    if not edges:
        raise QATError(f"no quantized op computes {[v.name for v in fetch_vars]}: the program's "
                       f"quantizers all feed other outputs (the loss); fetch the model output")
    float_model, float_program = _float_onnx(program, feed_vars, fetch_vars, scope, opset)
    edges = _onnx_names(edges, float_program, float_model)
    target = trained_target(edges) if target is None else target
    model = insert_qdq(float_model, edges, target)
    if target == "onnxruntime":
        prepare_for_onnxruntime(model)
    onnx.checker.check_model(model)
    if check:
        _check(model, target)
    path = Path(path)
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp))
    return OnnxExport(path, tuple(edges), target)


def export_float_onnx(program, feed_vars, fetch_vars, path, *, scope=None,
                      opset: int = DEFAULT_OPSET) -> Path:
    """Export an FP32 (unquantized) eval program to ONNX with paddle2onnx, atomically."""
    import onnx
    import paddle

    scope = paddle.static.global_scope() if scope is None else scope
    model, _ = _float_onnx(program, feed_vars, fetch_vars, scope, opset)
    path = Path(path)
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp))
    return path

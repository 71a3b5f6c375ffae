"""QAT eval program -> ONNX with explicit INT8 Q/DQ (TensorRT explicit quantization, ORT)."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import QATError, UnsupportedOpError
from ..passes import RECORDED_TARGET
from ..placement import parameter_behind
from .atomic import atomic_path
from .paddle2onnx_fixes import restore_approximate_gelus
from .qdq_insert import ONNX_CONSUMERS, insert_qdq
from .quant_map import QuantEdge, read_quant_edges, strip_quant_ops

_logger = logging.getLogger(__name__)

DEFAULT_OPSET = 13  # per-channel DequantizeLinear (axis) needs >= 13; paddle2onnx raises it for
# ops that need more (HardSwish: 14) instead of aborting the process


@dataclass(frozen=True)
class OnnxExport:
    path: Path
    edges: tuple[QuantEdge, ...]
    target: str = "tensorrt"


def trained_target(edges, program=None) -> str:
    """The deployment target a program was trained for: the one ``quantize_program`` recorded
    on it (eval programs from ``fleet.qat_init`` and :mod:`~paddle_qat.export.saved` have
    it, and a model saved by :func:`~paddle_qat.export.export_inference_model` has it in
    its ``.paddle_qat.json``); for another program loaded from files, ``"onnxruntime"`` when
    it holds an unsigned quantizer (only that target trains them; a model with no ReLU
    before a quantizer shows none, so pass ``target=`` for such a loaded model)."""
    recorded = getattr(program, RECORDED_TARGET, None)
    if recorded is not None:
        return recorded
    return "onnxruntime" if any(e.unsigned for e in edges) else "tensorrt"


# how to get past each target's refusal, by (export target, trained target)
_FIXES = {
    ("tensorrt", "onnxruntime"): "A model trained with QATConfig(target='onnxruntime') exports "
                                 "with target='onnxruntime' (CLI: --target onnxruntime)",
    ("tensorrt", "tensorrt"): "Pass check=False to write it anyway",
    ("onnxruntime", "tensorrt"): "Train with QATConfig(target='onnxruntime') for this "
                                 "placement, or pass check=False to write it anyway",
    ("onnxruntime", "onnxruntime"): "The model was trained for ONNX Runtime: no quantizer "
                                    "follows these ops because the op after each has no INT8 "
                                    "kernel in ONNX Runtime (a BatchNormalization or Mul that "
                                    "no conv absorbs) or was left in float by the skip "
                                    "settings. Pass check=False to write the model with them "
                                    "in float",
}


def _check(model, target: str, trained: str) -> None:
    from .target_check import target_report

    report = target_report(model, target)
    for note in report.notes:
        _logger.info("paddle_qat: %s (an INT8 kernel there would quantize the model's output, "
                     "which training does not simulate)", note)
    if report.problems:
        listing = "\n".join(f"  - {v}" for v in report.problems)
        raise QATError(f"the exported ONNX has {len(report.problems)} {report.what}:\n"
                       f"{listing}\n{_FIXES[(target, trained)]}")


def _onnx_names(edges, float_program, model) -> list[QuantEdge]:
    """``edges`` with each tensor under its ONNX name. paddle2onnx keeps Paddle's names
    except for some op outputs: a conv's bias add (of the bias or, from Paddle 3's
    ``nn.Conv2D``, of its reshape) is folded into the Conv, which keeps the conv's output
    name; a concat output becomes ``Concat.1`` and a relu6 output ``Clip.3``,
    the output of the ONNX node that reads exactly the Paddle producer's data inputs (besides
    constants such as Clip's bounds), under their ONNX names: in a chain of residual adds
    (MobileNetV2) the second add reads the first one's ``Add.3``."""
    import dataclasses

    constants = ({o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
                 | {t.name for t in model.graph.initializer})
    produced = {o for n in model.graph.node for o in n.output} - constants
    known = produced | {i.name for i in model.graph.input}
    block = float_program.global_block()
    made_by = {out: op for op in block.ops for out in op.output_arg_names}
    onnx_producer = {o: n for n in model.graph.node for o in n.output}
    # the candidates: nodes with an output of paddle2onnx's own naming (an output that kept a
    # Paddle name is that Paddle op's counterpart, not a renamed tensor's)
    paddle_names = set(block.vars)
    data_inputs = [(n, [i for i in n.input if i in known]) for n in model.graph.node
                   if n.output and n.output[0] not in paddle_names]
    onnx_name: dict[str, str | None] = {}

    def resolve(tensor: str) -> str | None:
        """``tensor``'s ONNX name, or None where no single ONNX tensor is it."""
        if tensor in known:
            return tensor
        if tensor not in onnx_name:
            onnx_name[tensor] = None  # a cycle cannot resolve
            onnx_name[tensor] = counterpart(made_by.get(tensor))
        return onnx_name[tensor]

    def counterpart(op) -> str | None:
        if op is None:
            return None
        if _identity_in_inference(op):  # paddle2onnx writes no node for it
            return resolve(op.input("X")[0])
        if op.type == "elementwise_add":  # a bias add paddle2onnx folded into its Conv
            params = {n: parameter_behind(n, block, made_by) for n in op.input_arg_names}
            data = [n for n, param in params.items() if param is None]
            bias = [param for param in params.values() if param is not None]
            node = onnx_producer.get(data[0]) if bias and len(data) == 1 else None
            if node is not None and bias[0] in node.input:
                return data[0]
        inputs = [resolve(name) for name in op.input_arg_names]
        inputs = [name for name in inputs if name in known]
        matches = [n for n, reads in data_inputs if inputs and reads == inputs]
        return matches[0].output[0] if len(matches) == 1 else None

    def read_by_consumer(edge) -> str | None:
        """The one data input of the consumer's ONNX node that none of the consumer's other
        inputs is: for a tensor paddle2onnx computes with more than one node (a ``scale``
        with a bias is a Mul and an Add; the Add's output is what the conv reads)."""
        node = onnx_producer.get(resolve(edge.consumer_output) or edge.consumer_output)
        op = made_by.get(edge.consumer_output)
        if node is None or op is None:
            return None
        others = {resolve(n) for n in op.input_arg_names if n != edge.tensor}
        candidates = {i for i in node.input if i and i not in constants and i not in others}
        return candidates.pop() if len(candidates) == 1 else None

    read_as: dict[str, set[str]] = {}  # tensor: the op types of the ONNX nodes reading it
    for node in model.graph.node:
        for name in node.input:
            read_as.setdefault(name, set()).add(node.op_type)

    def onnx_tensor(edge) -> str:
        name = resolve(edge.tensor)
        if name is None or not read_as.get(name, set()) & ONNX_CONSUMERS.get(edge.consumer,
                                                                            frozenset()):
            name = read_by_consumer(edge) or name
        # No single counterpart: keep the name; insert_qdq refuses it, naming the op.
        return name or edge.tensor

    return [edge if edge.is_weight else dataclasses.replace(edge, tensor=onnx_tensor(edge))
            for edge in edges]


def _identity_in_inference(op) -> bool:
    """Paddle ops that compute their input unchanged in an eval program: ``assign``, and
    ``dropout`` scaled in training (``upscale_in_train``, ``paddle.nn.Dropout``'s default)."""
    if op.type == "assign":
        return True
    return (op.type == "dropout" and op.attr("is_test")
            and op.attr("dropout_implementation") == "upscale_in_train")


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
    model = onnx.load_model_from_string(onnx_bytes)
    restore_approximate_gelus(model, float_program)
    return model, float_program


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
    trained = trained_target(edges, program)
    target = trained if target is None else target
    model = insert_qdq(float_model, edges, target)
    if target == "onnxruntime":
        prepare_for_onnxruntime(model)
    onnx.checker.check_model(model)
    if check:
        _check(model, target, trained)
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

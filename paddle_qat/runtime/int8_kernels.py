"""Whether ONNX Runtime's fused INT8 kernels compute a model exactly on this CPU.

ONNX Runtime replaces DequantizeLinear -> Conv / MatMul -> QuantizeLinear by one integer
kernel. On x86 CPUs without VNNI (AVX2, and AVX-512 before VNNI) that kernel multiplies
pairs of uint8 activations (int8 ones are shifted by 128 first) and int8 weights into one
int16 (``vpmaddubsw``), which saturates once ``2 * 255 * |w|`` passes 32767: for weight levels
beyond +-64. No error is raised; the model is just wrong. Measured on an AVX2 EPYC: the
demo's 8-bit QAT model scored 330 of 360 digits fused and 353 with Q/DQ computed in float,
its ONNX Runtime PTQ model 297 against 354; the 4-bit models (levels <= 7) were identical.

So every session paddle_qat opens goes through :func:`choose_kernels`:

* weights within +-64: fused kernels, exact on every CPU;
* larger weights on a CPU whose kernels are exact (probed once, see
  :func:`int8_kernels_saturate`): fused;
* larger weights on a CPU whose kernels saturate: Q/DQ computed in float
  (``session.disable_quant_qdq``), which is exactly the simulated arithmetic, at float
  speed, with a warning that says how to get INT8 speed there (``weight_bits=7``).

Example::

    from paddle_qat.runtime.int8_kernels import open_session
    session, kernels = open_session("qat.onnx")   # kernels.fused, kernels.reason
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import QATConfigError, QATError
from ..export.onnx_file import load_onnx

KERNEL_MODES = ("auto", "fused", "simulated")
# 2 * 255 * 64 = 32640 fits int16: weight levels up to 64 never saturate a uint8 x int8 pair
SAFE_WEIGHT_LEVEL = 64
_WEIGHT_READERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_log = logging.getLogger("paddle_qat")


@dataclass(frozen=True)
class KernelChoice:
    """How ONNX Runtime computes a model's quantized ops: ``fused`` integer kernels, or Q/DQ
    in float (exact, float speed). ``reason`` says why, for logs and reports."""

    fused: bool
    reason: str
    quantized: bool = True

    @property
    def label(self) -> str:
        """``fp32`` (nothing quantized), ``int8`` or ``float Q/DQ``, for tables."""
        if not self.quantized:
            return "fp32"
        return "int8" if self.fused else "float Q/DQ"


def weight_level(model) -> int:
    """Largest ``|level|`` of the int8 weights (input B) that a Conv, ConvTranspose, Gemm or
    MatMul reads through a DequantizeLinear: an int8 initializer, or a constant float weight
    behind a QuantizeLinear (computed here). 128, the worst case, where that int8 operand is
    computed at run time. 0 for a float model."""
    from onnx import numpy_helper

    constants = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = node.attribute[0].t

    def value(name):
        return numpy_helper.to_array(constants[name]) if name in constants else None

    level = 0
    for node in model.graph.node:
        dq = producer.get(node.input[1]) if node.op_type in _WEIGHT_READERS \
            and len(node.input) > 1 else None
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        levels, zero = value(dq.input[0]), value(dq.input[2]) if len(dq.input) > 2 else None
        typed = zero if zero is not None else levels  # the one that tells the int type
        if typed is None or typed.dtype != np.int8:
            continue  # uint8 weights: the u8u8 kernels widen to int16 first and do not saturate
        if levels is None:
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                levels = _quantized(value(q.input[0]), value(q.input[1]), zero, q)
        level = max(level, 128 if levels is None else
                    int(np.abs(levels.astype(np.int32)).max(initial=0)))
    return level


def _quantized(weight, scale, zero, q):
    """What QuantizeLinear ``q`` makes of a constant ``weight`` (None if it is not one)."""
    if weight is None or scale is None:
        return None
    axis = next((a.i for a in q.attribute if a.name == "axis"), 1)
    if np.ndim(scale) == 1 and weight.ndim > 1:
        shape = [1] * weight.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    levels = np.rint(weight / scale) + zero.astype(np.float64)
    return np.clip(levels, -128, 127).astype(np.int8)


def cpu_portability_note(model) -> str | None:
    """For a model meant for ONNX Runtime's CPU INT8 kernels: ``None`` if its weights stay
    within +-64 (exact INT8 on every CPU), else a note saying where its INT8 kernels are
    exact and what to do elsewhere. A property of the model, whatever CPU asks."""
    level = weight_level(load_onnx(model))
    if level <= SAFE_WEIGHT_LEVEL:
        return None
    return (f"weights reach +-{level}: ONNX Runtime's INT8 kernels compute this model "
            f"exactly on x86 CPUs with VNNI (AVX512-VNNI, AVX-VNNI); on those "
            f"without VNNI they saturate beyond +-{SAFE_WEIGHT_LEVEL}, where paddle_qat's "
            f"runner computes its Q/DQ in float instead. Train and export with "
            f"QATConfig(weight_bits=7) for INT8 kernels on every CPU")


def _probe_model(weight: int):
    """Q/DQ ops ONNX Runtime fuses, fed the worst case for a saturating pair of products:
    uint8 activations all 255, int8 weights all ``weight``. A 3x3 conv ending in a Q
    (QLinearConv) and a MatMul with a float output (MatMulIntegerToFloat)."""
    from onnx import TensorProto, helper, numpy_helper

    channels = 16

    def constant(name, value, dtype=np.float32):
        return numpy_helper.from_array(np.array(value, dtype), name)

    initializers = [
        constant("x_scale", 1.0), constant("x_zero", 0, np.uint8),
        # 16 * 9 * 255 * 127 = 4.7e6: one output step of 2**16 keeps it inside uint8
        constant("y_scale", 65536.0), constant("y_zero", 0, np.uint8),
        constant("w", np.full((4, channels, 3, 3), weight), np.int8),
        constant("w_scale", np.ones(4)), constant("w_zero", np.zeros(4), np.int8),
        constant("m", np.full((4, 8), weight), np.int8),
        constant("m_scale", 1.0), constant("m_zero", 0, np.int8),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wd"], axis=0),
        helper.make_node("Conv", ["xd", "wd"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["conv", "y_scale", "y_zero"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "y_scale", "y_zero"], ["conv_out"]),
        helper.make_node("DequantizeLinear", ["m", "m_scale", "m_zero"], ["md"]),
        helper.make_node("MatMul", ["xd", "md"], ["matmul_out"]),
    ]
    graph = helper.make_graph(
        nodes, "int8_saturation_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 4, 4])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
         for name in ("conv_out", "matmul_out")], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _run(model, feed: dict, fused: bool) -> list[np.ndarray]:
    import onnxruntime as ort

    options = session_options(KernelChoice(fused, "probe"), threads=1)
    options.log_severity_level = 3  # errors only
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feed)


@functools.cache
def int8_kernels_saturate() -> bool:
    """True when this CPU's fused INT8 kernels give full-range int8 weights another result
    than the same Q/DQ computed in float. Probed once per process (milliseconds)."""
    model = _probe_model(127)
    feed = {"x": np.full((1, 16, 4, 4), 255.0, np.float32)}
    fused, simulated = _run(model, feed, fused=True), _run(model, feed, fused=False)
    return not all(np.array_equal(a, b) for a, b in zip(fused, simulated))


def choose_kernels(model, mode: str = "auto") -> KernelChoice:
    """How to run ``model`` (a path or an ``onnx.ModelProto``) so that it computes what it
    says: see the module docstring. ``mode`` is ``auto``, ``fused`` (integer kernels, even
    where they saturate: for timing) or ``simulated`` (Q/DQ in float)."""
    if mode not in KERNEL_MODES:
        raise QATConfigError(f"unknown INT8 kernel mode {mode!r}; choose one of "
                             f"{list(KERNEL_MODES)}")
    if mode == "simulated":
        return KernelChoice(False, "Q/DQ in float asked for")
    proto = load_onnx(model)
    if not any(node.op_type == "DequantizeLinear" for node in proto.graph.node):
        return KernelChoice(True, "no quantized ops", quantized=False)
    level = weight_level(proto)
    exact = level <= SAFE_WEIGHT_LEVEL or not int8_kernels_saturate()
    if mode == "fused":
        return KernelChoice(True, "fused INT8 kernels asked for" + ("" if exact else (
            f"; this CPU's INT8 kernels saturate weights beyond +-{SAFE_WEIGHT_LEVEL} and "
            f"this model's reach +-{level}: its outputs are not the model's")))
    if level <= SAFE_WEIGHT_LEVEL:
        return KernelChoice(True, f"weight levels within +-{SAFE_WEIGHT_LEVEL} ({level}): "
                                  f"exact on every CPU")
    if exact:
        return KernelChoice(True, "this CPU's INT8 kernels are exact (VNNI or equivalent)")
    return KernelChoice(False, (
        f"this CPU's INT8 kernels saturate int8 weights beyond +-{SAFE_WEIGHT_LEVEL} (no "
        f"VNNI) and this model's reach +-{level}, so ONNX Runtime computes its Q/DQ in float "
        f"(exact, float speed). For INT8 speed on this CPU, train and export with "
        f"QATConfig(weight_bits=7); CPUs with VNNI run the model as it is"))


def session_options(choice: KernelChoice, threads: int | None = None):
    """``onnxruntime.SessionOptions`` that carry out ``choice``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not choice.fused:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    return options


def open_session(model, mode: str = "auto", threads: int | None = None):
    """``(onnxruntime.InferenceSession, KernelChoice)`` for ``model`` (a path or an
    ``onnx.ModelProto``) on the CPU, computing what the model says (see
    :func:`choose_kernels`); falling back to float Q/DQ is logged once per model."""
    import onnxruntime as ort

    proto = load_onnx(model)
    is_path = isinstance(model, (str, Path))
    name = str(model) if is_path else (proto.graph.name or "the ONNX model")
    choice = choose_kernels(proto, mode)
    if not choice.fused and mode == "auto":
        _warn_once(choice.reason, name)
    try:
        session = ort.InferenceSession(str(model) if is_path else proto.SerializeToString(),
                                       session_options(choice, threads),
                                       providers=["CPUExecutionProvider"])
    except Exception as error:  # ORT raises its own Fail/InvalidGraph types
        raise QATError(f"ONNX Runtime cannot load {name}: {error}") from None
    return session, choice


_warned: set[str] = set()


def _warn_once(reason: str, model_name: str) -> None:
    """Once per reason and process: a demo or a sweep opens many models for one cause."""
    if reason not in _warned:
        _warned.add(reason)
        _log.warning("%s: %s", model_name, reason)

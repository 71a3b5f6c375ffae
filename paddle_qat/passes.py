"""Insert Q/DQ into a legacy-IR program with Paddle's ``paddle.static.quantization`` passes.

Paddle's passes do the rewriting; this module decides which ones run and fixes what they get
wrong for deployment:

* the residual-add pass runs on every sub-graph (``quant_aware`` in Paddle 3.3.1 applies it
  to the last one only);
* per-channel weight scales run along the output-channel axis of each op, including a
  ``matmul``/``matmul_v2`` that transposes its weight (Paddle uses axis 1 regardless);
* every new quant variable gets an initializer in the startup program, so running the
  startup program in any scope prepares the quantized program;
* quantizing an eval program never overwrites scales that training already learnt;
* under AMP (O1 or pure FP16/BF16) every quantizer runs in fp32 on the fp32-named tensor, with
  fp32 state (see :mod:`paddle_qat.amp`);
* for ONNX Runtime (``target="onnxruntime"``), quantizers of tensors that cannot be negative
  use the unsigned range, see :func:`paddle_qat.placement.use_unsigned_ranges`;
* the integer range follows ``bit_length``: Paddle 3.3.1's quantize/dequantize kernels read
  the range from the ``qmin``/``qmax`` attributes (default -128/127) and ignore
  ``bit_length``, so without this ``weight_bits=4`` silently trains 8-bit.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np

from . import amp
from .config import WEIGHT_OP_AXES, QATConfig
from .errors import QATError
from .legacy_ir import require_legacy_program
from .placement import share_scales, unquantize_parameter_ops, use_unsigned_ranges
from .program_edit import ir_graphs, one_sync

QUANT_OP_TYPES = ("quantize_linear", "dequantize_linear")
# The Program attribute naming the QATConfig.target a program was quantized for (the export's
# default target; a program read back from files has lost it).
RECORDED_TARGET = "_paddle_qat_target"
_WEIGHT_SLOT = {
    "conv2d": "Filter",
    "depthwise_conv2d": "Filter",
    "conv2d_transpose": "Filter",
    "mul": "Y",
    "matmul": "Y",
    "matmul_v2": "Y",
}


@dataclass(frozen=True)
class QuantizationSummary:
    """What :func:`quantize_program` did, for logs and tests."""

    quantized_ops: tuple[str, ...]  # "op_type:weight_name" of each op given Q/DQ
    skipped_ops: tuple[str, ...]  # the same for quantizable ops left in float
    scale_names: tuple[str, ...]  # every scale variable the program now reads


def weight_axis(op) -> int:
    """Output-channel axis of ``op``'s weight (a legacy ``Operator``)."""
    axis = WEIGHT_OP_AXES[op.type]
    transposed = (op.type == "matmul_v2" and op.attr("trans_y")) or (
        op.type == "matmul" and op.attr("transpose_Y")
    )
    return 0 if transposed else axis


def _weight_name(op, block) -> str | None:
    slot = _WEIGHT_SLOT.get(op.type)
    if slot is None or slot not in op.input_names or not op.input(slot):
        return None
    name = op.input(slot)[0]
    var = block._find_var_recursive(name)
    return name if var is not None and var.persistable else None


def _mark_skipped(program, config: QATConfig) -> tuple[list[str], list[str]]:
    quantized, skipped = [], []
    for block in program.blocks:
        for op in block.ops:
            if op.type not in config.weight_op_types:
                continue
            weight = _weight_name(op, block)
            if weight is None:
                continue
            scope_name = op.attr("op_namescope") if op.has_attr("op_namescope") else ""
            skip = any(fnmatch.fnmatchcase(weight, p) for p in config.skip_weights) or any(
                s in scope_name for s in config.skip_name_scopes
            )
            if skip:
                op._set_attr("skip_quant", True)
            (skipped if skip else quantized).append(f"{op.type}:{weight}")
    return quantized, skipped


def _quant_state_snapshot(scope) -> dict[str, np.ndarray]:
    """Every initialized quant variable already in ``scope``. Paddle's passes initialize the
    variables they create, and their ``state_N`` / ``accum_N`` names restart at 0 under a
    fresh ``unique_name.guard()``: quantizing an eval program after (or while resuming)
    training would reset the training program's moving averages (measured: a resumed run
    diverged from the uninterrupted one)."""
    from .checkpoint import is_quant_state

    saved = {}
    for name in scope.local_var_names():
        if not is_quant_state(name):
            continue
        tensor = scope.find_var(name).get_tensor()
        if tensor._is_initialized():
            saved[name] = np.array(tensor)
    return saved


def _start_scales_at_their_average(program, scope, place, saved: dict[str, np.ndarray]):
    """Start each new moving-average scale at its average's value (accum / state, 1.0), not
    at Paddle's 0.001. A quantizer that observes writes its scale before it quantizes, but the
    members of a shared group that come before the group's observer read the scale as it was:
    on an uncalibrated first step, 0.001 clipped every activation of ShuffleNetV2's channel
    splits to +-0.001 and the training diverged to NaN."""
    for op in program.global_block().ops:
        if op.type != "quantize_linear" or "InState" not in op.input_names or \
                not op.input("InState"):
            continue
        scale, state, accum = (op.input(slot)[0] for slot in ("Scale", "InState", "InAccum"))
        if scale in saved or op.attr("quant_axis") >= 0:
            continue
        values = [scope.find_var(n) for n in (state, accum, scale)]
        if any(v is None or not v.get_tensor()._is_initialized() for v in values):
            continue
        state_value, accum_value, scale_value = (np.array(v.get_tensor()) for v in values)
        start = (accum_value / state_value).astype(scale_value.dtype)
        values[2].get_tensor().set(np.broadcast_to(start, scale_value.shape).copy(), place)


def _restore(scope, place, saved: dict[str, np.ndarray]) -> None:
    for name, value in saved.items():
        var = scope.find_var(name)
        if var is not None:
            var.get_tensor().set(value, place)


# Activations Paddle 3.3.1's AddQuantDequantPassV2 does not know, with their (input, output)
# slots; the pass only needs these to quantize an op's inputs.
_EXTRA_ACTIVATION_SLOTS = {"silu": [["X"], ["Out"]], "mish": [["X"], ["Out"]],
                           "elu": [["X"], ["Out"]]}


def _register_activation_ops() -> None:
    from paddle.static.quantization import quant_config

    for table in (quant_config.SUPPORT_ACT_QUANTIZATION_OP_DICT,
                  quant_config.SUPPORT_QUANTIZATION_OP_DICT):
        for op_type, slots in _EXTRA_ACTIVATION_SLOTS.items():
            table.setdefault(op_type, slots)


def _apply_paddle_passes(program, config: QATConfig, scope, place, for_test: bool):
    from paddle.static.quantization.quantization_pass import (
        AddQuantDequantForResidual,
        AddQuantDequantPassV2,
        OutScaleForTrainingPass,
        QuantizationTransformPassV2,
    )

    _register_activation_ops()
    graph, sub_graphs = ir_graphs(program, for_test)
    passes = [
        QuantizationTransformPassV2(
            scope=scope,
            place=place,
            weight_bits=config.weight_bits,
            activation_bits=config.activation_bits,
            activation_quantize_type=config.algo,
            weight_quantize_type="channel_wise_abs_max" if config.channel_wise else "abs_max",
            moving_rate=config.moving_rate,
            skip_pattern=list(config.skip_name_scopes),
            quantizable_op_type=list(config.weight_op_types),
            is_test=for_test,
        )
    ]
    if config.identity_branch_only:
        passes.append(AddQuantDequantForResidual(
            scope=scope, place=place, quant_bits=config.activation_bits, is_test=for_test))
    if config.quantized_activation_op_types:
        passes.append(AddQuantDequantPassV2(
            scope=scope,
            place=place,
            moving_rate=config.moving_rate,
            quant_bits=config.activation_bits,
            skip_pattern=list(config.skip_name_scopes),
            quantizable_op_type=list(config.quantized_activation_op_types),
            is_test=for_test,
        ))
    if config.collect_output_scales:
        passes.append(OutScaleForTrainingPass(
            scope=scope, place=place, moving_rate=config.moving_rate, is_test=for_test))
    for quant_pass in passes:
        for sub_graph in sub_graphs:
            quant_pass.apply(sub_graph)
    program._rebuild_from_desc(graph.to_program().desc)


def _fix_weight_axes(program, scope, place) -> None:
    """Move per-channel weight scales onto each consumer's output-channel axis."""
    for block in program.blocks:
        producers = {}
        for op in block.ops:
            if op.type in QUANT_OP_TYPES:
                producers[op.output("Y")[0]] = op
        for op in block.ops:
            if op.type not in ("matmul", "matmul_v2"):
                continue
            dq = producers.get(op.input("Y")[0])
            if dq is None or dq.type != "dequantize_linear" or dq.attr("quant_axis") < 0:
                continue
            q = producers.get(dq.input("X")[0])
            if q is None:
                continue
            want = weight_axis(op)
            if dq.attr("quant_axis") == want:
                continue
            weight = block._find_var_recursive(q.input("X")[0])
            channels = weight.shape[want]
            for quant_op in (q, dq):
                quant_op._set_attr("quant_axis", want)
                for slot in ("Scale", "ZeroPoint"):
                    var = block._find_var_recursive(quant_op.input(slot)[0])
                    var.desc.set_shape([channels])
                    tensor = scope.find_var(var.name).get_tensor()
                    old = np.array(tensor)
                    tensor.set(np.full([channels], old.flat[0], dtype=old.dtype), place)


def _set_integer_ranges(program) -> None:
    for block in program.blocks:
        for op in block.ops:
            if op.type in QUANT_OP_TYPES:
                qmax = 2 ** (op.attr("bit_length") - 1) - 1
                op._set_attr("qmax", qmax)
                op._set_attr("qmin", -qmax - 1)


def _stable_state_names(program, scope, place) -> None:
    """Name each quantizer's moving-average state after its output (``X.quantized@state``).

    Paddle's passes call them ``state_N`` / ``accum_N`` in graph-node order, which differs
    from process to process (measured: three runs, three orders), so a checkpoint's
    ``accum_0`` belonged to another quantizer when a new process loaded it.
    """
    block = program.global_block()
    renames = []
    for op in block.ops:
        if "InState" not in op.input_names:
            continue
        output = op.output("Y") if "Y" in op.output_names else op.output("Out")
        for slot, suffix in (("InState", "@state"), ("InAccum", "@accum")):
            if op.input(slot) and output and op.input(slot)[0] != f"{output[0]}{suffix}":
                renames.append((op.input(slot)[0], f"{output[0]}{suffix}"))
    with one_sync(program):
        for old, new in renames:
            if not block.has_var(old):
                continue
            block._rename_var(old, new)
            holder = scope.find_var(old)
            if holder is not None and holder.get_tensor()._is_initialized():
                scope.var(new).get_tensor().set(np.array(holder.get_tensor()), place)


def _add_startup_initializers(program, startup_program, scope) -> None:
    """Give every quant variable of ``program`` an initializer in ``startup_program``."""
    from .checkpoint import is_quant_state

    startup_block = startup_program.global_block()
    for var in program.list_vars():
        if not var.persistable or startup_block.has_var(var.name):
            continue
        if not is_quant_state(var.name):
            continue
        holder = scope.find_var(var.name)
        if holder is None or not holder.get_tensor()._is_initialized():
            continue
        value = np.array(holder.get_tensor())
        out = startup_block.create_var(
            name=var.name, shape=var.shape, dtype=var.dtype, persistable=True)
        if not np.all(value == value.flat[0]):
            raise QATError(f"quant variable {var.name} has a non-uniform initial value")
        startup_block.append_op(
            type="fill_constant",
            outputs={"Out": [out]},
            attrs={"shape": list(value.shape), "dtype": out.dtype,
                   "value": float(value.flat[0])},
        )


def is_quantized(program) -> bool:
    return any(op.type in QUANT_OP_TYPES for block in program.blocks for op in block.ops)


def quantize_program(
    program,
    config: QATConfig | None = None,
    *,
    startup_program=None,
    scope=None,
    place=None,
    for_test: bool = False,
) -> QuantizationSummary:
    """Insert QAT Q/DQ ops into ``program`` in place and return what was quantized.

    ``program`` may be a training program (with backward and optimizer ops) or an eval
    program (``for_test=True``); quantize the eval program with the same config and it reads
    the scale variables that training updates. New quant variables are created in ``scope``
    (default: the global scope) and, when ``startup_program`` is given, get initializers there.

    Example::

        with paddle.static.program_guard(main, startup):
            loss = build_net()
            paddle.optimizer.Momentum(0.01).minimize(loss)
        paddle_qat.quantize_program(main, QATConfig(), startup_program=startup)
        paddle_qat.quantize_program(eval_prog, QATConfig(), for_test=True)
    """
    import paddle

    require_legacy_program(program, "the program to quantize")
    config = QATConfig() if config is None else config
    if is_quantized(program):
        raise QATError(
            "the program already holds quantize_linear/dequantize_linear ops; quantize each "
            "program once (for an eval program, quantize a clone taken before quantization)"
        )
    scope = paddle.static.global_scope() if scope is None else scope
    place = paddle.framework._current_expected_place() if place is None else place

    quantized, skipped = _mark_skipped(program, config)
    saved_state = _quant_state_snapshot(scope)
    hoist_types = set(config.weight_op_types) | set(config.quantized_activation_op_types) | (
        {"elementwise_add"} if config.identity_branch_only else set())
    hoisted = amp.hoist_casts(program, hoist_types)
    _apply_paddle_passes(program, config, scope, place, for_test)
    amp.restore_low_precision(program, scope, place, hoisted, hoist_types)
    _fix_weight_axes(program, scope, place)
    _set_integer_ranges(program)
    _stable_state_names(program, scope, place)
    unquantize_parameter_ops(program)
    if config.share_scales:
        share_scales(program)
    if config.unsigned_activations:
        use_unsigned_ranges(program)
    _start_scales_at_their_average(program, scope, place, saved_state)
    _restore(scope, place, saved_state)
    setattr(program, RECORDED_TARGET, config.target)
    if startup_program is not None:
        _add_startup_initializers(program, startup_program, scope)
    scales = sorted({
        op.input("Scale")[0]
        for block in program.blocks
        for op in block.ops
        if op.type in QUANT_OP_TYPES
    })
    return QuantizationSummary(tuple(quantized), tuple(skipped), tuple(scales))

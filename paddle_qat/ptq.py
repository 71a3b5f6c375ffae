"""Post-training quantization (PTQ) of a static program, and PTQ-initialised QAT.

:func:`calibrate` fills the scales of a quantized eval program from data: weights get their
abs-max (per output channel when the program says so), activations the threshold a
:class:`~paddle_qat.calibration.ActivationCalibrator` picks from the float model's
activations. The result is a PTQ model with the same Q/DQ placement as QAT, so it exports,
checks and runs exactly like one. Given the training program too, it also starts QAT's
moving averages from those thresholds.

Example::

    eval_prog = main.clone(for_test=True)            # before minimize
    paddle_qat.quantize_program(eval_prog, config, for_test=True)
    paddle_qat.ptq.calibrate(eval_prog, batches, CalibrationConfig(method="entropy"))
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .calibration import ActivationCalibrator, CalibrationConfig
from .errors import QATError
from .placement import activation_quantizers

# A moving average with decay 0.9 that has seen many batches has state 1 / (1 - 0.9).
_STEADY_STATE = 10.0


def _quantizers(program):
    """(weight quantize_linear ops, activation quantize_linear ops) of ``program``."""
    block = program.global_block()
    activations = activation_quantizers(block)
    data = {id(op) for op in activations}
    weights = [op for op in block.ops if op.type == "quantize_linear" and id(op) not in data]
    return weights, activations


def _set(scope, name: str, value: np.ndarray, place) -> None:
    scope.find_var(name).get_tensor().set(np.asarray(value, np.float32), place)


def weight_scales(program, scope) -> dict[str, np.ndarray]:
    """Abs-max scale of every quantized weight (per channel along the op's quant_axis)."""
    scales = {}
    for op in _quantizers(program)[0]:
        weight = np.array(scope.find_var(op.input("X")[0]).get_tensor())
        axis = op.attr("quant_axis")
        if axis >= 0:
            reduce = tuple(d for d in range(weight.ndim) if d != axis)
            scale = np.abs(weight).max(axis=reduce)
        else:
            scale = np.abs(weight).max().reshape(1)
        scales[op.input("Scale")[0]] = np.maximum(scale, 1e-8).astype(np.float32)
    return scales


def calibrate(program, batches: Iterable[dict], config: CalibrationConfig | None = None, *,
              scope=None, place=None, train_program=None) -> dict[str, float]:
    """Set every scale of the quantized eval ``program`` from data; returns the activation
    thresholds by tensor name.

    ``batches`` yields feed dicts for the program. With ``train_program`` (the QAT training
    program sharing ``scope``), its moving-average state and accum are set as if they had
    averaged the calibrated threshold for many steps, so QAT starts from PTQ's scales.
    """
    import paddle

    from .export.quant_map import strip_quant_ops

    scope = paddle.static.global_scope() if scope is None else scope
    place = paddle.CPUPlace() if place is None else place
    weights, activations = _quantizers(program)
    if not weights and not activations:
        raise QATError("the program holds no quantize_linear ops: quantize it with "
                       "paddle_qat.quantize_program(program, for_test=True) before calibrating")
    for name, scale in weight_scales(program, scope).items():
        _set(scope, name, scale, place)

    tensors = sorted({op.input("X")[0] for op in activations})
    float_program = strip_quant_ops(program)
    calibrator = ActivationCalibrator(config)
    exe = paddle.static.Executor(place)
    with paddle.static.scope_guard(scope):
        for feed in batches:
            values = exe.run(float_program, feed=feed, fetch_list=tensors)
            calibrator.collect(dict(zip(tensors, values)))
    thresholds = calibrator.thresholds(
        unsigned={op.input("X")[0] for op in activations if op.attr("qmin") == 0})
    by_scale = _shared_thresholds(activations, thresholds)
    for scale, threshold in by_scale.items():
        _set(scope, scale, [threshold], place)
    if train_program is not None:
        _start_moving_averages(train_program, scope, place, by_scale)
    return thresholds


def _shared_thresholds(activations, thresholds) -> dict[str, float]:
    """One threshold per scale variable: the largest of the tensors that share it (a Concat's
    inputs and output, a pool's input and output; see placement.share_scales), so none of
    them is clipped by another's smaller range."""
    by_scale: dict[str, float] = {}
    for op in activations:
        scale = op.input("Scale")[0]
        by_scale[scale] = max(by_scale.get(scale, 0.0), thresholds[op.input("X")[0]])
    return by_scale


def _start_moving_averages(train_program, scope, place, by_scale) -> None:
    for op in _quantizers(train_program)[1]:
        threshold = by_scale.get(op.input("Scale")[0])
        if threshold is None or "InState" not in op.input_names or not op.input("InState"):
            continue
        _set(scope, op.input("Scale")[0], [threshold], place)
        _set(scope, op.input("InState")[0], [_STEADY_STATE], place)
        _set(scope, op.input("InAccum")[0], [_STEADY_STATE * threshold], place)

"""Dygraph quanters that simulate exactly what the exported ONNX computes.

Paddle 3.3.1's dygraph quanters are per-tensor only, and its moving-average quanter clips to
[-127, 127] where ONNX's QuantizeLinear saturates at -128, so a negative activation beyond
the scale came out one step different after export (measured). These quanters simulate
levels in [-qmax - 1, qmax]: per-channel abs-max for weights (what a static program's
``channel_wise_abs_max`` does) and a moving-average abs-max for activations (Paddle's
update, 0.9 decay). Traced for ``paddle.jit.save``, each writes the ``quantize_linear`` /
``dequantize_linear`` pair a static QAT program holds, so the saved model exports through
:mod:`paddle_qat.export` like a static one.
"""

from __future__ import annotations

import paddle
from paddle.quantization.base_quanter import BaseQuanter
from paddle.quantization.factory import QuanterFactory

# 1.5 * 2**23. A float32 below 2**22 in magnitude plus this has no fraction bits left, so
# the addition itself rounds to the nearest integer, ties to even (IEEE 754's default, what
# ONNX QuantizeLinear and Paddle's quantize_linear do), and subtracting it back is exact.
# Two in-place ops, and the tie rule is IEEE's, not whichever one a paddle.round kernel
# implements (3.3.1's CPU kernel rounds ties to even; the where(tie, ...) guard this
# replaces, nine activation-sized tensors per quantizer, was written for one that did not).
_ROUNDER = 12582912.0


def _round_clipped_(levels, qmax: int):
    """In place on a float32 no-grad tensor: clip to [-qmax - 1, qmax], then round half to
    even. Clipping first is the same as clipping after (the bounds are integers) and keeps
    the values far below 2**22."""
    levels.clip_(-qmax - 1, qmax)
    levels.scale_(1.0, _ROUNDER)
    levels.scale_(1.0, -_ROUNDER)
    return levels


def _float32(x):
    return x if x.dtype == paddle.float32 else x.astype("float32")


def _onto_grid(x, x32, levels, step, qmax: int):
    """``x`` moved to ``round(levels)`` x ``step``, ``levels`` clipped to [-qmax - 1, qmax]
    (``levels`` is float32 ``x`` over its step, and is overwritten); the gradient passes
    straight through: ``x`` plus a detached offset, formed in place in ``levels``."""
    with paddle.no_grad():
        offset = _round_clipped_(levels, qmax)
        offset.multiply_(step)
        offset.subtract_(x32)
        if offset.dtype != x.dtype:
            offset = offset.astype(x.dtype)
    return x + offset


def _fake_quant(x, step, qmax: int):
    """``x`` on the integer grid ``step`` x [-qmax - 1, qmax], computed in float32 like the
    exported model (x / step, as QuantizeLinear); gradient straight through."""
    with paddle.no_grad():
        x32 = _float32(x)
        levels = x32 / step
    return _onto_grid(x, x32, levels, step, qmax)


def _keep_fp32(layer) -> None:
    """AMP O2 (``paddle.amp.decorate``, fleet's ``distributed_model``) casts every layer's
    parameters to float16 unless the layer opts out; quant state must stay float32 (the
    static programs keep it so too: paddle_qat.amp)."""
    layer._cast_to_low_precision = False


def _state(layer, name: str, shape: list, dtype: str = "float32", value: float = 1.0):
    """A non-trainable parameter: saved by ``paddle.jit.save``, broadcast by DataParallel."""
    tensor = layer.create_parameter(
        shape=shape, dtype=dtype, is_bias=False,
        attr=paddle.ParamAttr(name=paddle.utils.unique_name.generate(name),
                              initializer=paddle.nn.initializer.Constant(value),
                              trainable=False))
    tensor.stop_gradient = True
    return tensor


def _append_qdq(x, scale, zero_point, axis: int, bits: int):
    """Trace (``paddle.jit.save``): the quantize_linear / dequantize_linear pair on ``x``."""
    block = paddle.static.default_main_program().current_block()
    qmax = 2 ** (bits - 1) - 1
    # round_type 0 (half to even): with 1, Paddle's kernel ignores qmin and clips at -qmax.
    attrs = {"quant_axis": axis, "bit_length": bits, "qmin": -qmax - 1, "qmax": qmax,
             "round_type": 0}
    levels = block.create_var(name=f"{x.name}.quantized", dtype=x.dtype, shape=x.shape)
    simulated = block.create_var(name=f"{x.name}.quantized.dequantized", dtype=x.dtype,
                                 shape=x.shape)
    inputs = {"Scale": [scale], "ZeroPoint": [zero_point]}
    block.append_op(type="quantize_linear", inputs={"X": [x], **inputs},
                    outputs={"Y": [levels]}, attrs=attrs)
    block.append_op(type="dequantize_linear", inputs={"X": [levels], **inputs},
                    outputs={"Y": [simulated]}, attrs=attrs)
    return simulated


def output_channel_axis(layer) -> int:
    """The weight axis that per-channel scales run along (Conv2D: 0, Linear [in, out]: 1)."""
    if isinstance(layer, paddle.nn.Linear):
        return 1
    if isinstance(layer, (paddle.nn.Conv2D, paddle.nn.Conv1D, paddle.nn.Conv3D)):
        return 0
    raise TypeError(f"no per-channel weight axis known for {type(layer).__name__}")


class AbsMaxWeightQuanter(QuanterFactory):
    """Factory for :class:`AbsMaxWeightQuanterLayer`, for ``QuantConfig``.

    Example::

        config = QuantConfig(activation=None, weight=None)
        config.add_type_config(paddle.nn.Conv2D, weight=AbsMaxWeightQuanter(bit_length=8))
    """

    def __init__(self, bit_length: int = 8, per_channel: bool = True):
        super().__init__(bit_length=bit_length, per_channel=per_channel)

    def _get_class(self):
        return AbsMaxWeightQuanterLayer


class AbsMaxWeightQuanterLayer(BaseQuanter):
    """Fake-quantizes a weight with the abs-max of the current weight as scale: one per
    output channel (``per_channel``) or one for the tensor.

    Forward: ``round(w / s * qmax) * s / qmax``, levels in [-qmax - 1, qmax]; the gradient
    passes straight through to ``w``.
    """

    def __init__(self, layer, bit_length: int = 8, per_channel: bool = True):
        super().__init__()
        self._bit_length = bit_length
        self._qmax = 2 ** (bit_length - 1) - 1
        _keep_fp32(self)
        self._axis = output_channel_axis(layer) if per_channel else -1
        channels = layer.weight.shape[self._axis] if per_channel else 1
        self._scale = _state(self, "weight_quant.scale", [channels])
        self._zero_point = _state(self, "weight_quant.zero_point", [channels], "int32", 0)

    def forward(self, weight):
        if not paddle.in_dynamic_mode():
            return _append_qdq(weight, self._scale, self._zero_point, self._axis,
                               self._bit_length)
        shape = [1] * weight.ndim
        with paddle.no_grad():
            w32 = _float32(weight)
            if self._axis >= 0:
                reduce = [d for d in range(weight.ndim) if d != self._axis]
                shape[self._axis] = -1
                # max |w| per channel without a |w| tensor the size of the weight
                scale = paddle.maximum(w32.max(axis=reduce), -w32.min(axis=reduce))
            else:
                scale = paddle.maximum(w32.max(), -w32.min()).reshape([1])
            scale = paddle.maximum(scale, paddle.to_tensor(1e-8))
            paddle.assign(scale, self._scale)
            # The export stores round(qmax * (1 / s) * w) (Paddle's quantize_linear kernel,
            # export.qdq_insert.quantize_weight); w / (s / qmax) rounds a weight within an ulp
            # of a half step the other way (one weight of ResNet18's 11 M, measured)
            ratio = (self._qmax * (1.0 / scale)).reshape(shape)
            levels = ratio * w32
            step = (scale / self._qmax).reshape(shape)
        return _onto_grid(weight, w32, levels, step, self._qmax)

    def bit_length(self):
        return self._bit_length

    def quant_axis(self):
        return self._axis

    def scales(self):
        return self._scale

    def zero_points(self):
        return self._zero_point



class MovingAverageActivationQuanter(QuanterFactory):
    """Factory for :class:`MovingAverageActivationQuanterLayer`, for ``QuantConfig``."""

    def __init__(self, bit_length: int = 8, moving_rate: float = 0.9):
        super().__init__(bit_length=bit_length, moving_rate=moving_rate)

    def _get_class(self):
        return MovingAverageActivationQuanterLayer


class MovingAverageActivationQuanterLayer(BaseQuanter):
    """Fake-quantizes an activation with a moving-average abs-max scale.

    Training updates ``state = r * state + 1``, ``accum = r * accum + max|x|``,
    ``scale = accum / state`` (Paddle's moving average, the same initial values), then
    quantizes with the new scale; eval uses the stored scale. Levels are [-qmax - 1, qmax].
    ``_scale`` / ``_state`` / ``_accum`` are what :mod:`.state_sync` averages across ranks.
    """

    def __init__(self, layer, bit_length: int = 8, moving_rate: float = 0.9):
        super().__init__()
        self._bit_length = bit_length
        self._qmax = 2 ** (bit_length - 1) - 1
        self._moving_rate = moving_rate
        _keep_fp32(self)
        self._scale = _state(self, "activation_quant.scale", [1], value=0.001)
        self._state = _state(self, "activation_quant.state", [1])
        self._accum = _state(self, "activation_quant.accum", [1])
        self._zero_point = _state(self, "activation_quant.zero_point", [1], "int32", 0)

    def forward(self, x):
        if not paddle.in_dynamic_mode():
            return _append_qdq(x, self._scale, self._zero_point, -1, self._bit_length)
        if self.training:
            with paddle.no_grad():
                rate = self._moving_rate
                paddle.assign(rate * self._state + 1, self._state)
                # max |x| without an |x| tensor the size of the activation
                largest = paddle.maximum(x.max(), -x.min()).astype("float32")
                paddle.assign(rate * self._accum + largest, self._accum)
                paddle.assign(self._accum / self._state, self._scale)
        return _fake_quant(x, self._scale / self._qmax, self._qmax)

    def bit_length(self):
        return self._bit_length

    def quant_axis(self):
        return -1

    def scales(self):
        return self._scale

    def zero_points(self):
        return self._zero_point


def refresh_weight_scales(model) -> int:
    """Recompute every weight scale from the current weights (the stored scale
    dates from the last forward, before the last optimizer step); returns how many."""
    count = 0
    with paddle.no_grad():
        for _, layer in model.named_sublayers(include_self=True):
            quanter = getattr(layer, "weight_quanter", None)
            if isinstance(quanter, AbsMaxWeightQuanterLayer):
                quanter(layer.weight)
                count += 1
    return count

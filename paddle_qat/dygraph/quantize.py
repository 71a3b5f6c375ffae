"""Quantize a dygraph model for QAT with ``paddle.quantization`` and paddle_qat's quanters."""

from __future__ import annotations

import fnmatch

from ..config import QATConfig
from ..errors import QATConfigError


def _check_dygraph_config(config: QATConfig) -> None:
    if config.target != "tensorrt":
        raise QATConfigError(
            f"QATConfig(target={config.target!r}) is built for static programs (fleet "
            f"minimize / quantize_program); dygraph QAT trains TensorRT's placement. Train with "
            f"the static fleet API for the {config.target} target")
    if config.activation_op_types or config.collect_output_scales:
        raise QATConfigError(
            "dygraph QAT quantizes Conv and Linear layers (input and weight) only; "
            "QATConfig.activation_op_types and collect_output_scales apply to static programs. "
            "Leave them at their defaults, or train with the static fleet API")


def _to_quantize(model, config: QATConfig) -> list:
    """Conv2D and Linear sublayers, less those whose path contains a ``skip_name_scopes``
    entry or whose weight name matches a ``skip_weights`` pattern."""
    import paddle

    chosen = []
    for path, layer in model.named_sublayers(include_self=True):
        if not isinstance(layer, (paddle.nn.Conv2D, paddle.nn.Linear)):
            continue
        if any(scope and scope in path for scope in config.skip_name_scopes):
            continue
        if any(fnmatch.fnmatchcase(layer.weight.name, p) for p in config.skip_weights):
            continue
        chosen.append(layer)
    return chosen


def quantize_model(model, config: QATConfig | None = None, *, inplace: bool = False,
                   sync: bool = True, group=None):
    """A QAT version of ``model``: Conv2D and Linear quantized on input and weight, and the
    identity branch of every registered residual block's add (``paddle.vision`` ResNet and
    MobileNetV2 blocks; :func:`paddle_qat.dygraph.register_residual_block` for your own).

    Weights get one scale per output channel when ``config.channel_wise`` (the default,
    what TensorRT wants), activations a moving-average abs-max scale. With more than one
    rank and ``sync``, quant state and BatchNorm statistics are averaged across ``group``
    before every training forward (see :mod:`paddle_qat.dygraph.state_sync`).

    ``inplace=True`` keeps the model's parameter objects, so an optimizer created before
    this call still trains them (what ``fleet.distributed_model`` with ``strategy.qat``
    uses).

    Example::

        model = paddle.DataParallel(paddle_qat.dygraph.quantize_model(model))
    """
    import paddle
    from paddle.quantization import QAT, QuantConfig

    from .quanters import AbsMaxWeightQuanter, MovingAverageActivationQuanter
    from .residual import quantize_residuals
    from .state_sync import enable_state_sync

    config = QATConfig() if config is None else config
    _check_dygraph_config(config)
    activation = MovingAverageActivationQuanter(bit_length=config.activation_bits,
                                                moving_rate=config.moving_rate)
    weight = AbsMaxWeightQuanter(bit_length=config.weight_bits,
                                      per_channel=config.channel_wise)
    quant_config = QuantConfig(activation=None, weight=None)
    layers = _to_quantize(model, config)
    if layers:
        quant_config.add_layer_config(layers, activation=activation, weight=weight)
    quantized = QAT(quant_config).quantize(model, inplace=inplace)
    quantize_residuals(quantized, config)
    if sync and paddle.distributed.get_world_size() > 1:
        enable_state_sync(quantized, group)
    return quantized

"""QAT for dynamic-graph (dygraph) data-parallel training, with quant state synced across ranks.

``paddle.quantization`` QAT puts a moving-average abs-max quanter on each layer's input and
weight; under ``DataParallel`` each rank's quanters learn from that rank's batches only, so
scales drift apart (the weights stay equal: their gradients are all-reduced, the quanter state
is not a gradient). :func:`quantize_model` quantizes a model and, when more than one rank
runs, averages every quanter's scale / state / accum across ranks before each training
forward (and once more in :func:`export_ready`), in one fused all-reduce. BatchNorm running
statistics are rank-local for the same reason and are averaged in the same all-reduce, so
every rank holds (and exports) the same model::

    model = paddle.DataParallel(paddle_qat.dygraph.quantize_model(model))
    ...train...
    paddle_qat.dygraph.export_ready(model)

(``strategy.qat = True`` inside ``fleet.distributed_model`` is not wired up yet.)

Limit (Paddle 3.3.1): ``paddle.quantization`` has only per-tensor quanters, so dygraph weights
are quantized per tensor; static programs get per-channel weight scales.
"""

from __future__ import annotations

from .config import QATConfig

QUANTIZED_LAYERS = ("Conv2D", "Linear")
STATE_ATTRS = ("_scale", "_state", "_accum")


def quantize_model(model, config: QATConfig | None = None, *, sync: bool = True):
    """A QAT copy of ``model`` (Conv2D and Linear quantized); syncs state when >1 rank."""
    import paddle
    from paddle.quantization import QAT, QuantConfig
    from paddle.quantization.quanters import FakeQuanterWithAbsMaxObserver

    config = QATConfig() if config is None else config
    activation = FakeQuanterWithAbsMaxObserver(moving_rate=config.moving_rate,
                                               bit_length=config.activation_bits)
    weight = FakeQuanterWithAbsMaxObserver(moving_rate=config.moving_rate,
                                           bit_length=config.weight_bits)
    quant_config = QuantConfig(activation=None, weight=None)
    quant_config.add_type_config([paddle.nn.Conv2D, paddle.nn.Linear], activation=activation,
                                 weight=weight)
    quantized = QAT(quant_config).quantize(model, inplace=False)
    if sync and paddle.distributed.get_world_size() > 1:
        enable_state_sync(quantized)
    return quantized


def quant_state(model) -> list:
    """Every quanter state tensor of ``model`` (scale, state, accum), in a fixed order."""
    tensors = []
    for _, layer in model.named_sublayers(include_self=True):
        if all(hasattr(layer, a) for a in STATE_ATTRS):
            tensors.extend(getattr(layer, a) for a in STATE_ATTRS)
    return tensors


def running_stats(model) -> list:
    """BatchNorm running mean / variance: rank-local too under DataParallel."""
    from paddle.nn.layer.norm import _BatchNormBase

    return [t for _, layer in model.named_sublayers(include_self=True)
            if isinstance(layer, _BatchNormBase) for t in (layer._mean, layer._variance)]


def sync_quant_state(model, group=None) -> int:
    """Average quant state and BatchNorm running statistics over the ranks of ``group`` in
    place (so every rank holds, and exports, the same model); returns tensors synced."""
    import paddle
    import paddle.distributed as dist

    tensors = quant_state(model) + running_stats(model)
    world = dist.get_world_size(group) if group is not None else dist.get_world_size()
    if not tensors or world < 2:
        return 0
    with paddle.no_grad():
        flat = paddle.concat([t.reshape([-1]) for t in tensors])
        dist.all_reduce(flat, group=group)
        flat = flat / world
        offset = 0
        for tensor in tensors:
            size = int(tensor.size)
            paddle.assign(flat[offset:offset + size].reshape(tensor.shape), tensor)
            offset += size
    return len(tensors)


def enable_state_sync(model, group=None):
    """Sync the quant state before every training-mode forward of ``model``; returns the hook
    handle (``handle.remove()`` turns it off).

    Before, not after: the state is an input of this step's backward, so it may only change
    between steps. Call :func:`sync_quant_state` once more after the last step, before saving
    or exporting (:func:`paddle_qat.dygraph.export_ready` does).
    """

    def before_forward(layer, inputs):
        if layer.training:
            sync_quant_state(layer, group)
        return None

    return model.register_forward_pre_hook(before_forward)


def export_ready(model, group=None):
    """Sync the state one last time and switch to eval: every rank now holds the same model."""
    sync_quant_state(model, group)
    model.eval()
    return model

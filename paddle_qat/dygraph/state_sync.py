"""Quant state and BatchNorm statistics averaged across data-parallel ranks.

Under ``DataParallel`` each rank's quanters learn from that rank's batches only, so scales
drift apart (the weights stay equal: their gradients are all-reduced, the quanter state is
not a gradient). BatchNorm running statistics are rank-local for the same reason. One fused
all-reduce before each training forward averages both, so every rank holds (and exports)
the same model.
"""

from __future__ import annotations

STATE_ATTRS = ("_scale", "_state", "_accum")


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
    """Sync the state one last time, refresh weight scales, switch to eval: every rank now
    holds the same model, and its saved scales match its weights."""
    from .quanters import refresh_weight_scales

    sync_quant_state(model, group)
    refresh_weight_scales(model)
    model.eval()
    return model

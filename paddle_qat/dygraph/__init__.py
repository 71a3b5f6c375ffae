"""QAT for dynamic-graph (dygraph) training, data parallel included.

Either through fleet (``strategy.qat = True``; ``fleet.distributed_model`` quantizes the
model in place) or with one call::

    model = paddle.DataParallel(paddle_qat.dygraph.quantize_model(model))
    ...train...
    paddle_qat.dygraph.export_onnx(model, [InputSpec([None, 3, 224, 224], "float32")],
                                   "qat.onnx")   # on every rank: the last sync is collective

Conv2D and Linear layers are quantized: per-channel weight scales (``QATConfig.channel_wise``)
and moving-average activation scales, and so is the identity branch of every residual add in
a registered block (``paddle.vision``'s ResNet and MobileNetV2 blocks;
:func:`register_residual_block` for your own); quant state and BatchNorm statistics are
averaged across ranks before every training forward.
"""

from .export import export_onnx
from .quantize import quantize_model
from .residual import register_residual_block
from .state_sync import (
           enable_state_sync,
           export_ready,
           quant_state,
           running_stats,
           sync_quant_state,
)

__all__ = ["enable_state_sync", "export_onnx", "export_ready", "quant_state", "quantize_model",
           "register_residual_block", "running_stats", "sync_quant_state"]

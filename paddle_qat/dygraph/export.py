"""Dygraph QAT model -> Paddle inference model (quant ops kept) -> ONNX with INT8 Q/DQ."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path


def _inner(model):
    """The user's model inside DataParallel and fleet's wrappers (not any ``_layers``)."""
    import paddle
    from paddle.distributed.fleet.meta_parallel import MetaParallelBase

    while isinstance(model, (paddle.DataParallel, MetaParallelBase)):
        model = model._layers
    return model


def export_onnx(model, input_spec, onnx_path, *, paddle_prefix=None, group=None,
                opset: int = 13):
    """Export a dygraph QAT model (plain, ``DataParallel`` or fleet-wrapped) to ONNX.

    Syncs quant state and BatchNorm statistics across ``group`` one last time (a collective:
    call it on every rank), switches the model to eval, saves it with ``paddle.jit.save``
    (legacy IR, quant ops kept; written to ``paddle_prefix`` too when given) and exports that
    through :func:`paddle_qat.export.export_paddle_model`, which places the Q/DQ and checks
    TensorRT's rules. Returns a :class:`paddle_qat.export.SavedExport`.

    Example::

        export_onnx(model, [InputSpec([None, 3, 32, 32], "float32", "image")], "qat.onnx")
    """
    import paddle

    from ..export.saved import export_paddle_model
    from ..legacy_ir import ensure_legacy_ir
    from .state_sync import export_ready

    ensure_legacy_ir()
    layer = _inner(model)
    export_ready(layer, group)
    target = None if paddle_prefix is None else Path(paddle_prefix)
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
    # Beside the target, so the final os.replace stays on one filesystem (atomic).
    with tempfile.TemporaryDirectory(prefix=".paddle_qat_dygraph_",
                                     dir=None if target is None else target.parent) as tmp:
        prefix = Path(tmp) / "model"
        paddle.jit.save(layer, str(prefix), input_spec=list(input_spec))
        try:
            result = export_paddle_model(prefix, onnx_path, opset=opset)
        finally:
            paddle.disable_static()  # reading the saved program switched Paddle to static
        if target is not None:
            for suffix in (".pdmodel", ".pdiparams"):
                os.replace(f"{prefix}{suffix}", f"{target}{suffix}")
            result = dataclasses.replace(
                result, paddle_model=(f"{target}.pdmodel", f"{target}.pdiparams"))
    return result

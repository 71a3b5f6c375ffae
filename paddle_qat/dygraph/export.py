"""Dygraph QAT model -> Paddle inference model (quant ops kept) -> ONNX with INT8 Q/DQ."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

from ..export.atomic import atomic_path


def _inner(model):
    """The user's model inside DataParallel and fleet's wrappers (not any ``_layers``)."""
    import paddle
    from paddle.distributed.fleet.meta_parallel import MetaParallelBase

    while isinstance(model, (paddle.DataParallel, MetaParallelBase)):
        model = model._layers
    return model


def _check_for_tensorrt(onnx_path) -> None:
    """TensorRT's rules on a dygraph export, with the advice that fits dygraph QAT."""
    from ..errors import QATError
    from ..export.checker import check_model

    violations = list(check_model(str(onnx_path)))
    if not violations:
        return
    listing = "\n".join(f"  - {v}" for v in violations)
    if all(v.rule == 7 for v in violations):
        raise QATError(
            f"the exported ONNX has {len(violations)} residual add(s) whose identity branch "
            f"has no Q/DQ (TensorRT rule 7):\n{listing}\nDygraph QAT quantizes the identity "
            f"branch of the residual blocks it knows (paddle.vision's ResNet and MobileNetV2 "
            f"blocks), not an x + y in another forward, so TensorRT would run these adds in "
            f"float after the INT8 conv: slower, not wrong. Register your block before "
            f"quantize_model (paddle_qat.dygraph.register_residual_block(MyBlock, "
            f"input_convs=('conv1',)) when the add reads the block input), export with "
            f"check=False to accept the float adds, or train with static fleet QAT "
            f"(strategy.qat = True on a static program), which quantizes every identity branch")
    raise QATError(f"the exported ONNX has {len(violations)} violation(s) of TensorRT's Q/DQ "
                   f"rules:\n{listing}")


def export_onnx(model, input_spec, onnx_path, *, paddle_prefix=None, group=None,
                opset: int = 13, check: bool = True):
    """Export a dygraph QAT model (plain, ``DataParallel`` or fleet-wrapped) to ONNX.

    Syncs quant state and BatchNorm statistics across ``group`` one last time (a collective:
    call it on every rank), switches the model to eval, saves it with ``paddle.jit.save``
    (legacy IR, quant ops kept; written to ``paddle_prefix`` too when given) and exports that
    through :func:`paddle_qat.export.export_paddle_model`, which places the Q/DQ, and checks
    TensorRT's rules (``check=False`` skips that). Dygraph QAT quantizes Conv2D and Linear
    layers, not the ``x + y`` of a residual block, so TensorRT would run those adds in float
    after the INT8 conv (rule 7): the check names them and the way out. The file is written
    only when the check passes (an existing one is kept otherwise). Returns a
    :class:`paddle_qat.export.SavedExport`.

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
            with atomic_path(onnx_path) as onnx_tmp:
                result = export_paddle_model(prefix, onnx_tmp, opset=opset, check=False,
                                             target="tensorrt")  # dygraph QAT's only one
                if check:
                    _check_for_tensorrt(onnx_tmp)
            result = dataclasses.replace(result, onnx_path=Path(onnx_path))
        finally:
            paddle.disable_static()  # reading the saved program switched Paddle to static
        if target is not None:
            for suffix in (".pdmodel", ".pdiparams"):
                os.replace(f"{prefix}{suffix}", f"{target}{suffix}")
            result = dataclasses.replace(
                result, paddle_model=(f"{target}.pdmodel", f"{target}.pdiparams"))
    return result

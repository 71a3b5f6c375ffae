"""ONNX Runtime's own static PTQ of a float ONNX model: the baseline to compare QAT with.

``quantize_static`` in QDQ format with per-channel int8 weights, calibrated on the given
images, with the settings of a deployment target (as ``QATConfig.target``):

* ``"tensorrt"``: int8 symmetric activations, the only kind TensorRT accepts;
* ``"onnxruntime"``: ONNX Runtime's recommended CPU recipe: ``quant_pre_process`` first
  (folds batch norms into convs), then uint8 asymmetric activations, so ``Relu`` folds
  into the quantizer and every conv gets an INT8 kernel.

Example::

    ort_ptq("fp32.onnx", "ptq_ort.onnx", calibration_images, method="MinMax")
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from ..errors import QATError
from .atomic import atomic_path

ORT_METHODS = ("MinMax", "Entropy", "Percentile")


def ort_ptq(float_onnx, out_path, images: np.ndarray, *, method: str = "MinMax",
            batch: int = 32, target: str = "tensorrt", reduce_range: bool = False) -> Path:
    """Quantize ``float_onnx`` with ONNX Runtime's ``quantize_static``; returns ``out_path``.

    ``reduce_range``: 7-bit weights, ONNX Runtime's own remedy for CPUs without VNNI, whose
    INT8 kernels saturate larger weights (see :mod:`paddle_qat.runtime.int8_kernels`)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from ..config import TARGETS

    if target not in TARGETS:
        raise QATError(f"PTQ target {target!r}: use one of {list(TARGETS)}")
    if method not in ORT_METHODS:
        raise QATError(f"ONNX Runtime calibration method {method!r}: use one of "
                       f"{list(ORT_METHODS)}")
    float_onnx = Path(float_onnx)
    if not float_onnx.is_file():
        raise QATError(f"float ONNX model {float_onnx} does not exist")
    input_name = onnx.load(str(float_onnx)).graph.input[0].name

    class Images(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{input_name: images[i:i + batch].astype(np.float32)}
                                 for i in range(0, len(images), batch)])

        def get_next(self):
            return next(self.batches, None)

    import onnxruntime

    cpu = target == "onnxruntime"
    out_path = Path(out_path)
    # quant_pre_process and calibration sessions warn about every initializer BN folding
    # left behind (16 lines on the demo); the written model has none.
    onnxruntime.set_default_logger_severity(3)
    with atomic_path(out_path) as tmp, tempfile.TemporaryDirectory() as work:
        source = str(float_onnx)
        if cpu:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            source = str(Path(work) / "preprocessed.onnx")
            quant_pre_process(str(float_onnx), source, skip_symbolic_shape=True)
        quantize_static(source, str(tmp), Images(), quant_format=QuantFormat.QDQ,
                        per_channel=True,
                        activation_type=QuantType.QUInt8 if cpu else QuantType.QInt8,
                        weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, method),
                        reduce_range=reduce_range,
                        extra_options={"ActivationSymmetric": not cpu,
                                       "WeightSymmetric": True})
    onnxruntime.set_default_logger_severity(2)  # ONNX Runtime's default: warnings
    return out_path

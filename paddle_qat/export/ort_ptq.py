"""ONNX Runtime's own static PTQ of a float ONNX model: the baseline to compare QAT with.

``quantize_static`` in QDQ format with int8 symmetric activations and per-channel int8
weights, the settings TensorRT accepts, calibrated on the given images.

Example::

    ort_ptq("fp32.onnx", "ptq_ort.onnx", calibration_images, method="MinMax")
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import QATError
from .atomic import atomic_path

ORT_METHODS = ("MinMax", "Entropy", "Percentile")


def ort_ptq(float_onnx, out_path, images: np.ndarray, *, method: str = "MinMax",
            batch: int = 32) -> Path:
    """Quantize ``float_onnx`` with ONNX Runtime's ``quantize_static``; returns ``out_path``."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

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

    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        quantize_static(str(float_onnx), str(tmp), Images(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, method),
                        extra_options={"ActivationSymmetric": True,
                                       "WeightSymmetric": True})
    return out_path

"""ONNX Runtime on CPU: the runtime every machine has."""

from __future__ import annotations

import numpy as np

from ..errors import QATError
from .int8_kernels import open_session


class OnnxRuntimeRunner:
    """One ONNX Runtime CPU session with a single input and the first output returned.

    ``int8_kernels`` (``auto``, ``fused``, ``simulated``): ``auto`` uses ONNX Runtime's fused
    INT8 kernels wherever they compute the model exactly, and Q/DQ in float where this CPU's
    kernels would saturate its weights (see :mod:`paddle_qat.runtime.int8_kernels`);
    ``runner.kernels`` says which and why."""

    def __init__(self, model_path, threads: int | None = None, int8_kernels: str = "auto"):
        self.session, self.kernels = open_session(model_path, int8_kernels, threads)
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise QATError(f"{model_path} has {len(inputs)} inputs; this runner feeds one "
                           f"image input")
        self.input_name = inputs[0].name
        self.input_shape = tuple(inputs[0].shape)

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, "float32")})[0]

"""ONNX Runtime on CPU: the runtime every machine has."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import QATError


class OnnxRuntimeRunner:
    """One ONNX Runtime CPU session with a single input and the first output returned."""

    def __init__(self, model_path, threads: int | None = None):
        import onnxruntime as ort

        path = Path(model_path)
        if not path.is_file():
            raise QATError(f"ONNX model {path} does not exist")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as error:  # ORT raises its own Fail/InvalidGraph types
            raise QATError(f"ONNX Runtime cannot load {path}: {error}. Is the file truncated "
                           f"or not an ONNX model?") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise QATError(f"{path} has {len(inputs)} inputs; this runner feeds one image input")
        self.input_name = inputs[0].name
        self.input_shape = tuple(inputs[0].shape)

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, "float32")})[0]

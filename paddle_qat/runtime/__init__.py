"""Run exported models: ONNX Runtime on CPU (default, works anywhere) or a TensorRT engine.

Both runners share one shape: ``runner.input_name``, ``runner.run(batch) -> ndarray``.
TensorRT is imported only when asked for, so this package imports without it.

Example::

    from paddle_qat.runtime import open_runner
    runner = open_runner("qat.onnx")                 # ONNX Runtime, CPU
    logits = runner.run(images)
"""

from __future__ import annotations

from .benchmark import Timing, benchmark

RUNTIMES = ("onnxruntime", "tensorrt")


def open_runner(model_path, runtime: str = "onnxruntime", **options):
    """A runner for ``model_path`` (.onnx; for tensorrt also a serialized .engine)."""
    from ..errors import QATConfigError

    if runtime == "onnxruntime":
        from .onnxruntime_runner import OnnxRuntimeRunner

        return OnnxRuntimeRunner(model_path, **options)
    if runtime == "tensorrt":
        from .tensorrt_runner import TensorRTRunner

        return TensorRTRunner.from_path(model_path, **options)
    raise QATConfigError(f"unknown runtime {runtime!r}; choose one of {list(RUNTIMES)}")


__all__ = ["RUNTIMES", "Timing", "benchmark", "open_runner"]

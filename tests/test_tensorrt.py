"""TensorRT engine from our Q/DQ ONNX (GPU machines with `pip install paddle-qat[tensorrt]`).

Skipped with a reason on machines without TensorRT; CPU CI proves the engine's input with the
checker and ONNX Runtime tests instead.
"""

import numpy as np
import pytest

pytest.importorskip("tensorrt", reason="TensorRT not installed (GPU-only extra)")
pytestmark = pytest.mark.gpu


def test_engine_agrees_with_onnx_runtime(demo_run, tmp_path):
    from paddle_qat.runtime import benchmark, open_runner
    from paddle_qat.runtime.tensorrt_runner import build_engine

    out, _, _ = demo_run
    engine = build_engine(out / "qat_w8.onnx", tmp_path / "qat.engine", max_batch=64)
    images = np.load(out / "test_images.npy")[:64]
    trt_logits = open_runner(engine, "tensorrt").run(images)
    ort_logits = open_runner(out / "qat_w8.onnx").run(images)
    # TensorRT's INT8 kernels accumulate in another order than ORT's reference kernels
    assert (trt_logits.argmax(1) == ort_logits.argmax(1)).mean() >= 0.98
    np.testing.assert_allclose(trt_logits, ort_logits, atol=0.1 * np.abs(ort_logits).max())
    assert benchmark(open_runner(engine, "tensorrt"), images[:1], iterations=10).median_ms > 0

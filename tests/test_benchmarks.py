"""benchmarks/run.py keeps running (no timing is asserted: targets live in its report)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_script_writes_its_report(tmp_path):
    out = tmp_path / "report.md"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--image-size", "16", "--width",
         "8", "--batch", "8", "--steps", "1", "--rounds", "1", "--threads", "1", "--out",
         str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    for needle in ("| machine |", "| paddle_fleet_qat |", "| paddle_qat_onnxruntime |",
                   "| ORT quantize_static PTQ INT8, CPU settings |",
                   "| QAT INT8, target onnxruntime / FP32 |", "trtexec --onnx=qat_int8.onnx"):
        assert needle in text

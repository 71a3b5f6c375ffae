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
                   "| QAT INT8, target onnxruntime / FP32 |", "trtexec --onnx=qat_int8.onnx",
                   "| QAT INT8 w7, target onnxruntime / FP32 |", "| ONNX Runtime INT8 kernels |",
                   "| QAT INT8 w7, target onnxruntime | int8 |",  # exact on every CPU
                   "| ORT quantize_static PTQ INT8, CPU settings, reduce_range | int8 |",
                   "| step memory (MiB) |", "| fleet minimize (s) |"):
        assert needle in text
    # every variant's step allocated activations (Paddle's allocator statistics were read)
    rows = [cells for cells in (line.split("|")[1:-1] for line in text.splitlines())
            if len(cells) == 6 and cells[0].strip() in ("fp32", "paddle_qat", "paddle_fleet_qat")]
    assert len(rows) == 3 and all(float(row[3]) > 0.1 for row in rows), rows


@pytest.mark.slow
def test_dygraph_benchmark_reports_each_variant(tmp_path):
    out = tmp_path / "dygraph.md"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "dygraph.py"), "--image-size", "16",
         "--batch", "4", "--steps", "1", "--rounds", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {cells[0].strip(): cells for cells in
            (line.split("|")[1:-1] for line in out.read_text().splitlines())
            if len(cells) == 5 and cells[0].strip() in ("fp32", "paddle_qat", "paddle_own_qat")}
    assert sorted(rows) == ["fp32", "paddle_own_qat", "paddle_qat"]
    # every variant trained (a step time) and its step allocated memory
    assert all(float(row[1]) > 0 and float(row[3]) > 0.01 for row in rows.values()), rows
    assert rows["fp32"][2].strip() == "1.000x"


@pytest.mark.slow
def test_seed_benchmark_reports_qat_minus_ptq_for_each_seed(tmp_path):
    out = tmp_path / "seeds.md"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "seeds.py"), "--seeds", "3-4", "--folds", "1",
         "--fp32-epochs", "2", "--qat-epochs", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = out.read_text().splitlines()
    header = next(line for line in lines if line.startswith("| seed |"))
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    rows = [dict(zip(columns, (cell.strip() for cell in line.strip("|").split("|"))))
            for line in lines if line[:4] in ("| 3 ", "| 4 ")]
    assert [row["seed"] for row in rows] == ["3", "4"]
    for row in rows:
        assert int(row["FP32"]) > 36  # trained beyond chance (10 classes, 360 digits)
        best_ptq = max(int(row[f"PTQ w8a8 {m}"]) for m in ("max", "percentile", "mse", "entropy"))
        assert int(row["TensorRT placement (best of 4 PTQ)"]) == int(row["QAT w8a8"]) - best_ptq
        for bits, pair, ptq in (
                (8, "CPU (ONNX Runtime's PTQ)", "ORT, CPU"),
                (7, "CPU, 7-bit weights (ORT's PTQ, reduce_range)", "ORT, CPU"),
                (8, "CPU (our PTQ, same placement)", "max, CPU target"),
                (7, "CPU, 7-bit weights (our PTQ, same placement)", "max, CPU target")):
            assert int(row[pair]) == \
                int(row[f"QAT w{bits}a8, CPU target"]) - int(row[f"PTQ w{bits}a8 {ptq}"])
    assert "| CPU, 7-bit weights (our PTQ, same placement) |" in lines[-1]


def test_seed_benchmark_refuses_a_bad_seed_list():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "seeds.py"), "--seeds",
                             "3-x"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "seeds must look like 0-5 or 0,2,7" in result.stderr
    assert "Traceback" not in result.stderr

"""The README's main job, shortened: FP32 -> fleet QAT -> ONNX -> ONNX Runtime table."""

import subprocess
import sys

import onnx
import pytest

from paddle_qat.export.checker import check_model
from paddle_qat.export.onnxruntime_check import float_ops
from paddle_qat.runtime.int8_kernels import weight_level


def test_short_demo_trains_exports_and_evaluates(demo_run):
    tmp_path, rows, printed = demo_run
    by_name = {r.name: r for r in rows}
    methods = ("max", "percentile", "mse", "entropy")
    expected = ["FP32"]
    for bits in (8, 4, 3):
        expected += [f"PTQ w{bits}a8 {m}" for m in methods] + [f"QAT w{bits}a8"]
    cpu_rows = [f"{kind} w{bits}a8{what}" for bits in (8, 7) for kind, what in (
        ("PTQ", " ORT, CPU"), ("PTQ", " max, CPU target"), ("QAT", ", CPU target"))]
    assert list(by_name) == expected + cpu_rows
    # two folds: every digit is tested once, by the fold that did not train on it
    assert {(r.images, r.correct <= r.images) for r in rows} == {(1797, True)}
    assert (tmp_path / "folds" / "1" / "qat_w8.onnx").is_file()
    # 10 classes, chance is 0.1. A seed gives the same table on every run; over seeds the
    # 8-bit QAT and PTQ rows tie within a few digits (PTQ is lossless at 8 bits here).
    assert by_name["FP32"].accuracy > 0.8 and by_name["QAT w8a8"].accuracy > 0.8
    for bits, margin in ((8, -0.02), (4, 0.02), (3, 0.1)):
        best_ptq = max(by_name[f"PTQ w{bits}a8 {m}"].accuracy for m in methods)
        assert by_name[f"QAT w{bits}a8"].accuracy >= best_ptq + margin, (bits, printed)
    for method in methods:  # every calibrator gives a usable 8-bit model
        assert by_name[f"PTQ w8a8 {method}"].accuracy > by_name["FP32"].accuracy - 0.05
    assert by_name["QAT w8a8"].size_kb < by_name["FP32"].size_kb  # int8 weights
    for name in ("qat_w8.onnx", "qat_w4.onnx", "ptq_w8_mse.onnx", "ptq_w4_entropy.onnx"):
        model = onnx.load(str(tmp_path / name))
        assert check_model(model) == []
        assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    assert not any(n.op_type == "QuantizeLinear"
                   for n in onnx.load(str(tmp_path / "fp32.onnx")).graph.node)
    # the CPU rows: ONNX Runtime has an INT8 kernel for every quantized op of each; the 7-bit
    # pair's weights stay within +-64, so those kernels are exact (and used) on every CPU
    for bits in (8, 7):
        for name in (f"qat_w{bits}_onnxruntime.onnx", f"ptq_w{bits}_ort_cpu.onnx",
                     f"ptq_w{bits}_max_onnxruntime.onnx"):
            assert float_ops(str(tmp_path / name)) == []
            assert (weight_level(onnx.load(str(tmp_path / name))) <= 64) == (bits == 7)
        qat, ptq = by_name[f"QAT w{bits}a8, CPU target"], by_name[f"PTQ w{bits}a8 ORT, CPU"]
        assert qat.accuracy >= ptq.accuracy - 0.02, printed
        assert qat.accuracy > by_name["FP32"].accuracy - 0.03, printed
        start = by_name[f"PTQ w{bits}a8 max, CPU target"]  # what the QAT row started from
        assert start.accuracy > by_name["FP32"].accuracy - 0.03, printed
        if bits == 7:
            assert qat.kernels == ptq.kernels == start.kernels == "int8"
    assert "latency bs1 (ms)" in printed
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "epoch_0001", "epoch_0002", "latest"]


def test_four_bit_weights_take_sixteen_levels_in_the_export(demo_run):
    from onnx import numpy_helper

    tmp_path, _, _ = demo_run
    model = onnx.load(str(tmp_path / "qat_w4.onnx"))
    weights = [numpy_helper.to_array(t) for t in model.graph.initializer
               if t.name.endswith(".int8")]
    assert weights and all(w.min() >= -8 and w.max() <= 7 for w in weights)


def test_demo_help():
    result = subprocess.run([sys.executable, "-m", "paddle_qat.demo", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "--fp32-epochs" in result.stdout


@pytest.mark.parametrize("args, text", [
    (["--seed", "-1"], "--seed must be 0 .. 2**32 - 1, got -1"),
    (["--folds", "0"], "--folds must be 1..10, got 0"),
    (["--low-bits", "4,1"], "low-bit weight widths must be 2..7"),
])
def test_bad_demo_arguments_are_one_clear_line(args, text):
    result = subprocess.run([sys.executable, "-m", "paddle_qat.demo", *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert text in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_ptq_row_is_the_model_qat_starts_from(single_rank, tmp_path, target):
    """The table pairs each QAT row with a PTQ row of the same placement and calibrator; with
    no fine-tuning step the two exports compute the same function."""
    import numpy as np
    import paddle

    from paddle_qat import QATConfig, demo
    from paddle_qat.runtime.onnxruntime_runner import OnnxRuntimeRunner

    train, test = next(demo.digit_folds(5, seed=0))
    fp32_scope = paddle.static.Scope()
    main, startup, eval_prog, (_, _, _, loss) = demo._build(0)
    with paddle.static.scope_guard(fp32_scope):
        with paddle.static.program_guard(main, startup):
            paddle.optimizer.Momentum(0.05, momentum=0.9).minimize(loss)
        exe = paddle.static.Executor(paddle.CPUPlace())
        exe.run(startup)
        demo._epochs(exe, main, loss, train, 1, 32, 0, "fp32")  # BN statistics move too
    state = [v.name for v in eval_prog.list_vars()
             if v.persistable and v.name not in ("feed", "fetch")]
    config = QATConfig(target=target)
    demo._ptq(tmp_path / "ptq.onnx", config, "max", fp32_scope, state, train)
    demo._qat(tmp_path / "qat.onnx", config, "max", 0, 32, 0, fp32_scope, state, train,
              checkpoints=tmp_path / "checkpoints")
    images = test[0][:64]
    ptq = OnnxRuntimeRunner(tmp_path / "ptq.onnx").run(images)
    qat = OnnxRuntimeRunner(tmp_path / "qat.onnx").run(images)
    assert np.abs(ptq).max() > 1.0  # a trained model's logits, not zeros
    np.testing.assert_allclose(qat, ptq, rtol=0, atol=1e-5)

"""PTQ on a real static program: scales from data, export fidelity, and QAT started from it."""

import numpy as np
import paddle
import pytest

import paddle_qat
from nets import build, separable_batches, train_qat, wide_and_narrow_net
from paddle_qat.calibration import ActivationCalibrator, CalibrationConfig
from paddle_qat.export import export_onnx
from paddle_qat.ptq import calibrate
from paddle_qat.runtime.int8_kernels import open_session


@pytest.fixture(scope="module")
def fp32_model():
    """The residual CNN trained in FP32; its eval program quantized (scales unset)."""
    scope = paddle.static.Scope()
    with paddle.static.scope_guard(scope):
        main, startup, test, (image, _, logits, loss) = build()
        with paddle.static.program_guard(main, startup):
            paddle.optimizer.Momentum(0.05, momentum=0.9).minimize(loss)
        exe = paddle.static.Executor(paddle.CPUPlace())
        exe.run(startup)
        for feed in separable_batches(30):
            exe.run(main, feed=feed)
        float_test = test.clone(for_test=True)
        paddle_qat.quantize_program(test, for_test=True)
    return dict(scope=scope, test=test, float_test=float_test, image=image, logits=logits,
                exe=exe)


def _logits(model, program, feed):
    with paddle.static.scope_guard(model["scope"]):
        return model["exe"].run(program, feed=feed, fetch_list=[model["logits"].name])[0]


def _calibration():
    return list(separable_batches(4, batch=32, seed=5))


def test_scales_come_from_the_weights_and_the_calibrator(fp32_model):
    scope = fp32_model["scope"]
    thresholds = calibrate(fp32_model["test"], _calibration(),
                           CalibrationConfig(method="max"), scope=scope)
    # The activation thresholds are what the calibrator says of the float activations.
    expected = ActivationCalibrator(CalibrationConfig(method="max"))
    for feed in _calibration():
        values = fp32_model["exe"].run(fp32_model["float_test"], feed=feed,
                                       fetch_list=sorted(thresholds), scope=scope)
        expected.collect(dict(zip(sorted(thresholds), values)))
    assert thresholds == pytest.approx(expected.thresholds())
    assert "image" in thresholds
    for op in fp32_model["test"].global_block().ops:
        if op.type == "quantize_linear" and op.input("X")[0] in thresholds:
            value = thresholds[op.input("X")[0]]
            assert np.array(scope.find_var(op.input("Scale")[0]).get_tensor()) == pytest.approx(
                value)
    # Weights: per output channel abs-max.
    weight = np.array(scope.find_var("conv2d_0.w_0").get_tensor())
    scale = np.array(scope.find_var("conv2d_0.w_0@scale").get_tensor())
    np.testing.assert_allclose(scale, np.abs(weight).max(axis=(1, 2, 3)), rtol=1e-6)


@pytest.mark.parametrize("method", ["max", "percentile", "mse", "entropy"])
def test_ptq_model_stays_close_to_fp32_and_exports_faithfully(fp32_model, method, tmp_path):
    calibrate(fp32_model["test"], _calibration(), CalibrationConfig(method=method),
              scope=fp32_model["scope"])
    feed = next(separable_batches(1, batch=256, seed=11))
    images = feed["image"]
    float_logits = _logits(fp32_model, fp32_model["float_test"], feed)
    ptq_logits = _logits(fp32_model, fp32_model["test"], feed)
    agreement = (float_logits.argmax(1) == ptq_logits.argmax(1)).mean()
    assert agreement >= 0.95, agreement
    with paddle.static.scope_guard(fp32_model["scope"]):
        export_onnx(fp32_model["test"], [fp32_model["image"]], [fp32_model["logits"]],
                    tmp_path / "ptq.onnx", scope=fp32_model["scope"])
    onnx_logits = open_session(str(tmp_path / "ptq.onnx"))[0].run(None, {"image": images})[0]
    np.testing.assert_allclose(onnx_logits, ptq_logits, atol=1e-5 * np.abs(ptq_logits).max())


def test_qat_starts_its_moving_averages_from_the_calibrated_scales():
    model = train_qat(steps=0)
    scope, main = model["scope"], model["main"]
    thresholds = calibrate(model["test"], _calibration(), scope=scope, train_program=main)
    block = main.global_block()
    (op,) = [op for op in block.ops
             if op.type == "quantize_linear" and op.input("X") == ["image"]]
    state, accum = op.input("InState")[0], op.input("InAccum")[0]
    assert np.array(scope.find_var(state).get_tensor()) == pytest.approx(10.0)
    assert np.array(scope.find_var(accum).get_tensor()) == pytest.approx(10 * thresholds["image"])
    feed = next(separable_batches(1, seed=8))
    with paddle.static.scope_guard(scope):
        model["exe"].run(main, feed=feed)
    # One step later the scale moved a tenth of the way towards this batch's max, not all
    # the way from the initial 1.0 (what an uncalibrated start does).
    after = float(np.array(scope.find_var("image@scale").get_tensor())[0])
    batch_max = float(np.abs(feed["image"]).max())
    assert after == pytest.approx((9 * thresholds["image"] + batch_max) / 10, rel=1e-5)


def test_calibrating_a_float_program_is_refused(fp32_model):
    with pytest.raises(paddle_qat.QATError, match="quantize it with"):
        calibrate(fp32_model["float_test"], _calibration(), scope=fp32_model["scope"])


def test_a_shared_scale_covers_the_widest_of_its_tensors():
    """A concat's inputs and output share one scale. Each tensor calibrates its own range; the
    shared scale must take the widest (the concat's output), not whichever was written last
    (a narrow one clipped the rest: logit cosine 0.95 in `sensitivity` before the fix, on the
    demo's block output shared with its average pool's output, which now has its own)."""
    from paddle_qat.placement import activation_quantizers

    scope = paddle.static.Scope()
    with paddle.static.scope_guard(scope):
        main, startup, test, (_, _, logits, _) = build(wide_and_narrow_net)
        exe = paddle.static.Executor(paddle.CPUPlace())
        exe.run(startup)
    program = test.clone(for_test=True)
    paddle_qat.quantize_program(program, paddle_qat.QATConfig(activation_op_types=("concat",)),
                                scope=scope, for_test=True)
    thresholds = calibrate(program, _calibration(), CalibrationConfig(method="max"),
                           scope=scope)
    groups = {}
    for q in activation_quantizers(program.global_block()):
        groups.setdefault(q.input("Scale")[0], []).append(q.input("X")[0])
    (shared, members), = [(s, m) for s, m in groups.items() if len(m) == 3]
    widest = max(thresholds[m] for m in members)
    assert min(thresholds[m] for m in members) < 0.1 * widest  # the ranges really differ
    assert float(np.array(scope.find_var(shared).get_tensor())[0]) == pytest.approx(widest)
    feed = next(separable_batches(1, batch=256, seed=11))
    with paddle.static.scope_guard(scope):
        got, expected = (exe.run(p, feed=feed, fetch_list=[logits.name])[0]
                         for p in (program, test))
    cosine = (got * expected).sum() / np.linalg.norm(got) / np.linalg.norm(expected)
    assert cosine > 0.99

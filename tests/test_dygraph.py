"""Dygraph QAT in one process: what it quantizes, that it learns, and that the export
computes exactly what the trained model computes (ONNX Runtime and the saved Paddle model)."""

import numpy as np
import onnx
import paddle
import pytest

from paddle_qat import QATConfig, QATConfigError, QATError
from paddle_qat.dygraph import export_onnx, quantize_model
from paddle_qat.runtime.int8_kernels import open_session

SPEC = [paddle.static.InputSpec([None, 3, 8, 8], "float32", "image")]


@pytest.fixture
def dygraph():
    paddle.disable_static()
    yield
    paddle.enable_static()


def _net():
    paddle.seed(3)
    return paddle.nn.Sequential(
        paddle.nn.Conv2D(3, 8, 3, padding=1), paddle.nn.BatchNorm2D(8), paddle.nn.ReLU(),
        paddle.nn.Conv2D(8, 8, 3, padding=1), paddle.nn.ReLU(),
        paddle.nn.AdaptiveAvgPool2D(1), paddle.nn.Flatten(), paddle.nn.Linear(8, 4))


def _batches(steps, batch=32, seed=0):
    """Class = the channel-and-quadrant that is brightest (as tests/nets.py)."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        labels = rng.integers(0, 4, size=(batch, 1))
        images = rng.normal(0, 0.3, size=(batch, 3, 8, 8)).astype("float32")
        for i, label in enumerate(labels[:, 0]):
            r, c = divmod(int(label), 2)
            images[i, label % 3, r * 4:(r + 1) * 4, c * 4:(c + 1) * 4] += 1.5
        yield paddle.to_tensor(images), paddle.to_tensor(labels.astype("int64"))


def _train(model, steps):
    optimizer = paddle.optimizer.Momentum(0.05, momentum=0.9, parameters=model.parameters())
    losses = []
    for images, labels in _batches(steps):
        loss = paddle.nn.functional.cross_entropy(model(images), labels).mean()
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        losses.append(float(loss))
    return losses


def _dq_axes(path):
    return sorted(next((a.i for a in n.attribute if a.name == "axis"), -1)
                  for n in onnx.load(str(path)).graph.node if n.op_type == "DequantizeLinear")


def test_qat_learns_and_export_matches_the_model_exactly(dygraph, tmp_path):
    model = quantize_model(_net())
    losses = _train(model, 40)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    result = export_onnx(model, SPEC, tmp_path / "qat.onnx", paddle_prefix=tmp_path / "p/qat")
    assert paddle.in_dynamic_mode()  # the export leaves the caller's mode alone
    images = np.random.default_rng(9).normal(0, 2, size=(128, 3, 8, 8)).astype("float32")
    expected = model(paddle.to_tensor(images)).numpy()
    onnx_out = open_session(str(result.onnx_path))[0].run(None, {"image": images})[0]
    np.testing.assert_allclose(onnx_out, expected, rtol=1e-5, atol=1e-5)
    paddle.enable_static()
    exe = paddle.static.Executor(paddle.CPUPlace())
    program, feeds, fetches = paddle.static.load_inference_model(str(tmp_path / "p/qat"), exe)
    paddle_out = exe.run(program, feed={feeds[0]: images}, fetch_list=fetches)[0]
    paddle.disable_static()
    np.testing.assert_allclose(paddle_out, expected, rtol=1e-5, atol=1e-5)
    # Two convs and the linear: 3 activation Q/DQ, 3 per-channel weight DQ (conv 0, fc 1).
    assert result.quantized_inputs == 6
    assert _dq_axes(result.onnx_path) == [-1, -1, -1, 0, 0, 1]


def test_per_tensor_weights_and_skipped_layers(dygraph, tmp_path):
    config = QATConfig(channel_wise=False, skip_weights=("linear_*",))
    model = quantize_model(_net(), config)
    assert type(model[7]).__name__ == "Linear"  # skipped: left in float
    _train(model, 3)
    result = export_onnx(model, SPEC, tmp_path / "qat.onnx")
    assert result.quantized_inputs == 4
    assert _dq_axes(result.onnx_path) == [-1, -1, -1, -1]


def test_four_bit_weights_use_sixteen_levels(dygraph):
    model = quantize_model(_net(), QATConfig(weight_bits=4))
    conv = model[0]
    simulated = conv.weight_quanter(conv.weight).numpy()
    steps = conv.weight_quanter.scales().numpy().reshape(-1, 1, 1, 1) / 7
    levels = np.round(simulated / steps)
    np.testing.assert_allclose(simulated, levels * steps, rtol=1e-5, atol=1e-7)
    assert levels.min() >= -8 and levels.max() <= 7 and len(np.unique(levels)) <= 16


def test_static_only_options_are_refused(dygraph):
    with pytest.raises(QATConfigError, match="activation_op_types"):
        quantize_model(_net(), QATConfig(activation_op_types=("relu",)))


def test_the_scale_update_is_paddles_moving_average(dygraph):
    model = quantize_model(_net())
    quanter = model[0].activation_quanter
    maxima = []
    for images, _ in _batches(3):
        model(images)
        maxima.append(float(np.abs(images.numpy()).max()))
    state, accum = 1.0, 1.0
    for value in maxima:
        state, accum = 0.9 * state + 1, 0.9 * accum + value
    np.testing.assert_allclose(quanter.scales().numpy().item(), accum / state, rtol=1e-6)


def test_pure_fp16_decoration_keeps_quant_state_float32(dygraph):
    """AMP O2 (paddle.amp.decorate, which fleet.distributed_model applies) casts every layer
    to float16 unless it opts out; on a CPU decorate is a no-op, so its initializer is called
    directly. The quanters opt out: their scales stay float32, the weights go float16."""
    from paddle.amp.auto_cast import amp_initialize

    model = quantize_model(_net())
    amp_initialize([model], "float16", None)
    dtypes = {name: str(p.dtype) for name, p in model.named_parameters()}
    assert dtypes["0.weight"] == "paddle.float16"
    quant = {n: d for n, d in dtypes.items() if "quanter." in n and "zero_point" not in n}
    assert len(quant) == 12 and set(quant.values()) == {"paddle.float32"}


def test_export_keeps_a_model_that_names_its_own_sublayers_layers(dygraph, tmp_path):
    """Only DataParallel / fleet wrappers are unwrapped, not any attribute called _layers."""

    class Net(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self._layers = paddle.nn.LayerList([paddle.nn.Conv2D(3, 4, 3, padding=1),
                                                paddle.nn.ReLU(), paddle.nn.Flatten(),
                                                paddle.nn.Linear(4 * 8 * 8, 4)])

        def forward(self, x):
            for layer in self._layers:
                x = layer(x)
            return x

    model = quantize_model(Net())
    _train(model, 2)
    result = export_onnx(model, SPEC, tmp_path / "net.onnx")
    images = np.random.default_rng(2).normal(size=(4, 3, 8, 8)).astype("float32")
    got = open_session(str(result.onnx_path))[0].run(None, {"image": images})[0]
    np.testing.assert_allclose(got, model(paddle.to_tensor(images)).numpy(), rtol=1e-5,
                               atol=1e-5)


class _Residual(paddle.nn.Layer):
    """A residual block as users write it: the add is ``x + y`` in forward, not a layer."""

    def __init__(self):
        super().__init__()
        paddle.seed(5)
        self.stem = paddle.nn.Sequential(paddle.nn.Conv2D(3, 8, 3, padding=1),
                                         paddle.nn.BatchNorm2D(8), paddle.nn.ReLU())
        self.branch = paddle.nn.Sequential(paddle.nn.Conv2D(8, 8, 3, padding=1),
                                           paddle.nn.BatchNorm2D(8))
        self.head = paddle.nn.Sequential(paddle.nn.AdaptiveAvgPool2D(1), paddle.nn.Flatten(),
                                         paddle.nn.Linear(8, 4))

    def forward(self, x):
        x = self.stem(x)
        return self.head(paddle.nn.functional.relu(x + self.branch(x)))


def test_a_residual_add_is_named_with_the_way_out_and_check_false_exports_it(dygraph,
                                                                             tmp_path):
    model = quantize_model(_Residual())
    _train(model, 2)
    path = tmp_path / "residual.onnx"
    path.write_bytes(b"an earlier export")
    with pytest.raises(QATError, match=r"(?s)1 residual add.*rule 7.*check=False.*static fleet"):
        export_onnx(model, SPEC, path)
    assert path.read_bytes() == b"an earlier export"  # nothing half-written, nothing lost

    result = export_onnx(model, SPEC, path, check=False)
    images = np.random.default_rng(4).normal(size=(4, 3, 8, 8)).astype("float32")
    got = open_session(str(result.onnx_path))[0].run(None, {"image": images})[0]
    np.testing.assert_allclose(got, model(paddle.to_tensor(images)).numpy(), rtol=1e-5,
                               atol=1e-5)

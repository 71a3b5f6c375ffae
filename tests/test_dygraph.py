"""Dygraph QAT in one process: what it quantizes, that it learns, and that the export
computes exactly what the trained model computes (ONNX Runtime and the saved Paddle model)."""

import numpy as np
import onnx
import onnx.numpy_helper
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


def test_weights_a_hair_off_half_steps_get_the_exported_levels(dygraph, tmp_path):
    """w / (s / qmax) and the export's qmax * (1 / s) * w can round a weight within an ulp of
    a half step differently (4 of these 216 did): training must simulate the exported levels."""
    model = quantize_model(_net())
    conv = model[0]
    rng = np.random.default_rng(7)
    shape = conv.weight.shape
    scale = np.float32(0.8)
    halves = ((rng.integers(-120, 120, size=shape) + 0.5) * (scale / 127)).astype("float32")
    weights = np.nextafter(halves, rng.choice([-np.inf, np.inf], size=shape).astype("float32"))
    weights[:, 0, 0, 0] = scale  # each channel's abs-max
    conv.weight.set_value(weights)
    result = export_onnx(model, SPEC, tmp_path / "qat.onnx")
    graph = onnx.load(str(result.onnx_path)).graph
    values = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    made_by = {out: node for node in graph.node for out in node.output}
    first_conv = next(n for n in graph.node if n.op_type == "Conv")
    exported = values[made_by[first_conv.input[1]].input[0]]
    simulated = conv.weight_quanter(conv.weight).numpy()
    np.testing.assert_array_equal(np.round(simulated / (scale / 127)), exported)
    images = np.random.default_rng(8).normal(size=(16, 3, 8, 8)).astype("float32")
    got = open_session(str(result.onnx_path))[0].run(None, {"image": images})[0]
    np.testing.assert_allclose(got, model(paddle.to_tensor(images)).numpy(), rtol=1e-5,
                               atol=1e-5)


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


def test_the_simulated_grid_rounds_ties_to_even_and_clips_like_quantize_linear(dygraph):
    """Exact half steps (what a fixed-point ReLU output lands on), both signs, and values
    past the range: the levels are numpy's rint of float32 x / step, clipped to
    [-128, 127], as ONNX QuantizeLinear computes them; the gradient passes straight
    through."""
    from paddle_qat.dygraph.quanters import _fake_quant

    step = np.float32(2.0 ** -4)  # a power of two: x / step is exactly k / 2
    halves = (np.arange(-260, 261, dtype="float32") * 0.5) * step
    values = np.concatenate([halves, np.float32([1e3, -1e3, 0.0])])
    x = paddle.to_tensor(values, stop_gradient=False)
    simulated = _fake_quant(x, paddle.to_tensor(step), 127)
    levels = np.clip(np.rint(values / step), -128, 127)
    np.testing.assert_array_equal(np.rint(simulated.numpy() / step), levels)
    # x + (simulated - x), the straight-through form, is simulated to float32's rounding
    # of x: within an ulp of the larger of the two, far below a step
    expected = (levels * step).astype("float32")
    ulp = np.spacing(np.maximum(np.abs(values), np.abs(expected)))
    assert np.all(np.abs(simulated.numpy() - expected) <= ulp)
    simulated.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), np.ones_like(values))


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
    with pytest.raises(QATError, match=r"(?s)1 residual add.*rule 7.*register_residual_block"
                                       r".*check=False.*static fleet"):
        export_onnx(model, SPEC, path)
    assert path.read_bytes() == b"an earlier export"  # nothing half-written, nothing lost

    result = export_onnx(model, SPEC, path, check=False)
    images = np.random.default_rng(4).normal(size=(4, 3, 8, 8)).astype("float32")
    got = open_session(str(result.onnx_path))[0].run(None, {"image": images})[0]
    np.testing.assert_allclose(got, model(paddle.to_tensor(images)).numpy(), rtol=1e-5,
                               atol=1e-5)


def _adds_read_a_dq(onnx_path) -> list[bool]:
    """For each residual Add (both inputs computed, not a bias): does one input come from a
    DequantizeLinear (TensorRT rule 7)?"""
    graph = onnx.load(str(onnx_path)).graph
    made_by = {out: node.op_type for node in graph.node for out in node.output}
    adds = [n for n in graph.node if n.op_type == "Add"
            and all(made_by.get(i) not in (None, "Constant") for i in n.input)]
    return [any(made_by[i] == "DequantizeLinear" for i in n.input) for n in adds]


def _trained_identity_scales(model) -> dict:
    return {path: layer.scales().numpy().item() for path, layer in model.named_sublayers()
            if path.endswith("identity_quanter")}


def _bottleneck_net():
    """paddle.vision's ResNet50 block, small: one with a strided downsample shortcut, one
    whose identity is its input (ResNet50 itself is 25M weights, too slow for the suite)."""
    from paddle.vision.models.resnet import BottleneckBlock

    nn = paddle.nn
    downsample = nn.Sequential(nn.Conv2D(8, 16, 1, stride=2, bias_attr=False),
                               nn.BatchNorm2D(16))
    return nn.Sequential(nn.Conv2D(3, 8, 3, padding=1), nn.ReLU(),
                         BottleneckBlock(8, 4, stride=2, downsample=downsample),
                         BottleneckBlock(16, 4), nn.AdaptiveAvgPool2D(1), nn.Flatten(),
                         nn.Linear(16, 4))


def _vision_model(name):
    from paddle.vision import models

    paddle.seed(0)
    if name == "resnet18":
        return models.resnet18(num_classes=4)
    if name == "mobilenet_v2":
        return models.mobilenet_v2(scale=0.25, num_classes=4)
    return _bottleneck_net()


# MobileNetV2 adds 10 times, and at scale 0.25 its first block too (8 channels in and out)
@pytest.mark.parametrize("name, blocks", [("resnet18", 8), ("mobilenet_v2", 11),
                                          ("bottleneck", 2)])
def test_paddle_vision_residual_adds_are_quantized_and_export_for_tensorrt(dygraph, tmp_path,
                                                                           name, blocks):
    model = quantize_model(_vision_model(name))
    scales = _trained_identity_scales(model)
    assert len(scales) == blocks and np.allclose(list(scales.values()), 0.001)  # the start
    _train(model, 2)
    trained = _trained_identity_scales(model)
    assert all(value > 0.01 for value in trained.values()), trained  # they learned
    spec = [paddle.static.InputSpec([None, 3, 8, 8], "float32", "image")]
    result = export_onnx(model, spec, tmp_path / f"{name}.onnx")  # TensorRT's rules hold
    adds = _adds_read_a_dq(result.onnx_path)
    assert len(adds) == blocks and all(adds)
    images = np.random.default_rng(1).normal(size=(4, 3, 8, 8)).astype("float32")
    got = open_session(str(result.onnx_path))[0].run(None, {"image": images})[0]
    np.testing.assert_allclose(got, model(paddle.to_tensor(images)).numpy(), rtol=1e-5,
                               atol=1e-5)


class _Block(paddle.nn.Layer):
    """A user's basic block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + x)``."""

    def __init__(self, channels=3):
        super().__init__()
        self.conv1 = paddle.nn.Conv2D(channels, channels, 3, padding=1, bias_attr=False)
        self.bn1 = paddle.nn.BatchNorm2D(channels)
        self.conv2 = paddle.nn.Conv2D(channels, channels, 3, padding=1, bias_attr=False)
        self.bn2 = paddle.nn.BatchNorm2D(channels)

    def forward(self, x):
        branch = self.bn2(self.conv2(paddle.nn.functional.relu(self.bn1(self.conv1(x)))))
        return paddle.nn.functional.relu(branch + x)


def _block_net():
    paddle.seed(6)
    return paddle.nn.Sequential(_Block(), _Block(), paddle.nn.AdaptiveAvgPool2D(1),
                                paddle.nn.Flatten(), paddle.nn.Linear(3, 4))


@pytest.fixture
def registered_block():
    from paddle_qat.dygraph import register_residual_block
    from paddle_qat.dygraph.residual import _REGISTRY

    register_residual_block(_Block, input_convs="conv1")
    yield
    del _REGISTRY[_Block]


def test_a_registered_block_quantizes_its_input_once_for_the_conv_and_the_add(
        dygraph, registered_block, tmp_path):
    import copy

    model = quantize_model(_block_net())
    for block in (model[0], model[1]):
        # the block input's quantizer replaces conv1's own: one scale on the shared tensor
        assert block.conv1.activation_quanter is None
        assert block.conv2.activation_quanter is not None
    _train(model, 3)
    result = export_onnx(model, SPEC, tmp_path / "blocks.onnx")
    assert _adds_read_a_dq(result.onnx_path) == [True, True]
    # conv1's input and the add's identity are one tensor on one scale: the DQs feeding them
    # dequantize the same tensor with the same scale
    graph = onnx.load(str(result.onnx_path)).graph
    made_by = {out: node for node in graph.node for out in node.output}
    values = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    first_add = next(n for n in graph.node if n.op_type == "Add")
    first_conv = next(n for n in graph.node if n.op_type == "Conv")
    identity_dq = next(made_by[i] for i in first_add.input
                       if made_by[i].op_type == "DequantizeLinear")
    conv_dq = made_by[first_conv.input[0]]
    assert conv_dq.op_type == "DequantizeLinear"
    quantized = [made_by[dq.input[0]] for dq in (conv_dq, identity_dq)]
    assert quantized[0].input[0] == quantized[1].input[0]  # the block input
    assert values[conv_dq.input[1]] == values[identity_dq.input[1]]
    images = np.random.default_rng(3).normal(size=(4, 3, 8, 8)).astype("float32")
    got = open_session(str(result.onnx_path))[0].run(None, {"image": images})[0]
    np.testing.assert_allclose(got, model(paddle.to_tensor(images)).numpy(), rtol=1e-5,
                               atol=1e-5)

    # The hooks are objects: a deep copy (an EMA model, say) trains its own quantizers
    before = _trained_identity_scales(model)
    clone = copy.deepcopy(model)
    clone.train()
    clone(paddle.to_tensor(images * 10))
    assert _trained_identity_scales(model) == before
    assert _trained_identity_scales(clone) != before


def test_a_block_registered_with_a_wrong_conv_is_named(dygraph):
    from paddle_qat.dygraph import register_residual_block
    from paddle_qat.dygraph.residual import _REGISTRY

    with pytest.raises(QATConfigError, match="input_convs"):
        register_residual_block(_Block, input_convs=())
    register_residual_block(_Block, input_convs=("conv_1",))
    try:
        with pytest.raises(QATConfigError, match=r"_Block has no sublayer 'conv_1'.*conv1"):
            quantize_model(_block_net())
        # a misspelt shortcut or switch is named too, not taken for "no shortcut"
        register_residual_block(_Block, input_convs="conv1", shortcut="down_sample")
        with pytest.raises(QATConfigError, match=r"no attribute 'down_sample'.*shortcut"):
            quantize_model(_block_net())
        register_residual_block(_Block, input_convs="conv1", enabled="use_res")
        with pytest.raises(QATConfigError, match=r"no attribute 'use_res'.*enabled"):
            quantize_model(_block_net())
    finally:
        del _REGISTRY[_Block]


def test_a_block_whose_first_conv_is_left_in_float_keeps_its_add_in_float(dygraph, tmp_path):
    """The block input's Q/DQ would feed a float conv (TensorRT rule 5): no identity
    quantizer there, and the export names the float add (rule 7), as for any other."""
    from paddle.vision.models import resnet18

    paddle.seed(0)
    model = resnet18(num_classes=4)
    skipped = model.layer1[1].conv1.weight.name
    model = quantize_model(model, QATConfig(skip_weights=(skipped,)))
    assert type(model.layer1[1].conv1).__name__ == "Conv2D"
    assert len(_trained_identity_scales(model)) == 7
    assert "layer1.1.identity_quanter" not in _trained_identity_scales(model)
    _train(model, 1)
    spec = [paddle.static.InputSpec([None, 3, 8, 8], "float32", "image")]
    with pytest.raises(QATError, match=r"(?s)1 residual add.*rule 7"):
        export_onnx(model, spec, tmp_path / "resnet18.onnx")

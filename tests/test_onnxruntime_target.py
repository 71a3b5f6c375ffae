"""QATConfig(target="onnxruntime"): a placement ONNX Runtime's CPU runs fully in INT8.

Trained: every residual-add and pooling input quantized, ReLU outputs unsigned. Exported:
uint8 activations, batch norms folded, and ONNX Runtime's own optimizer must give every
quantized op an INT8 kernel (asked, not assumed: its optimized graph is inspected).
"""

import collections
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import paddle
import pytest
from onnx import TensorProto, helper, numpy_helper

import nets
import paddle_qat
from paddle_qat import QATConfig, QATConfigError, QATError
from paddle_qat.dygraph import quantize_model
from paddle_qat.export import export_float_onnx, export_onnx
from paddle_qat.export.onnxruntime_check import (
    float_ops,
    float_output_ops,
    optimized_model,
)
from paddle_qat.export.onnxruntime_graph import (
    fold_batch_norms,
    prepare_for_onnxruntime,
    quantize_conv_biases,
)
from paddle_qat.placement import activation_quantizers
from paddle_qat.runtime.int8_kernels import choose_kernels, int8_kernels_saturate, open_session
from program_tools import producers

ORT_TARGET = QATConfig(target="onnxruntime")


def _train(config, steps=30):
    return nets.train_qat(steps, config=config)


@pytest.fixture(scope="module")
def ort_trained():
    return _train(ORT_TARGET)


def _quantizers(program):
    """{quantized tensor: (quantize op, the op type that made the tensor)} for activations."""
    made_by = producers(program)
    return {q.input("X")[0]: (q, made_by[q.input("X")[0]].type if q.input("X")[0] in made_by
                              else "feed")
            for q in activation_quantizers(program.global_block())}


def test_relu_outputs_train_unsigned_and_every_add_input_is_quantized(ort_trained):
    program, scope = ort_trained["test"], ort_trained["scope"]
    quantizers = _quantizers(program)
    ranges = {made: set() for made in ("relu", "batch_norm", "feed", "pool2d", "flatten")}
    for q, made in quantizers.values():
        ranges.setdefault(made, set()).add((q.attr("qmin"), q.attr("qmax"), q.attr("bit_length")))
    # batch_norm(act="relu") names its relu output batch_norm_*.tmp_4: made by a relu op
    assert ranges["relu"] == {(0, 255, 9)} and ranges["pool2d"] == {(0, 255, 9)}
    assert ranges["feed"] == {(-128, 127, 8)}  # the image can be negative
    assert ranges["batch_norm"] == {(-128, 127, 8)}  # the residual branch before the add
    block = program.global_block()
    made_by = producers(program)
    (residual,) = [op for op in block.ops if op.type == "elementwise_add"
                   and not any(block.var(n).persistable for n in op.input_arg_names)]
    assert all(made_by[n].type == "dequantize_linear" for n in residual.input_arg_names)
    (bias_add,) = [op for op in block.ops if op.type == "elementwise_add" and op is not residual]
    assert not any(made_by.get(n) is not None and made_by[n].type == "dequantize_linear"
                   for n in bias_add.input_arg_names)  # fc's bias add stays float

    # Paddle's kernel really simulates uint8: step scale / 255, nothing below 0
    relu_tensor = next(t for t, (_, made) in quantizers.items() if made == "relu")
    q = quantizers[relu_tensor][0]
    dq = next(op for op in block.ops if op.type == "dequantize_linear"
              and op.input("X") == q.output("Y"))
    feed = next(nets.separable_batches(1, batch=32, seed=4))
    x, y = ort_trained["exe"].run(program, feed=feed, scope=scope,
                                  fetch_list=[relu_tensor, dq.output("Y")[0]])
    scale = float(np.array(scope.find_var(q.input("Scale")[0]).get_tensor())[0])
    np.testing.assert_allclose(y, np.clip(np.round(x / scale * 255), 0, 255) * scale / 255,
                               atol=1e-6)
    levels = np.unique(np.round(y / scale * 255))
    assert levels.min() >= 0 and levels.max() > 127  # the upper half of the range is used


def test_export_runs_every_quantized_op_int8_in_onnxruntime_and_matches_paddle(
        ort_trained, tmp_path):
    t = ort_trained
    with paddle.static.scope_guard(t["scope"]):
        result = export_onnx(t["test"], [t["image"]], [t["logits"]], tmp_path / "cpu.onnx",
                             scope=t["scope"])  # target read from the program; check passes
    assert result.target == "onnxruntime"
    model = onnx.load(str(tmp_path / "cpu.onnx"))
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops["BatchNormalization"] == 0 and ops["Relu"] == 0  # folded / absorbed
    zero_points = {numpy_helper.to_array(t).dtype for t in model.graph.initializer
                   if t.name.endswith("zero_point")}
    assert np.dtype(np.uint8) in zero_points and np.dtype(np.int32) in zero_points
    read = {name for node in model.graph.node for name in node.input}
    constants = {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    assert {t.name for t in model.graph.initializer} | constants <= read  # no folded leftovers

    graph = optimized_model(model).graph
    optimized = collections.Counter(n.op_type for n in graph.node)
    assert optimized["QLinearConv"] == 2 and optimized["QLinearAdd"] == 1
    assert optimized["QLinearGlobalAveragePool"] == 1
    # the average keeps its own, narrower output scale (its input's wasted levels)
    (pool,) = [n for n in graph.node if n.op_type == "QLinearGlobalAveragePool"]
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    assert values[pool.input[3]] < 0.6 * values[pool.input[1]]
    assert not {"Conv", "FusedConv", "BatchNormalization", "Relu"} & set(optimized)
    assert float_ops(model) == []

    feed = next(nets.separable_batches(1, batch=64, seed=3))
    expected = t["exe"].run(t["test"], feed=feed, fetch_list=[t["logits"]], scope=t["scope"])[0]
    got = open_session(str(tmp_path / "cpu.onnx"))[0].run(None, {"image": feed["image"]})[0]
    # The average pool's input is quantized here, so its output often lies exactly between two
    # levels, and the order of a float sum decides the side (a step in ~2% of values; measured).
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.95
    assert np.abs(got - expected).max() <= 0.05 * np.abs(expected).max()


def mobile_net():
    """conv/bn/hard swish -> conv(+bias)/leaky ReLU -> squeeze-excite gate (sigmoid, mul) ->
    pool -> fc: the activations of MobileNetV3-style models, biased convs included."""
    import paddle.nn.functional as F
    from paddle import static

    x = static.data("image", [None, 3, nets.IMAGE, nets.IMAGE], "float32")
    y = static.data("label", [None, 1], "int64")
    a = F.hardswish(static.nn.batch_norm(static.nn.conv2d(x, 8, 3, padding=1, bias_attr=False)))
    b = F.leaky_relu(static.nn.conv2d(a, 8, 3, padding=1), 0.1)
    gate = nets.legacy_op("sigmoid", {"X": static.nn.conv2d(F.adaptive_avg_pool2d(b, 1), 8, 1)})
    c = nets.legacy_op("elementwise_mul", {"X": b, "Y": gate}, axis=-1)
    logits = static.nn.fc(paddle.flatten(F.adaptive_avg_pool2d(c, 1), 1), nets.CLASSES)
    return x, y, logits, paddle.mean(F.cross_entropy(logits, y))


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_mobile_style_activations_export_for_both_targets(target, tmp_path):
    """Hard swish needs opset 14 (paddle2onnx used to abort the process at 13); paddle2onnx
    folds a conv's bias add into the Conv, so the quantized tensor changes name; for ONNX
    Runtime every conv, the gate and the fc get INT8 kernels."""
    t = nets.train_qat(20, config=QATConfig(target=target), net=mobile_net)
    with paddle.static.scope_guard(t["scope"]):
        export_onnx(t["test"], [t["image"]], [t["logits"]], tmp_path / "m.onnx",
                    scope=t["scope"])  # each target's check runs inside
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 14
    if target == "onnxruntime":
        optimized = collections.Counter(
            n.op_type for n in optimized_model(model).graph.node)
        assert optimized["QLinearConv"] == 3 and "Conv" not in optimized
        for kernel in ("QLinearLeakyRelu", "QLinearSigmoid", "QLinearMul", "QGemm"):
            assert optimized[kernel] == 1, kernel
    feed = next(nets.separable_batches(1, batch=64, seed=3))
    expected = t["exe"].run(t["test"], feed=feed, fetch_list=[t["logits"]], scope=t["scope"])[0]
    got = open_session(str(tmp_path / "m.onnx"))[0].run(None, {"image": feed["image"]})[0]
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.95
    assert np.abs(got - expected).max() <= 0.05 * np.abs(expected).max()


def two_part_loss_net():
    """The residual CNN whose loss adds two terms: an add of two tensors outside the model."""
    import paddle.nn.functional as F

    image, label, logits, loss = nets.residual_cnn()
    return image, label, logits, paddle.add(loss, paddle.mean(F.relu(logits)))


def test_quantizers_on_the_loss_stay_out_of_the_export(tmp_path):
    t = nets.train_qat(5, config=ORT_TARGET, net=two_part_loss_net)
    block = t["test"].global_block()
    loss_add = [op for op in block.ops if op.type == "elementwise_add"][-1]
    assert all(producers(t["test"])[n].type == "dequantize_linear"
               for n in loss_add.input_arg_names)  # trained quantized, as any data add
    with paddle.static.scope_guard(t["scope"]):
        result = export_onnx(t["test"], [t["image"]], [t["logits"]], tmp_path / "m.onnx",
                             scope=t["scope"])
    assert loss_add.output_arg_names[0] not in {e.consumer_output for e in result.edges}


def test_tensorrt_placement_fails_the_onnxruntime_check(tmp_path):
    """Control for the check: the TensorRT placement leaves convs in float on ONNX Runtime."""
    t = _train(QATConfig(), steps=5)
    with paddle.static.scope_guard(t["scope"]):
        with pytest.raises(QATError, match=r"runs in float[\s\S]*target='onnxruntime'"):
            export_onnx(t["test"], [t["image"]], [t["logits"]], tmp_path / "m.onnx",
                        scope=t["scope"], target="onnxruntime")
        export_onnx(t["test"], [t["image"]], [t["logits"]], tmp_path / "m.onnx",
                    scope=t["scope"], target="onnxruntime", check=False)
    problems = float_ops(str(tmp_path / "m.onnx"))
    assert any(p.startswith(("Conv", "FusedConv")) for p in problems)


def dense_head_net():
    """conv/bn/relu -> 1x1 conv whose output is the model's (a segmentation head), the loss on
    its spatial mean."""
    import paddle.nn.functional as F
    from paddle import static

    x = static.data("image", [None, 3, nets.IMAGE, nets.IMAGE], "float32")
    y = static.data("label", [None, 1], "int64")
    features = F.relu(static.nn.batch_norm(static.nn.conv2d(x, 8, 3, padding=1)))
    scores = static.nn.conv2d(features, nets.CLASSES, 1)
    return x, y, scores, paddle.mean(F.cross_entropy(paddle.mean(scores, axis=[2, 3]), y))


def test_a_conv_computing_the_output_is_no_float_op_and_is_logged(tmp_path, caplog):
    """ONNX Runtime fuses a conv into INT8 only with a quantizer on its output; on the model's
    own output that would quantize what the model returns, which nothing trained."""
    t = nets.train_qat(5, config=ORT_TARGET, net=dense_head_net)
    path = tmp_path / "head.onnx"
    with paddle.static.scope_guard(t["scope"]), caplog.at_level("INFO", "paddle_qat"):
        export_onnx(t["test"], [t["image"]], [t["logits"]], path, scope=t["scope"])
    assert float_ops(str(path)) == []
    (last,) = float_output_ops(str(path))
    assert last.startswith(("Conv", "FusedConv")) and "computes the model's output" in last
    assert last in caplog.text
    optimized = collections.Counter(n.op_type for n in optimized_model(str(path)).graph.node)
    assert optimized["QLinearConv"] == 1  # the first conv: INT8 in and out
    feed = next(nets.separable_batches(1, batch=16, seed=3))
    expected = t["exe"].run(t["test"], feed=feed, fetch_list=[t["logits"]], scope=t["scope"])[0]
    got = open_session(str(path))[0].run(None, {"image": feed["image"]})[0]
    assert got.shape == expected.shape == (16, nets.CLASSES, nets.IMAGE, nets.IMAGE)
    assert np.abs(got - expected).max() <= 0.02 * np.abs(expected).max()
    checked = subprocess.run([sys.executable, "-m", "paddle_qat", "check", str(path),
                              "--target", "onnxruntime"], capture_output=True, text=True,
                             timeout=120)
    assert checked.returncode == 0, checked.stderr[-2000:]
    assert f"note: {last}" in checked.stdout
    assert "0 op(s) ONNX Runtime runs in float" in checked.stdout


def scaled_branch_net():
    """conv/bn/relu -> 0.5 x + 0.1 (a legacy ``scale`` op with a bias) -> conv: no quantizer
    can follow the relu, so the first conv stays float on ONNX Runtime."""
    import paddle.nn.functional as F
    from paddle import static

    x = static.data("image", [None, 3, nets.IMAGE, nets.IMAGE], "float32")
    y = static.data("label", [None, 1], "int64")
    features = F.relu(static.nn.batch_norm(static.nn.conv2d(x, 8, 3, padding=1)))
    halved = nets.legacy_op("scale", {"X": features}, scale=0.5, bias=0.1)
    pooled = F.adaptive_avg_pool2d(static.nn.conv2d(halved, 8, 3, padding=1), 1)
    logits = static.nn.fc(paddle.flatten(pooled, 1), nets.CLASSES)
    return x, y, logits, paddle.mean(F.cross_entropy(logits, y))


def test_an_onnxruntime_trained_model_with_a_float_op_gets_the_advice_that_fits(tmp_path):
    t = nets.train_qat(5, config=ORT_TARGET, net=scaled_branch_net)
    path = tmp_path / "m.onnx"
    with paddle.static.scope_guard(t["scope"]):
        with pytest.raises(QATError) as refused:
            export_onnx(t["test"], [t["image"]], [t["logits"]], path, scope=t["scope"])
        assert not path.exists()
        export_onnx(t["test"], [t["image"]], [t["logits"]], path, scope=t["scope"],
                    check=False)
    message = str(refused.value)
    assert "1 op(s) ONNX Runtime runs in float" in message and "Conv" in message
    assert "trained for ONNX Runtime" in message and "check=False" in message
    assert "Train with QATConfig(target='onnxruntime')" not in message  # it was
    assert len(float_ops(str(path))) == 1


def test_a_positive_scalar_mul_before_a_quantizer_moves_into_its_scale():
    """x -> Mul(0.5) -> Q/DQ -> conv: the Mul goes, the quantizer reads x with twice the step,
    and ONNX Runtime computes the same integers (the concat before such a Mul in SqueezeNet
    then ends in the quantizer and runs in INT8)."""
    from paddle_qat.export.onnxruntime_graph import fold_scalar_muls_into_quantizers

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.float32(0.5), "half"),
             numpy_helper.from_array(np.float32(0.03), "s"),
             numpy_helper.from_array(np.uint8(0), "z"),
             numpy_helper.from_array(rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8), "w"),
             numpy_helper.from_array(np.full(4, 0.01, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(4, np.int8), "wz")]
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Mul", ["r", "half"], ["m"]),
             helper.make_node("QuantizeLinear", ["m", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("Conv", ["d", "wd"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    x = rng.normal(0, 2, (2, 3, 6, 6)).astype(np.float32)

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=[
            "CPUExecutionProvider"]).run(None, {"x": x})[0]

    before = run(model)
    assert fold_scalar_muls_into_quantizers(model) == 1
    assert "Mul" not in {n.op_type for n in model.graph.node}
    quantizer = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    assert quantizer.input[0] == "r"
    np.testing.assert_allclose(run(model), before, rtol=0, atol=1e-6)


SMOOTH_ACTIVATIONS = {
    "silu": lambda F, x: F.silu(x), "swish": lambda F, x: F.swish(x),
    "gelu": lambda F, x: F.gelu(x), "gelu_tanh": lambda F, x: F.gelu(x, approximate=True),
    "mish": lambda F, x: F.mish(x), "elu": lambda F, x: F.elu(x),
    "softplus": lambda F, x: F.softplus(x), "tanh": lambda F, x: paddle.tanh(x),
}


def _smooth_activation_net(name):
    import paddle.nn.functional as F
    from paddle import static

    x = static.data("image", [None, 3, nets.IMAGE, nets.IMAGE], "float32")
    y = static.data("label", [None, 1], "int64")
    a = SMOOTH_ACTIVATIONS[name](F, static.nn.batch_norm(static.nn.conv2d(x, 8, 3, padding=1)))
    b = F.relu(static.nn.batch_norm(static.nn.conv2d(a, 8, 3, padding=1)))
    logits = static.nn.fc(paddle.flatten(F.adaptive_avg_pool2d(b, 1), 1), nets.CLASSES)
    return x, y, logits, paddle.mean(F.cross_entropy(logits, y))


@pytest.mark.parametrize("name", sorted(SMOOTH_ACTIVATIONS))
def test_a_conv_before_a_smooth_activation_runs_int8(tmp_path, name):
    """EfficientNet's and YOLO's SiLU, GELU, Mish...: ONNX Runtime has no INT8 kernel for
    them, so their input is quantized in training (as ONNX Runtime's own PTQ does): the conv
    before ends in a quantizer and runs QLinearConv, the activation runs in float between
    the quantizers. Refused by the export check before (the conv ran in float)."""
    t = nets.train_qat(3, config=ORT_TARGET, net=lambda: _smooth_activation_net(name))
    path = tmp_path / f"{name}.onnx"
    with paddle.static.scope_guard(t["scope"]):
        export_onnx(t["test"], [t["image"]], [t["logits"]], path, scope=t["scope"])
    optimized = collections.Counter(n.op_type for n in optimized_model(str(path)).graph.node)
    assert optimized["QLinearConv"] == 2 and not {"Conv", "FusedConv"} & set(optimized)
    feed = next(nets.separable_batches(1, batch=64, seed=3))
    expected = t["exe"].run(t["test"], feed=feed, fetch_list=[t["logits"]], scope=t["scope"])[0]
    got = open_session(str(path))[0].run(None, {"image": feed["image"]})[0]
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.95
    assert np.abs(got - expected).max() <= 0.05 * np.abs(expected).max()


def test_unsigned_program_refuses_a_tensorrt_export(ort_trained, tmp_path):
    t = ort_trained
    with paddle.static.scope_guard(t["scope"]), \
            pytest.raises(QATError, match="trained unsigned.*target='onnxruntime'"):
        export_onnx(t["test"], [t["image"]], [t["logits"]], tmp_path / "m.onnx",
                    scope=t["scope"], target="tensorrt")
    assert not (tmp_path / "m.onnx").exists()


def test_bad_targets_are_named():
    with pytest.raises(QATConfigError, match="'cpu' is not a deployment target.*onnxruntime"):
        QATConfig(target="cpu")
    with pytest.raises(QATConfigError, match="static programs"):
        quantize_model(paddle.nn.Linear(2, 2), ORT_TARGET)
    with pytest.raises(QATError, match="export target 'cpu'.*onnxruntime"):
        export_onnx(None, [], [], "never.onnx", target="cpu")  # refused before any work


def _conv_bn_model(gamma, weight_min=-127):
    """image -> DQ(int8 weight) conv -> BatchNormalization, with a chosen norm scale."""
    rng = np.random.default_rng(0)
    weight = rng.integers(weight_min, 128, size=(3, 2, 3, 3)).astype(np.int8)
    weight[:, 0, 0, 0] = weight_min
    channels = len(gamma)
    inits = [numpy_helper.from_array(weight, "w"),
             numpy_helper.from_array(np.array([0.01, 0.02, 0.005], np.float32), "w_scale"),
             numpy_helper.from_array(np.zeros(3, np.int8), "w_zero"),
             numpy_helper.from_array(np.asarray(gamma, np.float32), "gamma"),
             numpy_helper.from_array(rng.normal(size=channels).astype(np.float32), "beta"),
             numpy_helper.from_array(rng.normal(size=channels).astype(np.float32), "mean"),
             numpy_helper.from_array(rng.uniform(0.5, 2, channels).astype(np.float32), "var"),
             numpy_helper.from_array(np.float32(0.02), "x_scale"),
             numpy_helper.from_array(np.uint8(128), "x_zero")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"],
                              ["y"], epsilon=1e-5)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 2, 6, 6])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, None)], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _run(model, x):
    return open_session(model)[0].run(None, {"x": x})[0]


@pytest.mark.parametrize("weight_min", [-127, -128])
def test_folding_batch_norm_into_an_int8_conv_keeps_its_output(weight_min):
    """A negative norm scale flips that channel's int8 values; -128 cannot flip, so then the
    channel's scale goes negative: both exact."""
    x = np.random.default_rng(1).normal(size=(1, 2, 6, 6)).astype(np.float32)
    model = _conv_bn_model([1.5, -0.7, 0.3], weight_min)
    expected = _run(model, x)
    assert fold_batch_norms(model) == 1
    assert [n.op_type for n in model.graph.node].count("BatchNormalization") == 0
    np.testing.assert_allclose(_run(model, x), expected, atol=1e-5)
    assert quantize_conv_biases(model) == 1  # int32 bias: within half a unit of its scale
    np.testing.assert_allclose(_run(model, x), expected, atol=0.5 * 0.02 * 0.02 * 1.5 + 1e-5)
    weight = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w"))
    assert (weight.min() == -128) == (weight_min == -128)
    # ONNX Runtime's fused QLinearConv (an output quantizer added) agrees with plain Q/DQ
    model.graph.initializer.extend([numpy_helper.from_array(np.float32(0.05), "ys"),
                                    numpy_helper.from_array(np.uint8(128), "yz")])
    model.graph.output[0].name = "yd"
    model.graph.node.extend([helper.make_node("QuantizeLinear", ["y", "ys", "yz"], ["yq"]),
                             helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["yd"])])
    assert collections.Counter(n.op_type for n in optimized_model(model).graph.node)[
        "QLinearConv"] == 1
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = ort.InferenceSession(model.SerializeToString(), options).run(None, {"x": x})[0]
    fused = open_session(model, "fused")[0].run(None, {"x": x})[0]
    if int8_kernels_saturate():  # no VNNI: full-range weights saturate the fused kernel,
        assert not np.array_equal(fused, plain)  # so the runner computes Q/DQ in float
        assert not choose_kernels(model).fused
    else:
        np.testing.assert_array_equal(fused, plain)
    np.testing.assert_array_equal(_run(model, x), plain)


def test_a_bias_beyond_int32_gets_a_coarser_weight_scale_not_an_overflow():
    """gamma ~ 0 folds to a weight scale ~ 0: in units of input x weight scale the bias would
    be ~1e13. The channel gets a coarser scale; its output (~ its bias) barely moves."""
    x = np.random.default_rng(1).normal(size=(1, 2, 6, 6)).astype(np.float32)
    model = _conv_bn_model([1.5, 1e-9, 0.3])
    expected = _run(model, x)
    fold_batch_norms(model)
    quantize_conv_biases(model)
    bias = numpy_helper.to_array(next(t for t in model.graph.initializer
                                      if t.name.endswith(".bias.int32")))
    assert np.abs(bias).max() <= 2 ** 30
    got = _run(model, x)
    np.testing.assert_allclose(got[:, [0, 2]], expected[:, [0, 2]], atol=1e-4)  # untouched
    np.testing.assert_allclose(got[:, 1], expected[:, 1], atol=1e-6 + 3e-4 * np.abs(
        expected[:, 1]).max())


def test_relu_and_max_pool_before_an_unsigned_quantizer_become_int8_exactly():
    """x -> Relu -> MaxPool -> Q(uint8, zero point 0) -> DQ: the Relu is the quantizer's
    saturation at 0, and the max pool commutes with quantization."""
    scale, zero = numpy_helper.from_array(np.float32(0.05), "s"), \
        numpy_helper.from_array(np.uint8(0), "z")
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2],
                              name="pool"),
             helper.make_node("QuantizeLinear", ["p", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [2, 3, 8, 8])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, None)], initializer=[scale, zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    x = (np.random.default_rng(2).normal(size=(2, 3, 8, 8)) * 10).astype(np.float32)
    expected = _run(model, x)
    prepare_for_onnxruntime(model)
    assert [n.op_type for n in model.graph.node] == [
        "QuantizeLinear", "DequantizeLinear", "MaxPool", "QuantizeLinear", "DequantizeLinear"]
    np.testing.assert_array_equal(_run(model, x), expected)


def test_onnxruntime_ptq_cpu_settings_fold_norms_and_quantize_every_conv(ort_trained, tmp_path):
    from paddle_qat.export.ort_ptq import ort_ptq

    float_program = paddle_qat.export.quant_map.strip_quant_ops(ort_trained["test"])
    with paddle.static.scope_guard(ort_trained["scope"]):
        export_float_onnx(float_program, [ort_trained["image"]], [ort_trained["logits"]],
                          tmp_path / "fp32.onnx", scope=ort_trained["scope"])
    images = next(nets.separable_batches(1, batch=32))["image"]
    ort_ptq(tmp_path / "fp32.onnx", tmp_path / "ptq.onnx", images, target="onnxruntime")
    assert float_ops(str(tmp_path / "ptq.onnx")) == []
    ort_ptq(tmp_path / "fp32.onnx", tmp_path / "ptq_trt.onnx", images)  # TensorRT settings
    assert float_ops(str(tmp_path / "ptq_trt.onnx"))  # their convs stay float on the CPU


@pytest.mark.slow
def test_resnet50_onnxruntime_target_gets_an_int8_kernel_for_every_conv_and_add(tmp_path):
    scope = paddle.static.Scope()
    program, image, logits = nets.random_resnet50(ORT_TARGET, scope)
    with paddle.static.scope_guard(scope):
        export_onnx(program, [image], [logits], tmp_path / "rn50.onnx", scope=scope)
    optimized = collections.Counter(
        n.op_type for n in optimized_model(str(tmp_path / "rn50.onnx")).graph.node)
    assert optimized["QLinearConv"] == 53 and optimized["QLinearAdd"] == 16
    assert not {"Conv", "FusedConv", "BatchNormalization", "Relu"} & set(optimized)


@pytest.mark.parametrize("level", ["O1", "O2"])
def test_amp_keeps_the_onnxruntime_quantizers_fp32(level, gpu_amp_lists, single_rank,
                                                   fresh_scope):
    """AMP casts around the extra add and pooling quantizers too: state fp32, FP32 names,
    the same unsigned ranges as the FP32 eval program."""
    from test_amp import AMP_CONFIGS, quant_state

    from test_fleet_qat import fleet_minimize

    main, startup, test, (_, _, _, loss) = nets.build()
    strategy = single_rank.DistributedStrategy()
    strategy.amp = True
    strategy.amp_configs = AMP_CONFIGS[level]
    paddle_qat.configure(strategy, ORT_TARGET)
    optimizer = fleet_minimize(single_rank, strategy, main, startup, loss)
    state = quant_state(main)
    assert state and not [n for n in state if "cast_fp" in n]
    assert {d for n, d in state.items() if not n.endswith("@zero_point")} == {
        paddle.base.core.VarDesc.VarType.FP32}
    optimizer.qat_init(paddle.CPUPlace(), scope=fresh_scope, test_program=test)

    def ranges(program):
        return {q.input("Scale")[0]: (q.attr("qmin"), q.attr("qmax"))
                for q, _ in _quantizers(program).values()}
    assert ranges(main) == ranges(test)
    assert (0, 255) in ranges(test).values() and (-128, 127) in ranges(test).values()


def test_two_ranks_average_every_onnxruntime_quantizer(two_ranks):
    """Data parallel: the target's extra quantizers (add branch, pooling) and its unsigned ones
    are averaged across ranks like the rest, in the one fused all-reduce."""
    from paddle_qat.scale_sync import activation_quant_state
    from program_tools import all_reduce_count
    from test_fleet_qat import fleet_minimize

    main, startup, _, (_, _, _, loss) = nets.build()
    strategy = two_ranks.DistributedStrategy()
    paddle_qat.configure(strategy, ORT_TARGET)
    fleet_minimize(two_ranks, strategy, main, startup, loss)
    quantizers = _quantizers(main)
    scales = {q.input("Scale")[0] for q, _ in quantizers.values()}
    # image, stem, add branch, the block output shared by the pools, and the average pool's
    # output (the fc input)
    assert len(scales) == 5
    assert any(q.attr("qmin") == 0 for q, _ in quantizers.values())
    state = activation_quant_state(main)
    assert {n for n in state if n.endswith("@scale")} == scales
    assert all_reduce_count(main) > 0


def _conv_bn_net():
    """conv -> batch norm -> fc with no ReLU: no quantizer here is unsigned, so nothing in
    the quantized program itself says it was trained for ONNX Runtime."""
    import paddle.nn.functional as F
    from paddle import static

    x = static.data("image", [None, 3, nets.IMAGE, nets.IMAGE], "float32")
    y = static.data("label", [None, 1], "int64")
    features = static.nn.batch_norm(static.nn.conv2d(x, 4, 3, padding=1, bias_attr=False))
    logits = static.nn.fc(paddle.flatten(features, 1), nets.CLASSES)
    return x, y, logits, paddle.mean(F.cross_entropy(logits, y))


def test_a_saved_paddle_model_exports_for_the_target_it_was_trained_for(tmp_path):
    from paddle_qat.export import export_inference_model
    from paddle_qat.export.saved import export_paddle_model

    t = nets.train_qat(3, config=ORT_TARGET, net=_conv_bn_net)
    with paddle.static.scope_guard(t["scope"]):
        export_inference_model(tmp_path / "m", [t["image"]], [t["logits"]], t["exe"], t["test"])
    assert (tmp_path / "m.paddle_qat.json").is_file()
    result = export_paddle_model(tmp_path / "m", tmp_path / "m.onnx")
    assert result.target == "onnxruntime"
    kinds = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert "BatchNormalization" not in kinds  # folded, as the ONNX Runtime target does
    assert float_ops(str(tmp_path / "m.onnx")) == []
    # without the record, the same files read as TensorRT's (signed, nothing unsigned)
    (tmp_path / "m.paddle_qat.json").unlink()
    assert export_paddle_model(tmp_path / "m", tmp_path / "g.onnx").target == "tensorrt"
    (tmp_path / "m.paddle_qat.json").write_text("{not json")
    with pytest.raises(QATError, match="m.paddle_qat.json does not name a deployment target"):
        export_paddle_model(tmp_path / "m", tmp_path / "c.onnx")
    assert not (tmp_path / "c.onnx").exists()

"""QAT program -> ONNX Q/DQ -> ONNX Runtime computes what training simulated."""

import collections

import numpy as np
import onnx
import paddle
import pytest
from onnx import helper, numpy_helper

import nets
import paddle_qat
from paddle_qat.errors import QATError, ScaleError
from paddle_qat.export import export_inference_model, export_onnx, read_quant_edges
from paddle_qat.export.checker import check_model
from paddle_qat.runtime.int8_kernels import open_session
from program_tools import forward_ops


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A residual CNN trained 30 steps through fleet with ``strategy.qat = True``, its
    quantized eval program (``qat_init``) and scope."""
    from paddle.distributed import fleet

    fleet.init(is_collective=True)
    strategy = fleet.DistributedStrategy()
    strategy.qat = True
    scope = paddle.static.Scope()
    with paddle.static.scope_guard(scope):
        main, startup, test, (image, _, logits, loss) = nets.build()
        with paddle.static.program_guard(main, startup):
            optimizer = fleet.distributed_optimizer(
                paddle.optimizer.Momentum(0.05, momentum=0.9), strategy)
            optimizer.minimize(loss)
        exe = paddle.static.Executor(paddle.CPUPlace())
        exe.run(startup)
        optimizer.qat_init(paddle.CPUPlace(), scope=scope, test_program=test)
        for feed in nets.separable_batches(30):
            exe.run(main, feed=feed)
        path = tmp_path_factory.mktemp("export") / "model.onnx"
        result = export_onnx(test, [image], [logits], path, scope=scope)
    return dict(scope=scope, test=test, image=image, logits=logits, exe=exe, result=result,
                main=main)


def _feed(images):
    # the eval clone still computes the loss, so it needs a (dummy) label
    return {"image": images, "label": np.zeros((len(images), 1), "int64")}


def _paddle_logits(trained, images):
    with paddle.static.scope_guard(trained["scope"]):
        return trained["exe"].run(trained["test"], feed=_feed(images),
                                  fetch_list=[trained["logits"]])[0]


def test_onnx_runtime_agrees_with_paddle_simulated_quant_on_1024_inputs(trained):
    session, _ = open_session(str(trained["result"].path))
    rng = np.random.default_rng(123)
    agree = total = 0
    worst_steps = 0.0
    out_scale = None
    for index, feed in enumerate(nets.separable_batches(16, batch=64, seed=99)):
        images = feed["image"]
        if index % 2:  # half real-looking, half pure noise at a larger range
            images = rng.normal(0, 1.5, size=images.shape).astype("float32")
        expected = _paddle_logits(trained, images)
        got = session.run(None, {"image": images})[0]
        agree += int((expected.argmax(1) == got.argmax(1)).sum())
        total += len(images)
        # one quantization step of the output: the fc's activation x weight steps
        out_scale = out_scale or np.abs(expected).max() / 127
        worst_steps = max(worst_steps, float(np.abs(expected - got).max() / out_scale))
    assert total >= 1000
    assert agree / total >= 0.999, (agree, total)
    assert worst_steps <= 2.0, worst_steps


def test_every_simulated_qdq_is_exported_and_no_other(trained):
    model = onnx.load(str(trained["result"].path))
    producer = {o: n for n in model.graph.node for o in n.output}
    onnx_quantized = collections.Counter()
    for node in model.graph.node:
        for name in node.input:
            dq = producer.get(name)
            if dq is not None and dq.op_type == "DequantizeLinear":
                onnx_quantized[node.op_type] += 1
    paddle_edges = read_quant_edges(trained["test"], trained["scope"])
    to_onnx = {"conv2d": "Conv", "mul": "MatMul", "elementwise_add": "Add"}
    assert onnx_quantized == collections.Counter(to_onnx[e.consumer] for e in paddle_edges)
    kinds = collections.Counter(n.op_type for n in model.graph.node)
    assert kinds["DequantizeLinear"] == len(paddle_edges) == 7
    assert kinds["QuantizeLinear"] == 4  # activations only; weights are int8 initializers


def test_exported_model_follows_tensorrt_rules(trained):
    model = onnx.load(str(trained["result"].path))
    assert check_model(model) == []
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 13
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            axis = next(a.i for a in node.attribute if a.name == "axis")
            consumer_types = {n.op_type for n in model.graph.node if node.output[0] in n.input}
            assert axis == (0 if consumer_types == {"Conv"} else 1)
            assert inits[node.input[0]].dtype == np.int8


def test_paddle_inference_model_keeps_quant_ops(trained, tmp_path):
    with paddle.static.scope_guard(trained["scope"]):
        model_file, params_file = export_inference_model(
            tmp_path / "qat", [trained["image"]], [trained["logits"]], trained["exe"],
            trained["test"])
        program, feeds, fetches = paddle.static.load_inference_model(
            str(tmp_path / "qat"), trained["exe"])
    types = [op.type for op in program.global_block().ops]
    # 3 weights + image + stem output (one quantizer for its conv and its residual identity
    # branch, paddle_qat.placement) + fc input
    assert types.count("quantize_linear") == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "qat.paddle_qat.json", "qat.pdiparams", "qat.pdmodel"]


def test_non_qat_program_is_refused(tmp_path):
    _, _, test, (image, _, logits, _) = nets.build()
    with pytest.raises(QATError, match="not a QAT program"):
        export_onnx(test, [image], [logits], tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("bad", [np.nan, 0.0, -1.0])
def test_bad_scale_is_named_and_nothing_is_written(trained, tmp_path, bad):
    scope = trained["scope"]
    tensor = scope.find_var("flatten_0.tmp_0@scale").get_tensor()
    good = np.array(tensor)
    tensor.set(np.array([bad], dtype="float32"), paddle.CPUPlace())
    try:
        with pytest.raises(ScaleError, match="'flatten_0.tmp_0@scale' of tensor "
                                             "'flatten_0.tmp_0'"):
            export_onnx(trained["test"], [trained["image"]], [trained["logits"]],
                        tmp_path / "m.onnx", scope=scope)
    finally:
        tensor.set(good, paddle.CPUPlace())
    assert not list(tmp_path.iterdir())


def test_four_bit_activations_are_refused_not_silently_widened(tmp_path):
    scope = paddle.static.Scope()
    with paddle.static.scope_guard(scope):
        _, startup, test, (image, _, logits, _) = nets.build()
        paddle.static.Executor(paddle.CPUPlace()).run(startup)
        paddle_qat.quantize_program(test, paddle_qat.QATConfig(activation_bits=4),
                                    for_test=True)
        with pytest.raises(paddle_qat.UnsupportedOpError, match="quantized to 4 bits"):
            export_onnx(test, [image], [logits], tmp_path / "m.onnx", scope=scope)


def test_four_bit_weights_export_faithfully(tmp_path):
    scope = paddle.static.Scope()
    with paddle.static.scope_guard(scope):
        _, startup, test, (image, _, logits, _) = nets.build()
        exe = paddle.static.Executor(paddle.CPUPlace())
        exe.run(startup)
        paddle_qat.quantize_program(test, paddle_qat.QATConfig(weight_bits=4), for_test=True)
        _calibrate_by_hand(test, scope)
        result = export_onnx(test, [image], [logits], tmp_path / "m.onnx", scope=scope)
        images = next(nets.separable_batches(1, batch=32, seed=4))["image"]
        expected = exe.run(test, feed=_feed(images), fetch_list=[logits])[0]
    got = open_session(str(result.path))[0].run(None, {"image": images})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)
    weights = [numpy_helper.to_array(t) for t in onnx.load(str(result.path)).graph.initializer
               if t.name.endswith(".int8")]
    assert weights and all(w.min() >= -8 and w.max() <= 7 for w in weights)


def _calibrate_by_hand(program, scope):
    """Give an untrained eval program plausible scales: abs-max of weights, 3.0 for data."""
    for op in program.global_block().ops:
        if op.type != "quantize_linear":
            continue
        holder = scope.find_var(op.input("X")[0])
        scale = scope.find_var(op.input("Scale")[0]).get_tensor()
        if holder is not None and holder.get_tensor()._is_initialized() and op.attr(
                "quant_axis") >= 0:
            w = np.array(holder.get_tensor())
            axis = op.attr("quant_axis")
            value = np.abs(w).max(axis=tuple(i for i in range(w.ndim) if i != axis))
        else:
            value = np.full(np.array(scale).shape, 3.0)
        scale.set(value.astype("float32"), paddle.CPUPlace())


def test_atomic_write_leaves_the_old_file_when_export_fails(trained, tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous export")
    _, _, plain, (image, _, logits, _) = nets.build()
    with pytest.raises(QATError):
        export_onnx(plain, [image], [logits], target)
    assert target.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def _normalized_input_net(bias_after_scale: bool):
    """image -> 0.5 x + 0.1 (a legacy ``scale`` op with a bias: input normalization) -> conv:
    paddle2onnx writes it as two nodes (Mul and Add), and the conv reads the second."""
    image = paddle.static.data("image", [None, 3, nets.IMAGE, nets.IMAGE], "float32")
    label = paddle.static.data("label", [None, 1], "int64")
    normalized = nets.legacy_op("scale", {"X": image}, scale=0.5, bias=0.1,
                                bias_after_scale=bias_after_scale)
    features = paddle.nn.functional.relu(paddle.static.nn.batch_norm(
        paddle.static.nn.conv2d(normalized, 8, 3, padding=1)))
    pooled = paddle.flatten(paddle.nn.functional.adaptive_avg_pool2d(features, 1), 1)
    logits = paddle.static.nn.fc(pooled, nets.CLASSES)
    return image, label, logits, paddle.mean(
        paddle.nn.functional.cross_entropy(logits, label))


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
@pytest.mark.parametrize("bias_after_scale", [True, False])
def test_a_quantized_input_paddle2onnx_computes_in_two_nodes_is_found(tmp_path, target,
                                                                      bias_after_scale):
    t = nets.train_qat(3, config=paddle_qat.QATConfig(target=target),
                       net=lambda: _normalized_input_net(bias_after_scale))
    path = tmp_path / "m.onnx"
    with paddle.static.scope_guard(t["scope"]):  # refused before: "no Conv reading 'Mul.1'"
        export_onnx(t["test"], [t["image"]], [t["logits"]], path, scope=t["scope"])
    feed = next(nets.separable_batches(1, batch=32, seed=3))
    expected = t["exe"].run(t["test"], feed=feed, fetch_list=[t["logits"]], scope=t["scope"])[0]
    got = open_session(str(path))[0].run(None, {"image": feed["image"]})[0]
    assert np.abs(got - expected).max() <= 0.02 * np.abs(expected).max()
    model = onnx.load(str(path))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    made_by = {o: n for n in model.graph.node for o in n.output}
    assert made_by[conv.input[0]].op_type == "DequantizeLinear"  # the conv reads INT8


def _gelu_net(approximate: bool):
    import paddle.nn.functional as F

    image = paddle.static.data("image", [None, 3, nets.IMAGE, nets.IMAGE], "float32")
    label = paddle.static.data("label", [None, 1], "int64")
    features = F.gelu(paddle.static.nn.batch_norm(
        paddle.static.nn.conv2d(image, 8, 3, padding=1)), approximate=approximate)
    features = F.relu(paddle.static.nn.conv2d(features, 8, 3, padding=1))
    logits = paddle.static.nn.fc(paddle.flatten(F.adaptive_avg_pool2d(features, 1), 1),
                                 nets.CLASSES)
    return image, label, logits, paddle.mean(F.cross_entropy(logits, label))


@pytest.mark.parametrize("approximate, kept", [(True, "Tanh"), (False, "Erf")])
def test_gelu_exports_the_function_paddle_computed(tmp_path, approximate, kept):
    """paddle2onnx 1.3.1 writes gelu(approximate=True) as the exact (erf) GELU: 0.9 % of the
    largest logit off here before the export rewrote it to the tanh formula."""
    t = nets.train_qat(3, net=lambda: _gelu_net(approximate))
    path = tmp_path / "m.onnx"
    with paddle.static.scope_guard(t["scope"]):
        export_onnx(t["test"], [t["image"]], [t["logits"]], path, scope=t["scope"])
    kinds = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert kept in kinds and not {"Tanh", "Erf"} - {kept} & kinds
    feed = next(nets.separable_batches(1, batch=32, seed=3))
    expected = t["exe"].run(t["test"], feed=feed, fetch_list=[t["logits"]], scope=t["scope"])[0]
    got = open_session(str(path))[0].run(None, {"image": feed["image"]})[0]
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_an_approximate_gelu_paddle2onnx_wrote_otherwise_is_refused_by_name():
    """The rewrite only replaces paddle2onnx's own exact-GELU nodes; anything else is named."""
    from paddle_qat.export.paddle2onnx_fixes import restore_approximate_gelus

    main = paddle.static.Program()
    with paddle.static.program_guard(main, paddle.static.Program()):
        x = paddle.static.data("x", [None, 4], "float32")
        y = paddle.nn.functional.gelu(x, approximate=True)
    graph = helper.make_graph(  # a translation that is neither erf-GELU nor the tanh formula
        [helper.make_node("Sigmoid", ["x"], [y.name])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info(y.name, onnx.TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(QATError, match=rf"gelu\(approximate=True\) '{y.name}'.*approximate=False"):
        restore_approximate_gelus(model, main)


# ---- the checker: one hand-broken graph per rule -------------------------------------------

def _qdq_conv_model(zero_dtype=np.int8, zero_value=0, scale_value=0.02, weight_dtype=np.int8,
                    act_axis=False, weight_scales=4, opset=13, drop_data_dq=False,
                    extra_nodes=()):
    inits = [
        numpy_helper.from_array(np.ones((4, 3, 3, 3), weight_dtype), "w.int8"),
        numpy_helper.from_array(np.full((weight_scales,), 0.01, np.float32), "w.scale"),
        numpy_helper.from_array(np.zeros((weight_scales,), np.int8), "w.zero"),
        numpy_helper.from_array(np.full((3,) if act_axis else (), scale_value, np.float32),
                                "x.scale"),
        numpy_helper.from_array(np.full((3,) if act_axis else (), zero_value, zero_dtype),
                                "x.zero"),
    ]
    axis = {"axis": 1} if act_axis else {}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x.scale", "x.zero"], ["xq"], "q_x", **axis),
        helper.make_node("DequantizeLinear", ["xq", "x.scale", "x.zero"], ["xd"], "dq_x",
                         **axis),
        helper.make_node("DequantizeLinear", ["w.int8", "w.scale", "w.zero"], ["wd"], "dq_w",
                         axis=0),
        helper.make_node("Conv", ["x" if drop_data_dq else "xd", "wd"], ["y"], "conv"),
        *extra_nodes,
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_checker_accepts_a_good_graph():
    assert check_model(_qdq_conv_model()) == []


@pytest.mark.parametrize("kwargs, rule, node, text", [
    ({"opset": 11}, 1, "dq_w", "opset >= 13"),
    ({"zero_dtype": np.uint8}, 2, "q_x", "must be int8"),
    ({"zero_value": 3}, 2, "q_x", "all zeros"),
    ({"scale_value": 0.0}, 3, "q_x", "finite and > 0"),
    ({"scale_value": np.nan}, 3, "dq_x", "finite and > 0"),
    ({"weight_scales": 3}, 4, "dq_w", "do not match"),
    ({"act_axis": True}, 4, "dq_x", "per-channel scale on an activation"),
    ({"drop_data_dq": True}, 5, "conv", "one input only"),
    ({"weight_dtype": np.int32}, 11, "dq_w", "must be int8"),
    ({"extra_nodes": [helper.make_node("QuantizeLinear", ["x", "x.scale", "x.zero"], ["z"],
                                       "lonely_q")]}, 10, "lonely_q", "dangling"),
    ({"extra_nodes": [helper.make_node("ConvInteger", ["x", "w.int8"], ["ci"], "ci")]},
     11, "ci", "not accepted"),
])
def test_checker_names_each_broken_rule(kwargs, rule, node, text):
    found = check_model(_qdq_conv_model(**kwargs))
    assert any(v.rule == rule and v.node == node and text in v.message for v in found), found


def test_eval_program_has_one_qdq_per_quantized_input(trained):
    for op_type in ("conv2d", "mul"):
        assert forward_ops(trained["test"], op_type)


def test_quantized_op_without_onnx_mapping_is_named(tmp_path):
    """nearest_interp_v2 is quantizable in training, but the exporter knows no ONNX node
    that carries its input Q/DQ: export refuses instead of dropping them."""
    import paddle.nn.functional as F

    def upsampling_net():
        x = paddle.static.data("image", [None, 3, 8, 8], "float32")
        conv = paddle.static.nn.conv2d(x, 4, 3, padding=1)
        up = F.interpolate(conv, scale_factor=2, mode="nearest")
        logits = paddle.static.nn.fc(paddle.flatten(up, 1), 4)
        return x, None, logits, paddle.mean(logits)

    scope = paddle.static.Scope()
    with paddle.static.scope_guard(scope):
        _, startup, test, (image, _, logits, _) = nets.build(upsampling_net)
        paddle.static.Executor(paddle.CPUPlace()).run(startup)
        paddle_qat.quantize_program(
            test, paddle_qat.QATConfig(activation_op_types=("nearest_interp_v2",)),
            for_test=True)
        _calibrate_by_hand(test, scope)
        with pytest.raises(paddle_qat.UnsupportedOpError,
                           match=r"input 'conv2d_0.tmp_[01]' of Paddle op 'nearest_interp_v2': "
                                 r"no ONNX mapping"):
            export_onnx(test, [image], [logits], tmp_path / "m.onnx", scope=scope)
    assert not list(tmp_path.iterdir())


def test_an_op_paddle2onnx_cannot_translate_is_named_not_a_process_abort(tmp_path):
    """paddle2onnx 1.3.1 aborts the process (SIGABRT) on an unsupported op such as erfinv;
    the exporter asks paddle2onnx's own op list first."""
    def net():
        image, label, logits, _ = nets.residual_cnn()
        out = nets.legacy_op("erfinv", {"X": nets.legacy_op("tanh", {"X": logits})})
        import paddle.nn.functional as F
        return image, label, out, paddle.mean(F.cross_entropy(logits, label))

    t = nets.train_qat(1, net=net)
    with paddle.static.scope_guard(t["scope"]), \
            pytest.raises(paddle_qat.UnsupportedOpError, match=r"\['erfinv'\].*Paddle Inference"):
        export_onnx(t["test"], [t["image"]], [t["logits"]], tmp_path / "m.onnx",
                    scope=t["scope"])
    assert not (tmp_path / "m.onnx").exists()

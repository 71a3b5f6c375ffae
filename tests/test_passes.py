"""The pass driver: weight axes per op type, skips, scale handling."""

import numpy as np
import paddle
import pytest
from paddle import static

import nets
import paddle_qat
from paddle_qat import QATConfig, QATError
from program_tools import fake_quant, forward_ops, producers, quant_op_for


def _weighted(kind):
    def net():
        x = static.data("x", [None, 4, 6, 6], "float32")
        if kind == "conv2d":
            out = static.nn.conv2d(x, 5, 3)
        elif kind == "depthwise_conv2d":
            out = paddle.nn.Conv2D(4, 4, 3, groups=4)(x)
        elif kind == "conv2d_transpose":
            out = static.nn.conv2d_transpose(x, 5, filter_size=3)
        elif kind == "mul":
            out = static.nn.fc(paddle.flatten(x, 1), 5)
        else:
            flat = paddle.flatten(x, 1)
            trans = kind == "matmul_v2_trans_y"
            shape = [5, 144] if trans else [144, 5]
            w = static.create_parameter(shape, "float32", name="w")
            # paddle.matmul has no legacy-IR path in Paddle 3.3.1; append the op itself
            block = flat.block
            out = block.create_var(name="mm_out", dtype="float32", shape=[-1, 5])
            block.append_op(type="matmul_v2", inputs={"X": [flat], "Y": [w]},
                            outputs={"Out": [out]},
                            attrs={"trans_x": False, "trans_y": trans})
        return (x, paddle.mean(out))
    return net


@pytest.mark.parametrize("kind, op_type, axis, channels", [
    ("conv2d", "conv2d", 0, 5),
    ("depthwise_conv2d", "depthwise_conv2d", 0, 4),
    ("conv2d_transpose", "conv2d_transpose", 1, 5),
    ("mul", "mul", 1, 5),
    ("matmul_v2", "matmul_v2", 1, 5),
    ("matmul_v2_trans_y", "matmul_v2", 0, 5),
])
def test_weight_scale_runs_along_output_channels(fresh_scope, kind, op_type, axis, channels):
    main, startup, _, (_, loss) = nets.build(_weighted(kind))
    with static.program_guard(main, startup):
        paddle.optimizer.SGD(0.1).minimize(loss)
    paddle_qat.quantize_program(main, startup_program=startup)
    (op,) = forward_ops(main, op_type)
    slot = "Filter" if "conv" in op_type else "Y"
    q, dq = quant_op_for(main, op, slot)
    assert q.attr("quant_axis") == dq.attr("quant_axis") == axis
    exe = static.Executor(paddle.CPUPlace())
    exe.run(startup)
    weight = np.array(fresh_scope.find_var(q.input("X")[0]).get_tensor())  # before the step
    feed = {"x": np.random.default_rng(0).normal(size=(2, 4, 6, 6)).astype("float32")}
    exe.run(main, feed=feed)
    scale = np.array(fresh_scope.find_var(q.input("Scale")[0]).get_tensor())
    assert scale.shape == (channels,)
    # channel-wise abs-max of the (updated) weight, along the chosen axis
    others = tuple(i for i in range(weight.ndim) if i != axis)
    np.testing.assert_allclose(scale, np.abs(weight).max(axis=others), rtol=1e-6)


def test_name_scope_skip_and_weight_pattern_skip():
    def net():
        x = static.data("x", [None, 3, 6, 6], "float32")
        a = static.nn.conv2d(x, 4, 3, param_attr=paddle.ParamAttr(name="backbone.w"))
        with paddle.static.name_scope("skip_quant"):
            b = static.nn.conv2d(a, 4, 3, param_attr=paddle.ParamAttr(name="mid.w"))
        c = static.nn.conv2d(b, 4, 1, param_attr=paddle.ParamAttr(name="head.w"))
        return (x, paddle.mean(c))

    main, _, _, _ = nets.build(net)
    summary = paddle_qat.quantize_program(main, QATConfig(skip_weights=("head.*",)))
    assert summary.quantized_ops == ("conv2d:backbone.w",)
    assert set(summary.skipped_ops) == {"conv2d:mid.w", "conv2d:head.w"}
    made_by = producers(main)
    quantized = [op.input("Filter")[0] for op in forward_ops(main, "conv2d")
                 if made_by.get(op.input("Filter")[0]) is not None]
    assert quantized == ["backbone.w.quantized.dequantized"]


def test_four_bit_weights_really_simulate_four_bits(fresh_scope):
    """Paddle 3.3.1's kernels ignore bit_length; the pass must set the qmin/qmax range."""
    _, startup, test, _ = nets.build()
    exe = static.Executor(paddle.CPUPlace())
    exe.run(startup)
    paddle_qat.quantize_program(test, QATConfig(weight_bits=4), for_test=True)
    (fc,) = forward_ops(test, "mul")
    q, dq = quant_op_for(test, fc, "Y")
    assert q.attr("bit_length") == dq.attr("bit_length") == 4
    assert (q.attr("qmin"), q.attr("qmax")) == (-8, 7)
    weight = np.array(fresh_scope.find_var("fc_0.w_0").get_tensor())
    scale = np.abs(weight).max(axis=0).astype("float32")
    fresh_scope.find_var(q.input("Scale")[0]).get_tensor().set(scale, paddle.CPUPlace())
    feed = next(nets.separable_batches(1, batch=2))
    (dequantized,) = exe.run(test, feed=feed, fetch_list=[dq.output("Y")[0]])
    np.testing.assert_allclose(dequantized, fake_quant(weight, scale, bits=4, axis=1),
                               rtol=1e-6, atol=1e-7)
    for column in range(dequantized.shape[1]):
        assert len(np.unique(dequantized[:, column])) <= 16


def test_quantizing_twice_is_refused():
    main, _, _, _ = nets.build()
    paddle_qat.quantize_program(main, for_test=True)
    with pytest.raises(QATError, match="already holds quantize_linear"):
        paddle_qat.quantize_program(main, for_test=True)


def test_startup_program_initializes_quant_state_in_a_new_scope():
    main, startup, _, (_, _, _, loss) = nets.build()
    with static.program_guard(main, startup):
        paddle.optimizer.SGD(0.1).minimize(loss)
    paddle_qat.quantize_program(main, startup_program=startup)
    scope = static.Scope()  # not the scope the pass initialized
    with static.scope_guard(scope):
        exe = static.Executor(paddle.CPUPlace())
        exe.run(startup)
        (value,) = exe.run(main, feed=next(nets.separable_batches(1)), fetch_list=[loss])
    assert np.isfinite(value)
    assert np.array(scope.find_var("image@scale").get_tensor())[0] > 0


def test_unquantizable_relu_scale_list_is_rejected():
    with pytest.raises(paddle_qat.UnsupportedOpError, match="conv3d"):
        paddle_qat.quantize_program(nets.build()[0], QATConfig(weight_op_types=("conv3d",)))


def test_activation_only_ops_get_input_qdq():
    main, _, _, _ = nets.build()
    paddle_qat.quantize_program(main, QATConfig(activation_op_types=("pool2d",)), for_test=True)
    made_by = producers(main)
    for pool in forward_ops(main, "pool2d"):
        assert made_by[pool.input("X")[0]].type == "dequantize_linear"




def test_quantizing_an_eval_program_keeps_the_trained_moving_averages():
    """Both programs built under a fresh unique_name.guard() (as build_eval_program and the
    training script do) give the pass the same ``state_N`` / ``accum_N`` names; quantizing the
    eval program once training has run must not reset training's state."""
    from paddle_qat.checkpoint import is_quant_state

    scope = paddle.static.Scope()
    with paddle.static.scope_guard(scope), paddle.utils.unique_name.guard():
        main, startup, _, (_, _, _, loss) = nets.build()
        with paddle.static.program_guard(main, startup):
            paddle.optimizer.SGD(0.01).minimize(loss)
        paddle_qat.quantize_program(main, startup_program=startup)
        exe = paddle.static.Executor(paddle.CPUPlace())
        exe.run(startup)
        for feed in nets.separable_batches(3):
            exe.run(main, feed=feed)
    trained = {n: np.array(scope.find_var(n).get_tensor())
               for n in scope.local_var_names() if is_quant_state(n)}
    assert any(n.endswith("@state") and v[0] > 2 for n, v in trained.items())
    with paddle.static.scope_guard(scope), paddle.utils.unique_name.guard():
        _, _, test, _ = nets.build()
        paddle_qat.quantize_program(test, for_test=True, scope=scope)
    for name, value in trained.items():
        np.testing.assert_array_equal(np.array(scope.find_var(name).get_tensor()), value,
                                      err_msg=name)


def test_moving_average_state_is_named_after_its_quantizer():
    """Paddle numbers state_N / accum_N in an order that changes between processes, so a
    resumed run loaded each quantizer's state into another; names follow the output now."""
    main, startup, _, (_, _, _, loss) = nets.build()
    with static.program_guard(main, startup):
        paddle.optimizer.SGD(0.01).minimize(loss)
    paddle_qat.quantize_program(main, startup_program=startup, scope=paddle.static.Scope())
    stateful = [op for op in main.global_block().ops if "InState" in op.input_names
                and op.input("InState")]
    assert len(stateful) >= 4
    named_after = {f"{op.output('Y')[0]}@state" for op in stateful}
    for op in stateful:  # quantizers sharing a scale share the first one's state
        assert op.input("InState")[0] in named_after
        assert op.input("InAccum")[0] == op.input("InState")[0].replace("@state", "@accum")
        assert op.output("OutState") == op.input("InState")
    assert not [v.name for v in main.list_vars() if v.name.startswith(("state_", "accum_"))]
    assert {v.name for v in startup.list_vars()} >= {op.input("InState")[0] for op in stateful}

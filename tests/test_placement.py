"""Shared scales where TensorRT merges tensors: learnt in training, checked on export."""

import numpy as np
import paddle
import pytest
from paddle import static

import nets
from paddle_qat import QATConfig, QATError
from paddle_qat.export import export_onnx
from paddle_qat.runtime.int8_kernels import open_session
from program_tools import forward_ops, producers

CONFIG = QATConfig(activation_op_types=("concat", "pool2d"))


def inception_net():
    """Two conv branches -> concat -> max pool -> conv -> global average pool -> fc."""
    import paddle.nn.functional as F

    x = static.data("image", [None, 3, nets.IMAGE, nets.IMAGE], "float32")
    y = static.data("label", [None, 1], "int64")
    wide = F.relu(static.nn.conv2d(x, 6, 3, padding=1))
    narrow = F.relu(static.nn.conv2d(x, 4, 1))
    joined = F.max_pool2d(paddle.concat([wide, narrow], axis=1), 2)
    out = F.relu(static.nn.conv2d(joined, 8, 3, padding=1))
    logits = static.nn.fc(paddle.flatten(F.adaptive_avg_pool2d(out, 1), 1), nets.CLASSES)
    return x, y, logits, paddle.mean(F.cross_entropy(logits, y))


def _train(config, steps=20):
    return nets.train_qat(steps, config=config, net=inception_net)


def _quantizer_of(program, tensor):
    made_by = producers(program)
    dq = made_by[tensor]
    return made_by[dq.input("X")[0]]


def test_concat_and_pool_quantizers_learn_one_scale_together():
    t = _train(CONFIG)
    block = t["main"].global_block()
    (concat,) = [op for op in block.ops if op.type == "concat"]
    (pool,) = [op for op in block.ops if op.type == "pool2d" and op.attr("pooling_type") == "max"]
    (conv,) = [op for op in block.ops if op.type == "conv2d"
               and op.input("Input")[0].startswith(pool.output("Out")[0])]
    quantizers = [_quantizer_of(t["main"], n) for n in concat.input("X")]
    quantizers += [_quantizer_of(t["main"], pool.input("X")[0]),
                   _quantizer_of(t["main"], conv.input("Input")[0])]
    assert len({q.input("Scale")[0] for q in quantizers}) == 1
    # One member, the concat's output (the widest), updates the shared average each step.
    observers = [q for q in quantizers if q.input("InState")]
    assert [q.input("X")[0] for q in observers] == [concat.output("Out")[0]]
    assert observers[0].output("OutScale") == observers[0].input("Scale")
    state = float(np.array(t["scope"].find_var(observers[0].input("InState")[0])
                           .get_tensor())[0])
    assert state == pytest.approx(sum(0.9 ** k for k in range(20 + 1)), rel=1e-6)


def test_a_shared_scale_follows_the_widest_member_and_the_others_quantize_with_it():
    """PTQ calibrates a group to its widest tensor; QAT's moving average must too. Averaged
    over every member (a wide branch, a much narrower one, their concat) it would settle
    near the mean of their maxima and clip the wide branch."""
    config = QATConfig(activation_op_types=("concat",))
    t = nets.train_qat(0, config=config, net=nets.wide_and_narrow_net)
    block, scope = t["main"].global_block(), t["scope"]
    (concat,) = [op for op in block.ops if op.type == "concat"]
    joined, (_, narrow_dq) = concat.output("Out")[0], concat.input("X")
    narrow = _quantizer_of(t["main"], narrow_dq).input("X")[0]
    scale_name = _quantizer_of(t["main"], joined).input("Scale")[0]

    def value(name):
        return np.array(scope.find_var(name).get_tensor())

    state = accum = 1.0  # the startup program's initial state and accum
    for feed in nets.separable_batches(6):
        before = float(value(scale_name)[0])
        got_joined, got_narrow, got_dq = t["exe"].run(
            t["main"], feed=feed, fetch_list=[joined, narrow, narrow_dq],
            scope=scope)
        state, accum = 0.9 * state + 1, 0.9 * accum + float(np.abs(got_joined).max())
        assert float(value(scale_name)[0]) == pytest.approx(accum / state, rel=1e-5)
        # the narrow branch runs before the concat's quantizer: it used the scale as it was
        step = before / 127
        expected = np.clip(np.round(got_narrow / step), -128, 127) * step
        np.testing.assert_allclose(got_dq, expected, rtol=0, atol=step * 1e-3)
    assert np.abs(got_narrow).max() < 0.3 * np.abs(got_joined).max()  # it is narrow


def test_where_no_member_is_the_widest_one_observer_follows_the_widest_of_each_batch(
        tmp_path):
    """A split after a concat (ShuffleNetV2): the members are the concat's inputs and the
    split's outputs, and no member bounds the others. One observer-only quantizer on their
    stacked abs-maxima updates the shared average; the members quantize with it, and the
    model trains and exports as before."""
    config = QATConfig(activation_op_types=("concat",))
    t = nets.train_qat(0, config=config, net=nets.split_after_concat_net)
    block, scope = t["main"].global_block(), t["scope"]
    (split,) = forward_ops(t["main"], "split")
    observers = [op for op in block.ops if op.type == "quantize_linear" and
                 op.input("InState") and op.attr("quant_axis") < 0 and
                 not block.var(op.input("X")[0]).persistable]
    scales = [q.input("Scale")[0] for q in observers]
    assert len(scales) == len(set(scales)), scales  # one observer per scale
    (observer,) = [q for q in observers
                   if q.has_attr("only_observer") and q.attr("only_observer")]
    first_concat = forward_ops(t["main"], "concat")[0]
    expected = {_quantizer_of(t["main"], n).input("X")[0] for n in first_concat.input("X")}
    expected |= set(split.output("Out"))  # the convs' inputs
    members = [op for op in block.ops if op.type == "quantize_linear" and op is not observer
               and op.input("Scale") == observer.input("Scale")]
    assert {q.input("X")[0] for q in members} == expected
    assert all(q.attr("is_test") and not q.input("InState") for q in members)

    scale_name = observer.input("Scale")[0]
    state = accum = 1.0
    # what the members before the observer read on the first step: the average's start,
    # not Paddle's 0.001 (which clipped ShuffleNetV2's first step to nothing and diverged)
    assert float(np.array(scope.find_var(scale_name).get_tensor())[0]) == accum / state
    for feed in nets.separable_batches(4):
        got = t["exe"].run(t["main"], feed=feed, fetch_list=sorted(expected), scope=scope)
        state, accum = 0.9 * state + 1, 0.9 * accum + max(float(np.abs(g).max()) for g in got)
        assert float(np.array(scope.find_var(scale_name).get_tensor())[0]) == \
            pytest.approx(accum / state, rel=1e-5)
    with paddle.static.scope_guard(scope):
        export_onnx(t["test"], [t["image"]], [t["logits"]], tmp_path / "m.onnx", scope=scope)


def test_shared_scales_export_cleanly_and_faithfully(tmp_path):
    t = _train(CONFIG)
    with paddle.static.scope_guard(t["scope"]):
        result = export_onnx(t["test"], [t["image"]], [t["logits"]], tmp_path / "m.onnx",
                             scope=t["scope"])  # the checker runs inside and passes
    concat_inputs = [e for e in result.edges if e.consumer == "concat"]
    assert len(concat_inputs) == 2
    feed = next(nets.separable_batches(1, batch=64, seed=3))
    expected = t["exe"].run(t["test"], feed=feed, fetch_list=[t["logits"]],
                            scope=t["scope"])[0]
    got = open_session(str(tmp_path / "m.onnx"))[0].run(None, {"image": feed["image"]})[0]
    # ORT's and Paddle's float convolutions differ by ~1e-5, which moves a few values across a
    # rounding boundary: one quantization step here and there (as in test_export).
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.95
    assert np.abs(got - expected).max() <= 0.05 * np.abs(expected).max()


def test_without_sharing_the_export_is_refused_by_the_checker(tmp_path):
    """Control: Paddle's passes alone give each concat input its own scale (rule 8)."""
    t = _train(CONFIG.replace(share_scales=False), steps=5)
    with paddle.static.scope_guard(t["scope"]), pytest.raises(QATError, match="rule 8|8 "):
        export_onnx(t["test"], [t["image"]], [t["logits"]], tmp_path / "m.onnx",
                    scope=t["scope"])


@pytest.mark.slow
def test_resnet50_v15_exports_with_every_conv_int8_and_no_rule_broken(tmp_path):
    """The model the training scripts train, quantized with the defaults, random weights."""
    from collections import Counter

    import onnx

    from paddle_qat.export.checker import check_model

    scope = paddle.static.Scope()
    program, image, logits = nets.random_resnet50(QATConfig(), scope)
    with paddle.static.scope_guard(scope):
        result = export_onnx(program, [image], [logits], tmp_path / "rn50.onnx", scope=scope)
    model = onnx.load(str(tmp_path / "rn50.onnx"))
    assert check_model(model) == []
    counts = Counter(n.op_type for n in model.graph.node)
    # 54 data inputs + 54 weights (53 convs, fc) + 16 residual identity branches = 124
    # quantized inputs; each stage's first block feeds its main and projection convs from one
    # DQ (one tensor, one scale), so 4 fewer DequantizeLinear.
    assert len(result.edges) == 124
    assert counts["Conv"] == 53 and counts["DequantizeLinear"] == 120

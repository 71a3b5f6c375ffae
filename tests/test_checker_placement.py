"""Checker rules 6-9 (Q/DQ placement TensorRT needs): a good and a hand-broken graph each."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from paddle_qat.export.checker import check_model


class GraphBuilder:
    """Tiny ONNX graphs over input ``x`` [1, 4, 8, 8]: Q/DQ pairs and INT8 convs by name."""

    def __init__(self):
        self.nodes, self.inits = [], []

    def const(self, name, value):
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def qdq(self, tensor, scale=0.02, tag=None):
        tag = tag or f"{tensor}_qdq"
        s = self.const(f"{tag}.s", np.float32(scale))
        z = self.const(f"{tag}.z", np.int8(0))
        self.nodes += [
            helper.make_node("QuantizeLinear", [tensor, s, z], [f"{tag}.q"], f"q_{tag}"),
            helper.make_node("DequantizeLinear", [f"{tag}.q", s, z], [f"{tag}.d"], f"dq_{tag}"),
        ]
        return f"{tag}.d"

    def int8_conv(self, data, out, quantize_data=True):
        w = self.const(f"{out}.w", np.ones((4, 4, 1, 1), np.int8))
        ws = self.const(f"{out}.ws", np.full((4,), 0.01, np.float32))
        wz = self.const(f"{out}.wz", np.zeros((4,), np.int8))
        self.nodes.append(helper.make_node("DequantizeLinear", [w, ws, wz], [f"{out}.wd"],
                                           f"dq_{out}_w", axis=0))
        source = self.qdq(data, tag=f"{out}_in") if quantize_data else data
        self.nodes.append(helper.make_node("Conv", [source, f"{out}.wd"], [out], out))
        return out

    def op(self, op_type, inputs, out, **attrs):
        self.nodes.append(helper.make_node(op_type, inputs, [out], out, **attrs))
        return out

    def model(self, output):
        graph = helper.make_graph(
            self.nodes, "g",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 8, 8])],
            [helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None)], self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _rules(model):
    return [(v.rule, v.node) for v in check_model(model)]


def test_rule6_qdq_between_conv_and_activation():
    good = GraphBuilder()
    good.op("Relu", [good.int8_conv("x", "c")], "r")
    assert _rules(good.model("r")) == []

    bad = GraphBuilder()
    bad.op("Relu", [bad.qdq(bad.int8_conv("x", "c"), tag="between")], "r")
    assert (6, "q_between") in _rules(bad.model("r"))


def test_rule7_residual_add_needs_qdq_on_identity_only():
    good = GraphBuilder()
    good.op("Add", [good.int8_conv("x", "c"), good.qdq("x", tag="identity")], "y")
    assert _rules(good.model("y")) == []

    float_identity = GraphBuilder()
    float_identity.op("Add", [float_identity.int8_conv("x", "c"), "x"], "y")
    found = check_model(float_identity.model("y"))
    assert [(v.rule, v.node) for v in found] == [(7, "y")]
    assert "identity branch 'x'" in found[0].message

    qdq_on_conv = GraphBuilder()
    conv = qdq_on_conv.qdq(qdq_on_conv.int8_conv("x", "c"), tag="conv_out")
    qdq_on_conv.op("Add", [conv, qdq_on_conv.qdq("x", tag="identity")], "y")
    assert (7, "y") in _rules(qdq_on_conv.model("y"))


@pytest.mark.parametrize("scales, quantize_second, output_scale, ok", [
    ((0.02, 0.02), True, 0.02, True),
    ((0.02, 0.03), True, None, False),
    ((0.02, 0.02), False, None, False),
    ((0.02, 0.02), True, 0.05, False),
])
def test_rule8_concat_shares_one_scale(scales, quantize_second, output_scale, ok):
    g = GraphBuilder()
    a = g.qdq("x", scales[0], tag="a")
    b = g.qdq("x", scales[1], tag="b") if quantize_second else "x"
    out = g.op("Concat", [a, b], "cat", axis=1)
    if output_scale is not None:
        out = g.qdq(out, output_scale, tag="after")
    assert _rules(g.model(out)) == ([] if ok else [(8, "cat")])


@pytest.mark.parametrize("after, ok", [(0.02, True), (0.04, False)])
def test_rule9_maxpool_keeps_its_scale(after, ok):
    g = GraphBuilder()
    pooled = g.op("MaxPool", [g.qdq("x", 0.02, tag="in")], "pool", kernel_shape=[2, 2])
    out = g.qdq(pooled, after, tag="out")
    assert _rules(g.model(out)) == ([] if ok else [(9, "pool")])

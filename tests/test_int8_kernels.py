"""ONNX Runtime's fused INT8 kernels saturate on CPUs without VNNI: the runner must still
compute what the model says, on whichever CPU runs these tests."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from paddle_qat.errors import QATConfigError, QATError
from paddle_qat.runtime.int8_kernels import (
    SAFE_WEIGHT_LEVEL,
    choose_kernels,
    cpu_portability_note,
    int8_kernels_saturate,
    open_session,
    weight_level,
)
from paddle_qat.runtime.onnxruntime_runner import OnnxRuntimeRunner

ACTIVATIONS = {"uint8": (np.uint8, (0, 255)), "int8": (np.int8, (-128, 127))}


def _qdq_matmul(weights: np.ndarray, activation: str):
    """x -> Q/DQ (scale 1) -> MatMul with DQ(int8 weights, scale 1) -> float: ONNX Runtime
    fuses it into MatMulIntegerToFloat, and every exact output is an integer."""
    dtype, _ = ACTIVATIONS[activation]
    inits = [numpy_helper.from_array(np.float32(1.0), "s"),
             numpy_helper.from_array(np.array(0, dtype), "z"),
             numpy_helper.from_array(weights.astype(np.int8), "w"),
             numpy_helper.from_array(np.int8(0), "wz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "s", "wz"], ["wd"]),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    graph = helper.make_graph(
        nodes, "qdq_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, weights.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _worst_inputs(activation: str, k: int) -> np.ndarray:
    """Rows at the activation type's extremes (the largest pairs of products) and random."""
    _, (low, high) = ACTIVATIONS[activation]
    rng = np.random.default_rng(0)
    rows = [np.full(k, high), np.full(k, low), rng.integers(low, high + 1, k)]
    rows += [rng.choice([low, high], k) for _ in range(5)]
    return np.stack(rows).astype(np.float32)


def _weights(level: int, k: int = 64) -> np.ndarray:
    """Columns all +level, all -level, alternating and random within +-level."""
    rng = np.random.default_rng(1)
    low = -level - (level == 127)  # int8 reaches -128
    columns = [np.full(k, level), np.full(k, low), np.resize([level, low], k),
               rng.integers(low, level + 1, k)]
    return np.stack(columns, axis=1)


def _outputs(model, x, mode):
    return open_session(model, mode)[0].run(None, {"x": x})[0]


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_weights_within_64_run_fused_and_exact_on_every_cpu(activation):
    """2 * 255 * 64 fits int16: even the saturating kernels are exact at this level."""
    weights = _weights(SAFE_WEIGHT_LEVEL)
    model, x = _qdq_matmul(weights, activation), _worst_inputs(activation, 64)
    choice = choose_kernels(model)
    assert choice.fused and "every CPU" in choice.reason
    np.testing.assert_array_equal(_outputs(model, x, "auto"), x.astype(np.float64) @ weights)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_full_range_weights_are_computed_exactly_whatever_the_cpu(activation):
    """Fused kernels are exact exactly where the probe says they do not saturate, and the
    runner's automatic choice is exact everywhere."""
    weights = _weights(127)
    model, x = _qdq_matmul(weights, activation), _worst_inputs(activation, 64)
    exact = x.astype(np.float64) @ weights
    np.testing.assert_array_equal(_outputs(model, x, "auto"), exact)
    np.testing.assert_array_equal(_outputs(model, x, "simulated"), exact)
    fused_is_exact = np.array_equal(_outputs(model, x, "fused"), exact)
    assert fused_is_exact == (not int8_kernels_saturate())
    choice = choose_kernels(model)
    assert choice.fused == fused_is_exact
    if not choice.fused:
        assert "weight_bits=7" in choice.reason and "+-128" in choice.reason
        assert "outputs are not the model's" in choose_kernels(model, "fused").reason


def test_weight_level_reads_the_int8_weights_of_compute_ops():
    assert weight_level(_qdq_matmul(_weights(127), "uint8")) == 128  # the -128 column
    assert weight_level(_qdq_matmul(_weights(9), "uint8")) == 9
    float_model = _qdq_matmul(_weights(9), "uint8")
    del float_model.graph.node[:]
    float_model.graph.node.append(helper.make_node("MatMul", ["x", "x"], ["y"]))
    assert weight_level(float_model) == 0


def test_runner_reports_its_kernels_and_bad_input_is_named(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_qdq_matmul(_weights(7), "uint8"), str(path))
    with pytest.raises(QATConfigError, match="unknown INT8 kernel mode 'fast'.*simulated"):
        OnnxRuntimeRunner(path, int8_kernels="fast")
    runner = OnnxRuntimeRunner(path)
    assert runner.kernels.fused and runner.kernels.label == "int8"
    assert OnnxRuntimeRunner(path, int8_kernels="simulated").kernels.label == "float Q/DQ"
    with pytest.raises(QATError, match="nowhere.onnx does not exist"):
        open_session(tmp_path / "nowhere.onnx")
    (tmp_path / "cut.onnx").write_bytes(path.read_bytes()[:40])
    with pytest.raises(QATError, match="cut.onnx.*truncated"):
        OnnxRuntimeRunner(tmp_path / "cut.onnx")


def test_a_float_model_is_labelled_fp32():
    model = _qdq_matmul(_weights(9), "uint8")
    del model.graph.node[:]
    model.graph.node.append(helper.make_node("MatMul", ["x", "x"], ["y"]))
    choice = choose_kernels(model)
    assert choice.label == "fp32" and choice.fused


def test_portability_note_is_a_property_of_the_model_not_of_this_cpu():
    note = cpu_portability_note(_qdq_matmul(_weights(127), "uint8"))
    assert "+-128" in note and "without VNNI" in note and "weight_bits=7" in note
    assert cpu_portability_note(_qdq_matmul(_weights(SAFE_WEIGHT_LEVEL), "int8")) is None


def test_float_weights_behind_a_quantizer_count_and_run_time_ones_are_the_worst_case():
    """ONNX Runtime's own PTQ with int8 activations keeps float weights -> Q -> DQ."""
    model = _qdq_matmul(_weights(127), "int8")
    weights = next(t for t in model.graph.initializer if t.name == "w")
    weights.CopyFrom(numpy_helper.from_array(_weights(127).astype(np.float32) * 0.5, "w"))
    model.graph.initializer.append(numpy_helper.from_array(np.float32(0.5), "w_scale"))
    model.graph.node.insert(2, helper.make_node("QuantizeLinear", ["w", "w_scale", "wz"],
                                                ["wq"]))
    dequantize = next(n for n in model.graph.node if list(n.input) == ["w", "s", "wz"])
    dequantize.input[0] = "wq"
    assert weight_level(model) == 128
    x = _worst_inputs("int8", 64)
    np.testing.assert_array_equal(_outputs(model, x, "auto"), x.astype(np.float64) @ _weights(127))
    dequantize.input[0] = "xq"  # an int8 operand computed at run time: unknown, so the worst
    assert weight_level(model) == 128
    assert weight_level(_qdq_matmul(_weights(9), "int8")) == 9

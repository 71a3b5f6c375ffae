"""Functions Paddle 3.3 left without a legacy-IR form (paddle.matmul, paddle.sum, F.gelu, ...)
build legacy ops again, computing what Paddle's eager functions compute."""

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from paddle_qat import legacy_api
from paddle_qat.errors import LegacyIRRequiredError
from paddle_qat.legacy_api import LEGACY_OPS, LegacyOp
from program_tools import weight_gradients

RNG = np.random.default_rng(0)
UNIT = RNG.uniform(0.1, 0.9, (2, 3, 4)).astype("float32")  # inside every unary op's domain
SIGNED = RNG.normal(size=(2, 3, 4)).astype("float32")
OTHER = RNG.normal(size=(2, 3, 4)).astype("float32")
MASK = SIGNED > 0
SPECIAL = np.array([[1.0, np.nan, np.inf, -2.0]], "float32")

# function name -> (namespace, inputs, keyword arguments): one case per legacy op
CASES = {
    **{name: (paddle, [UNIT], {}) for name in
       ("abs", "asin", "atanh", "ceil", "cos", "cosh", "exp", "expm1", "floor", "log",
        "log10", "log1p", "log2", "rsqrt", "sigmoid", "sign", "sin", "sinh", "sqrt", "tanh")},
    "acos": (paddle, [UNIT - 0.5], {}),
    "acosh": (paddle, [UNIT + 1.0], {}),
    "isnan": (paddle, [SPECIAL], {}),
    "isinf": (paddle, [SPECIAL], {}),
    "isfinite": (paddle, [SPECIAL], {}),
    "round": (paddle, [SIGNED * 10], {}),
    "multiply": (paddle, [SIGNED, OTHER[:, :1]], {}),  # broadcast
    "maximum": (paddle, [SIGNED, OTHER], {}),
    "minimum": (paddle, [SIGNED, OTHER], {}),
    "greater_than": (paddle, [SIGNED, OTHER], {}),
    "dot": (paddle, [SIGNED[0, 0], OTHER[0, 0]], {}),
    "bmm": (paddle, [SIGNED, OTHER.transpose(0, 2, 1)], {}),
    "matmul": (paddle, [SIGNED, OTHER], {"transpose_y": True}),
    "logical_and": (paddle, [MASK, OTHER > 0], {}),
    "logical_or": (paddle, [MASK, OTHER > 0], {}),
    "logical_xor": (paddle, [MASK, OTHER > 0], {}),
    "logical_not": (paddle, [MASK], {}),
    "sum": (paddle, [SIGNED], {"axis": [0, 2], "keepdim": True}),
    "amax": (paddle, [SIGNED], {"axis": -1}),
    "amin": (paddle, [SIGNED], {}),
    "all": (paddle, [MASK], {"axis": 1}),
    "any": (paddle, [MASK], {"axis": 1}),
    "logsumexp": (paddle, [SIGNED], {"axis": 1}),
    "argmax": (paddle, [SIGNED], {"axis": 1}),
    "argmin": (paddle, [SIGNED], {}),
    "tril": (paddle, [SIGNED], {"diagonal": 1}),
    "triu": (paddle, [SIGNED], {}),
    "diagonal": (paddle, [SIGNED], {"axis1": 1, "axis2": 2}),
    "roll": (paddle, [SIGNED], {"shifts": 1, "axis": 2}),
    "expand_as": (paddle, [SIGNED[:1], OTHER], {}),
    "isclose": (paddle, [SIGNED, SIGNED + np.float32(1e-6) * (OTHER > 0)], {"atol": 1e-7}),
    "gelu": (F, [SIGNED], {"approximate": True}),
    "softplus": (F, [SIGNED * 10], {"beta": 2, "threshold": 5}),
    "grid_sample": (F, [SIGNED[:, None, :, :3].repeat(2, 1),
                        np.tanh(OTHER.reshape(2, 2, 3, 2))], {}),
    "svdvals": (paddle.linalg, [SIGNED], {}),
    "median": (paddle, [SIGNED], {"axis": 1}),
}


def _static(namespace, name, inputs, kwargs):
    main, startup = paddle.static.Program(), paddle.static.Program()
    with paddle.static.program_guard(main, startup):
        variables = [paddle.static.data(f"in{i}", list(a.shape), str(a.dtype))
                     for i, a in enumerate(inputs)]
        out = getattr(namespace, name)(*variables, **kwargs)
    exe = paddle.static.Executor(paddle.CPUPlace())
    (value,) = exe.run(main, feed={f"in{i}": a for i, a in enumerate(inputs)},
                       fetch_list=[out])
    return np.asarray(value), [op.type for op in main.global_block().ops]


def _eager(namespace, name, inputs, kwargs):
    paddle.disable_static()
    try:
        return getattr(namespace, name)(*map(paddle.to_tensor, inputs), **kwargs).numpy()
    finally:
        paddle.enable_static()


def test_every_legacy_op_has_a_case():
    assert set(CASES) == {name for name, op in LEGACY_OPS.items() if isinstance(op, LegacyOp)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_static_function_builds_its_legacy_op_and_computes_what_eager_paddle_does(name):
    namespace, inputs, kwargs = CASES[name]
    static, op_types = _static(namespace, name, inputs, kwargs)
    eager = _eager(namespace, name, inputs, kwargs)
    assert LEGACY_OPS[name].op_type in op_types
    assert static.dtype == eager.dtype and static.shape == eager.shape
    np.testing.assert_allclose(static, eager, rtol=1e-5, atol=1e-6)


# the argument forms most likely to be mapped wrong: dtypes, all-axis reductions, vectors
ARGUMENT_FORMS = {
    "argmax, paddle dtype, keepdim": lambda x: paddle.argmax(x, 1, True, dtype=paddle.int32),
    "argmin, string dtype": lambda x: paddle.argmin(x, axis=-1, dtype="int32"),
    "sum, paddle dtype": lambda x: paddle.sum(x, dtype=paddle.float64),
    "sum, all axes, keepdim": lambda x: paddle.sum(x, keepdim=True),
    "amax, axis tuple": lambda x: paddle.amax(x, axis=(0, 1)),
    "logsumexp, all axes": lambda x: paddle.logsumexp(x),
    "roll, flattened": lambda x: paddle.roll(x, 3),
    "roll, two axes": lambda x: paddle.roll(x, [1, -1], axis=[0, 2]),
    "matmul, matrix x vector": lambda x: paddle.matmul(x, x[0, 0]),
    "matmul, transpose_x": lambda x: paddle.linalg.matmul(x, x, transpose_x=True),
    "Variable method": lambda x: x.argmax(axis=0),
    "round, decimals": lambda x: paddle.round(x, decimals=2),
    "median, all axes, keepdim": lambda x: paddle.median(x, keepdim=True),
    "median, min mode, its indices": lambda x: paddle.median(x, axis=2, mode="min")[1],
}


@pytest.mark.parametrize("form", sorted(ARGUMENT_FORMS))
def test_argument_forms_match_eager(form):
    build = ARGUMENT_FORMS[form]
    main = paddle.static.Program()
    with paddle.static.program_guard(main, paddle.static.Program()):
        out = build(paddle.static.data("x", list(SIGNED.shape), "float32"))
    (static,) = paddle.static.Executor(paddle.CPUPlace()).run(main, feed={"x": SIGNED},
                                                              fetch_list=[out])
    paddle.disable_static()
    try:
        eager = build(paddle.to_tensor(SIGNED)).numpy()
    finally:
        paddle.enable_static()
    assert static.dtype == eager.dtype and static.shape == eager.shape
    np.testing.assert_allclose(static, eager, rtol=1e-5, atol=1e-6)


def test_every_function_paddle_left_without_a_legacy_form_is_covered():
    shims = pytest.importorskip("paddle.base.dygraph.generated_tensor_methods_patch")
    names = {name for name, _ in getattr(shims, "funcs_map", []) + getattr(shims, "nn_funcs_map",
                                                                            [])}
    if not names:
        pytest.skip("this Paddle has no C++-only functions")
    assert names <= set(LEGACY_OPS)


def test_paddles_own_functions_that_call_them_work_too():
    """F.cosine_similarity calls the ``sum`` its module imported, not ``paddle.sum``."""
    static, op_types = _static(F, "cosine_similarity", [SIGNED[0], OTHER[0]], {"axis": 1})
    eager = _eager(F, "cosine_similarity", [SIGNED[0], OTHER[0]], {"axis": 1})
    assert "reduce_sum" in op_types
    np.testing.assert_allclose(static, eager, rtol=1e-5)


def test_paddles_transformer_layer_builds_and_computes_what_eager_paddle_does(fresh_scope):
    """nn.MultiHeadAttention calls ``tensor.matmul`` of the module ``paddle.tensor`` (the
    attribute ``paddle.tensor`` is a function in Paddle 3.3)."""
    main, startup = paddle.static.Program(), paddle.static.Program()
    with paddle.static.program_guard(main, startup):
        layer = paddle.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
        out = layer(paddle.static.data("q", [2, 5, 8], "float32"))
    exe = paddle.static.Executor(paddle.CPUPlace())
    exe.run(startup)
    tokens = RNG.normal(size=(2, 5, 8)).astype("float32")
    (static,) = exe.run(main, feed={"q": tokens}, fetch_list=[out])
    weights = [np.array(fresh_scope.find_var(p.name).get_tensor()) for p in layer.parameters()]
    assert "matmul_v2" in {op.type for op in main.global_block().ops}

    paddle.disable_static()
    try:
        eager_layer = paddle.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
        for parameter, value in zip(eager_layer.parameters(), weights):
            parameter.set_value(value)
        eager = eager_layer(paddle.to_tensor(tokens)).numpy()
    finally:
        paddle.enable_static()
    np.testing.assert_allclose(static, eager, rtol=1e-4, atol=1e-5)


def test_variable_methods_and_sum_dtypes():
    main, startup = paddle.static.Program(), paddle.static.Program()
    with paddle.static.program_guard(main, startup):
        x = paddle.static.data("x", [None, 4], "float32")
        mask = paddle.static.data("mask", [None, 4], "bool")
        fetch = [x.sum(axis=1), x.matmul(x, transpose_y=True), x.exp(), paddle.sum(mask),
                 paddle.sum(x, dtype="float64")]
    exe = paddle.static.Executor(paddle.CPUPlace())
    data = SIGNED[0]
    row_sum, gram, exp, count, wide = exe.run(
        main, feed={"x": data, "mask": data > 0}, fetch_list=fetch)
    np.testing.assert_allclose(row_sum, data.sum(1), rtol=1e-5)
    np.testing.assert_allclose(gram, data @ data.T, rtol=1e-5)
    np.testing.assert_allclose(exp, np.exp(data), rtol=1e-5)
    assert count.dtype == np.int64 and count == (data > 0).sum()  # as eager paddle.sum
    assert wide.dtype == np.float64


def test_gradients_through_the_legacy_ops_match_eager():
    weight = RNG.normal(size=(4, 5)).astype("float32")

    def loss_of(x, w):
        return paddle.sum(F.gelu(paddle.matmul(x, w)) * paddle.sigmoid(x).sum(1, keepdim=True))

    static_grad, eager_grad = weight_gradients(loss_of, SIGNED[0], weight)
    np.testing.assert_allclose(static_grad, eager_grad, rtol=1e-4, atol=1e-6)


def test_median_trains_like_eager():
    """paddle.median calls its binding in every mode; on the legacy IR it is the legacy
    ``median`` op again, gradient included (half to each of the two middle values)."""
    data = RNG.normal(size=(3, 4)).astype("float32")
    main, startup = paddle.static.Program(), paddle.static.Program()
    with paddle.static.program_guard(main, startup):
        x = paddle.static.data("x", [3, 4], "float32")
        x.stop_gradient = False
        median = paddle.median(x, axis=1)
        (grad,) = paddle.static.gradients([paddle.sum(median)], [x])
    value, gradient = paddle.static.Executor(paddle.CPUPlace()).run(
        main, feed={"x": data}, fetch_list=[median, grad])
    np.testing.assert_allclose(value, np.median(data, axis=1), rtol=1e-6)
    middle = np.argsort(data, axis=1)[:, 1:3]
    expected = np.zeros_like(data)
    np.put_along_axis(expected, middle, 0.5, axis=1)
    np.testing.assert_array_equal(gradient, expected)


def test_fleet_qat_quantizes_and_trains_a_model_written_with_paddle_matmul(single_rank):
    main, startup = paddle.static.Program(), paddle.static.Program()
    with paddle.static.program_guard(main, startup):
        x = paddle.static.data("x", [None, 8], "float32")
        label = paddle.static.data("label", [None, 1], "int64")
        w1 = paddle.static.create_parameter([8, 16], "float32")
        w2 = paddle.static.create_parameter([16, 3], "float32")
        logits = paddle.matmul(F.gelu(paddle.matmul(x, w1)), w2)
        loss = paddle.mean(F.cross_entropy(logits, label))
        strategy = single_rank.DistributedStrategy()
        strategy.qat = True
        single_rank.distributed_optimizer(paddle.optimizer.Momentum(0.1), strategy).minimize(loss)
    ops = main.global_block().ops
    matmuls = [op for op in ops if op.type == "matmul_v2"]
    quantized = {op.output("Y")[0] for op in ops if op.type == "dequantize_linear"}
    assert len(matmuls) == 2
    assert all(op.input("X")[0] in quantized and op.input("Y")[0] in quantized
               for op in matmuls)
    exe = paddle.static.Executor(paddle.CPUPlace())
    exe.run(startup)
    data = RNG.normal(size=(64, 8)).astype("float32")
    labels = (data[:, :3].argmax(1)[:, None]).astype("int64")
    losses = [float(exe.run(main, feed={"x": data, "label": labels}, fetch_list=[loss])[0])
              for _ in range(30)]
    assert np.isfinite(losses).all() and losses[-1] < 0.7 * losses[0]


def test_a_function_without_a_legacy_op_names_itself_and_the_alternative():
    with paddle.static.program_guard(paddle.static.Program()):
        x = paddle.static.data("x", [4], "float32")
        index = paddle.static.data("index", [2], "int64")
        with pytest.raises(LegacyIRRequiredError, match=r"paddle\.index_put .*scatter"):
            paddle.index_put(x, (index,), x[:2])


def test_a_numpy_operand_next_to_a_variable_gets_a_clear_error():
    with paddle.static.program_guard(paddle.static.Program()):
        x = paddle.static.data("x", [2, 3], "float32")
        with pytest.raises(LegacyIRRequiredError, match=r"paddle\.matmul\(\): y is a ndarray"):
            paddle.matmul(x, np.ones((3, 2), "float32"))
        with pytest.raises(TypeError, match="unexpected keyword argument 'axes'"):
            paddle.sum(x, axes=1)
        with pytest.raises(LegacyIRRequiredError, match="Variable axis .* pass the axes as ints"):
            paddle.sum(x, axis=paddle.static.data("axis", [1], "int64"))
        with pytest.raises(LegacyIRRequiredError, match="out= has no legacy-IR form"):
            paddle.logical_not(x > 0, out=x > 0)


def test_paddle_functions_still_take_pir_values_when_the_user_chose_pir():
    """The wrappers only divert legacy Variables: with FLAGS_enable_pir_api=1 set by the
    user, paddle.sum and paddle.matmul on PIR values are Paddle's own."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = ("import paddle_qat, paddle, numpy as np\n"
              "paddle.enable_static()\n"
              "main = paddle.static.Program()\n"
              "with paddle.static.program_guard(main):\n"
              "    x = paddle.static.data('x', [2, 3], 'float32')\n"
              "    out = paddle.sum(paddle.matmul(x, x, transpose_y=True), axis=1)\n"
              "(value,) = paddle.static.Executor().run(main, feed={'x': np.ones((2, 3), "
              "'float32')}, fetch_list=[out])\n"
              "print('PIR', type(x).__name__, value.tolist())\n")
    env = {**os.environ, "FLAGS_enable_pir_api": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "PIR Value [6.0, 6.0]" in done.stdout


def test_eager_calls_reach_paddle_unchanged_and_install_is_idempotent():
    assert legacy_api.install() == []  # import paddle_qat already wrapped them
    assert paddle.sum.__wrapped__ is not None
    paddle.disable_static()
    try:
        value = paddle.sum(paddle.to_tensor([[1.0, 2.0], [3.0, 4.0]]), axis=0)
        assert isinstance(value, paddle.Tensor)
        np.testing.assert_array_equal(value.numpy(), [4.0, 6.0])
    finally:
        paddle.enable_static()

"""Read facts off legacy-IR programs for assertions."""

from __future__ import annotations

import collections

import numpy as np

WEIGHT_SLOTS = {"conv2d": ("Input", "Filter"), "depthwise_conv2d": ("Input", "Filter"),
                "conv2d_transpose": ("Input", "Filter"), "mul": ("X", "Y"),
                "matmul": ("X", "Y"), "matmul_v2": ("X", "Y")}


def op_counts(program) -> collections.Counter:
    return collections.Counter(op.type for op in program.global_block().ops)


def producers(program) -> dict:
    return {name: op for op in program.global_block().ops for name in op.output_arg_names}


def forward_ops(program, op_type: str):
    return [op for op in program.global_block().ops
            if op.type == op_type and int(op.attr("op_role")) in (0, 256)]


def dequantized_inputs(program, op) -> dict[str, bool]:
    """For each of op's data/weight slots: does a dequantize_linear feed it?"""
    made_by = producers(program)
    return {slot: made_by.get(op.input(slot)[0]) is not None
            and made_by[op.input(slot)[0]].type == "dequantize_linear"
            for slot in WEIGHT_SLOTS[op.type]}


def quant_op_for(program, consumer, slot: str):
    """(quantize_linear, dequantize_linear) feeding consumer's input slot."""
    made_by = producers(program)
    dq = made_by[consumer.input(slot)[0]]
    return made_by[dq.input("X")[0]], dq


def scale_values(program, scope) -> dict[str, np.ndarray]:
    names = {op.input("Scale")[0] for op in program.global_block().ops
             if op.type in ("quantize_linear", "dequantize_linear")}
    return {n: np.array(scope.find_var(n).get_tensor()) for n in sorted(names)}


def all_reduce_count(program) -> int:
    return sum(1 for op in program.global_block().ops
               if op.type in ("c_allreduce_sum", "all_reduce", "c_allreduce_avg"))


def fake_quant(x: np.ndarray, scale: np.ndarray, bits: int = 8, axis: int | None = None):
    """Hand-written float32 reference of Paddle's quantize_linear -> dequantize_linear:
    q = round_half_even(qmax * (1 / scale) * x) clipped to [-qmax - 1, qmax];
    x' = q * scale / qmax."""
    qmax = np.float32(2 ** (bits - 1) - 1)
    x = x.astype(np.float32)
    scale = scale.astype(np.float32)
    if axis is not None:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
    q = np.clip(np.round(qmax * (np.float32(1) / scale) * x), -qmax - 1, qmax)
    return (q * scale / qmax).astype(np.float32)


def weight_gradients(loss_of, features: np.ndarray, weight: np.ndarray):
    """d loss_of(x, w) / d w at ``features`` and ``weight``, computed twice: by a legacy
    static program (``paddle.static.gradients``) and by eager Paddle; (static, eager)."""
    import paddle

    main, startup = paddle.static.Program(), paddle.static.Program()
    with paddle.static.program_guard(main, startup):
        x = paddle.static.data("x", [None, *features.shape[1:]], "float32")
        w = paddle.static.create_parameter(
            list(weight.shape), "float32",
            default_initializer=paddle.nn.initializer.Assign(weight))
        (grad,) = paddle.static.gradients([loss_of(x, w)], [w])
    exe = paddle.static.Executor(paddle.CPUPlace())
    exe.run(startup)
    (static,) = exe.run(main, feed={"x": features}, fetch_list=[grad])

    paddle.disable_static()
    try:
        w_eager = paddle.to_tensor(weight, stop_gradient=False)
        loss_of(paddle.to_tensor(features), w_eager).backward()
        return static, w_eager.grad.numpy()
    finally:
        paddle.enable_static()

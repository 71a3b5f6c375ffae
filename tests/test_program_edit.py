"""Linear-time program edits rewrite exactly what Paddle's own helpers would."""

import paddle
import pytest

from nets import build
from paddle_qat import QATConfig, program_edit, quantize_program


def _ops(program):
    return [(op.type, op.input_arg_names, op.output_arg_names, op.attr("op_role"))
            for op in program.global_block().ops]


def _quantized(config, monkeypatch=None):
    """A training program and its eval clone, quantized with ``config`` in a fresh scope."""
    scope = paddle.static.Scope()
    with paddle.static.scope_guard(scope), paddle.utils.unique_name.guard():
        main, startup, test, (*_, loss) = build()
        with paddle.static.program_guard(main, startup):
            paddle.optimizer.Momentum(0.05, momentum=0.9).minimize(loss)
        quantize_program(main, config, startup_program=startup, scope=scope)
        quantize_program(test, config, for_test=True, scope=scope)
    return main, test


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_linking_graph_rewrites_like_paddles_ir_graph(monkeypatch, target):
    from paddle.base.framework import IrGraph

    config = QATConfig(target=target)
    fast = _quantized(config)
    monkeypatch.setattr(program_edit, "_ir_graph_class", lambda: IrGraph)
    slow = _quantized(config)
    for ours, paddles in zip(fast, slow):
        assert any(op[0] == "quantize_linear" for op in _ops(ours))
        assert _ops(ours) == _ops(paddles)
        assert sorted(v.name for v in ours.list_vars()) == \
            sorted(v.name for v in paddles.list_vars())


def test_one_sync_renames_and_syncs_once_even_when_the_body_raises():
    main, _, _, _ = build()
    block = main.global_block()
    old = next(op.input_arg_names[0] for op in block.ops if op.type == "conv2d")
    with pytest.raises(RuntimeError, match="inside"):
        with program_edit.one_sync(main):
            block._rename_var(old, "renamed_image")
            raise RuntimeError("inside")
    assert "_sync_with_cpp" not in vars(block)  # the class's method again
    assert block.has_var("renamed_image") and not block.has_var(old)
    assert any("renamed_image" in op.input_arg_names for op in block.ops)
    assert {v.name() for v in block.desc.all_vars()} == set(block.vars)

"""QAT-hostile fusions are switched off, for fleet users and for CompiledProgram users."""

import numpy as np
import paddle
import pytest

import nets
import paddle_qat
from paddle_qat.build_strategy import QAT_INCOMPATIBLE_FUSIONS
from program_tools import forward_ops, op_counts, producers


def _minimize_with_fusion(fleet, adjust: bool):
    main, startup, _, (_, _, _, loss) = nets.build()
    strategy = fleet.DistributedStrategy()
    paddle_qat.configure(strategy, paddle_qat.QATConfig(adjust_build_strategy=adjust))
    build_strategy = strategy.build_strategy
    build_strategy.fuse_elewise_add_act_ops = True
    strategy.build_strategy = build_strategy
    with paddle.static.program_guard(main, startup):
        fleet.distributed_optimizer(paddle.optimizer.SGD(0.1), strategy).minimize(loss)
    return main


def _residual_add_is_quantized(program) -> bool:
    made_by = producers(program)
    adds = [op for op in forward_ops(program, "elementwise_add")
            if not op.input("Y")[0].endswith(".b_0")]
    return any(made_by.get(name) is not None and made_by[name].type == "dequantize_linear"
               for op in adds for name in op.input_arg_names)


def test_fleet_switch_keeps_residual_add_visible(single_rank):
    main = _minimize_with_fusion(single_rank, adjust=True)
    assert op_counts(main)["fused_elemwise_add_activation"] == 0
    assert _residual_add_is_quantized(main)


def test_without_the_switch_the_fusion_hides_the_residual_add(single_rank):
    """The control: proves the test above depends on the switch."""
    main = _minimize_with_fusion(single_rank, adjust=False)
    assert op_counts(main)["fused_elemwise_add_activation"] == 1
    assert not _residual_add_is_quantized(main)


def test_qat_build_strategy_copies_and_disables_every_listed_fusion():
    user = paddle.static.BuildStrategy()
    settable = []
    for name in QAT_INCOMPATIBLE_FUSIONS:
        try:
            setattr(user, name, True)
            settable.append(name)
        except RuntimeError:  # fuse_resunit needs a cuDNN-frontend (GPU) build
            pass
    assert len(settable) >= len(QAT_INCOMPATIBLE_FUSIONS) - 1
    safe = paddle_qat.qat_build_strategy(user)
    for name in settable:
        assert getattr(user, name) is True, f"user's strategy changed: {name}"
        assert getattr(safe, name) is False, name


def test_compiled_program_with_qat_build_strategy_trains(fresh_scope):
    """The NVIDIA RN50 program.py path: quantize, then compile with the user's strategy."""
    main, startup, _, (_, _, _, loss) = nets.build()
    with paddle.static.program_guard(main, startup):
        paddle.optimizer.Momentum(0.05, momentum=0.9).minimize(loss)
    paddle_qat.quantize_program(main, startup_program=startup)
    user_bs = paddle.static.BuildStrategy()
    user_bs.fuse_elewise_add_act_ops = True
    compiled = paddle.static.CompiledProgram(
        main, build_strategy=paddle_qat.qat_build_strategy(user_bs))
    exe = paddle.static.Executor(paddle.CPUPlace())
    exe.run(startup)
    losses = [float(exe.run(compiled, feed=f, fetch_list=[loss])[0])
              for f in nets.separable_batches(20)]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


def test_disable_returns_what_changed():
    bs = paddle.static.BuildStrategy()
    bs.fuse_bn_act_ops = True
    assert "fuse_bn_act_ops" in paddle_qat.disable_qat_incompatible_fusions(bs)
    assert not bs.fuse_bn_act_ops
    assert paddle_qat.disable_qat_incompatible_fusions(bs) == []


@pytest.mark.parametrize("name", sorted(QAT_INCOMPATIBLE_FUSIONS))
def test_every_listed_fusion_is_a_real_build_strategy_field(name):
    assert hasattr(paddle.static.BuildStrategy(), name)

"""strategy.qat = True in fleet static training: correct, complete, composable."""

import numpy as np
import paddle
import pytest

import nets
import paddle_qat
from paddle_qat.meta_optimizer import QATOptimizer
from program_tools import (
    all_reduce_count,
    dequantized_inputs,
    fake_quant,
    forward_ops,
    op_counts,
    producers,
    quant_op_for,
    scale_values,
)

QUANTIZABLE = ("conv2d", "mul")


def fleet_minimize(fleet, strategy, main, startup, loss, optimizer=None):
    with paddle.static.program_guard(main, startup):
        optimizer = optimizer or paddle.optimizer.Momentum(0.05, momentum=0.9)
        dist_opt = fleet.distributed_optimizer(optimizer, strategy)
        dist_opt.minimize(loss)
    return dist_opt


def qat_strategy(fleet, **settings):
    strategy = fleet.DistributedStrategy()
    strategy.qat = True
    for key, value in settings.items():
        setattr(strategy, key, value)
    return strategy


def applied(fleet):
    return fleet.fleet.strategy_compiler._get_applied_meta_list()


def test_import_replaces_paddles_qat_optimizer(single_rank):
    main, startup, _, (_, _, _, loss) = nets.build()
    fleet_minimize(single_rank, qat_strategy(single_rank), main, startup, loss)
    qat = [o for o in single_rank.fleet.strategy_compiler._get_applied_meta_optimizer()
           if type(o).__name__ == "QATOptimizer"]
    assert len(qat) == 1 and isinstance(qat[0], QATOptimizer)


def test_qat_trains_and_eval_matches_hand_computed_fake_quant(single_rank, fresh_scope):
    main, startup, test, (_, _, logits, loss) = nets.build()
    dist_opt = fleet_minimize(single_rank, qat_strategy(single_rank), main, startup, loss)

    # every quantizable forward op reads dequantized data and weight
    for op_type in QUANTIZABLE:
        ops = forward_ops(main, op_type)
        assert ops, op_type
        for op in ops:
            assert all(dequantized_inputs(main, op).values()), (op_type, op.input_arg_names)
    # the residual add reads its identity branch through Q/DQ
    made_by = producers(main)
    residual = [op for op in forward_ops(main, "elementwise_add")
                if not op.input("Y")[0].endswith(".b_0")]
    assert len(residual) == 1
    assert any(made_by[name].type == "dequantize_linear"
               for name in residual[0].input_arg_names)

    exe = paddle.static.Executor(paddle.CPUPlace())
    exe.run(startup)
    dist_opt.qat_init(paddle.CPUPlace(), scope=fresh_scope, test_program=test)
    losses = [float(exe.run(main, feed=feed, fetch_list=[loss])[0])
              for feed in nets.separable_batches(40)]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses

    scales = scale_values(main, fresh_scope)
    # 3 weights + image + fc input + the stem output, whose conv and residual-identity
    # quantizers share one scale (one INT8 tensor for TensorRT, paddle_qat.placement)
    assert len(scales) == 6
    for name, value in scales.items():
        assert np.all(np.isfinite(value)) and np.all(value > 0), name
    assert scales["image@scale"][0] != pytest.approx(0.001)  # learnt, not the initial value

    # eval program: the fc layer equals a hand-computed fake-quant reference
    (fc,) = forward_ops(test, "mul")
    q_x, _ = quant_op_for(test, fc, "X")
    q_w, _ = quant_op_for(test, fc, "Y")
    assert q_w.attr("quant_axis") == 1
    feed = next(nets.separable_batches(1, seed=11))
    x, out, logit_values = exe.run(test, feed=feed, fetch_list=[
        q_x.input("X")[0], fc.output("Out")[0], logits])
    weight = np.array(fresh_scope.find_var(q_w.input("X")[0]).get_tensor())
    x_scale = scales[q_x.input("Scale")[0]]
    w_scale = scales[q_w.input("Scale")[0]]
    reference = fake_quant(x, x_scale) @ fake_quant(weight, w_scale, axis=1)
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)
    assert not np.allclose(out, x @ weight, atol=1e-4)  # quantization really happened
    # and eval reads the trained scales (qat_init ran before training)
    assert np.isfinite(logit_values).all()


def test_eval_quantization_after_training_keeps_learnt_scales(single_rank, fresh_scope):
    main, startup, test, (_, _, _, loss) = nets.build()
    dist_opt = fleet_minimize(single_rank, qat_strategy(single_rank), main, startup, loss)
    exe = paddle.static.Executor(paddle.CPUPlace())
    exe.run(startup)
    for feed in nets.separable_batches(5):
        exe.run(main, feed=feed)
    learnt = scale_values(main, fresh_scope)
    dist_opt.qat_init(paddle.CPUPlace(), scope=fresh_scope, test_program=test)
    after = scale_values(test, fresh_scope)
    assert set(after) <= set(learnt)
    for name, value in after.items():
        np.testing.assert_array_equal(value, learnt[name])


def test_two_ranks_keep_gradient_all_reduce_under_qat(two_ranks):
    counts = {}
    for qat in (False, True):
        main, startup, _, (_, _, _, loss) = nets.build()
        strategy = two_ranks.DistributedStrategy()
        strategy.qat = qat
        fleet_minimize(two_ranks, strategy, main, startup, loss)
        counts[qat] = all_reduce_count(main)
        assert "RawProgramOptimizer" in applied(two_ranks)
    # one all-reduce per trainable parameter's gradient, QAT or not, plus QAT's one fused
    # all-reduce of the activation quant state (tests/test_scale_sync.py)
    assert counts[True] == counts[False] + 1 and counts[False] > 0


def test_paddles_own_qat_optimizer_drops_the_all_reduce(two_ranks, monkeypatch):
    """Why ours exists: documents the upstream bug so a fixed Paddle shows up here."""
    from paddle.distributed.fleet.base import meta_optimizer_factory
    from paddle.distributed.fleet.meta_optimizers import qat_optimizer

    monkeypatch.setattr(meta_optimizer_factory, "QATOptimizer", qat_optimizer.QATOptimizer)
    main, startup, _, (_, _, _, loss) = nets.build()
    fleet_minimize(two_ranks, qat_strategy(two_ranks), main, startup, loss)
    assert all_reduce_count(main) == 0


@pytest.mark.parametrize("extra", ["amp", "recompute", "gradient_merge"])
def test_composes_with_other_meta_optimizers(single_rank, fresh_scope, extra):
    main, startup, _, (_, _, _, loss) = nets.build()
    strategy = qat_strategy(single_rank)
    if extra == "amp":
        strategy.amp = True
        strategy.amp_configs = {"custom_white_list": ["conv2d", "mul"]}
    elif extra == "recompute":
        strategy.recompute = True
        strategy.recompute_configs = {"checkpoints": [_first_bn_output(main)]}
    else:
        strategy.gradient_merge = True
        strategy.gradient_merge_configs = {"k_steps": 2, "avg": True}
    fleet_minimize(single_rank, strategy, main, startup, loss)
    names = applied(single_rank)
    assert names[0] == "QATOptimizer", names  # outermost: quantizes the finished program
    assert {"AMPOptimizer": "amp", "RecomputeOptimizer": "recompute",
            "GradientMergeOptimizer": "gradient_merge"}.keys() & set(names)
    assert op_counts(main)["quantize_linear"] >= 6  # 3 weights, 3 activation scales
    for op_type in QUANTIZABLE:
        for op in forward_ops(main, op_type):
            assert all(dequantized_inputs(main, op).values()), (extra, op_type)
    if extra != "amp":  # fp16 kernels need a GPU; AMP numerics are covered by the AMP tests
        exe = paddle.static.Executor(paddle.CPUPlace())
        exe.run(startup)
        losses = [float(exe.run(main, feed=feed, fetch_list=[loss])[0])
                  for feed in nets.separable_batches(6)]
        assert np.isfinite(losses).all()
        for name, value in scale_values(main, fresh_scope).items():
            assert np.all(np.isfinite(value)) and np.all(value > 0), name


def _first_bn_output(program):
    return next(op.output("Y")[0] for op in program.global_block().ops
                if op.type == "batch_norm")


def test_fleet_skip_pattern_and_typed_skip(single_rank):
    main, startup, _, (_, _, _, loss) = nets.build()
    strategy = single_rank.DistributedStrategy()
    paddle_qat.configure(strategy, paddle_qat.QATConfig(skip_weights=("fc_*",)))
    fleet_minimize(single_rank, strategy, main, startup, loss)
    (fc,) = forward_ops(main, "mul")
    assert not any(dequantized_inputs(main, fc).values())
    for conv in forward_ops(main, "conv2d"):
        assert all(dequantized_inputs(main, conv).values())

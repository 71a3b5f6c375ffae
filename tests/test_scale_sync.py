"""Static data parallel: activation quant state averaged across ranks every step."""

import numpy as np
import paddle

import nets
from paddle_qat.scale_sync import activation_quant_state, insert_scale_sync
from program_tools import all_reduce_count
from test_fleet_qat import fleet_minimize, qat_strategy


def _ops_after_optimizer(program):
    types = [op.type for op in program.global_block().ops]
    last_optimizer = max(i for i, t in enumerate(types) if t == "momentum")
    return types[last_optimizer + 1:]


def test_two_ranks_average_every_activation_quantizer(two_ranks):
    main, startup, _, (_, _, _, loss) = nets.build()
    fleet_minimize(two_ranks, qat_strategy(two_ranks), main, startup, loss)
    tail = _ops_after_optimizer(main)
    assert tail.count("all_reduce") == 1 and "concat" in tail and "split" in tail
    state = activation_quant_state(main)
    # 3 activation scales (image, stem output -- its conv and residual-identity quantizers
    # share one, paddle_qat.placement -- and fc input) x (scale, state, accum)
    assert len(state) == 9
    assert {n.rsplit("@", 1)[1] for n in state} == {"scale", "state", "accum"}
    assert not [n for n in state if n.startswith(("conv2d", "fc_0.w"))]  # weights: not synced
    split = next(op for op in main.global_block().ops if op.type == "split")
    assert len(split.output("Out")) == len(state)


def test_two_ranks_qat_amp_keeps_gradient_and_scale_sync(two_ranks, gpu_amp_lists):
    counts = {}
    for qat in (False, True):
        main, startup, _, (_, _, _, loss) = nets.build()
        strategy = qat_strategy(two_ranks, amp=True, qat=qat)
        strategy.amp_configs = {"custom_white_list": ["conv2d", "mul"]}
        fleet_minimize(two_ranks, strategy, main, startup, loss)
        counts[qat] = all_reduce_count(main)
    # the same gradient all-reduces as without QAT, plus the one fused quant-state all-reduce
    assert counts[False] > 0 and counts[True] == counts[False] + 1
    assert len(activation_quant_state(main)) == 9  # as above, under AMP too


def test_single_rank_has_no_sync(single_rank):
    main, startup, _, (_, _, _, loss) = nets.build()
    fleet_minimize(single_rank, qat_strategy(single_rank), main, startup, loss)
    assert "all_reduce" not in _ops_after_optimizer(main)


def test_sync_plumbing_writes_the_average_back_in_place(fresh_scope):
    """Run the inserted ops for real with the all-reduce as a 1-rank identity: every synced
    variable must come back as its own value / nranks, in its own shape."""
    import paddle_qat

    main, startup, _, (_, _, _, loss) = nets.build()
    with paddle.static.program_guard(main, startup):
        paddle.optimizer.SGD(0.0).minimize(loss)
    paddle_qat.quantize_program(main, startup_program=startup)
    names = insert_scale_sync(main, nranks=4)
    block = main.global_block()
    index = next(i for i, op in enumerate(block.ops) if op.type == "all_reduce")
    block._remove_op(index)  # no communicator on CPU: sum over one rank is the identity
    main._sync_with_cpp()
    exe = paddle.static.Executor(paddle.CPUPlace())
    exe.run(startup)
    unsynced = main.clone()
    unsynced_block = unsynced.global_block()
    first_sync = next(i for i, op in enumerate(unsynced_block.ops)
                      if op.type == "reshape2" and op.input("X")[0] in names)
    for i in reversed(range(first_sync, len(unsynced_block.ops))):
        unsynced_block._remove_op(i)
    unsynced._sync_with_cpp()
    feed = next(nets.separable_batches(1))
    before = {n: np.array(fresh_scope.find_var(n).get_tensor()) for n in names}
    exe.run(unsynced, feed=feed)
    raw = {n: np.array(fresh_scope.find_var(n).get_tensor()) for n in names}
    for n, v in before.items():
        fresh_scope.find_var(n).get_tensor().set(v, paddle.CPUPlace())
    exe.run(main, feed=feed)
    for n in names:
        got = np.array(fresh_scope.find_var(n).get_tensor())
        assert got.shape == raw[n].shape
        np.testing.assert_allclose(got, raw[n] / 4, rtol=1e-6)

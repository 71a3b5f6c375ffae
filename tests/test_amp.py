"""AMP (O1 and pure FP16 O2) + QAT: quant state fp32 and canonically named, at op level.

Paddle's CPU build refuses to put conv/mul in the FP16 white list, so ``gpu_amp_lists`` makes
AMP's list builder answer as it does on a GPU; the AMP rewrite itself is Paddle's, unchanged.
FP16 kernels need a GPU, so these tests assert on the programs, and run numerics (startup,
checkpoint, export, overflow) with the FP32 kernels the CPU has.
"""

import pickle
import warnings

import numpy as np
import paddle
import pytest
from paddle.base import core

import nets
import paddle_qat
from paddle_qat import amp
from paddle_qat.checkpoint import is_quant_state, load_checkpoint, save_checkpoint
from paddle_qat.export import export_onnx
from paddle_qat.runtime.int8_kernels import open_session
from program_tools import all_reduce_count, producers
from test_fleet_qat import fleet_minimize, qat_strategy

FP16, FP32 = core.VarDesc.VarType.FP16, core.VarDesc.VarType.FP32
AMP_CONFIGS = {
    "O1": {"custom_white_list": ["conv2d", "mul", "elementwise_add"]},
    "O2": {"custom_white_list": ["conv2d", "mul", "elementwise_add"], "use_pure_fp16": True,
           "use_fp16_guard": False},
}


def amp_qat(fleet, level, multi_precision=False):
    main, startup, test, tensors = nets.build()
    strategy = qat_strategy(fleet, amp=True)
    strategy.amp_configs = AMP_CONFIGS[level]
    momentum = paddle.optimizer.Momentum(0.05, momentum=0.9, multi_precision=multi_precision)
    optimizer = fleet_minimize(fleet, strategy, main, startup, tensors[3], momentum)
    return main, startup, test, tensors, optimizer


def quant_state(program):
    return {v.name: v.dtype for v in program.list_vars()
            if v.persistable and is_quant_state(v.name)}


def through_casts(made_by, name):
    op = made_by.get(name)
    while op is not None and op.type == "cast":
        name = op.input("X")[0]
        op = made_by.get(name)
    return op


@pytest.mark.parametrize("ranks", ["single_rank", "two_ranks"])
@pytest.mark.parametrize("level", ["O1", "O2"])
def test_amp_qat_quant_state_is_fp32_and_named_like_fp32(level, ranks, gpu_amp_lists,
                                                         request, fresh_scope):
    fleet = request.getfixturevalue(ranks)
    main, _, test, _, optimizer = amp_qat(fleet, level)
    state = quant_state(main)
    assert state and not [n for n in state if "cast_fp" in n]
    assert {n: d for n, d in state.items() if not n.endswith("@zero_point")} == {
        n: FP32 for n in state if not n.endswith("@zero_point")}

    # the FP32 eval program reads exactly the scale variables training writes
    optimizer.qat_init(paddle.CPUPlace(), scope=fresh_scope, test_program=test)
    eval_scales = {n for n in quant_state(test) if n.endswith("@scale")}
    assert eval_scales == {n for n in state if n.endswith("@scale")}

    # AMP still runs conv/mul in FP16, each input through fp32 Q/DQ and a cast back;
    # weights get per-channel quantizers (a mul weight read through a cast used to get none)
    made_by = producers(main)
    block = main.global_block()
    for op in block.ops:
        if op.type not in ("conv2d", "mul"):
            continue
        for slot, axis in (("Input", None), ("Filter", 0)) if op.type == "conv2d" else (
                ("X", None), ("Y", 1)):
            name = op.input(slot)[0]
            assert block.var(name).dtype == FP16
            dq = through_casts(made_by, name)
            assert dq.type == "dequantize_linear", (op.type, slot)
            q = made_by[dq.input("X")[0]]
            assert block.var(q.input("Scale")[0]).dtype == FP32
            if axis is not None:
                assert q.attr("quant_axis") == axis
    if ranks == "two_ranks":
        assert all_reduce_count(main) > 0
    if ranks == "two_ranks" or level == "O2":  # several found_inf flags, combined by any()
        assert "reduce_any" in {op.type for op in block.ops}


@pytest.mark.parametrize("level", ["O1", "O2"])
def test_a_shared_scale_observer_reads_fp32_under_amp(level, gpu_amp_lists, single_rank):
    """The observer that updates a group no member bounds (a split after a concat) is added
    after AMP's casts: it must read the members' fp32 copies, as their quantizers do."""
    main, startup, _, tensors = nets.build(nets.split_after_concat_net)
    strategy = qat_strategy(single_rank, amp=True)
    strategy.amp_configs = AMP_CONFIGS[level]
    fleet_minimize(single_rank, strategy, main, startup, tensors[3])
    block = main.global_block()
    (observer,) = [op for op in block.ops if op.type == "quantize_linear"
                   and op.has_attr("only_observer") and op.attr("only_observer")]
    made_by = producers(main)
    stack = made_by[observer.input("X")[0]]
    assert stack.type == "stack" and len(stack.input("X")) == 2  # the split's two halves
    chain = [made_by[name] for name in stack.input("X")]
    chain += [made_by[op.input("X")[0]] for op in chain]  # the abs ops
    assert {op.type for op in chain} == {"reduce_max", "abs"}
    members = {op.input("X")[0] for op in chain if op.type == "abs"}
    quantized = {q.input("X")[0] for q in block.ops if q.type == "quantize_linear"
                 and q.input("Scale") == observer.input("Scale") and q is not observer}
    assert members == quantized
    for name in [*members, *stack.input("X"), observer.input("X")[0]]:
        assert block.var(name).dtype == FP32, name
    assert block.var(observer.input("Scale")[0]).dtype == FP32


def test_paddles_any_breaks_multi_rank_amp_without_our_fix(gpu_amp_lists, two_ranks,
                                                           monkeypatch):
    """Control for the paddle.any fix: Paddle 3.3.1's own any() only takes PIR values."""
    monkeypatch.setattr(paddle, "any", paddle.any.__wrapped__)
    with pytest.raises(TypeError, match="must be Value, but got Variable"):
        amp_qat(two_ranks, "O1")


def test_without_the_rewrite_paddle_names_scales_after_casts(gpu_amp_lists, single_rank,
                                                             monkeypatch, fresh_scope):
    """Control: the failure the rewrite removes, reproduced with it switched off."""
    monkeypatch.setattr(amp, "hoist_casts", lambda program, types: {})
    monkeypatch.setattr(amp, "restore_low_precision", lambda *a, **k: [])
    main, *_ = amp_qat(single_rank, "O1")
    state = quant_state(main)
    assert "conv2d_0.w_0.cast_fp16@scale" in state
    assert state["conv2d_0.w_0.cast_fp16@scale"] == FP16
    assert "fc_0.w_0@scale" not in state and "fc_0.w_0.cast_fp16@scale" not in state


@pytest.mark.parametrize("level, masters", [("O1", False), ("O2", False), ("O2", True)])
def test_amp_checkpoint_loads_into_fp32_eval_and_exports_without_warnings(
        level, masters, gpu_amp_lists, single_rank, tmp_path):
    train_scope = paddle.static.Scope()
    with paddle.static.scope_guard(train_scope):
        main, startup, test, (image, _, logits, _), optimizer = amp_qat(single_rank, level,
                                                                        masters)
        paddle.static.Executor(paddle.CPUPlace()).run(startup)  # fp32 kernels only
        if level == "O2":
            optimizer.amp_init(paddle.CPUPlace(), scope=train_scope)  # params -> fp16
    for name in quant_state(main):  # trained-looking scales (startup gives 0.001)
        if name.endswith("@scale"):
            tensor = train_scope.find_var(name).get_tensor()
            tensor.set(np.full(np.array(tensor).shape, 2.5, "float32"), paddle.CPUPlace())
    path = save_checkpoint(tmp_path, main, epoch=1, scope=train_scope)

    eval_scope = paddle.static.Scope()
    with paddle.static.scope_guard(eval_scope):
        paddle_qat.quantize_program(test, for_test=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = load_checkpoint(path, test, scope=eval_scope)
            result = export_onnx(test, [image], [logits], tmp_path / "m.onnx", scope=eval_scope)
    assert [str(w.message) for w in caught] == []
    assert "conv2d_0.w_0@scale" in report.loaded
    loaded = np.array(eval_scope.find_var("conv2d_0.w_0").get_tensor())
    if level == "O2" and masters:  # fp16 parameters: the fp32 master copies are used
        assert "conv2d_0.w_0" in report.from_master_weights
        np.testing.assert_array_equal(loaded, np.array(train_scope.find_var(
            "conv2d_0.w_0_fp32_master_0").get_tensor()))
    elif level == "O2":  # no master copies kept: the fp16 values, widened exactly
        assert "conv2d_0.w_0" in report.upcast
        np.testing.assert_array_equal(loaded, np.array(train_scope.find_var(
            "conv2d_0.w_0").get_tensor()).astype("float32"))
    np.testing.assert_array_equal(
        np.array(eval_scope.find_var("conv2d_0.w_0@scale").get_tensor()), np.full(8, 2.5))
    assert len(result.edges) == 7
    images = next(nets.separable_batches(1))["image"]
    assert np.isfinite(open_session(str(result.path))[0].run(None, {"image": images})[0]).all()


def test_migrate_round_trips_an_old_layout_checkpoint(tmp_path):
    import subprocess
    import sys

    t = nets.train_qat()
    scope, main, test, exe, logits = t["scope"], t["main"], t["test"], t["exe"], t["logits"]
    values = {v.name: np.array(scope.find_var(v.name).get_tensor()) for v in main.list_vars()
              if v.persistable and v.name not in ("feed", "fetch")}
    params = {p.name for p in main.all_parameters()}
    casted = ("image", "conv2d_0.w_0", "conv2d_1.w_0", "fc_0.w_0", "flatten_0.tmp_0")

    def old_name(name):  # what AMP + QAT training named it before paddle_qat
        for tensor in casted:
            if name.startswith(tensor + "@") or name.startswith(tensor + ".quantized"):
                return tensor + ".cast_fp16" + name[len(tensor):]
        return name

    old_params = {k: v for k, v in values.items() if k in params}
    old_opt = {old_name(k): (v.astype("float16") if v.dtype == np.float32 else v)
               for k, v in values.items() if k not in params}
    assert "conv2d_0.w_0.cast_fp16@scale" in old_opt
    old = tmp_path / "old"
    old.mkdir()
    for suffix, data in ((".pdparams", old_params), (".pdopt", old_opt)):
        (old / f"rn{suffix}").write_bytes(pickle.dumps(data, protocol=2))
    before = {p.name: p.read_bytes() for p in old.iterdir()}

    result = subprocess.run([sys.executable, "-m", "paddle_qat", "migrate", str(old / "rn"),
                             str(tmp_path / "new"), "--model", "residual_cnn", "--image-size",
                             "8", "--classes", "4", "--width", "8"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "conv2d_0.w_0.cast_fp16@scale -> conv2d_0.w_0@scale" in result.stdout
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before

    fresh = paddle.static.Scope()
    load_checkpoint(tmp_path / "new", test, scope=fresh)
    for name in ("conv2d_0.w_0@scale", "image@scale", "batch_norm_0.tmp_4@scale"):
        got = np.array(fresh.find_var(name).get_tensor())
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, values[name].astype("float16").astype("float32"))
    feed = next(nets.separable_batches(1, batch=64, seed=3))
    with paddle.static.scope_guard(scope):
        expected = exe.run(test, feed=feed, fetch_list=[logits])[0]
    with paddle.static.scope_guard(fresh):
        got = exe.run(test, feed=feed, fetch_list=[logits])[0]
    assert (expected.argmax(1) == got.argmax(1)).mean() >= 0.95

    again = subprocess.run([sys.executable, "-m", "paddle_qat", "migrate", str(old / "rn"),
                            str(old)], capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "never edits in place" in again.stderr


@pytest.mark.parametrize("gain, steps, fp16_fails", [
    (4e4, 6, "overflow"),
    (1e-9, 160, "underflow"),  # enough steps for the start value (1.0) to decay away
])
def test_scales_beyond_fp16_range_stay_finite_and_positive(gain, steps, fp16_fails, tmp_path):
    """An abs-max near fp16's limit makes the moving-average accumulator exceed 65504 within
    a few steps; a tiny one makes the scale fall below fp16's smallest subnormal. fp32 state
    (what the AMP rewrite keeps) holds both, and the model exports."""
    scope = paddle.static.Scope()
    with paddle.static.scope_guard(scope):
        main, startup, test, (image, _, logits, loss) = nets.build()
        with paddle.static.program_guard(main, startup):
            paddle.optimizer.SGD(0.0).minimize(loss)  # watch the observers, not the weights
        paddle_qat.quantize_program(main, startup_program=startup)
        paddle_qat.quantize_program(test, for_test=True)
        exe = paddle.static.Executor(paddle.CPUPlace())
        exe.run(startup)
        for feed in nets.separable_batches(steps):
            feed["image"] = feed["image"] / np.abs(feed["image"]).max() * gain
            exe.run(main, feed=feed)
        scale = float(np.array(scope.find_var("image@scale").get_tensor())[0])
        accum = max(float(np.array(scope.find_var(n).get_tensor()).max())
                    for n in scope.local_var_names() if n.endswith("@accum"))
        assert np.isfinite(scale) and scale > 0
        if fp16_fails == "overflow":
            assert 0.5 * gain < scale <= gain * 1.001  # a moving average of batch abs-max
            with np.errstate(over="ignore"):  # the overflow fp16 state would have hit
                assert accum > 65504 and np.isinf(np.float16(accum))
        else:
            assert scale < 6e-8 and np.float16(scale) == 0  # below fp16's smallest subnormal
        export_onnx(test, [image], [logits], tmp_path / "m.onnx", scope=scope)

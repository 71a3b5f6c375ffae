"""Checkpoints: atomic saves, verified loads, every mismatch named."""

import json
import pickle

import numpy as np
import paddle
import pytest

import nets
from paddle_qat.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)


@pytest.fixture
def trained_qat(tmp_path):
    trained = nets.train_qat()
    trained["path"] = save_checkpoint(tmp_path / "ckpt", trained["main"], epoch=1,
                                      scope=trained["scope"])
    return trained


def _eval(exe, program, logits, scope):
    feed = next(nets.separable_batches(1, seed=5))
    with paddle.static.scope_guard(scope):
        return exe.run(program, feed=feed, fetch_list=[logits])[0]


def test_eval_program_loads_weights_and_scales_into_a_new_scope(trained_qat):
    t = trained_qat
    expected = _eval(t["exe"], t["test"], t["logits"], t["scope"])
    scope = paddle.static.Scope()
    report = load_checkpoint(t["path"], t["test"], scope=scope)
    assert any(n.endswith("@scale") for n in report.loaded)
    assert any(n.endswith("@state") for n in report.unused)  # training-only quant state
    np.testing.assert_array_equal(_eval(t["exe"], t["test"], t["logits"], scope), expected)


def test_resume_restores_optimizer_state_and_continues_identically(trained_qat):
    t = trained_qat
    resumed = paddle.static.Scope()
    with paddle.static.scope_guard(resumed):
        t["exe"].run(t["startup"])
    load_checkpoint(t["path"], t["main"], scope=resumed, optimizer_state=True)
    feed = next(nets.separable_batches(1, seed=9))
    losses = []
    for scope in (t["scope"], resumed):
        with paddle.static.scope_guard(scope):
            losses.append(t["exe"].run(t["main"], feed=feed, fetch_list=[t["loss"]])[0])
    np.testing.assert_array_equal(*losses)


def test_latest_points_at_the_last_complete_save(trained_qat):
    t = trained_qat
    second = save_checkpoint(t["path"].parent, t["main"], epoch=2, scope=t["scope"])
    assert latest_checkpoint(t["path"].parent) == second
    assert resolve_checkpoint(t["path"].parent) == second
    assert resolve_checkpoint(t["path"]) == t["path"]
    assert sorted(p.name for p in t["path"].parent.iterdir()) == [
        "epoch_0001", "epoch_0002", "latest"]


def test_failed_save_keeps_the_previous_checkpoint(trained_qat, monkeypatch):
    t = trained_qat
    before = (t["path"] / "model.pdparams").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pickle, "dump", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(t["path"].parent, t["main"], epoch=1, scope=t["scope"])
    assert (t["path"] / "model.pdparams").read_bytes() == before
    assert sorted(p.name for p in t["path"].parent.iterdir()) == ["epoch_0001", "latest"]


def test_truncated_file_is_named(trained_qat):
    params = trained_qat["path"] / "model.pdparams"
    params.write_bytes(params.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"model.pdparams is truncated.*100 bytes"):
        load_checkpoint(trained_qat["path"], trained_qat["test"])


def test_corrupt_file_is_named(trained_qat):
    params = trained_qat["path"] / "model.pdparams"
    data = bytearray(params.read_bytes())
    data[-10] ^= 0xFF
    params.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.pdparams is corrupt"):
        load_checkpoint(trained_qat["path"], trained_qat["test"])


def test_missing_checkpoint_and_missing_meta_are_named(trained_qat, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere", trained_qat["test"])
    (trained_qat["path"] / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="not a paddle_qat checkpoint"):
        load_checkpoint(trained_qat["path"], trained_qat["test"])


def test_mismatch_lists_every_variable_by_name(trained_qat):
    path = trained_qat["path"]
    params = path / "model.pdparams"
    values = pickle.loads(params.read_bytes())
    values["conv2d_0.w_0"] = values["conv2d_0.w_0"][:2]
    values["image@scale"] = values["image@scale"].astype("float16")
    values["fc_0.w_0@scale.cast_fp16"] = values.pop("fc_0.w_0@scale")
    params.write_bytes(pickle.dumps(values, protocol=4))
    meta = json.loads((path / "meta.json").read_text())  # keep the integrity check happy
    from paddle_qat.checkpoint import _sha256

    meta["files"]["model.pdparams"] = {"bytes": params.stat().st_size,
                                       "sha256": _sha256(params)}
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path, trained_qat["test"])
    message = str(error.value)
    assert "3 problems" in message
    assert "conv2d_0.w_0: shape [2, 3, 3, 3], program wants [8, 3, 3, 3]" in message
    assert "image@scale: dtype float16, program wants float32" in message
    assert "fc_0.w_0@scale: missing (checkpoint has 'fc_0.w_0@scale.cast_fp16'" in message


def test_pretrained_parameters_from_a_pdparams_file_or_a_checkpoint(trained_qat, tmp_path):
    """QAT fine-tuning starts from FP32 weights: parameters only, from either format."""
    from paddle_qat.checkpoint import is_quant_state, load_pretrained, model_var_names

    t = trained_qat
    params = {n: np.array(t["scope"].find_var(n).get_tensor())
              for n in model_var_names(t["test"]) if not is_quant_state(n)}
    paddle.save(params, str(tmp_path / "fp32.pdparams"))
    main, _, _, _ = nets.build()
    for source in (tmp_path / "fp32", t["path"]):  # DLE-style prefix; our checkpoint
        scope = paddle.static.Scope()
        report = load_pretrained(source, main, scope=scope)
        assert set(report.loaded) == set(params)
        for name, value in params.items():
            np.testing.assert_array_equal(np.array(scope.find_var(name).get_tensor()), value)
    del params["conv2d_0.w_0"]
    paddle.save(params, str(tmp_path / "partial.pdparams"))
    with pytest.raises(CheckpointError, match="conv2d_0.w_0: missing"):
        load_pretrained(tmp_path / "partial.pdparams", main, scope=paddle.static.Scope())
    with pytest.raises(CheckpointError, match="do not exist"):
        load_pretrained(tmp_path / "nothing", main, scope=paddle.static.Scope())


def test_old_numbered_moving_average_state_is_explained(trained_qat, tmp_path):
    from paddle_qat.checkpoint import read_values, write_checkpoint

    t = trained_qat
    model = {(f"state_{i}" if n.endswith("@state") else n): v
             for i, (n, v) in enumerate(read_values(t["path"], "model.pdparams").items())}
    old = write_checkpoint(tmp_path / "old", epoch=1, model=model,
                           optimizer=read_values(t["path"], "model.pdopt"), meta={})
    load_checkpoint(old, t["test"], scope=paddle.static.Scope())  # eval needs no state
    with pytest.raises(CheckpointError, match="numbered in a different order"):
        load_checkpoint(old, t["main"], scope=paddle.static.Scope(), optimizer_state=True)

import paddle
import pytest
from paddle.distributed import fleet

import paddle_qat
from paddle_qat import QATConfig, QATConfigError, UnsupportedOpError
from paddle_qat.config import resolve_config


def test_defaults_follow_tensorrt_int8():
    cfg = QATConfig()
    assert (cfg.weight_bits, cfg.activation_bits, cfg.channel_wise) == (8, 8, True)
    assert cfg.algo == "moving_average_abs_max"
    assert "matmul_v2" in cfg.weight_op_types and cfg.quantize_residual_add


@pytest.mark.parametrize("key, match", [
    ("weight_bit", "unknown key 'weight_bit'.*did you mean 'weight_bits'"),
    ("moving_rate", "unknown key 'moving_rate'.*paddle_qat.QATConfig"),
])
def test_unknown_fleet_key_is_named(key, match):
    strategy = fleet.DistributedStrategy()
    with pytest.raises(QATConfigError, match=match):
        strategy.qat_configs = {key: 8}


@pytest.mark.parametrize("configs, match", [
    ({"weight_bits": 9}, "weight_bits must be an integer from 2 to 8"),
    ({"activation_bits": "8"}, "activation_bits must be an integer"),
    ({"algo": "lsq"}, "algo.*'lsq' is not supported"),
    ({"channel_wise_abs_max": "yes"}, "channel_wise must be True or False"),
])
def test_bad_fleet_values_are_named(configs, match):
    strategy = fleet.DistributedStrategy()
    with pytest.raises(QATConfigError, match=match):
        strategy.qat_configs = configs


@pytest.mark.parametrize("kwargs, error, match", [
    ({"weight_op_types": ("conv3d",)}, UnsupportedOpError, "'conv3d'.*cannot quantize"),
    ({"activation_op_types": ("softmax",)}, UnsupportedOpError, "'softmax'"),
    ({"moving_rate": 0.5}, QATConfigError, "kernel always averages with 0.9"),
    ({"skip_weights": "fc_*"}, QATConfigError, "skip_weights must be a list or tuple"),
])
def test_bad_typed_values_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        QATConfig(**kwargs)


def test_replace_rejects_unknown_field():
    with pytest.raises(QATConfigError, match="did you mean 'weight_bits'"):
        QATConfig().replace(wieght_bits=4)


def test_fleet_keys_override_attached_config():
    strategy = fleet.DistributedStrategy()
    paddle_qat.configure(strategy, QATConfig(weight_bits=4, skip_weights=("fc_*",),
                                             channel_wise=False))
    assert strategy.qat and strategy.qat_configs["weight_bits"] == 4
    strategy.qat_configs = {"activation_bits": 6, "not_quant_pattern": ["head"]}
    cfg = resolve_config(strategy)
    assert (cfg.weight_bits, cfg.activation_bits) == (4, 6)
    assert cfg.skip_name_scopes == ("head",)
    assert cfg.skip_weights == ("fc_*",) and not cfg.channel_wise


def test_attached_config_survives_fleet_deepcopy():
    import copy

    strategy = fleet.DistributedStrategy()
    paddle_qat.configure(strategy, QATConfig(weight_bits=5))
    assert resolve_config(copy.deepcopy(strategy)).weight_bits == 5


def test_configure_rejects_a_dict():
    with pytest.raises(QATConfigError, match="expected a paddle_qat.QATConfig"):
        paddle_qat.configure(fleet.DistributedStrategy(), {"weight_bits": 8})


def test_paddle_static_is_legacy_after_import():
    assert not paddle.framework.in_pir_mode()

"""The one typed QAT configuration, and the only code that reads fleet's ``qat_configs`` dict.

Config flows one way: ``strategy.qat_configs`` (fleet's five keys) plus an optional
:class:`QATConfig` attached with :func:`paddle_qat.configure` -> :func:`resolve_config` ->
one frozen :class:`QATConfig` -> the passes and the exporter.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass

from .errors import QATConfigError, UnsupportedOpError

# Ops with a weight input. The axis is the weight's output-channel axis, the one that
# per-channel scales run along (TensorRT rule: conv axis 0, K x N matmul axis 1).
WEIGHT_OP_AXES: dict[str, int] = {
    "conv2d": 0,
    "depthwise_conv2d": 0,
    "conv2d_transpose": 1,  # filter is [C_in, C_out / groups, kh, kw]
    "mul": 1,
    "matmul": 1,  # becomes 0 when the op transposes Y (see passes)
    "matmul_v2": 1,
}

# Ops quantized on their inputs only (no weight); Paddle's AddQuantDequantPassV2 handles them.
ACTIVATION_OP_TYPES: tuple[str, ...] = (
    "pool2d",
    "elementwise_add",
    "concat",
    "elementwise_mul",
    "relu",
    "sigmoid",
    "leaky_relu",
    "hard_swish",
    "hard_sigmoid",
    "swish",
    "silu",
    "gelu",
    "mish",
    "tanh",
    "softplus",
    "elu",
    "bilinear_interp_v2",
    "nearest_interp_v2",
)

ACTIVATION_ALGOS: tuple[str, ...] = ("moving_average_abs_max",)

# Where the INT8 model will run; it decides the Q/DQ placement trained (see QATConfig.target).
TARGETS: tuple[str, ...] = ("tensorrt", "onnxruntime")
# ONNX Runtime's CPU kernels run an op in INT8 only between a DequantizeLinear on every input
# and a QuantizeLinear on its output, so its target also quantizes these ops' inputs: then
# the conv before them ends in a quantizer, and each has an INT8 kernel of its own (QLinear*),
# except hard_swish and hard_sigmoid (the gate of MobileNetV3's squeeze-excitation) and the
# smooth activations (SiLU/swish of EfficientNet and YOLO, GELU, Mish, tanh, softplus, ELU),
# which ONNX Runtime computes in float between the quantizers, as after its own PTQ.
ONNXRUNTIME_ACTIVATION_OP_TYPES: tuple[str, ...] = (
    "elementwise_add", "pool2d", "concat", "elementwise_mul", "sigmoid", "leaky_relu",
    "hard_swish", "hard_sigmoid", "swish", "silu", "gelu", "mish", "tanh", "softplus", "elu")

# quantize_linear's kernel hard-codes its moving-average decay (the pass's attribute is
# dropped because the op does not declare it); measured on Paddle 3.3.1.
PADDLE_MOVING_RATE = 0.9

FLEET_KEYS: tuple[str, ...] = (
    "channel_wise_abs_max",
    "weight_bits",
    "activation_bits",
    "not_quant_pattern",
    "algo",
)


@dataclass(frozen=True)
class QATConfig:
    """Everything that decides how a program is quantized.

    Example::

        import paddle_qat
        cfg = paddle_qat.QATConfig(weight_bits=4, skip_weights=("fc_*",))
        paddle_qat.configure(strategy, cfg)   # strategy.qat = True is set too

    Fields:
        weight_bits: bits of weight quantization, 2..8 (fleet key ``weight_bits``).
        activation_bits: bits of activation quantization, 2..8 (``activation_bits``).
        channel_wise: one scale per output channel of each weight (``channel_wise_abs_max``);
            False gives one scale per weight tensor.
        algo: how activation scales are learnt (``algo``): ``"moving_average_abs_max"``
            (fleet's ``""`` means the same). An exponential moving average of each batch's
            abs-max, the scale TensorRT's explicit-quantization tooling expects.
        moving_rate: decay of that moving average. Only 0.9 is accepted: Paddle 3.3.1's
            ``quantize_linear`` kernel ignores any other value.
        skip_name_scopes: ops whose ``name_scope`` contains one of these strings are left in
            float (``not_quant_pattern``).
        skip_weights: ``fnmatch`` patterns on weight parameter names (e.g. ``"conv2d_0.w_0"``,
            ``"fc_*"``); an op whose weight matches is left in float.
        weight_op_types: op types quantized on their data input and weight.
        activation_op_types: op types quantized on their inputs only (off by default: TensorRT
            takes these scales from the neighbouring Q/DQ).
        quantize_residual_add: put Q/DQ on the identity branch of every residual
            ``elementwise_add`` so TensorRT can fuse the add into the conv as INT8.
        share_scales: quantizers of tensors TensorRT merges (Concat inputs and output,
            max pooling and data-movement input and output) share one scale variable in
            training, so the export meets TensorRT's rules 8 and 9 (see
            :mod:`paddle_qat.placement`).
        collect_output_scales: also observe every op's output range (``out_threshold``). Costs
            training time; export never turns these into Q/DQ.
        adjust_build_strategy: turn off fusions that hide ops from the quant passes.
        target: where the INT8 model runs, which decides the Q/DQ placement trained.
            ``"tensorrt"`` (default): signed INT8 everywhere, Q/DQ on conv/matmul inputs and
            the identity branch of residual adds, as TensorRT fuses them.
            ``"onnxruntime"``: for ONNX Runtime's CPU INT8 kernels. Every input of residual
            adds, pooling, concat, elementwise multiplies and non-ReLU activations (sigmoid,
            leaky ReLU, hard swish, hard sigmoid, SiLU / swish, GELU, Mish, tanh, softplus,
            ELU) is quantized too, and tensors that cannot be
            negative (after ReLU) use the unsigned range [0, 255], so the exported
            ``Relu -> QuantizeLinear`` folds and every conv becomes a ``QLinearConv``.
            Export it with the same target; its check names any op left in float.
    """

    weight_bits: int = 8
    activation_bits: int = 8
    channel_wise: bool = True
    algo: str = "moving_average_abs_max"
    moving_rate: float = 0.9
    skip_name_scopes: tuple[str, ...] = ("skip_quant",)
    skip_weights: tuple[str, ...] = ()
    weight_op_types: tuple[str, ...] = tuple(WEIGHT_OP_AXES)
    activation_op_types: tuple[str, ...] = ()
    quantize_residual_add: bool = True
    share_scales: bool = True
    collect_output_scales: bool = False
    adjust_build_strategy: bool = True
    target: str = "tensorrt"

    @property
    def quantized_activation_op_types(self) -> tuple[str, ...]:
        """The op types quantized on their inputs only, for this target."""
        extra = ONNXRUNTIME_ACTIVATION_OP_TYPES if self.target == "onnxruntime" else ()
        return tuple(dict.fromkeys(self.activation_op_types + extra))

    @property
    def identity_branch_only(self) -> bool:
        """Quantize the identity branch of residual adds alone (TensorRT's placement)."""
        return self.quantize_residual_add and self.target == "tensorrt"

    @property
    def unsigned_activations(self) -> bool:
        """Non-negative tensors are quantized to the unsigned range [0, 2**bits - 1]."""
        return self.target == "onnxruntime"

    def __post_init__(self):
        for name in ("skip_name_scopes", "skip_weights", "weight_op_types", "activation_op_types"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise QATConfigError(
                    f"QATConfig.{name} must be a list or tuple of strings, got {value!r}"
                )
            object.__setattr__(self, name, tuple(value))
        for name in ("weight_bits", "activation_bits"):
            bits = getattr(self, name)
            if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
                raise QATConfigError(
                    f"QATConfig.{name} must be an integer from 2 to 8 (INT8 deployment), "
                    f"got {bits!r}"
                )
        for name in ("channel_wise", "quantize_residual_add", "share_scales",
                     "collect_output_scales", "adjust_build_strategy"):
            if not isinstance(getattr(self, name), bool):
                raise QATConfigError(
                    f"QATConfig.{name} must be True or False, got {getattr(self, name)!r}"
                )
        if self.moving_rate != PADDLE_MOVING_RATE:
            raise QATConfigError(
                f"QATConfig.moving_rate = {self.moving_rate!r} cannot be honoured: Paddle "
                f"3.3.1's quantize_linear op has no moving_rate attribute and its kernel "
                f"always averages with {PADDLE_MOVING_RATE}. Leave moving_rate at "
                f"{PADDLE_MOVING_RATE}"
            )
        if self.target not in TARGETS:
            raise QATConfigError(
                f"QATConfig.target = {self.target!r} is not a deployment target; use one of "
                f"{list(TARGETS)}")
        algo = "moving_average_abs_max" if self.algo == "" else self.algo
        if algo not in ACTIVATION_ALGOS:
            raise QATConfigError(
                f"QATConfig.algo / qat_configs['algo'] = {self.algo!r} is not supported; "
                f"use one of {list(ACTIVATION_ALGOS)} (or '' for the default)"
            )
        object.__setattr__(self, "algo", algo)
        for op_type in self.weight_op_types:
            if op_type not in WEIGHT_OP_AXES:
                raise UnsupportedOpError(
                    f"weight_op_types has {op_type!r}, which paddle_qat cannot quantize by "
                    f"weight; supported: {sorted(WEIGHT_OP_AXES)}. Ops without weights go in "
                    f"activation_op_types."
                )
        for op_type in self.activation_op_types:
            if op_type not in ACTIVATION_OP_TYPES:
                raise UnsupportedOpError(
                    f"activation_op_types has {op_type!r}, which paddle_qat cannot quantize; "
                    f"supported: {sorted(ACTIVATION_OP_TYPES)}"
                )

    def to_dict(self) -> dict:
        """Plain JSON-ready data (stored in checkpoints)."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> QATConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error, missing keys take defaults."""
        return cls().replace(**data)

    def replace(self, **changes) -> QATConfig:
        """Return a copy with ``changes`` applied (validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise QATConfigError(_unknown_key_message(sorted(unknown)[0], "QATConfig",
                                                      [f.name for f in dataclasses.fields(self)]))
        return dataclasses.replace(self, **changes)


def _unknown_key_message(key: str, where: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key {key!r} in {where}{hint} Valid keys: {sorted(valid)}"


def check_fleet_qat_configs(configs: dict) -> None:
    """Validate a ``strategy.qat_configs`` dict with messages that name the key and the fix."""
    if not isinstance(configs, dict):
        raise QATConfigError(
            f"strategy.qat_configs must be a dict, got {type(configs).__name__}"
        )
    for key in configs:
        if key not in FLEET_KEYS:
            raise QATConfigError(_unknown_key_message(
                key, "strategy.qat_configs", list(FLEET_KEYS)) +
                ". Other settings go in paddle_qat.QATConfig via paddle_qat.configure().")
    _from_fleet_dict(QATConfig(), configs)


def _from_fleet_dict(base: QATConfig, configs: dict) -> QATConfig:
    changes = {}
    if "channel_wise_abs_max" in configs:
        changes["channel_wise"] = configs["channel_wise_abs_max"]
    for key in ("weight_bits", "activation_bits", "algo"):
        if key in configs:
            changes[key] = configs[key]
    if "not_quant_pattern" in configs:
        pattern = configs["not_quant_pattern"]
        if isinstance(pattern, str):
            pattern = [pattern]
        changes["skip_name_scopes"] = tuple(pattern)
    return base.replace(**changes)


_CONFIG_ATTR = "_paddle_qat_config"


def attach_config(strategy, config: QATConfig) -> None:
    if not isinstance(config, QATConfig):
        raise QATConfigError(
            f"expected a paddle_qat.QATConfig, got {type(config).__name__}"
        )
    # DistributedStrategy refuses new attributes through its __setattr__; the attribute is
    # ours, and deepcopy (fleet copies the strategy) keeps it.
    object.__setattr__(strategy, _CONFIG_ATTR, config)


def resolve_config(strategy) -> QATConfig:
    """The effective config: the attached QATConfig, overridden by fleet's five keys."""
    base = getattr(strategy, _CONFIG_ATTR, None) or QATConfig()
    configs = dict(strategy.qat_configs)
    check_fleet_qat_configs(configs)
    # An unset protobuf string reads as ''; fleet's default for not_quant_pattern is [].
    # Both mean "nothing set here": keep the attached config's values then.
    if not configs.get("not_quant_pattern"):
        configs.pop("not_quant_pattern", None)
    if configs.get("algo", "") == "":
        configs.pop("algo", None)
    return _from_fleet_dict(base, configs)


def fleet_dict(config: QATConfig) -> dict:
    """The five fleet keys for ``config``, for writing back into ``strategy.qat_configs``."""
    return {
        "channel_wise_abs_max": config.channel_wise,
        "weight_bits": config.weight_bits,
        "activation_bits": config.activation_bits,
        "not_quant_pattern": list(config.skip_name_scopes),
        "algo": config.algo,
    }


__all__ = ["QATConfig", "TARGETS", "WEIGHT_OP_AXES", "ACTIVATION_OP_TYPES"]

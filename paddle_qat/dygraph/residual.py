"""Quantizers on the identity branch of residual adds in dygraph blocks (TensorRT rule 7).

A dygraph residual add is ``out += identity`` inside a block's ``forward``, not a layer, so
``paddle.quantization`` never sees it. A registered block type says where its identity
branch comes from, and :func:`quantize_residuals` puts a moving-average activation
quantizer there, trained like every other:

- a shortcut sublayer (ResNet's ``downsample``): its output is quantized;
- no shortcut (the identity is the block input): the block input is quantized once, before
  the block, and the convs that read it take that Q/DQ instead of their own, so TensorRT
  sees one scale on the tensor its conv and its add share.

``paddle.vision.models``' ResNet blocks and MobileNetV2's inverted residual are registered;
:func:`register_residual_block` adds a block of your own.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import QATConfig
from ..errors import QATConfigError

QUANTER_NAME = "identity_quanter"


@dataclass(frozen=True)
class ResidualBlock:
    """Where a block type's residual add reads its identity branch.

    ``input_convs``: paths (inside the block) of the convs that read the block input.
    ``shortcut``: the sublayer computing the identity branch when the block has one (None on
    an instance means the identity is the block input). ``enabled``: a boolean attribute of
    the block saying whether this instance adds at all (MobileNetV2's ``use_res_connect``).
    """

    input_convs: tuple[str, ...]
    shortcut: str | None = None
    enabled: str | None = None


_REGISTRY: dict[type, ResidualBlock] = {}


def register_residual_block(block_type: type, *, input_convs, shortcut: str | None = None,
                            enabled: str | None = None) -> None:
    """Teach dygraph QAT where ``block_type``'s residual add reads its identity branch.

    Call before :func:`paddle_qat.dygraph.quantize_model` (or ``fleet.distributed_model``).
    Example, for a block whose forward is ``relu(self.conv2(relu(self.conv1(x))) + x)``::

        paddle_qat.dygraph.register_residual_block(MyBlock, input_convs=("conv1",))
    """
    input_convs = (input_convs,) if isinstance(input_convs, str) else tuple(input_convs)
    if not input_convs:
        raise QATConfigError(f"register_residual_block({block_type.__name__}): name the "
                             f"conv(s) that read the block input in input_convs")
    _REGISTRY[block_type] = ResidualBlock(input_convs, shortcut, enabled)


def _register_paddle_vision() -> None:
    from paddle.vision.models.mobilenetv2 import InvertedResidual
    from paddle.vision.models.resnet import BasicBlock, BottleneckBlock

    for block in (BasicBlock, BottleneckBlock):
        _REGISTRY.setdefault(block, ResidualBlock(("conv1",), shortcut="downsample"))
    _REGISTRY.setdefault(InvertedResidual,
                         ResidualBlock(("conv.0.0",), enabled="use_res_connect"))


def registered(layer) -> ResidualBlock | None:
    _register_paddle_vision()
    return next((spec for cls, spec in _REGISTRY.items() if isinstance(layer, cls)), None)


class _QuantizeOutput:
    """Forward post-hook: the shortcut's output through the identity quantizer. An object,
    not a closure, so a deep copy of the model hooks the copy's quantizer."""

    def __init__(self, quanter):
        self.quanter = quanter

    def __call__(self, layer, inputs, output):
        return self.quanter(output)


class _QuantizeInput:
    """Forward pre-hook: the block input through the identity quantizer."""

    def __init__(self, quanter):
        self.quanter = quanter

    def __call__(self, layer, inputs):
        return (self.quanter(inputs[0]), *inputs[1:])


def _sublayer(block, path: str):
    layers = dict(block.named_sublayers())
    if path not in layers:
        raise QATConfigError(
            f"{type(block).__name__} has no sublayer {path!r} (registered as reading the "
            f"block input); its sublayers: {sorted(layers)[:12]}. Fix the "
            f"register_residual_block call")
    return layers[path]


def _attribute(block, name: str, role: str):
    """``block.name``, or an error naming the registration (an attribute set to None, like
    a ResNet block's ``downsample`` without a shortcut, is fine)."""
    if not hasattr(block, name):
        raise QATConfigError(
            f"{type(block).__name__} has no attribute {name!r} (registered as its {role}). "
            f"Fix the register_residual_block call")
    return getattr(block, name)


def quantize_residuals(model, config: QATConfig) -> list[str]:
    """Put an identity quantizer in every registered block of ``model`` that adds (after
    ``paddle.quantization`` wrapped its convs); returns the blocks' paths."""
    from .quanters import MovingAverageActivationQuanterLayer

    done = []
    for path, block in model.named_sublayers(include_self=True):
        spec = registered(block)
        if spec is None or (spec.enabled and not _attribute(block, spec.enabled, "enabled")):
            continue
        if any(scope and scope in path for scope in config.skip_name_scopes):
            continue
        if hasattr(block, QUANTER_NAME):
            continue  # quantized already
        quanter = MovingAverageActivationQuanterLayer(
            None, bit_length=config.activation_bits, moving_rate=config.moving_rate)
        shortcut = _attribute(block, spec.shortcut, "shortcut") if spec.shortcut else None
        convs = [] if shortcut is not None else [_sublayer(block, p) for p in spec.input_convs]
        if not all(hasattr(conv, "activation_quanter") for conv in convs):
            # a conv left in float (skip_weights / skip_name_scopes) would read the block
            # input's Q/DQ with float weights (TensorRT rule 5); the add stays float too
            continue
        block.add_sublayer(QUANTER_NAME, quanter)
        if shortcut is not None:
            shortcut.register_forward_post_hook(_QuantizeOutput(quanter))
        else:
            block.register_forward_pre_hook(_QuantizeInput(quanter))
            for conv in convs:  # they read the quantized block input now
                if getattr(conv, "activation_quanter", None) is not None:
                    conv.activation_quanter = None
        done.append(path)
    return done

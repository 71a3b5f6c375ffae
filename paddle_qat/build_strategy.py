"""Build-strategy switches that QAT needs, in one place.

A fusion pass that merges ops before the quant passes run hides those ops from them: the
merged op is not a ``conv2d`` / ``elementwise_add`` any more, so it gets no Q/DQ and the
exported model is not what training simulated.
"""

from __future__ import annotations

import logging

_logger = logging.getLogger(__name__)

# name -> why QAT needs it off. Verified on CPU here: fuse_elewise_add_act_ops turns
# relu(add(a, b)) into fused_elemwise_add_activation and the residual add loses its Q/DQ
# (tests/test_build_strategy.py). The others are GPU/FP16-only passes with the same effect.
QAT_INCOMPATIBLE_FUSIONS: dict[str, str] = {
    "fuse_elewise_add_act_ops": "hides residual elementwise_add from the residual Q/DQ pass",
    "fuse_bn_act_ops": "merges batch_norm + activation so the activation Q/DQ lands inside it",
    "fuse_bn_add_act_ops": "merges batch_norm + residual add + relu (GPU, FP16), hiding the add",
    "fuse_resunit": "merges conv + bn + add + act (GPU), hiding the conv from weight quantization",
    "fuse_relu_depthwise_conv": "merges relu into depthwise_conv2d, hiding its input Q/DQ",
    "enable_addto": "accumulates conv input grads in place across the inserted dequantize ops",
}

_already_logged: set[str] = set()


def disable_qat_incompatible_fusions(build_strategy) -> list[str]:
    """Turn off, in place, every fusion in ``build_strategy`` that QAT cannot work with.

    Returns the names that were on and are now off. Each change is logged once per process.

    Example::

        bs = paddle.static.BuildStrategy()
        bs.fuse_elewise_add_act_ops = True
        paddle_qat.disable_qat_incompatible_fusions(bs)   # ['fuse_elewise_add_act_ops']
    """
    changed = []
    for name, why in QAT_INCOMPATIBLE_FUSIONS.items():
        if getattr(build_strategy, name, False):
            setattr(build_strategy, name, False)
            changed.append(name)
            if name not in _already_logged:
                _already_logged.add(name)
                _logger.warning("paddle_qat: build_strategy.%s turned off for QAT: it %s",
                                name, why)
    return changed


def qat_build_strategy(build_strategy=None):
    """A ``paddle.static.BuildStrategy`` safe for a QAT program.

    For users who compile the program themselves (``CompiledProgram(prog, build_strategy=bs)``
    as NVIDIA's ResNet50 ``program.py`` does): pass your strategy and compile with the result.
    The argument is copied, never changed.

    Example::

        bs = paddle_qat.qat_build_strategy(my_build_strategy)
        compiled = paddle.static.CompiledProgram(main_prog, build_strategy=bs)
    """
    import paddle

    bs = paddle.static.BuildStrategy() if build_strategy is None else build_strategy._copy()
    disable_qat_incompatible_fusions(bs)
    return bs

"""The check each deployment target gets: TensorRT's Q/DQ rules, or ONNX Runtime's INT8 kernels.

Example::

    problems, what = target_problems("qat.onnx", "onnxruntime")
"""

from __future__ import annotations

# what a problem is, per target, for messages ("3 <what>")
WHAT = {"tensorrt": "violation(s) of TensorRT's Q/DQ rules",
        "onnxruntime": "op(s) ONNX Runtime runs in float"}


def target_problems(model, target: str) -> tuple[list, str]:
    """(problems of ``model`` -- an ``onnx.ModelProto`` or a path -- for ``target``, what
    they are)."""
    if target == "onnxruntime":
        from .onnxruntime_check import float_ops

        return float_ops(model), WHAT[target]
    from .checker import check_model

    return list(check_model(model)), WHAT[target]

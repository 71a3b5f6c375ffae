"""The check each deployment target gets: TensorRT's Q/DQ rules, or ONNX Runtime's INT8 kernels.

Example::

    problems, what = target_problems("qat.onnx", "onnxruntime")
"""

from __future__ import annotations

from dataclasses import dataclass

# what a problem is, per target, for messages ("3 <what>")
WHAT = {"tensorrt": "violation(s) of TensorRT's Q/DQ rules",
        "onnxruntime": "op(s) ONNX Runtime runs in float"}


@dataclass(frozen=True)
class TargetReport:
    """``problems`` refuse an export; ``notes`` are worth a line but refuse nothing (for ONNX
    Runtime: the ops that compute the model's output in float)."""

    problems: list
    notes: list
    what: str


def target_report(model, target: str) -> TargetReport:
    """The check of ``model`` (an ``onnx.ModelProto`` or a path) for ``target``."""
    if target == "onnxruntime":
        from .onnxruntime_check import float_op_report

        problems, at_output = float_op_report(model)
        return TargetReport(problems, at_output, WHAT[target])
    from .checker import check_model

    return TargetReport(list(check_model(model)), [], WHAT[target])


def target_problems(model, target: str) -> tuple[list, str]:
    """(problems of ``model`` -- an ``onnx.ModelProto`` or a path -- for ``target``, what
    they are)."""
    report = target_report(model, target)
    return report.problems, report.what

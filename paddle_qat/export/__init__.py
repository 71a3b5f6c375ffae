"""Export a QAT program: Paddle inference model, ONNX with explicit INT8 Q/DQ, static checks.

Heavy dependencies (paddle2onnx, onnx) are imported inside the functions that use them.
"""

from .quant_map import QuantEdge, read_quant_edges

__all__ = ["QuantEdge", "read_quant_edges", "export_onnx", "export_float_onnx",
           "export_inference_model"]


def export_onnx(*args, **kwargs):
    """See :func:`paddle_qat.export.onnx_export.export_onnx`."""
    from .onnx_export import export_onnx as _export_onnx

    return _export_onnx(*args, **kwargs)


def export_float_onnx(*args, **kwargs):
    """See :func:`paddle_qat.export.onnx_export.export_float_onnx`."""
    from .onnx_export import export_float_onnx as _export

    return _export(*args, **kwargs)


def export_inference_model(*args, **kwargs):
    """See :func:`paddle_qat.export.paddle_model.export_inference_model`."""
    from .paddle_model import export_inference_model as _export

    return _export(*args, **kwargs)

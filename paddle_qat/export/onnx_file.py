"""Read an ONNX model from a path (or take one already loaded), naming a bad file clearly.

Example::

    model = load_onnx("qat.onnx")   # QATError if it is missing, truncated or not ONNX
"""

from __future__ import annotations

from pathlib import Path

from ..errors import QATError


def load_onnx(model_or_path):
    """``onnx.ModelProto`` for a path, or ``model_or_path`` itself if it is already one."""
    import onnx

    if not isinstance(model_or_path, (str, Path)):
        return model_or_path
    path = Path(model_or_path)
    if not path.is_file():
        raise QATError(f"ONNX model {path} does not exist")
    try:
        return onnx.load(str(path))
    except Exception as error:  # onnx raises DecodeError and friends
        raise QATError(f"cannot read ONNX model {path}: {error}. Is the file truncated or "
                       f"not an ONNX model?") from None

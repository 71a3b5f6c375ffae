"""Save Paddle inference models (with or without quant ops), atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def export_inference_model(path_prefix, feed_vars, fetch_vars, executor, program):
    """Write ``<path_prefix>.pdmodel`` / ``.pdiparams`` from ``program`` (quant ops kept).

    For Paddle Inference / Paddle-TRT users. Each file is replaced atomically, so a reader
    never sees a half-written file; a failure leaves the previous export in place. The
    deployment target the program was quantized for goes to ``<path_prefix>.paddle_qat.json``
    (the .pdmodel has no place for it), where :func:`~paddle_qat.export.saved.
    export_paddle_model` reads it back.
    """
    import paddle

    from ..passes import RECORDED_TARGET

    prefix = Path(path_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    target = getattr(program, RECORDED_TARGET, None)
    suffixes = [".pdmodel", ".pdiparams"] + ([TARGET_SUFFIX] if target else [])
    with tempfile.TemporaryDirectory(prefix=f".{prefix.name}.", dir=prefix.parent) as tmp:
        paddle.static.save_inference_model(str(Path(tmp) / prefix.name), feed_vars, fetch_vars,
                                           executor, program=program)
        if target:
            (Path(tmp) / f"{prefix.name}{TARGET_SUFFIX}").write_text(
                json.dumps({"target": target}) + "\n")
        for suffix in suffixes:
            os.replace(Path(tmp) / f"{prefix.name}{suffix}", f"{prefix}{suffix}")
    return f"{prefix}.pdmodel", f"{prefix}.pdiparams"


TARGET_SUFFIX = ".paddle_qat.json"


def recorded_target(path_prefix) -> str | None:
    """The target :func:`export_inference_model` recorded beside the model, or None (a model
    saved by other code)."""
    from ..config import TARGETS
    from ..errors import QATError

    path = Path(f"{path_prefix}{TARGET_SUFFIX}")
    if not path.is_file():
        return None
    try:
        target = json.loads(path.read_text())["target"]
    except (ValueError, KeyError, TypeError):
        target = None
    if target not in TARGETS:
        raise QATError(f"{path} does not name a deployment target ({list(TARGETS)}); it is "
                       f"corrupt: delete it and pass --target (or target=) instead")
    return target

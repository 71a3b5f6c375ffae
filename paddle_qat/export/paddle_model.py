"""Save Paddle inference models (with or without quant ops), atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def export_inference_model(path_prefix, feed_vars, fetch_vars, executor, program):
    """Write ``<path_prefix>.pdmodel`` / ``.pdiparams`` from ``program`` (quant ops kept).

    For Paddle Inference / Paddle-TRT users. Each file is replaced atomically, so a reader
    never sees a half-written file; a failure leaves the previous export in place.
    """
    import paddle

    prefix = Path(path_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{prefix.name}.", dir=prefix.parent) as tmp:
        paddle.static.save_inference_model(str(Path(tmp) / prefix.name), feed_vars, fetch_vars,
                                           executor, program=program)
        for suffix in (".pdmodel", ".pdiparams"):
            os.replace(Path(tmp) / f"{prefix.name}{suffix}", f"{prefix}{suffix}")
    return f"{prefix}.pdmodel", f"{prefix}.pdiparams"

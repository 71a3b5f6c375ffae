"""Save Paddle inference models (with or without quant ops), atomically."""

from __future__ import annotations

from pathlib import Path

from .atomic import atomic_path


def export_inference_model(path_prefix, feed_vars, fetch_vars, executor, program):
    """Write ``<path_prefix>.pdmodel`` / ``.pdiparams`` from ``program`` (quant ops kept).

    For Paddle Inference / Paddle-TRT users. Both files appear together or not at all.
    """
    import paddle

    prefix = Path(path_prefix)
    with atomic_path(prefix.parent / f".{prefix.name}.export", directory=True) as tmp:
        paddle.static.save_inference_model(str(tmp / prefix.name), feed_vars, fetch_vars,
                                           executor, program=program)
        for suffix in (".pdmodel", ".pdiparams"):
            (tmp / f"{prefix.name}{suffix}").replace(f"{prefix}{suffix}")
    return f"{prefix}.pdmodel", f"{prefix}.pdiparams"

"""Convert a checkpoint from the AMP-workaround era into a paddle_qat checkpoint.

Before paddle_qat, AMP + QAT training saved quant state named after AMP's casts and stored as
float16 (``conv2d_0.w_0.cast_fp16@scale``, ``image.cast_fp16.quantized@zero_point``) with
``paddle.static.save`` (``PREFIX.pdparams`` + ``PREFIX.pdopt``), and NVIDIA's
``convert_scale_fp16`` edited the ``.pdopt`` in place. This reads such a pair, strips every
``.cast_fp16`` from the names, stores quant state as float32, and writes a new checkpoint folder
(atomically, never touching the input).

Example::

    python -m paddle_qat migrate old/resnet50 runs/migrated --model resnet50
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from .checkpoint import CheckpointError, is_quant_state

CAST_SUFFIXES = (".cast_fp16", ".cast_bf16")


def canonical_name(name: str) -> str:
    for suffix in CAST_SUFFIXES:
        name = name.replace(suffix, "")
    return name


def _read_pickle(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        with open(path, "rb") as f:
            values = pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise CheckpointError(f"{path} is truncated or not a Paddle checkpoint ({error})"
                              ) from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{path} does not hold a name -> array dict")
    values.pop("StructuredToParameterName@@", None)
    return {k: np.asarray(v) for k, v in values.items()}


def migrate_values(old_params: dict, old_optimizer: dict) -> tuple[dict, dict, list[str]]:
    """(model values, optimizer values, what changed) with canonical fp32 quant state."""
    model, optimizer, changes = {}, {}, []
    for source, is_param_file in ((old_params, True), (old_optimizer, False)):
        for name, value in source.items():
            new = canonical_name(name)
            quant = is_quant_state(new)
            if quant and value.dtype == np.float16:
                value = value.astype(np.float32)
                changes.append(f"{name}: float16 -> float32")
            if new != name:
                changes.append(f"{name} -> {new}")
            target = model if (is_param_file or quant) else optimizer
            if new in model or new in optimizer:
                raise CheckpointError(f"{name} and another variable both become {new}; the "
                                      f"old checkpoint holds the same tensor twice")
            target[new] = value
    return model, optimizer, changes


def migrate_checkpoint(old_prefix, out_dir, *, meta: dict | None = None) -> tuple[Path, list]:
    """Write ``out_dir/epoch_0000`` from ``old_prefix.pdparams`` / ``.pdopt``."""
    from .checkpoint import write_checkpoint

    prefix = Path(old_prefix)
    params = _read_pickle(prefix.with_name(prefix.name + ".pdparams"))
    opt_path = prefix.with_name(prefix.name + ".pdopt")
    optimizer = _read_pickle(opt_path) if opt_path.is_file() else {}
    model, optimizer, changes = migrate_values(params, optimizer)
    out = Path(out_dir)
    if out.resolve() == prefix.parent.resolve():
        raise CheckpointError("write the migrated checkpoint to another folder than the old "
                              "one; migration never edits in place")
    path = write_checkpoint(out, epoch=(meta or {}).get("epoch", 0), model=model,
                            optimizer=optimizer, meta={"migrated_from": str(prefix),
                                                       **(meta or {})})
    return path, changes

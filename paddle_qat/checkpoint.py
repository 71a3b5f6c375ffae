"""Training checkpoints: written atomically, verified on load, every mismatch named.

A checkpoint is a folder ``epoch_NNNN`` holding

* ``model.pdparams``: parameters, BN statistics and every quantization variable (scales,
  moving-average state/accum), a pickled ``{name: ndarray}`` as ``paddle.static.save`` writes;
* ``model.pdopt``: the optimizer state (momentum, learning rate, AMP loss scaling);
* ``meta.json``: epoch, the QAT config, the model spec, and each file's size and SHA-256.

The folder is written under a temporary name and renamed into place, then ``latest`` (a text
file naming it) is replaced atomically, so an interrupted save leaves the previous checkpoint
intact and never a half-written one that looks complete.

Example::

    path = save_checkpoint("runs/qat", main_prog, epoch=3, meta={"model": spec.to_dict()})
    load_checkpoint(latest_checkpoint("runs/qat"), eval_prog)   # parameters + scales only
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import QATError

FORMAT_VERSION = 1
MODEL_FILE = "model.pdparams"
OPTIMIZER_FILE = "model.pdopt"
META_FILE = "meta.json"
LATEST_FILE = "latest"
SKIPPED_VARS = ("feed", "fetch")


class CheckpointError(QATError, OSError):
    """A checkpoint is missing, truncated, corrupt or does not fit the program."""


QUANT_STATE_SUFFIXES = ("@scale", "@zero_point", "@state", "@accum")


def is_quant_state(name: str) -> bool:
    """Scales, zero points and moving-average state/accum of the quant passes."""
    return name.endswith(QUANT_STATE_SUFFIXES)


def _persistables(program):
    return [v for v in program.list_vars()
            if v.persistable and v.name not in SKIPPED_VARS and v.type != _reader_type()]


def _reader_type():
    from paddle.base import core

    return core.VarDesc.VarType.READER


def model_var_names(program) -> set[str]:
    """Variables an eval program needs: parameters (incl. BN statistics) and quant state."""
    params = {p.name for p in program.all_parameters()}
    return {v.name for v in _persistables(program) if v.name in params or is_quant_state(v.name)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _scope_values(program, scope) -> tuple[dict, dict]:
    model_names = model_var_names(program)
    model, optimizer = {}, {}
    for var in _persistables(program):
        holder = scope.find_var(var.name)
        if holder is None or not holder.get_tensor()._is_initialized():
            raise CheckpointError(
                f"variable {var.name!r} of the program has no value in the scope; run the "
                f"startup program before saving")
        value = np.array(holder.get_tensor())
        (model if var.name in model_names else optimizer)[var.name] = value
    return model, optimizer


def save_checkpoint(directory, program, *, epoch: int, scope=None, meta: dict | None = None
                    ) -> Path:
    """Save every persistable variable of ``program`` as ``directory/epoch_NNNN``; returns it."""
    import paddle

    scope = paddle.static.global_scope() if scope is None else scope
    model, optimizer = _scope_values(program, scope)
    return write_checkpoint(directory, epoch=epoch, model=model, optimizer=optimizer, meta=meta)


def write_checkpoint(directory, *, epoch: int, model: dict, optimizer: dict,
                     meta: dict | None = None) -> Path:
    """Write ``{name: array}`` dicts as checkpoint ``directory/epoch_NNNN`` (atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"epoch_{epoch:04d}"
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=directory))
    try:
        files = {}
        for file_name, values in ((MODEL_FILE, model), (OPTIMIZER_FILE, optimizer)):
            path = staging / file_name
            with open(path, "wb") as f:
                pickle.dump(values, f, protocol=4)
                f.flush()
                os.fsync(f.fileno())
            files[file_name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        record = {**(meta or {}), "format": FORMAT_VERSION, "epoch": epoch, "files": files}
        (staging / META_FILE).write_text(json.dumps(record, indent=1, sort_keys=True))
        if target.exists():  # re-saving an epoch: move the old one aside, then drop it
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=directory))
            os.replace(target, old / target.name)
            os.replace(staging, target)
            shutil.rmtree(old)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    from .export.atomic import atomic_path

    with atomic_path(directory / LATEST_FILE) as tmp:
        tmp.write_text(target.name + "\n")
    return target


def latest_checkpoint(directory) -> Path | None:
    """The checkpoint ``directory/latest`` names, or None when nothing was saved yet."""
    pointer = Path(directory) / LATEST_FILE
    if not pointer.is_file():
        return None
    path = Path(directory) / pointer.read_text().strip()
    if not (path / META_FILE).is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which is missing; delete "
                              f"{pointer} to start over or restore that folder")
    return path


def resolve_checkpoint(path) -> Path:
    """``path`` itself when it is a checkpoint, else the latest checkpoint saved under it."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if (path / META_FILE).is_file():
        return path
    latest = latest_checkpoint(path) if path.is_dir() else None
    if latest is None:
        raise CheckpointError(
            f"{path} is neither a checkpoint (no {META_FILE}) nor a folder of checkpoints (no "
            f"{LATEST_FILE}). It is not a paddle_qat checkpoint; for one from the old NVIDIA "
            f"workaround layout (PREFIX.pdparams/.pdopt) run `python -m paddle_qat migrate`")
    return latest


def read_meta(path) -> dict:
    path = resolve_checkpoint(path)
    meta_path = path / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{meta_path} is corrupt ({error}); the save was interrupted "
                              f"or the file was edited") from None
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')!r}, this "
                              f"paddle_qat reads format {FORMAT_VERSION}")
    return meta


def read_values(path, file_name: str) -> dict[str, np.ndarray]:
    """The ``{name: array}`` of one checkpoint file, after checking its size and SHA-256."""
    path = Path(path)
    expected = read_meta(path)["files"].get(file_name)
    file_path = path / file_name
    if expected is None or not file_path.is_file():
        raise CheckpointError(f"{file_path} is missing; the checkpoint is incomplete")
    size = file_path.stat().st_size
    if size != expected["bytes"]:
        raise CheckpointError(f"{file_path} is truncated or overwritten: {size} bytes, "
                              f"{expected['bytes']} expected; use an earlier checkpoint")
    if _sha256(file_path) != expected["sha256"]:
        raise CheckpointError(f"{file_path} is corrupt (SHA-256 differs from {META_FILE}); "
                              f"use an earlier checkpoint")
    with open(file_path, "rb") as f:
        return pickle.load(f)


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` set, and what the checkpoint held that nobody read."""

    loaded: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    from_master_weights: list[str] = field(default_factory=list)  # pure-FP16 runs
    upcast: list[str] = field(default_factory=list)  # fp16 parameters widened exactly


def _fp32_parameters(path, program, values: dict) -> tuple[list[str], list[str]]:
    """Pure-FP16 (O2) checkpoints hold fp16 parameters; an FP32 program gets the fp32 master
    copies from the optimizer state when training kept them (``multi_precision``), else the
    fp16 values widened to fp32 (exact: they are what training computed with)."""
    block = program.global_block()
    params = {p.name for p in program.all_parameters()}
    wanted = [name for name, value in values.items()
              if name in params and value.dtype == np.float16
              and _dtype_name(block._find_var_recursive(name)) == "float32"]
    if not wanted:
        return [], []
    optimizer = read_values(path, OPTIMIZER_FILE)
    masters, upcast = [], []
    for name in wanted:
        master = optimizer.get(f"{name}_fp32_master_0")
        if master is not None and master.shape == values[name].shape:
            values[name] = master
            masters.append(name)
        else:
            values[name] = values[name].astype(np.float32)
            upcast.append(name)
    return masters, upcast


def _dtype_name(var) -> str:
    from paddle.base.data_feeder import _PADDLE_DTYPE_2_NUMPY_DTYPE

    return str(np.dtype(_PADDLE_DTYPE_2_NUMPY_DTYPE[var.dtype]))


def check_fits(program, values: dict[str, np.ndarray], names) -> None:
    """Raise one :class:`CheckpointError` listing every missing, mis-shaped or mis-typed var."""
    block = program.global_block()
    problems = []
    for name in sorted(names):
        var = block._find_var_recursive(name)
        if name not in values:
            hint = [k for k in values if k.replace(".cast_fp16", "") == name]
            problems.append(f"{name}: missing" + (f" (checkpoint has {hint[0]!r}: an old "
                            f"AMP layout; run `python -m paddle_qat migrate`)" if hint else ""))
            continue
        value = values[name]
        want_shape = [d for d in var.shape]
        if -1 not in want_shape and list(value.shape) != want_shape:
            problems.append(f"{name}: shape {list(value.shape)}, program wants {want_shape}")
        if str(value.dtype) != _dtype_name(var):
            problems.append(f"{name}: dtype {value.dtype}, program wants {_dtype_name(var)}")
    missing_state = any(p.split(":")[0].endswith(("@state", "@accum")) for p in problems)
    if missing_state and any(k.startswith(("state_", "accum_")) for k in values):
        problems.append("the checkpoint names moving-average state state_N / accum_N, which "
                        "paddle_qat 0.1 numbered in a different order in every process: that "
                        "state cannot be matched to its quantizer. Start a new run from its "
                        "weights with --from-pretrained-params (scales are recalibrated)")
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems[:40])
        more = f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else ""
        raise CheckpointError(
            f"checkpoint does not fit the program ({len(problems)} problems):\n{listing}{more}")


def load_checkpoint(path, program, *, scope=None, place=None, optimizer_state: bool = False
                    ) -> LoadReport:
    """Load a checkpoint (an ``epoch_NNNN`` folder, or the latest under a folder) into
    ``scope`` for ``program``.

    With ``optimizer_state=False`` (eval / export) only parameters and quant state are
    needed; with True (resume) every persistable variable of the training program must be
    there. Raises :class:`CheckpointError` naming each missing, mis-shaped or mis-typed
    variable, and for a missing, truncated or corrupt file.
    """
    import paddle

    scope = paddle.static.global_scope() if scope is None else scope
    place = paddle.CPUPlace() if place is None else place
    path = resolve_checkpoint(path)
    values = read_values(path, MODEL_FILE)
    if optimizer_state:
        values.update(read_values(path, OPTIMIZER_FILE))
        wanted = {v.name for v in _persistables(program)}
    else:
        wanted = model_var_names(program)
    masters, upcast = _fp32_parameters(path, program, values)
    check_fits(program, values, wanted)
    for name in sorted(wanted):
        scope.var(name).get_tensor().set(values[name], place)
    return LoadReport(loaded=sorted(wanted), unused=sorted(set(values) - wanted),
                      from_master_weights=masters, upcast=upcast)


def _read_pdparams(path: Path) -> dict[str, np.ndarray]:
    """A bare ``.pdparams`` file (``paddle.static.save`` / DeepLearningExamples' format)."""
    import paddle

    file_path = path if path.suffix == ".pdparams" else path.with_name(path.name + ".pdparams")
    if not file_path.is_file():
        raise CheckpointError(f"pretrained parameters {path} do not exist: pass a paddle_qat "
                              f"checkpoint folder or a .pdparams file (with or without suffix)")
    try:
        values = paddle.load(str(file_path), return_numpy=True)
    except Exception as error:  # Paddle raises bare pickle/ValueError/RuntimeError here
        raise CheckpointError(f"{file_path} is not a readable .pdparams file: {error}") from None
    return {name: np.asarray(value) for name, value in values.items()}


def load_pretrained(path, program, *, scope=None, place=None) -> LoadReport:
    """Initialise ``program``'s parameters (weights and BN statistics, not quant state or
    optimizer state) from a checkpoint folder or a ``.pdparams`` file, e.g. an FP32 run
    that QAT fine-tunes. Every parameter must be there with its shape; extra entries are
    reported as unused.
    """
    import paddle

    scope = paddle.static.global_scope() if scope is None else scope
    place = paddle.CPUPlace() if place is None else place
    path = Path(path)
    if path.is_dir() or (path / META_FILE).exists():
        checkpoint = resolve_checkpoint(path)
        values = read_values(checkpoint, MODEL_FILE)
        masters, upcast = _fp32_parameters(checkpoint, program, values)
    else:
        values, masters, upcast = _read_pdparams(path), [], []
    wanted = {name for name in model_var_names(program) if not is_quant_state(name)}
    block = program.global_block()
    # Pure-FP16 programs declare fp16 parameters: load the fp32 values as they are and let
    # amp_init keep them as master weights and cast them, so only check them as fp16.
    as_checked = {name: value.astype(np.float16)
                  if name in wanted and value.dtype == np.float32
                  and _dtype_name(block._find_var_recursive(name)) == "float16" else value
                  for name, value in values.items()}
    check_fits(program, as_checked, wanted)
    for name in sorted(wanted):
        scope.var(name).get_tensor().set(values[name], place)
    return LoadReport(loaded=sorted(wanted), unused=sorted(set(values) - wanted),
                      from_master_weights=masters, upcast=upcast)

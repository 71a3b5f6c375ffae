"""Export from what training left on disk: a checkpoint folder or a Paddle inference model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import QATError


@dataclass(frozen=True)
class SavedExport:
    onnx_path: Path
    paddle_model: tuple[str, str] | None  # (.pdmodel, .pdiparams) when one was written
    quantized_inputs: int  # Q/DQ-fed op inputs in the ONNX model
    target: str = "tensorrt"  # the runtime whose rules the ONNX was written and checked for


def build_eval_program(spec, config, scope, place=None):
    """The quantized eval program of ``spec``: returns (program, image, logits).

    Variable names match a training program built the same way under a fresh
    ``unique_name.guard()`` (as every paddle_qat entry point builds it), so a checkpoint of
    that training run loads into it.
    """
    import paddle

    from ..models import build_classifier
    from ..passes import quantize_program

    paddle.enable_static()
    main, startup = paddle.static.Program(), paddle.static.Program()
    with paddle.utils.unique_name.guard(), paddle.static.program_guard(main, startup):
        image, _, logits, _ = build_classifier(spec)
    program = main.clone(for_test=True)
    quantize_program(program, config, scope=scope, place=place or paddle.CPUPlace(),
                     for_test=True)
    return program, image, logits


def export_checkpoint(checkpoint, onnx_path, *, paddle_prefix=None, opset: int = 13,
                      target: str | None = None) -> SavedExport:
    """Rebuild the model a checkpoint names, load its weights and scales, export it.

    ``checkpoint`` is an ``epoch_NNNN`` folder or a folder of them (its latest is used).
    ``target`` defaults to the one the checkpoint was trained for (``QATConfig.target``).

    Example::

        export_checkpoint("runs/demo/checkpoints/epoch_0003", "qat.onnx",
                          paddle_prefix="runs/demo/inference/qat")
    """
    import paddle

    from ..checkpoint import CheckpointError, load_checkpoint, read_meta, resolve_checkpoint
    from ..config import QATConfig
    from ..models import ModelSpec
    from .onnx_export import export_onnx
    from .paddle_model import export_inference_model

    checkpoint = resolve_checkpoint(checkpoint)
    meta = read_meta(checkpoint)
    if "model" not in meta or "qat_config" not in meta:
        raise CheckpointError(
            f"{checkpoint} does not say which model and QAT config it holds (no 'model' / "
            f"'qat_config' in meta.json); export it from the live program with "
            f"paddle_qat.export.export_onnx instead")
    spec = ModelSpec.from_dict(meta["model"])
    config = QATConfig.from_dict(meta["qat_config"])
    scope = paddle.static.Scope()
    with paddle.static.scope_guard(scope):
        program, image, logits = build_eval_program(spec, config, scope)
        load_checkpoint(checkpoint, program, scope=scope)
        result = export_onnx(program, [image], [logits], onnx_path, scope=scope, opset=opset,
                             target=target or config.target)
        written = None
        if paddle_prefix is not None:
            exe = paddle.static.Executor(paddle.CPUPlace())
            written = export_inference_model(paddle_prefix, [image], [logits], exe, program)
    return SavedExport(Path(onnx_path), written, len(result.edges), result.target)


def export_paddle_model(path_prefix, onnx_path, *, opset: int = 13,
                        target: str | None = None, check: bool = True) -> SavedExport:
    """Export a Paddle inference model that keeps its quant ops (``.pdmodel``/``.pdiparams``).
    ``target`` defaults to the one the model was trained for, and ``check=False`` skips its
    rules (see ``export_onnx``).

    Example::

        export_paddle_model("runs/demo/inference/qat", "qat.onnx")
    """
    import paddle

    from .onnx_export import export_onnx
    from .paddle_model import recorded_target

    paddle.enable_static()
    prefix = Path(path_prefix)
    for suffix in (".pdmodel", ".pdiparams"):
        if not prefix.with_name(prefix.name + suffix).is_file():
            raise QATError(f"{prefix}{suffix} does not exist; pass the path prefix of a Paddle "
                           f"inference model (the part before .pdmodel)")
    scope = paddle.static.Scope()
    with paddle.static.scope_guard(scope):
        exe = paddle.static.Executor(paddle.CPUPlace())
        try:
            program, feed_names, fetch_vars = paddle.static.load_inference_model(
                str(prefix), exe)
        except Exception as error:  # Paddle raises bare RuntimeError/ValueError here
            raise QATError(f"cannot read the Paddle inference model {prefix}: {error}. The "
                           f"files are truncated or not a Paddle inference model") from None
        block = program.global_block()
        if target is None:
            target = recorded_target(prefix)  # None: guessed from the quantizers' ranges
        result = export_onnx(program, [block.var(n) for n in feed_names], fetch_vars,
                             onnx_path, scope=scope, opset=opset, target=target,
                             check=check)
    return SavedExport(Path(onnx_path), None, len(result.edges), result.target)

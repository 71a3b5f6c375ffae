"""``python -m paddle_qat <command>``: export, check, compare, sensitivity, infer, migrate.

Thin wrappers over the library.

Each command prints what it did and exits 0, or prints one line naming the problem and the fix
and exits 2 (bad input) without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .config import TARGETS
from .errors import QATError
from .export.ort_ptq import ORT_METHODS
from .runtime.int8_kernels import KERNEL_MODES


def _export(args) -> None:
    from .export.saved import export_checkpoint, export_paddle_model

    if args.checkpoint is not None:
        result = export_checkpoint(args.checkpoint, args.onnx, paddle_prefix=args.paddle_model,
                                   opset=args.opset, target=args.target)
    else:
        result = export_paddle_model(args.paddle_input, args.onnx, opset=args.opset,
                                     target=args.target)
    checked = {"tensorrt": "TensorRT Q/DQ rules checked",
               "onnxruntime": "every quantized op runs INT8 in ONNX Runtime"}[result.target]
    print(f"wrote {result.onnx_path} ({result.quantized_inputs} quantized inputs, {checked})")
    _print_cpu_note(result.onnx_path, result.target)
    if result.paddle_model:
        print(f"wrote {' and '.join(result.paddle_model)}")


def _check(args) -> int:
    from .export.target_check import target_report

    if not Path(args.model).is_file():
        raise QATError(f"ONNX model {args.model} does not exist")
    report = target_report(args.model, args.target)
    for violation in report.problems:
        print(violation)
    for note in report.notes:
        print(f"note: {note}")
    print(f"{args.model}: {len(report.problems)} {report.what}")
    _print_cpu_note(args.model, args.target)
    return 1 if report.problems else 0


def _print_cpu_note(model, target: str) -> None:
    from .runtime.int8_kernels import cpu_portability_note

    note = cpu_portability_note(model) if target == "onnxruntime" else None
    if note:
        print(f"note: {note}")


def _compare(args) -> None:
    import tempfile

    from .export.compare import compare_models, format_comparison
    from .export.ort_ptq import ort_ptq

    models = {"QAT": args.model}
    models.update({f"PTQ {i + 1}": path for i, path in enumerate(args.ptq or [])})
    with tempfile.TemporaryDirectory(prefix="paddle_qat_compare_") as tmp:
        if args.float is not None:
            images = _load_array(args.calibration, "calibration") if args.calibration else \
                np.random.default_rng(0).normal(size=(64, *_input_shape(args.float))).astype(
                    "float32")
            path = args.keep_ort_ptq or Path(tmp) / "ort_ptq.onnx"
            models[f"ORT PTQ ({args.ort_method})"] = ort_ptq(args.float, path, images,
                                                             method=args.ort_method,
                                                             target=args.target)
        print(format_comparison(compare_models(models, args.target)))
    print("On a GPU, compare the engines TensorRT builds from these files: trtexec "
          "--onnx=F.onnx --stronglyTyped --exportLayerInfo=F.json --profilingVerbosity=detailed")


def _sensitivity(args) -> None:
    import paddle

    from .checkpoint import load_checkpoint, read_meta, resolve_checkpoint
    from .config import QATConfig
    from .export.saved import build_eval_program
    from .models import ModelSpec
    from .sensitivity import auto_skip, format_sensitivity, layer_fidelity, layer_sensitivity

    checkpoint = resolve_checkpoint(args.checkpoint)
    meta = read_meta(checkpoint)
    if "model" not in meta:
        raise QATError(f"{checkpoint} does not say which model it holds (no 'model' in "
                       f"meta.json); save it with paddle_qat's training script or demo")
    spec = ModelSpec.from_dict(meta["model"])
    saved = QATConfig.from_dict(meta["qat_config"]) if "qat_config" in meta else QATConfig()
    config = saved if args.weight_bits is None else saved.replace(weight_bits=args.weight_bits)
    images = _load_array(args.images, "images").astype("float32")
    labels = _load_array(args.labels, "labels") if args.labels else None
    paddle.enable_static()
    rows = layer_sensitivity(spec, checkpoint, images, labels, config=config)
    print(format_sensitivity(rows))
    if args.auto_skip:
        print(f"skip_weights={auto_skip(rows, args.auto_skip, config).skip_weights!r}")
    if args.onnx is not None:
        scope = paddle.static.Scope()
        program, _, _ = build_eval_program(spec, saved, scope)  # what the ONNX was made from
        load_checkpoint(checkpoint, program, scope=scope)
        for name, cosine in layer_fidelity(program, scope, args.onnx, images[:256]).items():
            print(f"Paddle vs ONNX Runtime, output of {name}: cosine {cosine:.6f}")


def _input_shape(path) -> tuple[int, ...]:
    import onnx

    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[1:]
    if not all(d.dim_value for d in dims):
        raise QATError(f"{path} has a dynamic image shape; pass --calibration images.npy")
    return tuple(d.dim_value for d in dims)


def _load_array(path, what: str) -> np.ndarray:
    if not Path(path).is_file():
        raise QATError(f"{what} file {path} does not exist")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise QATError(f"{what} file {path} is not a readable .npy array: {error}") from None


def _infer(args) -> None:
    from .export.atomic import atomic_path
    from .runtime import benchmark, open_runner

    options = {"threads": args.threads, "int8_kernels": args.int8_kernels} \
        if args.runtime == "onnxruntime" else {
            "engine_path": args.engine, "max_batch": args.batch, "rebuild": args.rebuild}
    runner = open_runner(args.model, args.runtime, **options)
    if args.input:
        images = _load_array(args.input, "input").astype("float32")
    else:
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in runner.input_shape[1:]] \
            if hasattr(runner, "input_shape") else None
        if shape is None:
            raise QATError("pass --input images.npy (the engine's input shape is not known)")
        images = np.random.default_rng(0).normal(size=(args.batch, *shape)).astype("float32")
    logits = np.concatenate([runner.run(images[i:i + args.batch])
                             for i in range(0, len(images), args.batch)])
    print(f"{args.runtime}: ran {len(images)} inputs through {args.model}")
    if hasattr(runner, "kernels"):
        print(f"kernels: {runner.kernels.label} ({runner.kernels.reason})")
    if args.labels:
        labels = _load_array(args.labels, "labels").reshape(-1)
        if len(labels) != len(images):
            raise QATError(f"{args.labels} has {len(labels)} labels for {len(images)} inputs")
        print(f"top-1 accuracy: {float((logits.argmax(1) == labels).mean()):.4f}")
    if args.output:
        with atomic_path(args.output) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, logits)
        print(f"wrote logits to {args.output}")
    if args.benchmark:
        print(benchmark(runner, images[:args.batch], iterations=args.benchmark))


def _migrate(args) -> None:
    from .config import QATConfig
    from .migrate import migrate_checkpoint
    from .models import ModelSpec

    meta = {}
    if args.model:
        meta["model"] = ModelSpec(args.model, args.in_channels, args.image_size, args.classes,
                                  args.width).to_dict()
        meta["qat_config"] = QATConfig(weight_bits=args.weight_bits,
                                       activation_bits=args.activation_bits).to_dict()
    path, changes = migrate_checkpoint(args.old_prefix, args.out, meta=meta)
    for change in changes:
        print(f"  {change}")
    print(f"wrote {path} ({len(changes)} changes; {args.old_prefix}.* left untouched)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m paddle_qat",
        description="paddle_qat tools: export QAT models to ONNX Q/DQ, check them against "
                    "TensorRT's rules, run them on ONNX Runtime or TensorRT.")
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser(
        "export", help="checkpoint or Paddle inference model -> ONNX with INT8 Q/DQ",
        description="Export a QAT model to ONNX (opset >= 13, explicit INT8 Q/DQ), checked "
                    "against TensorRT's rules and written atomically.")
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path,
                        help="a paddle_qat checkpoint (epoch_NNNN folder, or the folder of "
                             "checkpoints: its latest is used)")
    source.add_argument("--paddle-input", metavar="PREFIX",
                        help="a Paddle inference model with quant ops (path before .pdmodel)")
    export.add_argument("--onnx", type=Path, required=True, help="ONNX file to write")
    export.add_argument("--paddle-model", metavar="PREFIX",
                        help="with --checkpoint: also write a Paddle inference model here")
    export.add_argument("--opset", type=int, default=13,
                        help="lowest ONNX opset, >= 13 (default 13); raised where an op needs "
                             "more, e.g. 14 for HardSwish")
    export.add_argument("--target", choices=TARGETS, default=None,
                        help="runtime to write and check the Q/DQ for (default: the one the "
                             "model was trained for, QATConfig.target)")
    export.set_defaults(run=_export)

    check = commands.add_parser(
        "check", help="check an ONNX model against TensorRT's explicit-quantization rules",
        description="List every violation of TensorRT's Q/DQ rules with the node name (with "
                    "--target onnxruntime: every quantized op ONNX Runtime would run in "
                    "float); exit 1 when there is any.")
    check.add_argument("model", help="ONNX file")
    check.add_argument("--target", choices=TARGETS, default="tensorrt",
                       help="whose rules to check (default tensorrt)")
    check.set_defaults(run=_check)

    compare = commands.add_parser(
        "compare", help="put a QAT ONNX beside PTQ ONNX of the same float model, node by node",
        description="For every compute node: in which precision each model runs it and the "
                    "scale of its input; then Q/DQ counts and TensorRT rule violations per "
                    "model. With --float, ONNX Runtime's quantize_static PTQ of that model "
                    "joins the comparison.")
    compare.add_argument("model", help="the QAT ONNX (python -m paddle_qat export)")
    compare.add_argument("--ptq", nargs="*", help="other quantized ONNX files, e.g. "
                                                   "paddle_qat's own PTQ")
    compare.add_argument("--float", type=Path, help="the FP32 ONNX to quantize with ONNX "
                                                     "Runtime's quantize_static")
    compare.add_argument("--calibration", help="images .npy for quantize_static (default: "
                                               "64 random inputs)")
    compare.add_argument("--ort-method", default="MinMax",
                         choices=ORT_METHODS)
    compare.add_argument("--keep-ort-ptq", type=Path, help="write ONNX Runtime's PTQ model here")
    compare.add_argument("--target", choices=TARGETS, default="tensorrt",
                         help="deployment target: whose problems to count, and the settings of "
                              "ONNX Runtime's PTQ (default tensorrt)")
    compare.set_defaults(run=_compare)

    sensitivity = commands.add_parser(
        "sensitivity", help="per-layer quantization sensitivity (one layer, all but one)",
        description="From a checkpoint's weights: PTQ with one layer quantized, and with all "
                    "but one, scored by logit cosine to FP32 (and accuracy with --labels); "
                    "--auto-skip K names the K layers to leave in float; --onnx compares "
                    "each quantized layer's output in Paddle and in the exported ONNX.")
    sensitivity.add_argument("--checkpoint", type=Path, required=True,
                             help="checkpoint folder whose meta.json names the model")
    sensitivity.add_argument("--images", required=True, help="float32 .npy, N x C x H x W")
    sensitivity.add_argument("--labels", help="integer labels .npy")
    sensitivity.add_argument("--weight-bits", type=int, choices=range(2, 9))
    sensitivity.add_argument("--auto-skip", type=int, default=0, metavar="K")
    sensitivity.add_argument("--onnx", type=Path, help="the exported QAT ONNX of this "
                                                       "checkpoint, for per-layer fidelity")
    sensitivity.set_defaults(run=_sensitivity)

    infer = commands.add_parser(
        "infer", help="run an ONNX model (ONNX Runtime or TensorRT) or a TensorRT engine",
        description="Run a model on images from a .npy file (or random inputs), report "
                    "accuracy with --labels, latency with --benchmark.")
    infer.add_argument("model", help=".onnx model, or a serialized .engine for tensorrt")
    infer.add_argument("--runtime", choices=("onnxruntime", "tensorrt"), default="onnxruntime")
    infer.add_argument("--input", help="images as a float32 .npy array, N x C x H x W")
    infer.add_argument("--labels", help="integer labels .npy (N) to report top-1 accuracy")
    infer.add_argument("--output", help="write the logits to this .npy file")
    infer.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    infer.add_argument("--benchmark", type=int, default=0, metavar="RUNS",
                       help="time RUNS runs of one batch and print latency / throughput")
    infer.add_argument("--threads", type=int, default=None, help="ONNX Runtime CPU threads")
    infer.add_argument("--int8-kernels", choices=KERNEL_MODES, default="auto",
                       help="onnxruntime: auto (default) fuses INT8 kernels only where they "
                            "compute the model exactly (CPUs without VNNI saturate weights "
                            "beyond +-64); fused forces them (timing only); simulated runs "
                            "Q/DQ in float")
    infer.add_argument("--engine", help="tensorrt: engine file to build or reuse "
                                        "(default: the .onnx path with .engine)")
    infer.add_argument("--rebuild", action="store_true", help="tensorrt: rebuild the engine")
    infer.set_defaults(run=_infer)

    migrate = commands.add_parser(
        "migrate", help="convert an old AMP-QAT checkpoint (.cast_fp16 names, fp16 scales)",
        description="Read PREFIX.pdparams / PREFIX.pdopt written by paddle.static.save in AMP "
                    "+ QAT training before paddle_qat, strip '.cast_fp16' from names, store "
                    "quant state as float32, write a new paddle_qat checkpoint folder. The old "
                    "files are never modified.")
    migrate.add_argument("old_prefix", help="path before .pdparams / .pdopt")
    migrate.add_argument("out", type=Path, help="folder for the new checkpoint")
    migrate.add_argument("--model", choices=("residual_cnn", "resnet50"),
                         help="record the network so `export --checkpoint` can rebuild it")
    migrate.add_argument("--in-channels", type=int, default=3)
    migrate.add_argument("--image-size", type=int, default=224)
    migrate.add_argument("--classes", type=int, default=1000)
    migrate.add_argument("--width", type=int, default=16, help="residual_cnn width")
    migrate.add_argument("--weight-bits", type=int, default=8)
    migrate.add_argument("--activation-bits", type=int, default=8)
    migrate.set_defaults(run=_migrate)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except QATError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

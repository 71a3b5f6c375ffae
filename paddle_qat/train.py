"""Image-classification training with fleet, the DeepLearningExamples RN50 v1.5 way.

The same flags as DLE's ``train.py``: an FP32 or AMP baseline, and QAT fine-tuning from it
with ``--qat --from-pretrained-params CKPT --inference-dir DIR``. Launch it like any fleet
job (``scripts/training/*.sh`` do)::

    python -m paddle.distributed.launch --gpus 0,1,2,3,4,5,6,7 paddle_qat/train.py \\
        --image-root /imagenet --amp --qat --from-pretrained-params output/epoch_0090

Every epoch writes ``--output-dir/epoch_NNNN`` atomically (``--from-checkpoint`` resumes
from it); the end of the run writes the Paddle inference model and ONNX to
``--inference-dir``. Errors in the input end the run with one ``error:`` line, exit code 2.
"""

# Runs as a script under paddle.distributed.launch: absolute imports only.
# ruff: noqa: I001  (paddle_qat is imported before paddle on purpose)
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import paddle_qat  # legacy IR and fleet QAT in place before paddle
from paddle_qat.calibration import METHODS, CalibrationConfig
from paddle_qat.config import TARGETS
from paddle_qat.errors import QATError
from paddle_qat.models import (
    MODELS,
    ModelSpec,
    build_classifier,
    seed_argument,
    seeded_programs,
)

DESCRIPTION = __doc__.split("\n\n")[0]


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def _float_list(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", type=Path, default=Path("output"),
                     help="checkpoints, one epoch_NNNN folder per epoch")
    run.add_argument("--epochs", type=int, default=90)
    run.add_argument("--steps-per-epoch", type=int, default=None,
                     help="cap on training steps per epoch (smoke tests, benchmarks)")
    run.add_argument("--eval-interval", type=int, default=1,
                     help="evaluate on --image-root/val every N epochs (0: never)")
    run.add_argument("--print-interval", type=int, default=10, help="log every N steps")
    run.add_argument("--from-pretrained-params", type=Path, default=None,
                     help="initial weights: a checkpoint folder or a .pdparams file")
    run.add_argument("--from-checkpoint", type=Path, default=None,
                     help="resume: a checkpoint folder (its latest epoch) or an epoch_NNNN")
    run.add_argument("--inference-dir", type=Path, default=None,
                     help="write MODEL_PREFIX.pdmodel/.pdiparams and MODEL_PREFIX.onnx here")
    run.add_argument("--model-prefix", default="resnet_50_paddle")
    run.add_argument("--seed", type=seed_argument, default=42)
    data = parser.add_argument_group("data")
    data.add_argument("--image-root", type=Path, default=Path("/imagenet"),
                      help="holds train/ and val/, one sub-folder of images per class")
    data.add_argument("--image-shape", type=_int_list, default=[3, 224, 224],
                      help="C,H,W of the network input")
    data.add_argument("--resize-short", type=int, default=None,
                      help="evaluation resizes the short side to this (default H * 256/224)")
    data.add_argument("--rand-crop-scale", type=_float_list, default=[0.08, 1.0],
                      help="range of image area a training crop covers")
    data.add_argument("--batch-size", type=int, default=256, help="per device")
    data.add_argument("--workers", type=int, default=4, help="decoding threads")
    data.add_argument("--dali", action="store_true", help="NVIDIA DALI training loader")
    data.add_argument("--data-layout", default="NCHW", choices=("NCHW",),
                      help="NHWC is not offered: the quant passes and ONNX export use NCHW")
    model = parser.add_argument_group("model")
    model.add_argument("--model-arch-name", default="resnet50", type=str.lower,
                       choices=sorted(MODELS))
    model.add_argument("--num-of-class", type=int, default=None,
                       help="classes (default: the class folders under train/)")
    train = parser.add_argument_group("training")
    train.add_argument("--lr", type=float, default=0.256,
                       help="per device; multiplied by the number of devices")
    train.add_argument("--lr-scheduler", default="Cosine", choices=("Cosine",))
    train.add_argument("--warmup-epochs", type=int, default=5)
    train.add_argument("--warmup-start-lr", type=float, default=0.0)
    train.add_argument("--momentum", type=float, default=0.875)
    train.add_argument("--weight-decay", type=float, default=3.0517578125e-05)
    train.add_argument("--label-smoothing", type=float, default=0.1)
    amp = parser.add_argument_group("mixed precision")
    amp.add_argument("--amp", action="store_true", help="automatic mixed precision (fleet)")
    amp.add_argument("--scale-loss", type=float, default=1.0, help="initial loss scale")
    amp.add_argument("--use-dynamic-loss-scaling", action="store_true")
    amp.add_argument("--use-pure-fp16", action="store_true", help="AMP O2")
    qat = parser.add_argument_group("quantization-aware training")
    qat.add_argument("--qat", action="store_true", help="strategy.qat = True")
    qat.add_argument("--qat-weight-bits", type=int, default=8, choices=range(2, 9))
    qat.add_argument("--qat-target", default="tensorrt", choices=TARGETS,
                     help="runtime the INT8 model is for; it decides the Q/DQ placement "
                          "trained and exported (QATConfig.target)")
    qat.add_argument("--qat-init", default="max", choices=("none", *METHODS),
                     help="calibrate the scales QAT starts from (not when resuming; default "
                          "max, where QAT's moving-average abs-max observer stays)")
    qat.add_argument("--calibration-batches", type=int, default=8)
    args = parser.parse_args(argv)
    if args.from_pretrained_params and args.from_checkpoint:
        parser.error("--from-pretrained-params and --from-checkpoint exclude each other: "
                     "resume with --from-checkpoint alone")
    low, high = (args.rand_crop_scale + [0, 0])[:2]
    if len(args.rand_crop_scale) != 2 or not 0 < low <= high <= 1:
        parser.error(f"--rand-crop-scale wants LOW,HIGH with 0 < LOW <= HIGH <= 1, got "
                     f"{args.rand_crop_scale}")
    if len(args.image_shape) != 3 or args.image_shape[1] != args.image_shape[2]:
        parser.error(f"--image-shape wants C,H,W with H == W, got {args.image_shape}")
    return args


@dataclass
class Programs:
    main: object
    startup: object
    eval: object
    image: object
    logits: object
    loss: object
    scheduler: object
    optimizer: object


def _strategy(args):
    from paddle.distributed import fleet

    strategy = fleet.DistributedStrategy()
    if args.amp:
        strategy.amp = True
        strategy.amp_configs = {
            "init_loss_scaling": args.scale_loss,
            "use_dynamic_loss_scaling": args.use_dynamic_loss_scaling,
            "use_pure_fp16": args.use_pure_fp16,
            "use_fp16_guard": False,
        }
    if args.qat:
        paddle_qat.configure(strategy, paddle_qat.QATConfig(weight_bits=args.qat_weight_bits,
                                                            target=args.qat_target))
    return strategy


def build_programs(args, spec: ModelSpec, steps_per_epoch: int, nranks: int, strategy
                   ) -> Programs:
    import paddle
    from paddle.distributed import fleet

    main, startup = seeded_programs(args.seed)
    with paddle.utils.unique_name.guard(), paddle.static.program_guard(main, startup):
        image, _, logits, loss = build_classifier(spec, args.label_smoothing)
        eval_program = main.clone(for_test=True)
        total = max(1, args.epochs * steps_per_epoch)
        warmup = min(args.warmup_epochs * steps_per_epoch, total - 1)
        peak = args.lr * nranks
        scheduler = paddle.optimizer.lr.CosineAnnealingDecay(peak, T_max=max(1, total - warmup))
        if warmup > 0:
            scheduler = paddle.optimizer.lr.LinearWarmup(scheduler, warmup,
                                                         args.warmup_start_lr, peak)
        optimizer = paddle.optimizer.Momentum(
            scheduler, momentum=args.momentum,
            weight_decay=paddle.regularizer.L2Decay(args.weight_decay),
            multi_precision=args.use_pure_fp16)
        optimizer = fleet.distributed_optimizer(optimizer, strategy)
        optimizer.minimize(loss)
    return Programs(main, startup, eval_program, image, logits, loss, scheduler, optimizer)


def _place():
    import paddle

    if paddle.is_compiled_with_cuda():
        return paddle.CUDAPlace(int(os.environ.get("FLAGS_selected_gpus", "0").split(",")[0]))
    return paddle.CPUPlace()


def evaluate(exe, programs: Programs, batches) -> tuple[float, float]:
    """Top-1 and top-5 accuracy of the eval program over ``batches``."""
    top1 = top5 = count = 0
    for batch in batches:
        (logits,) = exe.run(programs.eval, feed=batch, fetch_list=[programs.logits])
        ranked = np.argsort(-logits, axis=1)[:, :5]
        labels = np.asarray(batch["label"]).reshape(-1, 1)
        top1 += int((ranked[:, :1] == labels).sum())
        top5 += int((ranked == labels).any(axis=1).sum())
        count += len(labels)
    return top1 / max(count, 1), top5 / max(count, 1)


def _train_epoch(exe, programs, batches, epoch, steps, args, rank) -> float:
    from tqdm import tqdm

    losses, start, seen = [], time.perf_counter(), 0
    bar = tqdm(batches, total=steps, desc=f"epoch {epoch + 1}/{args.epochs}",
               disable=rank != 0, leave=False)
    for step, batch in enumerate(bar, 1):
        (loss,) = exe.run(programs.main, feed=batch, fetch_list=[programs.loss])
        programs.scheduler.step()
        value = float(np.asarray(loss).mean())
        if not np.isfinite(value):
            raise QATError(f"loss is {value} at epoch {epoch + 1} step {step}: training "
                           f"diverged; lower --lr or enable --use-dynamic-loss-scaling")
        losses.append(value)
        seen += len(batch["label"])
        if rank == 0 and step % args.print_interval == 0:
            rate = seen / (time.perf_counter() - start)
            bar.write(f"epoch {epoch + 1} step {step}/{steps} loss {np.mean(losses[-10:]):.4f}"
                      f" lr {programs.scheduler.get_lr():.6g} {rate:.1f} img/s")
    return float(np.mean(losses))


def run(args) -> dict:
    """Train (and export) as ``args`` say; returns the last epoch's metrics."""
    import paddle
    from paddle.distributed import fleet

    from paddle_qat import data
    from paddle_qat.checkpoint import (load_checkpoint, load_pretrained, read_meta,
                                       resolve_checkpoint, save_checkpoint)
    from paddle_qat.config import resolve_config

    paddle.enable_static()
    fleet.init(is_collective=True)
    rank, nranks = fleet.worker_index(), fleet.worker_num()
    train_folder = data.image_folder(args.image_root / "train")
    val_root = args.image_root / "val"
    val_folder = data.image_folder(val_root, train_folder.classes) if (
        args.eval_interval and val_root.is_dir()) else None
    classes = len(train_folder.classes)
    if args.num_of_class not in (None, classes):
        raise QATError(f"--num-of-class {args.num_of_class}, but {args.image_root}/train has "
                       f"{classes} class folders")
    size = args.image_shape[1]
    image_spec = data.ImageSpec(size, args.resize_short or round(size * 256 / 224),
                                tuple(args.rand_crop_scale))
    spec = ModelSpec(args.model_arch_name, in_channels=args.image_shape[0], image_size=size,
                     classes=classes)
    per_rank = len(train_folder.samples) // nranks // args.batch_size
    steps = min(per_rank, args.steps_per_epoch or per_rank)
    if steps == 0:
        raise QATError(f"{len(train_folder.samples)} training images make no batch of "
                       f"{args.batch_size} per device; lower --batch-size")
    strategy = _strategy(args)
    programs = build_programs(args, spec, steps, nranks, strategy)
    place = _place()
    scope = paddle.static.global_scope()
    exe = paddle.static.Executor(place)
    exe.run(programs.startup)

    start_epoch = 0
    if args.from_checkpoint is not None:
        checkpoint = resolve_checkpoint(args.from_checkpoint)
        load_checkpoint(checkpoint, programs.main, scope=scope, place=place,
                        optimizer_state=True)
        start_epoch = int(read_meta(checkpoint)["epoch"])
        programs.scheduler.step(start_epoch * steps)
        print(f"resumed from {checkpoint}: epoch {start_epoch} done")
    elif args.from_pretrained_params is not None:
        report = load_pretrained(args.from_pretrained_params, programs.main, scope=scope,
                                 place=place)
        print(f"initialised {len(report.loaded)} parameters from {args.from_pretrained_params}")
    if args.amp and args.use_pure_fp16 and args.from_checkpoint is None:
        programs.optimizer.amp_init(place, scope=scope)
    if args.qat:
        programs.optimizer.qat_init(place, scope=scope, test_program=programs.eval)
        if args.qat_init != "none" and args.from_checkpoint is None:
            from paddle_qat.ptq import calibrate

            # The same images on every rank, so every rank starts from the same scales.
            batches = data.eval_batches(train_folder, image_spec, args.batch_size,
                                        workers=args.workers,
                                        max_steps=args.calibration_batches)
            calibrate(programs.eval, batches, CalibrationConfig(method=args.qat_init),
                      scope=scope, place=place, train_program=programs.main)
            print(f"QAT scales calibrated ({args.qat_init}) on "
                  f"{args.calibration_batches} batches")

    meta = {"model": spec.to_dict(), "classes": list(train_folder.classes)}
    if args.qat:
        meta["qat_config"] = resolve_config(strategy).to_dict()
    metrics: dict = {"epoch": start_epoch}
    for epoch in range(start_epoch, args.epochs):
        if args.dali:
            batches = data.dali_train_batches(train_folder, image_spec, args.batch_size,
                                              rank=rank, nranks=nranks,
                                              device_id=getattr(place, "get_device_id",
                                                                lambda: 0)(),
                                              seed=args.seed + epoch, workers=args.workers)
        else:
            batches = data.train_batches(train_folder, image_spec, args.batch_size, epoch,
                                         rank=rank, nranks=nranks, seed=args.seed,
                                         workers=args.workers, max_steps=steps)
        loss = _train_epoch(exe, programs, batches, epoch, steps, args, rank)
        metrics = {"epoch": epoch + 1, "loss": loss}
        if val_folder is not None and rank == 0 and (epoch + 1) % args.eval_interval == 0:
            metrics["top1"], metrics["top5"] = evaluate(
                exe, programs, data.eval_batches(val_folder, image_spec, args.batch_size,
                                                 workers=args.workers))
        if rank == 0:
            saved = save_checkpoint(args.output_dir, programs.main, epoch=epoch + 1,
                                    scope=scope, meta=meta)
            print(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in metrics.items()) + f" checkpoint {saved}")
    if args.inference_dir is not None and rank == 0:
        export(args, programs, scope)
    return metrics


def export(args, programs: Programs, scope) -> None:
    """Paddle inference model (quant ops kept) and ONNX (INT8 Q/DQ under --qat)."""
    import paddle

    from paddle_qat.export import export_float_onnx, export_inference_model, export_onnx

    prefix = args.inference_dir / args.model_prefix
    exe = paddle.static.Executor(paddle.CPUPlace())
    export_inference_model(prefix, [programs.image], [programs.logits], exe, programs.eval)
    onnx_path = prefix.with_name(prefix.name + ".onnx")
    with paddle.static.scope_guard(scope):
        if args.qat:
            export_onnx(programs.eval, [programs.image], [programs.logits], onnx_path,
                        scope=scope, target=args.qat_target)
        else:
            export_float_onnx(programs.eval, [programs.image], [programs.logits], onnx_path,
                              scope=scope)
    print(f"exported {prefix}.pdmodel and {onnx_path}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except QATError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

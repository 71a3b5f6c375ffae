"""End-to-end demo: FP32 training, PTQ baselines, fleet QAT fine-tuning, ONNX, ONNX Runtime.

Runs on 2 CPU cores in a few minutes with scikit-learn's bundled handwritten digits
(8x8, upscaled to 16x16), so it needs no download:

    python -m paddle_qat.demo --out runs/demo

Accuracy is 5-fold cross-validated: the whole pipeline runs once per fold, and every one of
the 1797 digits is classified once, by the models that did not train on it. A single
360-image test split moved QAT-vs-PTQ by two images either way from run to run (one image
is 0.28 % there, 0.06 % here).

For 8-bit weights and low-bit settings (``--low-bits``, 4 and 3 by default) it calibrates PTQ
models with each calibrator (max, percentile, MSE, entropy) and fine-tunes a QAT model
(``strategy.qat = True``) whose scales start from PTQ's, all with TensorRT's Q/DQ placement.
Then, for the CPU it runs on: ONNX Runtime's own PTQ recipe, our PTQ with the CPU target's
Q/DQ placement (the model the CPU-target QAT starts from) and a QAT model trained with
``QATConfig(target="onnxruntime")``. Every model is exported to ONNX and run by ONNX Runtime;
one table prints accuracy, latency at batch 1 and model size.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import paddle_qat  # noqa: F401  (legacy IR before paddle, fleet QAT installed)
from paddle_qat.calibration import METHODS, CalibrationConfig
from paddle_qat.models import ModelSpec, build_classifier, seed_argument, seeded_programs

SPEC = ModelSpec("residual_cnn", in_channels=1, image_size=16, classes=10, width=16)
CALIBRATION_IMAGES = 256  # from the training split, the usual few hundred
QAT_LR = 0.002  # fine-tuning a converged model: 4 % of the FP32 rate
# QAT's activation observer is a moving average of batch abs-max, so a max start is where it
# stays (stem: 3.70 -> 3.65 over fine-tuning), while a percentile start is dragged up (3.12 ->
# 3.65) as it trains. Six seeds of the 5-fold demo, QAT minus PTQ at 8 bits, in digits: from
# max -1..+3 (best of 4 PTQ rows) and -1..+14 (CPU pair); from percentile -6..+3 and -4..+9.
QAT_INIT = "max"
# The CPU pair's weight widths and their checkpoint folders' suffixes: 8 bits, and 7, whose
# weights (within +-64) no CPU's INT8 kernels saturate
CPU_WEIGHT_BITS = ((8, ""), (7, "_w7"))


@dataclass
class Result:
    """One table row: ``correct`` of ``images`` test digits over all folds; latency and size
    are the first fold's model (every fold's is the same network); ``kernels`` is how ONNX
    Runtime computed it on this CPU (``int8``, or ``float Q/DQ`` where its INT8 kernels would
    saturate the weights: see :mod:`paddle_qat.runtime.int8_kernels`)."""

    name: str
    correct: int
    images: int
    latency_ms: float
    size_kb: float
    kernels: str = "int8"

    @property
    def accuracy(self) -> float:
        return self.correct / self.images


def digit_folds(folds: int, seed: int = 0):
    """Yield (train, test) splits of the digits: with ``folds`` >= 2, k-fold cross-validation
    (each digit in exactly one test split); with 1, a single 80/20 split (quick runs)."""
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    images = np.kron(data.images, np.ones((2, 2))).astype("float32")[:, None] / 16.0
    images = (images - 0.3) / 0.4
    labels = data.target.astype("int64")[:, None]
    order = np.random.default_rng(seed).permutation(len(images))
    tests = np.array_split(order, folds) if folds > 1 else [order[int(0.8 * len(order)):]]
    for test in tests:
        train = np.setdiff1d(order, test, assume_unique=True)  # keeps the shuffled order
        yield (images[train], labels[train]), (images[test], labels[test])


def _build(seed: int):
    import paddle

    main, startup = seeded_programs(seed)
    with paddle.utils.unique_name.guard(), paddle.static.program_guard(main, startup):
        tensors = build_classifier(SPEC)
    return main, startup, main.clone(for_test=True), tensors


def _cosine(rate: float, epochs: int, train, batch: int):
    """Both runs end on a decayed rate: with a constant one, the last steps' noise decided
    QAT-vs-PTQ at 8 bits, where the two differ by a few test images (measured)."""
    import paddle

    return paddle.optimizer.lr.CosineAnnealingDecay(
        rate, T_max=max(1, epochs * (len(train[0]) // batch)))


def _calibration_batches(train, batch: int = 64):
    images, labels = train
    for start in range(0, CALIBRATION_IMAGES, batch):
        yield {"image": images[start:start + batch], "label": labels[start:start + batch]}


def _epochs(exe, program, loss, train, epochs, batch, seed, desc, on_epoch=None,
            scheduler=None):
    from tqdm import tqdm

    images, labels = train
    rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        order = rng.permutation(len(images))
        steps = range(0, len(order) - batch + 1, batch)
        losses = []
        for start in tqdm(steps, desc=f"{desc} epoch {epoch + 1}/{epochs}", leave=False):
            index = order[start:start + batch]
            (value,) = exe.run(program, feed={"image": images[index], "label": labels[index]},
                               fetch_list=[loss])
            losses.append(float(value))
            if scheduler is not None:
                scheduler.step()
        print(f"{desc} epoch {epoch + 1}: loss {np.mean(losses):.4f}")
        if on_epoch is not None:
            on_epoch(epoch + 1)


def _evaluate_onnx(name, path, test, timed: bool = True) -> Result:
    from .runtime.onnxruntime_runner import OnnxRuntimeRunner

    runner = OnnxRuntimeRunner(path, threads=2)  # INT8 kernels only where they are exact
    images, labels = test
    logits = np.concatenate([runner.run(images[i:i + 256]) for i in range(0, len(images), 256)])
    correct = int((logits.argmax(1) == labels[:, 0]).sum())
    latency = float("nan")
    if timed:
        one = images[:1]
        for _ in range(20):
            runner.run(one)
        start = time.perf_counter()
        for _ in range(200):
            runner.run(one)
        latency = (time.perf_counter() - start) / 200 * 1e3
    return Result(name, correct, len(images), latency, Path(path).stat().st_size / 1024,
                  runner.kernels.label)


def _copy_weights(names, source, target, place) -> None:
    for name in names:
        target.var(name).get_tensor().set(np.array(source.find_var(name).get_tensor()),
                                               place)


def _ptq(path, config, method, fp32_scope, fp32_state, train) -> None:
    """Calibrate the FP32 weights into a PTQ model with QAT's Q/DQ placement for ``config``
    (the model QAT starts from, when ``method`` is QAT's); export it for its target."""
    import paddle

    from .export import export_onnx
    from .export.saved import build_eval_program
    from .ptq import calibrate

    scope = paddle.static.Scope()
    with paddle.static.scope_guard(scope):
        program, image, logits = build_eval_program(SPEC, config, scope)
        _copy_weights(fp32_state, fp32_scope, scope, paddle.CPUPlace())
        calibrate(program, _calibration_batches(train), CalibrationConfig(method=method),
                  scope=scope)
        export_onnx(program, [image], [logits], path, scope=scope)


def _qat(path, config, init_method, epochs, batch, seed, fp32_scope, fp32_state, train,
         checkpoints, paddle_prefix=None) -> Path:
    """Fine-tune with fleet ``strategy.qat = True`` from the FP32 weights and PTQ scales."""
    import paddle
    from paddle.distributed import fleet

    from .checkpoint import save_checkpoint
    from .config import resolve_config
    from .export import export_inference_model, export_onnx
    from .fleet_patch import configure
    from .ptq import calibrate

    place = paddle.CPUPlace()
    scope = paddle.static.Scope()
    main, startup, eval_prog, (image, _, logits, loss) = _build(seed)
    strategy = fleet.DistributedStrategy()
    configure(strategy, config)  # strategy.qat = True, with the deployment target
    scheduler = _cosine(QAT_LR, epochs, train, batch)
    with paddle.static.scope_guard(scope):
        with paddle.static.program_guard(main, startup):
            optimizer = fleet.distributed_optimizer(
                paddle.optimizer.Momentum(scheduler, momentum=0.9), strategy)
            optimizer.minimize(loss)
        exe = paddle.static.Executor(place)
        exe.run(startup)
        _copy_weights(fp32_state, fp32_scope, scope, place)  # weights and BN statistics
        optimizer.qat_init(place, scope=scope, test_program=eval_prog)
        calibrate(eval_prog, _calibration_batches(train), CalibrationConfig(method=init_method),
                  scope=scope, train_program=main)
        meta = {"model": SPEC.to_dict(), "qat_config": resolve_config(strategy).to_dict()}
        _epochs(exe, main, loss, train, epochs, batch, seed + 1, f"qat {path.stem}",
                on_epoch=lambda epoch: save_checkpoint(checkpoints, main, epoch=epoch,
                                                       scope=scope, meta=meta),
                scheduler=scheduler)
        export_onnx(eval_prog, [image], [logits], path, scope=scope)
        if paddle_prefix is not None:
            export_inference_model(paddle_prefix, [image], [logits], exe, eval_prog)
    return path


def run(out: Path, fp32_epochs: int = 30, qat_epochs: int = 3, batch: int = 32,
        low_bits: tuple[int, ...] = (4, 3), qat_init: str = QAT_INIT, seed: int = 0,
        folds: int = 5) -> list[Result]:
    """The whole pipeline, once per fold; returns the table's rows summed over the folds.

    The first fold writes to ``out`` (the models, checkpoints and test images the README's
    inference scripts use), fold k to ``out/folds/k``."""
    import paddle
    from paddle.distributed import fleet

    paddle.enable_static()
    fleet.init(is_collective=True)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[Result] = []
    for fold, (train, test) in enumerate(digit_folds(folds, seed)):
        if folds > 1:
            print(f"fold {fold + 1}/{folds}: {len(train[0])} training digits, "
                  f"{len(test[0])} test digits")
        fold_rows = _run_fold(out / "folds" / str(fold) if fold else out, train, test,
                              fp32_epochs, qat_epochs, batch, low_bits, qat_init,
                              seed + fold, timed=fold == 0)
        rows = fold_rows if not rows else [
            dataclasses.replace(r, correct=r.correct + f.correct, images=r.images + f.images)
            for r, f in zip(rows, fold_rows)]
    print(format_table(rows))
    return rows


def _run_fold(out: Path, train, test, fp32_epochs: int, qat_epochs: int, batch: int,
              low_bits: tuple[int, ...], qat_init: str, seed: int, timed: bool
              ) -> list[Result]:
    import paddle

    from .config import QATConfig
    from .export import export_float_onnx
    from .export.ort_ptq import ort_ptq

    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "test_images.npy", test[0])  # for scripts/inference/infer_*.sh
    np.save(out / "test_labels.npy", test[1][:, 0])

    def evaluate(name, path):
        return _evaluate_onnx(name, path, test, timed)

    # 1. FP32 baseline
    fp32_scope = paddle.static.Scope()
    main, startup, eval_prog, (image, _, logits, loss) = _build(seed)
    scheduler = _cosine(0.05, fp32_epochs, train, batch)
    with paddle.static.scope_guard(fp32_scope):
        with paddle.static.program_guard(main, startup):
            paddle.optimizer.Momentum(scheduler, momentum=0.9).minimize(loss)
        exe = paddle.static.Executor(paddle.CPUPlace())
        exe.run(startup)
        _epochs(exe, main, loss, train, fp32_epochs, batch, seed, "fp32", scheduler=scheduler)
    export_float_onnx(eval_prog, [image], [logits], out / "fp32.onnx", scope=fp32_scope)
    fp32_state = [v.name for v in eval_prog.list_vars()
                  if v.persistable and v.name not in ("feed", "fetch")]
    rows = [evaluate("FP32", out / "fp32.onnx")]

    # 2. PTQ with each calibrator, then QAT started from PTQ's scales, per weight width
    qat = dict(init_method=qat_init, epochs=qat_epochs, batch=batch, seed=seed,
               fp32_scope=fp32_scope, fp32_state=fp32_state, train=train)
    for bits in (8, *low_bits):
        for method in METHODS:
            path = out / f"ptq_w{bits}_{method}.onnx"
            _ptq(path, QATConfig(weight_bits=bits), method, fp32_scope, fp32_state, train)
            rows.append(evaluate(f"PTQ w{bits}a8 {method}", path))
        path = _qat(out / f"qat_w{bits}.onnx", QATConfig(weight_bits=bits), **qat,
                    checkpoints=out / ("checkpoints" if bits == 8 else f"checkpoints_w{bits}"),
                    paddle_prefix=out / "inference" / "qat" if bits == 8 else None)
        rows.append(evaluate(f"QAT w{bits}a8", path))

    # 3. For ONNX Runtime on a CPU: its own PTQ recipe; our PTQ with the CPU target's
    # placement (the model QAT starts from); QAT with target="onnxruntime". At 8-bit weights
    # (INT8 kernels on CPUs with VNNI) and at 7 (ONNX Runtime's reduce_range: INT8 kernels
    # that are exact on every x86 CPU, see runtime.int8_kernels)
    images = np.concatenate([b["image"] for b in _calibration_batches(train)])
    for bits, suffix in CPU_WEIGHT_BITS:
        path = ort_ptq(out / "fp32.onnx", out / f"ptq_w{bits}_ort_cpu.onnx", images,
                       target="onnxruntime", reduce_range=bits == 7)
        rows.append(evaluate(f"PTQ w{bits}a8 ORT, CPU", path))
        config = QATConfig(weight_bits=bits, target="onnxruntime")
        path = out / f"ptq_w{bits}_{qat_init}_onnxruntime.onnx"
        _ptq(path, config, qat_init, fp32_scope, fp32_state, train)
        rows.append(evaluate(f"PTQ w{bits}a8 {qat_init}, CPU target", path))
        path = _qat(out / f"qat_w{bits}_onnxruntime.onnx", config, **qat,
                    checkpoints=out / f"checkpoints_onnxruntime{suffix}")
        rows.append(evaluate(f"QAT w{bits}a8, CPU target", path))
    return rows


def format_table(rows: list[Result]) -> str:
    width = max([len("model"), *(len(r.name) for r in rows)])
    lines = [f"{'model':<{width}} {'accuracy':>9} {'correct':>11} {'latency bs1 (ms)':>17} "
             f"{'size (KiB)':>11}  ORT kernels"]
    lines += [f"{r.name:<{width}} {r.accuracy:>9.4f} {f'{r.correct}/{r.images}':>11} "
              f"{r.latency_ms:>17.3f} {r.size_kb:>11.1f}  {r.kernels}" for r in rows]
    return "\n".join(lines)


def _bits(text: str) -> tuple[int, ...]:
    bits = tuple(int(b) for b in text.split(","))
    if not all(2 <= b <= 7 for b in bits):
        raise argparse.ArgumentTypeError(f"low-bit weight widths must be 2..7, got {text}")
    return bits


def _folds(text: str) -> int:
    folds = int(text)
    if not 1 <= folds <= 10:
        raise argparse.ArgumentTypeError(f"--folds must be 1..10, got {text}")
    return folds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"),
                        help="folder for models, checkpoints and data (default: runs/demo)")
    parser.add_argument("--fp32-epochs", type=int, default=30, help="FP32 epochs (30)")
    parser.add_argument("--qat-epochs", type=int, default=3, help="QAT epochs per width (3)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (32)")
    parser.add_argument("--low-bits", type=_bits, default=(4, 3),
                        help="weight bits of the low-bit settings, comma-separated (4,3)")
    parser.add_argument("--qat-init", default=QAT_INIT, choices=METHODS,
                        help=f"calibrator whose scales QAT starts from ({QAT_INIT})")
    parser.add_argument("--folds", type=_folds, default=5,
                        help="cross-validation folds; 1 is a single 80/20 split, 5x quicker "
                             "and 5x coarser (5)")
    parser.add_argument("--seed", type=seed_argument, default=0,
                        help="seed of the fold split, initial weights and batch order (0)")
    args = parser.parse_args(argv)
    run(args.out, args.fp32_epochs, args.qat_epochs, args.batch, args.low_bits, args.qat_init,
        args.seed, args.folds)


if __name__ == "__main__":
    main()

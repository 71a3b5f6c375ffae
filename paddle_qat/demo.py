"""End-to-end demo: FP32 training, fleet QAT fine-tuning, ONNX export, ONNX Runtime evaluation.

Runs on 2 CPU cores in a few minutes with scikit-learn's bundled handwritten digits
(8x8, upscaled to 16x16), so it needs no download:

    python -m paddle_qat.demo --out runs/demo

Prints one table (accuracy, latency at batch 1, model size) for the FP32 and QAT models as
ONNX Runtime runs them.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import paddle_qat  # noqa: F401  (legacy IR before paddle, fleet QAT installed)
from paddle_qat.models import ModelSpec, build_classifier

SPEC = ModelSpec("residual_cnn", in_channels=1, image_size=16, classes=10, width=16)


@dataclass
class Result:
    name: str
    accuracy: float
    latency_ms: float
    size_kb: float


def load_digits(seed: int = 0):
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    images = np.kron(data.images, np.ones((2, 2))).astype("float32")[:, None] / 16.0
    images = (images - 0.3) / 0.4
    labels = data.target.astype("int64")[:, None]
    order = np.random.default_rng(seed).permutation(len(images))
    split = int(0.8 * len(images))
    return (images[order[:split]], labels[order[:split]]), (images[order[split:]],
                                                            labels[order[split:]])


def _build(seed: int):
    import paddle

    main, startup = paddle.static.Program(), paddle.static.Program()
    main.random_seed = startup.random_seed = seed
    with paddle.utils.unique_name.guard(), paddle.static.program_guard(main, startup):
        tensors = build_classifier(SPEC)
    return main, startup, main.clone(for_test=True), tensors


def _epochs(exe, program, loss, train, epochs, batch, seed, desc, on_epoch=None):
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
        print(f"{desc} epoch {epoch + 1}: loss {np.mean(losses):.4f}")
        if on_epoch is not None:
            on_epoch(epoch + 1)


def _evaluate_onnx(name, path, test) -> Result:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    images, labels = test
    logits = np.concatenate([session.run(None, {"image": images[i:i + 256]})[0]
                             for i in range(0, len(images), 256)])
    accuracy = float((logits.argmax(1) == labels[:, 0]).mean())
    one = images[:1]
    for _ in range(20):
        session.run(None, {"image": one})
    start = time.perf_counter()
    for _ in range(200):
        session.run(None, {"image": one})
    latency = (time.perf_counter() - start) / 200 * 1e3
    return Result(name, accuracy, latency, Path(path).stat().st_size / 1024)


def _export_float(program, feed, fetch, scope, path):
    import tempfile

    import paddle
    import paddle2onnx

    with tempfile.TemporaryDirectory() as tmp, paddle.static.scope_guard(scope):
        exe = paddle.static.Executor(paddle.CPUPlace())
        paddle.static.save_inference_model(f"{tmp}/m", feed, fetch, exe, program=program)
        paddle2onnx.export(f"{tmp}/m.pdmodel", f"{tmp}/m.pdiparams", str(path),
                           opset_version=13, verbose=False)


def run(out: Path, fp32_epochs: int = 30, qat_epochs: int = 3, batch: int = 32,
        weight_bits: int = 8, seed: int = 0) -> list[Result]:
    """The whole pipeline; returns the table's rows."""
    import paddle
    from paddle.distributed import fleet

    from .checkpoint import save_checkpoint
    from .config import resolve_config
    from .export import export_inference_model, export_onnx

    paddle.enable_static()
    out.mkdir(parents=True, exist_ok=True)
    train, test = load_digits(seed)
    np.save(out / "test_images.npy", test[0])  # for scripts/inference/infer_*.sh
    np.save(out / "test_labels.npy", test[1][:, 0])
    place = paddle.CPUPlace()

    # 1. FP32 baseline
    fp32_scope = paddle.static.Scope()
    main, startup, eval_prog, (image, _, logits, loss) = _build(seed)
    with paddle.static.scope_guard(fp32_scope):
        with paddle.static.program_guard(main, startup):
            paddle.optimizer.Momentum(0.05, momentum=0.9).minimize(loss)
        exe = paddle.static.Executor(place)
        exe.run(startup)
        _epochs(exe, main, loss, train, fp32_epochs, batch, seed, "fp32")
    _export_float(eval_prog, [image], [logits], fp32_scope, out / "fp32.onnx")
    fp32_state = [v.name for v in eval_prog.list_vars()
                  if v.persistable and v.name not in ("feed", "fetch")]

    # 2. QAT fine-tuning from the FP32 weights, through fleet with strategy.qat = True
    fleet.init(is_collective=True)
    qat_scope = paddle.static.Scope()
    main, startup, eval_prog, (image, _, logits, loss) = _build(seed)
    strategy = fleet.DistributedStrategy()
    strategy.qat = True
    strategy.qat_configs = {"weight_bits": weight_bits}
    with paddle.static.scope_guard(qat_scope):
        with paddle.static.program_guard(main, startup):
            optimizer = fleet.distributed_optimizer(
                paddle.optimizer.Momentum(0.01, momentum=0.9), strategy)
            optimizer.minimize(loss)
        exe = paddle.static.Executor(place)
        exe.run(startup)
        for name in fp32_state:  # weights and BN statistics, from the FP32 run
            qat_scope.find_var(name).get_tensor().set(
                np.array(fp32_scope.find_var(name).get_tensor()), place)
        optimizer.qat_init(place, scope=qat_scope, test_program=eval_prog)
        meta = {"model": SPEC.to_dict(), "qat_config": resolve_config(strategy).to_dict()}
        _epochs(exe, main, loss, train, qat_epochs, batch, seed + 1, "qat",
                on_epoch=lambda epoch: save_checkpoint(out / "checkpoints", main, epoch=epoch,
                                                       scope=qat_scope, meta=meta))
        export_onnx(eval_prog, [image], [logits], out / "qat_int8.onnx", scope=qat_scope)
        export_inference_model(out / "inference" / "qat", [image], [logits], exe, eval_prog)

    rows = [_evaluate_onnx("FP32", out / "fp32.onnx", test),
            _evaluate_onnx(f"QAT INT8 (w{weight_bits}a8)", out / "qat_int8.onnx", test)]
    print(format_table(rows))
    return rows


def format_table(rows: list[Result]) -> str:
    lines = [f"{'model':<20} {'accuracy':>9} {'latency bs1 (ms)':>17} {'size (KiB)':>11}"]
    lines += [f"{r.name:<20} {r.accuracy:>9.4f} {r.latency_ms:>17.3f} {r.size_kb:>11.1f}"
              for r in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"),
                        help="folder for the exported models (default: runs/demo)")
    parser.add_argument("--fp32-epochs", type=int, default=30)
    parser.add_argument("--qat-epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--weight-bits", type=int, default=8, choices=range(2, 9))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    run(args.out, args.fp32_epochs, args.qat_epochs, args.batch, args.weight_bits, args.seed)


if __name__ == "__main__":
    main()

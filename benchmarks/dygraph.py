"""Dygraph QAT training cost, measured side by side in one run; results written with machine
and date.

Step time and step memory of one ``paddle.vision`` model in dygraph: FP32, paddle-qat's
dygraph QAT (``paddle_qat.dygraph.quantize_model``, what ``strategy.qat = True`` with
``fleet.distributed_model`` applies) and Paddle 3.3.1's own dygraph QAT
(``paddle.quantization.QAT`` with ``FakeQuanterWithAbsMaxObserver``, per-tensor, one fused
kernel per quantizer), rounds interleaved so that machine noise falls on all three alike.

    python benchmarks/dygraph.py                          # ResNet18 at 32x32, a minute
    python benchmarks/dygraph.py --model mobilenet_v2 --image-size 64

Writes ``benchmarks/results/<date>-dygraph-<model>.md`` (or ``--out``) and prints it.
"""

# ruff: noqa: I001  (paddle_qat is imported before paddle on purpose)
from __future__ import annotations

import argparse
import collections
import statistics
import time
from pathlib import Path

import numpy as np

import paddle_qat
import paddle

from paddle_qat.dygraph import quantize_model

from run import StepMemory, header, machine, write_report

VARIANTS = ("fp32", "paddle_qat", "paddle_own_qat")
MODELS = {"resnet18": lambda: paddle.vision.models.resnet18(num_classes=10),
          "resnet50": lambda: paddle.vision.models.resnet50(num_classes=10),
          "mobilenet_v2": lambda: paddle.vision.models.mobilenet_v2(num_classes=10)}


def build(model_name: str, variant: str):
    paddle.seed(0)
    model = MODELS[model_name]()
    if variant == "paddle_qat":
        model = quantize_model(model, paddle_qat.QATConfig())
    elif variant == "paddle_own_qat":
        from paddle.quantization import QAT, QuantConfig
        from paddle.quantization.quanters import FakeQuanterWithAbsMaxObserver

        quanter = FakeQuanterWithAbsMaxObserver(moving_rate=0.9)
        model = QAT(QuantConfig(activation=quanter, weight=quanter)).quantize(model,
                                                                              inplace=True)
    optimizer = paddle.optimizer.Momentum(0.01, momentum=0.9, parameters=model.parameters())
    return model, optimizer


def train_step(model, optimizer, images, labels) -> None:
    loss = paddle.nn.functional.cross_entropy(model(images), labels).mean()
    loss.backward()
    optimizer.step()
    optimizer.clear_grad()


def measure(args) -> tuple[dict, dict]:
    """Median seconds per step and median step memory in bytes, per variant."""
    rng = np.random.default_rng(0)
    images = paddle.to_tensor(rng.normal(size=(args.batch, 3, args.image_size,
                                               args.image_size)).astype("float32"))
    labels = paddle.to_tensor(rng.integers(0, 10, size=(args.batch, 1)).astype("int64"))
    built = {variant: build(args.model, variant) for variant in VARIANTS}
    for model, optimizer in built.values():
        model.train()
        for _ in range(3):  # warm-up: kernel selection, allocations
            train_step(model, optimizer, images, labels)
    times, memory = collections.defaultdict(list), collections.defaultdict(list)
    for _ in range(args.rounds):
        for variant, (model, optimizer) in built.items():
            for _ in range(args.steps):
                with StepMemory() as used:  # read outside the timed region
                    start = time.perf_counter()
                    train_step(model, optimizer, images, labels)
                    times[variant].append(time.perf_counter() - start)
                memory[variant].append(used.bytes)
    return ({v: statistics.median(t) for v, t in times.items()},
            {v: statistics.median(m) for v, m in memory.items()})


def report(args, info, times, memory) -> str:
    lines = header(f"paddle-qat dygraph benchmark, {info['date']}", info)
    lines += ["", f"Model: paddle.vision {args.model}, 3x{args.image_size}x{args.image_size}, "
              f"10 classes; batch {args.batch}; {args.rounds} interleaved rounds x "
              f"{args.steps} steps, median.", "",
              "| variant | ms / step | vs FP32 | step memory (MiB) | vs FP32 |",
              "| --- | --- | --- | --- | --- |"]
    for variant in VARIANTS:
        lines.append(f"| {variant} | {times[variant] * 1e3:.1f} | "
                     f"{times[variant] / times['fp32']:.3f}x | {memory[variant] / 2**20:.1f} | "
                     f"{memory[variant] / memory['fp32']:.3f}x |")
    lines += ["", "`paddle_own_qat` is per-tensor and clips to [-127, 127], so its export "
              "differs from what it trained (README, Dygraph); ours is per-channel and "
              "simulates the exported QuantizeLinear exactly, ties to even, in float32. "
              "`step memory`: the most host memory a step allocated above what it started "
              "with (Paddle's allocator statistics), median over the timed steps."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", choices=sorted(MODELS))
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None,
                        help="report file (default benchmarks/results/<date>-dygraph-<model>.md)")
    args = parser.parse_args(argv)
    paddle.disable_static()
    times, memory = measure(args)
    write_report(report(args, machine(), times, memory), args.out, f"dygraph-{args.model}")


if __name__ == "__main__":
    main()

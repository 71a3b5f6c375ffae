"""8-bit QAT against PTQ over several seeds: the demo's 8-bit rows, once per seed.

At 8 bits every row of the demo lands within a few digits of FP32, and which one is ahead
moves with the seed (the initial weights, the folds, the batch order). One table cannot
tell a method's edge from that noise; this script runs the demo's whole 8-bit pipeline
(cross-validated FP32, the four PTQ calibrators, QAT; ONNX Runtime's PTQ and the
CPU-target QAT) for each seed and reports QAT minus PTQ for each pair:

* TensorRT placement: ``QAT w8a8`` against the best of the four PTQ rows (the best is
  picked on the test digits themselves, which favours PTQ);
* CPU: ``QAT w8a8, CPU target`` against ONNX Runtime's own PTQ, and the same at 7-bit
  weights (``reduce_range``), whose INT8 kernels are exact on every x86 CPU;
* CPU, like for like: the same QAT rows against our max PTQ with the CPU target's placement,
  the model they start from.

    python benchmarks/seeds.py                      # seeds 0-5: about 20 minutes on 2 cores
    python benchmarks/seeds.py --seeds 0,3 --folds 1

Writes ``benchmarks/results/<date>-qat-vs-ptq-seeds.md`` (or ``--out``) and prints it.
"""

# ruff: noqa: I001  (paddle_qat is imported before paddle on purpose)
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from paddle_qat import demo
from paddle_qat.calibration import METHODS
from paddle_qat.models import seed_argument

from run import header, machine, write_report

PTQ_ROWS = tuple(f"PTQ w8a8 {method}" for method in METHODS)
PAIRS = {  # pair name: (QAT row, PTQ rows it is compared with, best of them)
    "TensorRT placement (best of 4 PTQ)": ("QAT w8a8", PTQ_ROWS),
    "CPU (ONNX Runtime's PTQ)": ("QAT w8a8, CPU target", ("PTQ w8a8 ORT, CPU",)),
    "CPU, 7-bit weights (ORT's PTQ, reduce_range)": ("QAT w7a8, CPU target",
                                                     ("PTQ w7a8 ORT, CPU",)),
    "CPU (our PTQ, same placement)": ("QAT w8a8, CPU target", ("PTQ w8a8 max, CPU target",)),
    "CPU, 7-bit weights (our PTQ, same placement)": ("QAT w7a8, CPU target",
                                                     ("PTQ w7a8 max, CPU target",)),
}
ROWS = ("FP32", *PTQ_ROWS, "QAT w8a8",
        *(f"{kind} w{bits}a8{what}" for bits in (8, 7) for kind, what in (
            ("PTQ", " ORT, CPU"), ("PTQ", " max, CPU target"), ("QAT", ", CPU target"))))


def seeds_argument(text: str) -> tuple[int, ...]:
    """``0-5`` or ``0,2,7``."""
    try:
        if "-" in text:
            first, last = (seed_argument(part) for part in text.split("-", 1))
            seeds = tuple(range(first, last + 1))
        else:
            seeds = tuple(seed_argument(part) for part in text.split(","))
    except (ValueError, argparse.ArgumentTypeError) as error:
        raise argparse.ArgumentTypeError(
            f"seeds must look like 0-5 or 0,2,7: {error}") from None
    if not seeds:
        raise argparse.ArgumentTypeError(f"{text!r} names no seed")
    return seeds


def margins(correct: dict[str, int]) -> dict[str, int]:
    """QAT minus PTQ, in test digits, for each pair of one seed's rows."""
    return {pair: correct[qat] - max(correct[row] for row in ptq)
            for pair, (qat, ptq) in PAIRS.items()}


def report(info: dict, args, per_seed: dict[int, dict[str, int]], images: int) -> str:
    lines = header("8-bit QAT vs PTQ over seeds", info)
    lines += ["", f"Correct of {images} test digits ({args.folds}-fold; FP32 {args.fp32_epochs} "
              f"epochs, QAT {args.qat_epochs}); the last columns are QAT minus PTQ.", "",
              "| seed | " + " | ".join(ROWS) + " | " + " | ".join(PAIRS) + " |",
              "| --- " * (1 + len(ROWS) + len(PAIRS)) + "|"]
    for seed, correct in per_seed.items():
        diff = margins(correct)
        lines.append(f"| {seed} | " + " | ".join(str(correct[r]) for r in ROWS) + " | "
                     + " | ".join(f"{diff[p]:+d}" for p in PAIRS) + " |")
    lines += ["", "| pair | mean | min | max | seeds with QAT >= PTQ |",
              "| --- | --- | --- | --- | --- |"]
    for pair in PAIRS:
        values = [margins(correct)[pair] for correct in per_seed.values()]
        lines.append(f"| {pair} | {statistics.mean(values):+.1f} | {min(values):+d} | "
                     f"{max(values):+d} | {sum(v >= 0 for v in values)} of {len(values)} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=seeds_argument, default=tuple(range(6)),
                        help="0-5 (default) or 0,2,7")
    parser.add_argument("--folds", type=int, default=5, choices=range(1, 11), metavar="1..10")
    parser.add_argument("--fp32-epochs", type=int, default=30)
    parser.add_argument("--qat-epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None,
                        help="report file (default benchmarks/results/<date>-qat-vs-ptq-seeds.md)")
    args = parser.parse_args(argv)

    per_seed, images = {}, 0
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix="paddle_qat_seeds_") as tmp:
            rows = demo.run(Path(tmp), fp32_epochs=args.fp32_epochs, qat_epochs=args.qat_epochs,
                            low_bits=(), seed=seed, folds=args.folds)
        per_seed[seed] = {row.name: row.correct for row in rows}
        images = rows[0].images
    write_report(report(machine(), args, per_seed, images), args.out, "qat-vs-ptq-seeds")


if __name__ == "__main__":
    main()

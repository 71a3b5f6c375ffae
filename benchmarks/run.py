"""paddle-qat benchmarks, measured side by side in one run; results written with machine and date.

(a) training step time and step memory of one model: FP32, paddle-qat's QAT
    (``strategy.qat = True``) and Paddle 3.3.1's own fleet QAT optimizer, interleaved round
    by round;
(b) ONNX Runtime CPU latency / throughput at batch 1 and 32: the FP32 ONNX, our QAT INT8
    ONNX and ONNX Runtime's ``quantize_static`` PTQ INT8 of the same FP32 ONNX, plus what
    ONNX Runtime's graph optimizer turned each into (the INT8 kernels it picked);
(c) TensorRT FP16 / PTQ / QAT: printed as commands to run on a GPU machine.

    python benchmarks/run.py                          # small residual CNN, minutes on 2 cores
    python benchmarks/run.py --model resnet50 --image-size 224 --batch 32 --steps 5

Writes ``benchmarks/results/<date>-<model>.md`` (or ``--out``) and prints the same text.
"""

# ruff: noqa: I001  (paddle_qat is imported before paddle on purpose)
from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import paddle_qat
import paddle
from paddle.distributed import fleet

from paddle_qat.models import ModelSpec, build_classifier

VARIANTS = ("fp32", "paddle_qat", "paddle_fleet_qat", "paddle_qat_onnxruntime")
CONFIGS = {"paddle_qat": paddle_qat.QATConfig(),
           "paddle_qat_onnxruntime": paddle_qat.QATConfig(target="onnxruntime")}
GOAL_STEP_RATIO = 1.15  # our QAT step time vs FP32, from issue 7


def machine() -> dict:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    from paddle_qat.runtime.int8_kernels import int8_kernels_saturate

    return {"date": datetime.date.today().isoformat(), "machine": platform.node(), "cpu": cpu,
            "cores": os.cpu_count(), "python": platform.python_version(),
            "paddle": paddle.__version__, "onnxruntime": onnxruntime.__version__,
            "paddle_qat": paddle_qat.__version__,
            "ONNX Runtime INT8 kernels": "saturate weights beyond +-64 (no VNNI)"
            if int8_kernels_saturate() else "exact for 8-bit weights"}


def header(title: str, info: dict) -> list[str]:
    """A report's title and the machine table every benchmark report opens with."""
    return [f"# {title}", "", "| machine | value |", "| --- | --- |",
            *(f"| {key} | {value} |" for key, value in info.items())]


def write_report(text: str, out: Path | None, name: str) -> Path:
    """Write ``text`` to ``out`` (default ``benchmarks/results/<date>-<name>.md``), print it."""
    out = out or Path(__file__).with_name("results") / (
        f"{datetime.date.today().isoformat()}-{name}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"written to {out}")
    return out


@dataclasses.dataclass
class Built:
    main: object
    startup: object
    eval: object
    image: object
    logits: object
    loss: object
    scope: object  # each variant's variables have the same names: one scope per variant
    minimize_s: float  # fleet minimize: backward, optimizer and (QAT) the quant passes


def _build(spec: ModelSpec, variant: str) -> Built:
    """One variant's programs built through fleet."""
    from paddle.distributed.fleet.base import meta_optimizer_factory
    from paddle.distributed.fleet.meta_optimizers import qat_optimizer as paddle_own

    main, startup = paddle.static.Program(), paddle.static.Program()
    main.random_seed = startup.random_seed = 1
    strategy = fleet.DistributedStrategy()
    strategy.qat = variant != "fp32"
    if variant in CONFIGS:
        paddle_qat.configure(strategy, CONFIGS[variant])
    ours = meta_optimizer_factory.QATOptimizer
    if variant == "paddle_fleet_qat":  # Paddle's optimizer, which paddle_qat replaces
        meta_optimizer_factory.QATOptimizer = paddle_own.QATOptimizer
    try:
        # Paddle's own QAT initializes its variables in the global scope only.
        scope = paddle.static.global_scope() if variant == "paddle_fleet_qat" else \
            paddle.static.Scope()
        with paddle.utils.unique_name.guard(), paddle.static.program_guard(main, startup), \
                paddle.static.scope_guard(scope):
            image, _, logits, loss = build_classifier(spec)
            eval_program = main.clone(for_test=True)
            optimizer = fleet.distributed_optimizer(
                paddle.optimizer.Momentum(0.01, momentum=0.9), strategy)
            start = time.perf_counter()
            optimizer.minimize(loss)
            minimize_s = time.perf_counter() - start
    finally:
        meta_optimizer_factory.QATOptimizer = ours
    return Built(main, startup, eval_program, image, logits, loss, scope, minimize_s)


class StepMemory:
    """Host memory one training step allocates at its peak above what was held before it
    (Paddle's own allocator statistics: activations, gradients, temporaries)."""

    def __enter__(self):
        from paddle.base import core

        self._core = core
        self._held = core.host_memory_stat_current_value("Allocated", 0)
        core.host_memory_stat_reset_peak_value("Allocated", 0)
        return self

    def __exit__(self, *exc):
        self.bytes = self._core.host_memory_stat_peak_value("Allocated", 0) - self._held


def step_times(spec: ModelSpec, batch: int, steps: int, rounds: int) -> tuple[dict, dict, dict]:
    """Median seconds per training step of each variant (rounds interleaved), its median
    step memory in bytes, and the built programs."""
    rng = np.random.default_rng(0)
    feed = {"image": rng.normal(size=(batch, spec.in_channels, spec.image_size,
                                      spec.image_size)).astype("float32"),
            "label": rng.integers(0, spec.classes, size=(batch, 1)).astype("int64")}
    exe = paddle.static.Executor(paddle.CPUPlace())
    built = {}
    for variant in VARIANTS:
        b = built[variant] = _build(spec, variant)
        with paddle.static.scope_guard(b.scope):
            exe.run(b.startup)
            for _ in range(3):  # warm-up: kernel selection, allocations
                exe.run(b.main, feed=feed, fetch_list=[b.loss])
    times, memory = collections.defaultdict(list), collections.defaultdict(list)
    for _ in range(rounds):
        for variant in VARIANTS:
            b = built[variant]
            with paddle.static.scope_guard(b.scope):
                for _ in range(steps):
                    with StepMemory() as used:  # read outside the timed region
                        start = time.perf_counter()
                        exe.run(b.main, feed=feed, fetch_list=[b.loss])
                        times[variant].append(time.perf_counter() - start)
                    memory[variant].append(used.bytes)
    return ({v: statistics.median(t) for v, t in times.items()},
            {v: statistics.median(m) for v, m in memory.items()}, built)


# ONNX models of table (b): (row name, file name)
FP32 = ("FP32", "fp32.onnx")
QAT_TRT = ("QAT INT8, TensorRT placement", "qat_int8.onnx")
QAT_ORT = ("QAT INT8, target onnxruntime", "qat_int8_onnxruntime.onnx")
PTQ_TRT = ("ORT quantize_static PTQ INT8, TensorRT settings", "ort_ptq_int8.onnx")
PTQ_ORT = ("ORT quantize_static PTQ INT8, CPU settings", "ort_ptq_int8_cpu.onnx")
# 7-bit weights: INT8 kernels exact on CPUs without VNNI too (paddle_qat.runtime.int8_kernels)
QAT_ORT7 = ("QAT INT8 w7, target onnxruntime", "qat_int8_onnxruntime_w7.onnx")
PTQ_ORT7 = ("ORT quantize_static PTQ INT8, CPU settings, reduce_range", "ort_ptq_int8_cpu_w7.onnx")
# (numerator, denominator, goal <= 1): the ratios table (b) reports
RATIOS = ((QAT_TRT, PTQ_TRT), (QAT_ORT, PTQ_ORT), (QAT_ORT, FP32), (QAT_ORT7, PTQ_ORT7),
          (QAT_ORT7, FP32))


def export_models(built, folder: Path, calibration: np.ndarray) -> dict[str, Path]:
    from paddle_qat.export import export_float_onnx, export_onnx
    from paddle_qat.export.ort_ptq import ort_ptq

    b = built["fp32"]
    export_float_onnx(b.eval, [b.image], [b.logits], folder / FP32[1], scope=b.scope)
    # fleet is one object per process: fleet.qat_init would use the last variant's
    # optimizer, so each eval program is quantized with its variant's config directly.
    w7 = dataclasses.replace(CONFIGS["paddle_qat_onnxruntime"], weight_bits=7)
    for variant, config, (_, name) in (
            ("paddle_qat", CONFIGS["paddle_qat"], QAT_TRT),
            ("paddle_qat_onnxruntime", w7, QAT_ORT7),
            ("paddle_qat_onnxruntime", CONFIGS["paddle_qat_onnxruntime"], QAT_ORT)):
        b = built[variant]
        program = b.eval.clone(for_test=True)
        paddle_qat.quantize_program(program, config, scope=b.scope, for_test=True)
        export_onnx(program, [b.image], [b.logits], folder / name, scope=b.scope)
    for (_, name), target, reduce_range in ((PTQ_TRT, "tensorrt", False),
                                            (PTQ_ORT, "onnxruntime", False),
                                            (PTQ_ORT7, "onnxruntime", True)):
        ort_ptq(folder / FP32[1], folder / name, calibration, target=target,
                reduce_range=reduce_range)
    return {row: folder / name
            for row, name in (FP32, QAT_TRT, QAT_ORT, QAT_ORT7, PTQ_TRT, PTQ_ORT, PTQ_ORT7)}


def ort_latency(models: dict, shape: tuple, threads: int, rounds: int) -> tuple[dict, dict]:
    """{(model, batch): Timing} and, per model, how it ran (fused INT8 kernels or Q/DQ in
    float, as the runner chose for this CPU) and the op types ONNX Runtime's optimizer left."""
    import onnx
    import onnxruntime as ort

    from paddle_qat.runtime import benchmark, open_runner
    from paddle_qat.runtime.int8_kernels import choose_kernels, session_options

    results, kernels = {}, {}
    for name, path in models.items():
        choice = choose_kernels(path)
        options = session_options(choice, threads)
        optimized = path.with_suffix(".optimized.onnx")
        options.optimized_model_filepath = str(optimized)
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        counts = collections.Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
        kernels[name] = (choice.label, ", ".join(
            f"{op} {n}" for op, n in sorted(counts.items())
            if op not in ("Constant", "Shape", "Slice", "Concat")))
    runners = {name: open_runner(path, threads=threads) for name, path in models.items()}
    rng = np.random.default_rng(1)
    for batch in (1, 32):
        data = rng.normal(size=(batch, *shape)).astype("float32")
        per_round = collections.defaultdict(list)
        for _ in range(rounds):  # interleaved, so drift hits every model alike
            for name, runner in runners.items():
                # batch 1 of a small model takes ~0.1 ms: enough calls to see past VM jitter
                per_round[name].append(benchmark(runner, data, iterations=200 if batch == 1
                                                 else 20, warmup=10))
        for name, timings in per_round.items():
            results[(name, batch)] = min(timings, key=lambda t: t.median_ms)
    return results, kernels


TENSORRT = """\
On a GPU machine with TensorRT (`pip install -e .[tensorrt]` or the Dockerfile), from the
ONNX files this run wrote (keep them with `--keep DIR`):

    trtexec --onnx=fp32.onnx --fp16 --shapes=image:32x{shape} \\
        --exportLayerInfo=fp16.json --profilingVerbosity=detailed
    trtexec --onnx=ort_ptq_int8.onnx --stronglyTyped --shapes=image:32x{shape} \\
        --exportLayerInfo=ptq.json --profilingVerbosity=detailed
    trtexec --onnx=qat_int8.onnx --stronglyTyped --shapes=image:32x{shape} \\
        --exportLayerInfo=qat.json --profilingVerbosity=detailed

(TensorRT <= 10: `--int8 --fp16` instead of `--stronglyTyped`.) Compare the throughput
lines and, in the layer JSON, that every convolution runs INT8 in and out with no
Reformat layers between them."""


def report(spec, args, info, steps, memory, built, latency, kernels) -> str:
    lines = header(f"paddle-qat benchmarks, {info['date']}", info)
    lines += ["", f"Model: {spec.name}, {spec.in_channels}x{spec.image_size}x"
              f"{spec.image_size}, {spec.classes} classes; ONNX Runtime threads: "
              f"{args.threads}.", "",
              f"## (a) Training step time, batch {args.batch} ({args.rounds} interleaved rounds "
              f"x {args.steps} steps, median)", "",
              "| variant | ms / step | vs FP32 | step memory (MiB) | vs FP32 | "
              "fleet minimize (s) |",
              "| --- | --- | --- | --- | --- | --- |"]
    for variant in VARIANTS:
        lines.append(f"| {variant} | {steps[variant] * 1e3:.2f} | "
                     f"{steps[variant] / steps['fp32']:.3f}x | {memory[variant] / 2**20:.1f} | "
                     f"{memory[variant] / memory['fp32']:.3f}x | "
                     f"{built[variant].minimize_s:.2f} |")
    ours, theirs = steps["paddle_qat"] / steps["fp32"], steps["paddle_fleet_qat"] / steps["fp32"]
    our_memory, their_memory = memory["paddle_qat"], memory["paddle_fleet_qat"]
    lines += ["", f"Goals: QAT <= {GOAL_STEP_RATIO}x FP32: "
              f"{'met' if ours <= GOAL_STEP_RATIO else 'NOT met'} ({ours:.3f}x); ours <= "
              f"Paddle's fleet QAT: {'met' if ours <= theirs else 'NOT met'} ({ours:.3f}x vs "
              f"{theirs:.3f}x); step memory, ours <= Paddle's fleet QAT: "
              f"{'met' if our_memory <= their_memory else 'NOT met'} "
              f"({our_memory / 2**20:.1f} vs {their_memory / 2**20:.1f} MiB). `step memory`: "
              f"the most host memory a training step allocated above what it started with "
              f"(Paddle's allocator statistics), median over the timed steps; the executor's "
              f"op order moves one step's peak by up to about 20 %. "
              f"`fleet minimize` is the one-off program build: backward, "
              f"optimizer and, for QAT, the quant passes.", "",
              "## (b) ONNX Runtime CPU", "",
              "| model | kernels | bs1 median ms | bs1 p90 ms | bs32 median ms | "
              "bs32 samples/s |",
              "| --- | --- | --- | --- | --- | --- |"]
    for name, (label, _) in kernels.items():
        one, many = latency[(name, 1)], latency[(name, 32)]
        lines.append(f"| {name} | {label} | {one.median_ms:.3f} | {one.p90_ms:.3f} | "
                     f"{many.median_ms:.2f} | {many.throughput:.0f} |")
    lines += ["", "| latency ratio (goal <= 1) | batch 1 | batch 32 |", "| --- | --- | --- |"]
    for (top, _), (bottom, _) in RATIOS:
        cells = []
        for batch in (1, 32):
            ratio = latency[(top, batch)].median_ms / latency[(bottom, batch)].median_ms
            cells.append(f"{ratio:.3f} ({'met' if ratio <= 1.0 else 'NOT met'})")
        lines.append(f"| {top} / {bottom} | {' | '.join(cells)} |")
    lines += ["", "`kernels`: `float Q/DQ` where this CPU's INT8 kernels would saturate the "
              "model's 8-bit weights (no VNNI), so the runner computes its Q/DQ in float "
              "(exact); `int8` where the fused kernels are exact. Ops after ONNX Runtime's "
              "graph optimizations (what actually runs):", ""]
    lines += [f"- {name}: {ops}" for name, (_, ops) in kernels.items()]
    shape = "x".join(str(d) for d in (spec.in_channels, spec.image_size, spec.image_size))
    lines += ["", "## (c) TensorRT", "", TENSORRT.format(shape=shape)]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="residual_cnn", choices=("residual_cnn", "resnet50"))
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=32, help="residual_cnn channels")
    parser.add_argument("--batch", type=int, default=32, help="training batch")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep the ONNX files here (for the TensorRT commands)")
    parser.add_argument("--out", type=Path, default=None,
                        help="report file (default benchmarks/results/<date>-<model>.md)")
    args = parser.parse_args(argv)

    paddle.enable_static()
    fleet.init(is_collective=True)
    spec = ModelSpec(args.model, in_channels=3, image_size=args.image_size, classes=10,
                     width=args.width)
    steps, memory, built = step_times(spec, args.batch, args.steps, args.rounds)
    with tempfile.TemporaryDirectory(prefix="paddle_qat_bench_") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        calibration = np.random.default_rng(2).normal(
            size=(64, 3, args.image_size, args.image_size)).astype("float32")
        models = export_models(built, folder, calibration)
        latency, kernels = ort_latency(models, (3, args.image_size, args.image_size),
                                       args.threads, args.rounds)
    write_report(report(spec, args, machine(), steps, memory, built, latency, kernels), args.out,
                 args.model)


if __name__ == "__main__":
    main()

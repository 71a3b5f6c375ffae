"""Latency / throughput of a runner on one batch, measured the same way for every runtime."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Timing:
    batch: int
    iterations: int
    median_ms: float
    p90_ms: float

    @property
    def throughput(self) -> float:
        """Samples per second at the median latency."""
        return self.batch / (self.median_ms / 1e3)

    def __str__(self):
        return (f"batch {self.batch}: median {self.median_ms:.3f} ms, p90 {self.p90_ms:.3f} ms, "
                f"{self.throughput:.1f} samples/s ({self.iterations} runs)")


def benchmark(runner, batch: np.ndarray, iterations: int = 100, warmup: int = 10) -> Timing:
    """Median and p90 wall time of ``runner.run(batch)`` (each run synchronises)."""
    for _ in range(warmup):
        runner.run(batch)
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        runner.run(batch)
        times.append((time.perf_counter() - start) * 1e3)
    return Timing(len(batch), iterations, float(np.median(times)),
                  float(np.percentile(times, 90)))

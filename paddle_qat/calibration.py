"""Calibrators: pick an activation's quantization range from samples of it.

An observer measures, a calibrator answers: :class:`ActivationCalibrator` takes batches of
named activations (``collect``) and returns one abs-max threshold per tensor
(``thresholds``), Paddle's scale convention (``x`` maps to ``round(x / t * qmax)``).

Methods:
    ``max``         largest |x| seen; no clipping, coarse steps when outliers exist.
    ``percentile``  the |x| below which ``percentile`` % of values fall.
    ``mse``         the threshold minimising the mean squared quantization error (clipping
                    plus rounding) over the |x| histogram.
    ``entropy``     TensorRT's KL-divergence method: the threshold whose 2^(bits-1)-level
                    quantized |x| histogram diverges least from the clipped original,
                    among those that keep at least 99 % of the values.

All but ``max`` read one |x| histogram per tensor (``bins`` bins over [0, running max],
re-binned when the max grows), as TensorRT and pytorch-quantization do. ONNX Runtime's
``HistogramCollector`` was tried first: its entropy search is a Python loop (30 s for two
16x16x16 tensors here) over a signed histogram, half of it empty for post-ReLU tensors.

Example::

    calibrator = ActivationCalibrator(CalibrationConfig(method="mse"))
    for batch in batches:
        calibrator.collect({"conv1_in": batch_activations})
    thresholds = calibrator.thresholds()   # {"conv1_in": 3.2}
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import QATConfigError

METHODS = ("max", "percentile", "mse", "entropy")


@dataclass(frozen=True)
class CalibrationConfig:
    """How activation ranges are calibrated.

    Fields:
        method: one of ``max``, ``percentile``, ``mse``, ``entropy`` (see the module doc).
        percentile: for ``percentile``, the share of |x| kept unclipped, in (0, 100].
        bins: histogram bins (``percentile``, ``mse``, ``entropy``); TensorRT uses 2048.
        bits: activation bits the range is chosen for (``mse`` and ``entropy``).
    """

    method: str = "percentile"
    percentile: float = 99.99
    bins: int = 2048
    bits: int = 8

    def __post_init__(self):
        if self.method not in METHODS:
            raise QATConfigError(f"calibration method {self.method!r} is unknown; use one of "
                                 f"{list(METHODS)}")
        if not 0 < self.percentile <= 100:
            raise QATConfigError(f"percentile must be in (0, 100], got {self.percentile!r}")
        if self.bins < 256:
            raise QATConfigError(f"bins must be >= 256 for a useful histogram, got {self.bins}")
        if not 2 <= self.bits <= 8:
            raise QATConfigError(f"bits must be 2..8, got {self.bits}")


class AbsHistogram:
    """A |x| histogram with ``bins`` equal bins over [0, max seen so far]."""

    def __init__(self, bins: int):
        self.bins = bins
        self.counts = np.zeros(bins, np.float64)
        self.top = 0.0

    def add(self, values: np.ndarray) -> None:
        values = np.abs(values.ravel())
        top = float(values.max())
        if top > self.top:
            if self.counts.any():  # re-bin what was seen onto the wider range
                old_edges = np.linspace(0, self.top, self.bins + 1)
                centers = (old_edges[:-1] + old_edges[1:]) / 2
                self.counts, _ = np.histogram(centers, self.bins, (0, top), weights=self.counts)
            self.top = top
        if self.top > 0:
            counts, _ = np.histogram(values, self.bins, (0, self.top))
            self.counts += counts

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(0, self.top, self.bins + 1)


def percentile_threshold(hist: AbsHistogram, percentile: float) -> float:
    """The bin edge below which ``percentile`` % of the values lie."""
    cdf = np.cumsum(hist.counts) / hist.counts.sum()
    index = int(np.searchsorted(cdf, percentile / 100.0))
    return float(hist.edges[min(index + 1, hist.bins)])


def mse_threshold(hist: AbsHistogram, bits: int) -> float:
    """The bin edge with the least mean squared quantization error; values above it clip."""
    qmax = 2 ** (bits - 1) - 1
    edges = hist.edges
    centers = (edges[:-1] + edges[1:]) / 2
    candidates = edges[hist.bins // 16::max(1, hist.bins // 512)]
    errors = []
    for threshold in candidates:
        step = threshold / qmax
        simulated = np.minimum(np.round(centers / step), qmax) * step
        errors.append(float(np.sum(hist.counts * (centers - simulated) ** 2)))
    return float(candidates[int(np.argmin(errors))])


# The least share of the values an ``entropy`` range keeps unclipped (see entropy_threshold).
KEEP_AT_LEAST = 0.99


def entropy_threshold(hist: AbsHistogram, bits: int) -> float:
    """TensorRT's KL method: for each candidate end bin ``i`` the reference P is the first
    ``i`` bins with everything above folded into the last; Q is P's bins merged into
    2^(bits-1) levels and spread back evenly over P's non-empty bins. The edge of the ``i``
    with the least KL(P || Q) wins."""
    levels = 2 ** (bits - 1)
    counts = hist.counts.copy()
    # Post-ReLU tensors put a large share of exact zeros in bin 0; that spike says nothing
    # about the range and, kept, drags the threshold down to a few bins (0.1 accuracy in
    # the demo, measured). pytorch-quantization's entropy calibrator flattens it the same way.
    counts[0] = counts[1]
    # A candidate must keep KEEP_AT_LEAST of the values. KL rewards reproducing the
    # histogram's shape, and where that shape is a few tall spikes it will clip a long tail
    # to reproduce them exactly:
    # * a tensor with no values near zero (pooled features in [0.58, 7.1]): P and Q were one
    #   nearly empty slice plus the folded tail, KL ~0, threshold 0.58, accuracy 0.09;
    # * a conv map of images with flat backgrounds (the demo's stem, unsigned for
    #   target="onnxruntime", so 256 levels): each channel's background is one value, ten
    #   of them held a fifth of the mass, and the search
    #   stopped right after the last, at 0.89 of 4.07, clipping 17 % of the non-zero values
    #   (accuracy 198 of 359 instead of 348 on that fold; measured).
    floor = int(np.searchsorted(np.cumsum(counts), counts.sum() * KEEP_AT_LEAST)) + 1
    best, best_kl = hist.bins, np.inf
    for end in range(max(levels, floor), hist.bins + 1):
        reference = counts[:end].copy()
        reference[-1] += counts[end:].sum()
        if reference.sum() == 0:
            continue
        groups = np.array_split(np.arange(end), levels)
        starts = np.array([g[0] for g in groups])
        nonzero = counts[:end] > 0
        merged = np.add.reduceat(counts[:end], starts)
        filled = np.add.reduceat(nonzero.astype(np.float64), starts)
        sizes = np.diff(np.append(starts, end))
        per_bin = np.repeat(np.divide(merged, filled, out=np.zeros_like(merged),
                                      where=filled > 0), sizes)
        candidate = np.where(nonzero, per_bin, 0.0)
        p = reference / reference.sum()
        q = candidate / max(candidate.sum(), 1e-12)
        mask = p > 0
        if np.any(q[mask] == 0):
            continue  # Q misses mass P has: infinite divergence
        kl = float(np.sum(p[mask] * np.log(p[mask] / q[mask])))
        if kl < best_kl:
            best, best_kl = end, kl
    return float(hist.edges[best])


class ActivationCalibrator:
    """Collects activations batch by batch; answers one abs-max threshold per tensor."""

    def __init__(self, config: CalibrationConfig | None = None):
        self.config = CalibrationConfig() if config is None else config
        self._histograms: dict[str, AbsHistogram] = {}

    def collect(self, activations: dict[str, np.ndarray]) -> None:
        for name, value in activations.items():
            value = np.asarray(value, dtype=np.float32)
            if not np.all(np.isfinite(value)):
                raise QATConfigError(f"activation {name!r} holds NaN or Inf during calibration: "
                                     f"the float model is broken on this data")
            self._histograms.setdefault(name, AbsHistogram(self.config.bins)).add(value)

    def thresholds(self, unsigned=frozenset()) -> dict[str, float]:
        """One threshold per tensor. Tensors named in ``unsigned`` are quantized to
        ``[0, 2**bits - 1]`` (``QATConfig(target="onnxruntime")`` after a ReLU): twice the
        levels over the same |x| histogram, which ``mse`` and ``entropy`` search with."""
        if not self._histograms:
            raise QATConfigError("no calibration data was collected: pass at least one batch")
        config = self.config
        found = {}
        for name, hist in self._histograms.items():
            bits = config.bits + 1 if name in unsigned else config.bits
            if hist.top == 0 or config.method == "max":
                found[name] = hist.top
            elif config.method == "percentile":
                found[name] = percentile_threshold(hist, config.percentile)
            elif config.method == "mse":
                found[name] = mse_threshold(hist, bits)
            else:
                found[name] = entropy_threshold(hist, bits)
        # An all-zero tensor has no range; keep a tiny positive scale, as export requires.
        return {name: max(value, 1e-8) for name, value in found.items()}

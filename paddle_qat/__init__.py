"""paddle_qat: quantization-aware training for PaddlePaddle fleet, exported for TensorRT.

``import paddle_qat`` then ``strategy.qat = True`` is all a fleet static-graph training script
needs. Importing this package keeps Paddle on its legacy program IR (see
:mod:`paddle_qat.legacy_ir`) and replaces fleet's QAT meta-optimizer with ours.
"""

import warnings

from .legacy_ir import ensure_legacy_ir

# Paddle warns on every import that no C++ build cache (ccache) is installed; it concerns
# custom C++ ops only, which paddle_qat never builds.
warnings.filterwarnings("ignore", message="No ccache found", category=UserWarning)

ensure_legacy_ir()

from .build_strategy import disable_qat_incompatible_fusions, qat_build_strategy  # noqa: E402
from .config import QATConfig  # noqa: E402
from .errors import (  # noqa: E402
    LegacyIRRequiredError,
    QATConfigError,
    QATError,
    ScaleError,
    UnsupportedOpError,
)
from .fleet_patch import configure, install  # noqa: E402
from .passes import QuantizationSummary, quantize_program  # noqa: E402

install()

__version__ = "0.1.0"

# The sub-packages the README calls through the package (paddle_qat.export.export_onnx,
# paddle_qat.dygraph.quantize_model, ...): imported on first use, so ``import paddle_qat``
# stays as quick as it was, and ``import paddle_qat`` alone is enough to call them.
_SUBPACKAGES = ("calibration", "checkpoint", "dygraph", "export", "models", "ptq", "runtime",
                "sensitivity")


def __getattr__(name):
    if name in _SUBPACKAGES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "QATConfig",
    "QuantizationSummary",
    "configure",
    "quantize_program",
    "qat_build_strategy",
    "disable_qat_incompatible_fusions",
    "QATError",
    "QATConfigError",
    "LegacyIRRequiredError",
    "UnsupportedOpError",
    "ScaleError",
]

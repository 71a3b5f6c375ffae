"""Static-graph models by name, so checkpoints and export commands can rebuild a network.

Example::

    from paddle_qat.models import ModelSpec, build_classifier
    spec = ModelSpec("resnet50", in_channels=3, image_size=224, classes=1000)
    image, label, logits, loss = build_classifier(spec)   # inside a program_guard
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import QATConfigError


@dataclass(frozen=True)
class ModelSpec:
    """Which network to build and its input/output sizes (stored in every checkpoint)."""

    name: str
    in_channels: int = 3
    image_size: int = 224
    classes: int = 1000
    width: int = 16  # residual_cnn only: channels of its convolutions

    def __post_init__(self):
        if self.name not in MODELS:
            raise QATConfigError(f"unknown model {self.name!r}; known: {sorted(MODELS)}")
        for field in ("in_channels", "image_size", "classes", "width"):
            if getattr(self, field) < 1:
                raise QATConfigError(f"ModelSpec.{field} must be >= 1")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelSpec:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise QATConfigError(f"unknown ModelSpec keys {sorted(unknown)}")
        return cls(**data)


def _residual_cnn(spec: ModelSpec):
    from .residual_cnn import residual_cnn

    return residual_cnn(spec.in_channels, spec.image_size, spec.classes, spec.width)


def _resnet50(spec: ModelSpec):
    from .resnet import resnet50

    return resnet50(spec.in_channels, spec.image_size, spec.classes)


MODELS = {"residual_cnn": _residual_cnn, "resnet50": _resnet50}


def seed_argument(text: str) -> int:
    """argparse type of ``--seed``: Paddle and NumPy take seeds 0 .. 2**32 - 1."""
    import argparse

    seed = int(text)
    if not 0 <= seed < 2**32:
        raise argparse.ArgumentTypeError(f"--seed must be 0 .. 2**32 - 1, got {text}")
    return seed


def seeded_programs(seed: int):
    """A fresh (main, startup) pair whose initial weights depend on ``seed`` alone.

    Paddle reads a program seed of 0 as "pick one at random", which made ``--seed 0`` runs
    differ (the demo's default: its FP32 accuracy moved by up to 5 of 360 test images
    between identical runs). Seeding Paddle's global generator too covers that case."""
    import paddle

    paddle.seed(seed)
    main, startup = paddle.static.Program(), paddle.static.Program()
    main.random_seed = startup.random_seed = seed
    return main, startup


def build_classifier(spec: ModelSpec, label_smoothing: float = 0.0):
    """Build ``spec`` in the current program: returns (image, label, logits, loss), the
    loss a mean softmax cross-entropy (with ``label_smoothing``, DLE's ResNet50 uses 0.1)."""
    import paddle
    import paddle.nn.functional as F

    image, label, logits = MODELS[spec.name](spec)
    if label_smoothing > 0:
        # F.cross_entropy(label_smoothing=...) rejects int64 labels in static programs.
        target = F.label_smooth(F.one_hot(paddle.squeeze(label, -1), spec.classes),
                                epsilon=label_smoothing)
        loss = paddle.mean(F.cross_entropy(logits, target, soft_label=True))
    else:
        loss = paddle.mean(F.cross_entropy(logits, label))
    return image, label, logits, loss

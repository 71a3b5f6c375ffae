"""Tiny static-graph networks and data, built in-process for the tests."""

from __future__ import annotations

import numpy as np
from paddle import static

from paddle_qat.models.residual_cnn import residual_cnn as _residual_cnn

IMAGE = 8
CLASSES = 4


def residual_cnn(image: int = IMAGE, classes: int = CLASSES, channels: int = 8):
    """The demo's conv/bn/relu -> residual block -> maxpool -> avgpool -> fc, made tiny."""
    return _residual_cnn(in_channels=3, image=image, classes=classes, width=channels)


def build(net=residual_cnn, seed: int = 7):
    """Fresh (main, startup, test, tensors) with the eval clone taken before any optimizer."""
    main, startup = static.Program(), static.Program()
    main.random_seed = startup.random_seed = seed
    with static.program_guard(main, startup):
        tensors = net()
    return main, startup, main.clone(for_test=True), tensors


def separable_batches(steps: int, batch: int = 16, seed: int = 0, image: int = IMAGE):
    """Images whose class is the channel-and-quadrant with the brightest mean."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        labels = rng.integers(0, CLASSES, size=(batch, 1))
        images = rng.normal(0, 0.3, size=(batch, 3, image, image)).astype("float32")
        half = image // 2
        for i, label in enumerate(labels[:, 0]):
            r, c = divmod(int(label), 2)
            images[i, label % 3, r * half:(r + 1) * half, c * half:(c + 1) * half] += 1.5
        yield {"image": images, "label": labels.astype("int64")}

"""ResNet50 v1.5 (stride 2 on the bottleneck's 3x3 conv), as a static program.

The layout DeepLearningExamples' Paddle RN50 uses: conv/bn/relu stem, max pool, four stages of
bottlenecks with a projection shortcut (1x1 conv + bn) on each stage's first block, global
average pool, fc. Each residual add reads the shortcut directly, so the QAT residual pass can
quantize the identity branch and TensorRT can fuse the add into the last conv.
"""

from __future__ import annotations

STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (width, blocks, first stride)
EXPANSION = 4


def _conv_bn(x, channels, size, stride=1, act=None):
    from paddle import static

    conv = static.nn.conv2d(x, channels, size, stride=stride, padding=(size - 1) // 2,
                            bias_attr=False)
    return static.nn.batch_norm(conv, act=act)


def _bottleneck(x, width, stride, project):
    import paddle
    import paddle.nn.functional as F

    out = _conv_bn(x, width, 1, act="relu")
    out = _conv_bn(out, width, 3, stride=stride, act="relu")  # v1.5: stride on the 3x3
    out = _conv_bn(out, width * EXPANSION, 1)
    shortcut = _conv_bn(x, width * EXPANSION, 1, stride=stride) if project else x
    return F.relu(paddle.add(out, shortcut))


def resnet50(in_channels: int = 3, image: int = 224, classes: int = 1000):
    """Returns (image, label, logits) built in the current program."""
    import paddle
    import paddle.nn.functional as F
    from paddle import static

    x = static.data("image", [None, in_channels, image, image], "float32")
    y = static.data("label", [None, 1], "int64")
    out = _conv_bn(x, 64, 7, stride=2, act="relu")
    out = F.max_pool2d(out, 3, stride=2, padding=1)
    for width, blocks, stride in STAGES:
        for index in range(blocks):
            out = _bottleneck(out, width, stride if index == 0 else 1, project=index == 0)
    pooled = paddle.flatten(F.adaptive_avg_pool2d(out, 1), 1)
    return x, y, static.nn.fc(pooled, classes)

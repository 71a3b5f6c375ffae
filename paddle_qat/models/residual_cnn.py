"""A small residual CNN with every pattern TensorRT's Q/DQ rules care about, for demo and tests."""

from __future__ import annotations


def residual_cnn(in_channels: int = 3, image: int = 8, classes: int = 4, width: int = 8):
    """conv/bn/relu -> [conv/bn + identity] add/relu -> maxpool -> avgpool -> fc (static).

    Returns (image, label, logits).
    """
    import paddle
    import paddle.nn.functional as F
    from paddle import static

    x = static.data("image", [None, in_channels, image, image], "float32")
    y = static.data("label", [None, 1], "int64")
    stem = static.nn.batch_norm(static.nn.conv2d(x, width, 3, padding=1, bias_attr=False),
                                act="relu")
    branch = static.nn.batch_norm(static.nn.conv2d(stem, width, 3, padding=1, bias_attr=False))
    block_out = F.relu(paddle.add(branch, stem))
    pooled = F.adaptive_avg_pool2d(F.max_pool2d(block_out, 2), 1)
    return x, y, static.nn.fc(paddle.flatten(pooled, 1), classes)

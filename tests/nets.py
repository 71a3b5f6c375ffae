"""Tiny static-graph networks and data, built in-process for the tests."""

from __future__ import annotations

import numpy as np
from paddle import static

from paddle_qat.models import ModelSpec, build_classifier

IMAGE = 8
CLASSES = 4


def residual_cnn(image: int = IMAGE, classes: int = CLASSES, channels: int = 8):
    """The demo's conv/bn/relu -> residual block -> maxpool -> avgpool -> fc, made tiny."""
    return build_classifier(ModelSpec("residual_cnn", in_channels=3, image_size=image,
                                      classes=classes, width=channels))


def legacy_op(op_type, inputs, **attrs):
    """One legacy-IR op appended by hand (one that Paddle 3.3.1's functional API builds only in
    PIR, or with attributes it does not expose); returns its output."""
    from paddle.base.layer_helper import LayerHelper

    helper = LayerHelper(op_type)
    out = helper.create_variable_for_type_inference("float32")
    helper.append_op(type=op_type, inputs=inputs, outputs={"Out": out}, attrs=attrs)
    return out


def wide_and_narrow_net():
    """Two conv branches, one scaled to a fiftieth, joined by a concat -> conv -> fc."""
    import paddle
    import paddle.nn.functional as F

    x = static.data("image", [None, 3, IMAGE, IMAGE], "float32")
    y = static.data("label", [None, 1], "int64")
    wide = F.relu(static.nn.conv2d(x, 4, 3, padding=1))
    narrow = paddle.scale(F.relu(static.nn.conv2d(x, 4, 1)), 0.02)
    out = F.relu(static.nn.conv2d(paddle.concat([wide, narrow], axis=1), 4, 3, padding=1))
    logits = static.nn.fc(paddle.flatten(out, 1), CLASSES)
    return x, y, logits, paddle.mean(F.cross_entropy(logits, y))


def split_after_concat_net():
    """The wide and narrow branches' concat split again, each half to a conv: the group's
    widest tensor, the concat output, is quantized by no consumer (ShuffleNetV2's pattern)."""
    import paddle
    import paddle.nn.functional as F

    x = static.data("image", [None, 3, IMAGE, IMAGE], "float32")
    y = static.data("label", [None, 1], "int64")
    wide = F.relu(static.nn.conv2d(x, 4, 3, padding=1))
    narrow = paddle.scale(F.relu(static.nn.conv2d(x, 4, 1)), 0.02)
    first, second = paddle.split(paddle.concat([wide, narrow], axis=1), 2, axis=1)
    out = paddle.concat([F.relu(static.nn.conv2d(first, 4, 3, padding=1)),
                         F.relu(static.nn.conv2d(second, 4, 3, padding=1))], axis=1)
    logits = static.nn.fc(paddle.flatten(out, 1), CLASSES)
    return x, y, logits, paddle.mean(F.cross_entropy(logits, y))


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


def train_qat(steps: int = 5, optimizer=None, config=None, net=residual_cnn):
    """``net`` quantized with ``quantize_program`` (``config``, default QATConfig()) and
    trained ``steps`` steps in a scope of its own, under fresh unique names: a dict of scope,
    main, startup, test, image, logits, loss, exe."""
    import paddle

    import paddle_qat

    scope = paddle.static.Scope()
    with paddle.static.scope_guard(scope), paddle.utils.unique_name.guard():
        main, startup, test, (image, _, logits, loss) = build(net)
        with paddle.static.program_guard(main, startup):
            (optimizer or paddle.optimizer.Momentum(0.05, momentum=0.9)).minimize(loss)
        paddle_qat.quantize_program(main, config, startup_program=startup)
        paddle_qat.quantize_program(test, config, for_test=True)
        exe = paddle.static.Executor(paddle.CPUPlace())
        exe.run(startup)
        for feed in separable_batches(steps):
            exe.run(main, feed=feed)
    return dict(scope=scope, main=main, startup=startup, test=test, image=image,
                logits=logits, loss=loss, exe=exe)


def random_resnet50(config, scope, image: int = 32):
    """ResNet50 v1.5's quantized eval program with random weights and BN statistics, its
    activation scales calibrated on random images: (program, image, logits)."""
    import paddle

    from paddle_qat.checkpoint import is_quant_state
    from paddle_qat.export.saved import build_eval_program
    from paddle_qat.ptq import calibrate

    rng = np.random.default_rng(0)
    with paddle.static.scope_guard(scope):
        program, image_var, logits = build_eval_program(
            ModelSpec("resnet50", 3, image, 10), config, scope)
        for var in program.list_vars():
            if var.persistable and var.name not in ("feed", "fetch") and \
                    not is_quant_state(var.name):
                value = rng.normal(0, 0.05, size=var.shape).astype("float32")
                if var.name.endswith("w_2"):  # BatchNorm variance
                    value = np.abs(value) + 0.5
                scope.var(var.name).get_tensor().set(value, paddle.CPUPlace())
        images = rng.normal(size=(8, 3, image, image)).astype("float32")
        calibrate(program, [{"image": images, "label": np.zeros((8, 1), "int64")}],
                  scope=scope)
    return program, image_var, logits

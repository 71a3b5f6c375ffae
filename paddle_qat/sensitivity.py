"""Which layers does quantization hurt? Per-layer sensitivity and Paddle-vs-ONNX fidelity.

For every layer with a weight (conv, fc), from FP32 weights and PTQ calibration:

- ``only``: quantize that layer alone, everything else float;
- ``all_but``: quantize every layer except that one;

each scored by the cosine similarity of the logits to FP32's and by top-1 accuracy (with
labels). The worst ``only`` layers are the sensitive ones; skipping the layers whose
``all_but`` score is highest recovers the most. :func:`auto_skip` turns that into a
:class:`~paddle_qat.QATConfig` with those layers in ``skip_weights``.
:func:`layer_fidelity` compares, per quantized layer, the output Paddle's simulated
quantization computes with what ONNX Runtime computes from the exported INT8 model.

Example::

    rows = layer_sensitivity(spec, "runs/fp32/epoch_0030", images, labels)
    print(format_sensitivity(rows))
    config = auto_skip(rows, 2)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .calibration import CalibrationConfig
from .config import QATConfig


@dataclass(frozen=True)
class LayerSensitivity:
    weight: str  # the layer's weight parameter, what QATConfig.skip_weights matches
    op_type: str
    only_cosine: float
    only_accuracy: float | None
    all_but_cosine: float
    all_but_accuracy: float | None


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def _logits(program, logits, scope, images, batch=256) -> np.ndarray:
    import paddle

    exe = paddle.static.Executor(paddle.CPUPlace())
    labels = np.zeros((batch, 1), np.int64)
    out = []
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        out.append(exe.run(program, feed={"image": chunk, "label": labels[:len(chunk)]},
                           fetch_list=[logits], scope=scope)[0])
    return np.concatenate(out)


def _weighted_layers(spec) -> list[tuple[str, str]]:
    """(weight name, op type) of every quantizable layer, in program order."""
    import paddle

    from .config import WEIGHT_OP_AXES
    from .models import build_classifier

    main, startup = paddle.static.Program(), paddle.static.Program()
    with paddle.utils.unique_name.guard(), paddle.static.program_guard(main, startup):
        build_classifier(spec)
    block = main.global_block()
    layers = []
    for op in block.ops:
        if op.type in WEIGHT_OP_AXES:
            for name in op.input_arg_names:
                var = block._find_var_recursive(name)
                if var is not None and var.persistable and name not in dict(layers):
                    layers.append((name, op.type))
    return layers


def _ptq_logits(spec, checkpoint, config, images, calibration) -> np.ndarray:
    import paddle

    from .checkpoint import load_pretrained
    from .export.saved import build_eval_program
    from .ptq import calibrate

    scope = paddle.static.Scope()
    program, _, logits = build_eval_program(spec, config, scope)
    load_pretrained(checkpoint, program, scope=scope)
    calibrate(program, calibration, CalibrationConfig(method="percentile"), scope=scope)
    return _logits(program, logits, scope, images)


def _fp32_logits(spec, checkpoint, images) -> np.ndarray:
    import paddle

    from .checkpoint import load_pretrained
    from .models import build_classifier

    main, startup = paddle.static.Program(), paddle.static.Program()
    with paddle.utils.unique_name.guard(), paddle.static.program_guard(main, startup):
        _, _, logits, _ = build_classifier(spec)
    program = main.clone(for_test=True)
    scope = paddle.static.Scope()
    load_pretrained(checkpoint, program, scope=scope)
    return _logits(program, logits, scope, images)


def layer_sensitivity(spec, checkpoint, images: np.ndarray, labels: np.ndarray | None = None,
                      *, config: QATConfig | None = None, calibration_images: int = 256
                      ) -> list[LayerSensitivity]:
    """Quantize one layer at a time, and all but one, from ``checkpoint``'s weights."""
    config = QATConfig() if config is None else config
    calibration = [{"image": images[i:i + 64], "label": np.zeros((len(images[i:i + 64]), 1),
                                                                  np.int64)}
                   for i in range(0, min(calibration_images, len(images)), 64)]
    reference = _fp32_logits(spec, checkpoint, images)

    def score(logits):
        accuracy = None if labels is None else float(
            (logits.argmax(1) == np.asarray(labels).reshape(-1)).mean())
        return _cosine(logits, reference), accuracy

    layers = _weighted_layers(spec)
    rows = []
    for weight, op_type in layers:
        others = tuple(name for name, _ in layers if name != weight)
        only = score(_ptq_logits(spec, checkpoint, config.replace(
            skip_weights=config.skip_weights + others), images, calibration))
        all_but = score(_ptq_logits(spec, checkpoint, config.replace(
            skip_weights=config.skip_weights + (weight,)), images, calibration))
        rows.append(LayerSensitivity(weight, op_type, *only, *all_but))
    return rows


def auto_skip(rows: list[LayerSensitivity], count: int, config: QATConfig | None = None
              ) -> QATConfig:
    """``config`` with the ``count`` layers whose skipping recovers the most left in float."""
    config = QATConfig() if config is None else config
    worst = sorted(rows, key=lambda r: r.all_but_cosine, reverse=True)[:count]
    return config.replace(skip_weights=config.skip_weights + tuple(r.weight for r in worst))


def format_sensitivity(rows: list[LayerSensitivity]) -> str:
    def acc(value):
        return "-" if value is None else f"{value:.4f}"

    lines = [f"{'layer (weight)':<28} {'op':<10} {'only: cos':>10} {'acc':>7} "
             f"{'all but: cos':>13} {'acc':>7}"]
    for r in sorted(rows, key=lambda r: r.only_cosine):
        lines.append(f"{r.weight:<28} {r.op_type:<10} {r.only_cosine:>10.6f} "
                     f"{acc(r.only_accuracy):>7} {r.all_but_cosine:>13.6f} "
                     f"{acc(r.all_but_accuracy):>7}")
    return "\n".join(lines)


def layer_fidelity(program, scope, onnx_path, images: np.ndarray) -> dict[str, float]:
    """Per quantized layer: cosine of Paddle's simulated output and ONNX Runtime's output of
    the same tensor (layers whose output paddle2onnx renamed are left out)."""
    import onnx

    from .export.quant_map import read_quant_edges
    from .runtime.int8_kernels import open_session

    model = onnx.load(str(onnx_path))
    produced = {o for n in model.graph.node for o in n.output}
    outputs = sorted({e.consumer_output for e in read_quant_edges(program, scope)} & produced)
    for name in outputs:
        model.graph.output.append(onnx.helper.make_tensor_value_info(
            name, onnx.TensorProto.FLOAT, None))
    session, _ = open_session(model)
    onnx_values = session.run(outputs, {model.graph.input[0].name: images})
    import paddle

    exe = paddle.static.Executor(paddle.CPUPlace())
    feed = {"image": images, "label": np.zeros((len(images), 1), np.int64)}
    paddle_values = exe.run(program, feed=feed, fetch_list=outputs, scope=scope)
    return {name: _cosine(a, b) for name, a, b in zip(outputs, paddle_values, onnx_values)}

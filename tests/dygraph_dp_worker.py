"""One rank of the 2-process dygraph QAT test (run by paddle.distributed.launch).

Usage: python -m paddle.distributed.launch --nproc_per_node 2 tests/dygraph_dp_worker.py OUT
       {fleet,nosync}. Each rank trains on its own data, then saves weights and quant state
       (``rank{N}.npz``, with the quant state each step started from); in fleet mode it
       also exports ``rank{N}.onnx`` and saves its eval logits on a fixed batch
       (``rank{N}_logits.npy``).

fleet:  ``strategy.qat = True`` and ``fleet.distributed_model`` (quant state synced).
nosync: ``quantize_model(sync=False)`` in ``paddle.DataParallel``: the control.
"""

# ruff: noqa: I001  (paddle_qat is imported before paddle on purpose)
import sys
from pathlib import Path

import numpy as np

import paddle_qat  # noqa: F401
import paddle
import paddle.distributed as dist
from paddle.distributed import fleet

from paddle_qat.dygraph import export_onnx, quant_state, quantize_model

EVAL_BATCH = np.random.default_rng(7).normal(0, 2, size=(64, 3, 8, 8)).astype("float32")


def build_model():
    """A stem, paddle.vision's ResNet basic block (its identity branch gets a quantizer that
    must be synced like the others) and a linear head."""
    from paddle.vision.models.resnet import BasicBlock

    paddle.seed(0)
    return paddle.nn.Sequential(
        paddle.nn.Conv2D(3, 8, 3, padding=1), paddle.nn.BatchNorm2D(8), paddle.nn.ReLU(),
        BasicBlock(8, 8), paddle.nn.AdaptiveAvgPool2D(1), paddle.nn.Flatten(),
        paddle.nn.Linear(8, 4))


def main(out: Path, mode: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if mode == "fleet":
        strategy = fleet.DistributedStrategy()
        strategy.qat = True
        fleet.init(is_collective=True, strategy=strategy)
        model = build_model()
        optimizer = fleet.distributed_optimizer(
            paddle.optimizer.Momentum(0.05, momentum=0.9, parameters=model.parameters()))
        model = fleet.distributed_model(model)
    else:
        dist.init_parallel_env()
        model = paddle.DataParallel(quantize_model(build_model(), sync=False))
        optimizer = paddle.optimizer.Momentum(0.05, momentum=0.9, parameters=model.parameters())
    rank = dist.get_rank()
    # The quant state each training step starts from (after the sync hook, which runs first).
    step_starts = []

    def record(layer, inputs):
        if layer.training:
            step_starts.append(np.concatenate([t.numpy().ravel() for t in quant_state(layer)]))

    model._layers.register_forward_pre_hook(record)
    rng = np.random.default_rng(100 + rank)  # different data on each rank
    for _ in range(8):
        images = rng.normal(0, 1 + 2 * rank, size=(16, 3, 8, 8)).astype("float32")
        labels = rng.integers(0, 4, size=(16, 1)).astype("int64")
        loss = paddle.nn.functional.cross_entropy(model(paddle.to_tensor(images)),
                                                  paddle.to_tensor(labels)).mean()
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
    if mode == "fleet":  # the final sync (collective), eval mode, jit.save, ONNX
        spec = [paddle.static.InputSpec([None, 3, 8, 8], "float32", "image")]
        export_onnx(model, spec, out / f"rank{rank}.onnx")
        np.save(out / f"rank{rank}_logits.npy", model(paddle.to_tensor(EVAL_BATCH)).numpy())
    values = {f"{'param' if p.trainable else 'stats'}:{p.name}": p.numpy()
              for p in model.parameters()}
    values.update({f"quant:{i}": t.numpy() for i, t in enumerate(quant_state(model))})
    values["step_starts"] = np.stack(step_starts)
    np.savez(out / f"rank{rank}.npz", **values)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])

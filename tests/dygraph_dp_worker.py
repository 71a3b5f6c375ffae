"""One rank of the 2-process dygraph QAT test (run by paddle.distributed.launch).

Usage: python -m paddle.distributed.launch --nproc_per_node 2 tests/dygraph_dp_worker.py OUT
       {sync,nosync}. Each rank trains on its own data and saves weights and quant state.
"""

# ruff: noqa: I001  (paddle_qat is imported before paddle on purpose)
import sys
from pathlib import Path

import numpy as np

import paddle_qat  # noqa: F401
import paddle
import paddle.distributed as dist

from paddle_qat.dygraph import export_ready, quant_state, quantize_model


def main(out: Path, sync: bool) -> None:
    dist.init_parallel_env()
    rank = dist.get_rank()
    paddle.seed(0)
    model = paddle.nn.Sequential(
        paddle.nn.Conv2D(3, 8, 3, padding=1), paddle.nn.BatchNorm2D(8), paddle.nn.ReLU(),
        paddle.nn.AdaptiveAvgPool2D(1), paddle.nn.Flatten(), paddle.nn.Linear(8, 4))
    model = paddle.DataParallel(quantize_model(model, sync=sync))
    optimizer = paddle.optimizer.Momentum(0.05, momentum=0.9, parameters=model.parameters())
    rng = np.random.default_rng(100 + rank)  # different data on each rank
    for _ in range(8):
        images = rng.normal(0, 1 + 2 * rank, size=(16, 3, 8, 8)).astype("float32")
        labels = rng.integers(0, 4, size=(16, 1)).astype("int64")
        loss = paddle.nn.functional.cross_entropy(model(paddle.to_tensor(images)),
                                                  paddle.to_tensor(labels)).mean()
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
    if sync:
        export_ready(model)  # the last step's observer updates, synced too
    values = {f"{'param' if p.trainable else 'stats'}:{p.name}": p.numpy()
              for p in model.parameters() if not p.name.startswith("quant")}
    values.update({f"quant:{i}": t.numpy() for i, t in enumerate(quant_state(model))})
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / f"rank{rank}.npz", **values)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] == "sync")

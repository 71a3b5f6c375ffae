"""Dygraph QAT on 2 real processes (gloo on CPU): weights and every quant scale identical."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("dygraph_dp_worker.py")


def _train_two_ranks(out: Path, mode: str) -> tuple[dict, dict]:
    env = dict(os.environ, PADDLE_DISTRI_BACKEND="gloo")
    for key in ("PADDLE_TRAINERS_NUM", "PADDLE_TRAINER_ENDPOINTS", "PADDLE_CURRENT_ENDPOINT",
                "PADDLE_TRAINER_ID"):
        env.pop(key, None)
    result = subprocess.run(
        [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
         "--log_dir", str(out / "log"), str(WORKER), str(out), mode],
        env=env, capture_output=True, text=True, timeout=300)
    logs = "\n".join(p.read_text()[-2000:] for p in sorted((out / "log").glob("*")))
    assert result.returncode == 0, result.stderr[-2000:] + logs
    ranks = [dict(np.load(out / f"rank{r}.npz")) for r in (0, 1)]
    return ranks[0], ranks[1]


@pytest.mark.slow
def test_two_processes_end_with_identical_weights_and_scales(tmp_path):
    rank0, rank1 = _train_two_ranks(tmp_path / "sync", "sync")
    assert rank0.keys() == rank1.keys()
    quant = [k for k in rank0 if k.startswith("quant:")]
    assert len(quant) == 12  # conv and linear: input and weight quanters x (scale, state, accum)
    for key in rank0:
        np.testing.assert_allclose(rank0[key], rank1[key], rtol=1e-6, atol=1e-7, err_msg=key)


@pytest.mark.slow
def test_without_sync_the_scales_drift_apart(tmp_path):
    """Control: the failure the sync removes (weights still agree through gradient sync)."""
    rank0, rank1 = _train_two_ranks(tmp_path / "nosync", "nosync")
    params = [k for k in rank0 if k.startswith("param:")]
    for key in params:
        np.testing.assert_allclose(rank0[key], rank1[key], rtol=1e-5, atol=1e-6)
    differing = [k for k in rank0 if k.startswith("quant:")
                 and not np.allclose(rank0[k], rank1[k], rtol=1e-3)]
    assert differing

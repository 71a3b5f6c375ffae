# ruff: noqa: I001  (paddle_qat is imported before paddle on purpose)
import os

import paddle_qat  # noqa: F401  (must come first: keeps Paddle on the legacy IR)
import paddle
import pytest

paddle.enable_static()

TWO_RANKS = {
    "PADDLE_TRAINERS_NUM": "2",
    "PADDLE_TRAINER_ENDPOINTS": "127.0.0.1:36001,127.0.0.1:36002",
    "PADDLE_CURRENT_ENDPOINT": "127.0.0.1:36001",
    "PADDLE_TRAINER_ID": "0",
}


@pytest.fixture
def fresh_scope():
    scope = paddle.static.Scope()
    with paddle.static.scope_guard(scope):
        yield scope


@pytest.fixture
def single_rank(monkeypatch):
    for key in TWO_RANKS:
        monkeypatch.delenv(key, raising=False)
    from paddle.distributed import fleet

    fleet.init(is_collective=True)
    return fleet


@pytest.fixture
def two_ranks(monkeypatch):
    """A simulated 2-rank collective job; communicator init is stubbed (CPU build has no
    c_gen_nccl_id), the main program's gradient all-reduce ops are real."""
    for key, value in TWO_RANKS.items():
        monkeypatch.setenv(key, value)
    from paddle.distributed import fleet
    from paddle.distributed.fleet.meta_optimizers import common

    monkeypatch.setattr(common.CollectiveHelper, "_init_communicator",
                        lambda self, *a, **k: None)
    fleet.init(is_collective=True)
    return fleet


os.environ.setdefault("GLOG_minloglevel", "2")


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The README's main job, shortened (two folds, fewer epochs), run once:
    (output folder, table rows, stdout)."""
    import contextlib
    import io

    from paddle_qat import demo

    out = tmp_path_factory.mktemp("demo")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rows = demo.run(out, fp32_epochs=20, qat_epochs=2, folds=2)
    return out, rows, printed.getvalue()


@pytest.fixture
def gpu_amp_lists(monkeypatch):
    """Paddle's CPU build refuses conv/mul in the FP16 white list: make AMP's list builder
    answer as on a GPU (the AMP rewrite itself stays Paddle's)."""
    from paddle.static.amp import fp16_lists

    real = fp16_lists._get_sys_unsupported_list
    monkeypatch.setattr(fp16_lists, "_get_sys_unsupported_list",
                        lambda dtype: ("GPU", set(), real(dtype)[2]))

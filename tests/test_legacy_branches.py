"""Paddle 3.3.1 functions whose own legacy-IR code is broken (F.normalize, paddle.fft,
paddle.linalg.solve, x.mT, paddle.rand_like, ...) build working legacy programs again,
computing what Paddle's eager functions compute."""

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from paddle_qat import legacy_branches
from paddle_qat.errors import LegacyIRRequiredError
from program_tools import weight_gradients

RNG = np.random.default_rng(0)
SQUARE = (RNG.normal(size=(3, 4, 4)) + 4 * np.eye(4)).astype("float32")  # well conditioned

# name -> the computation, run on a legacy Variable and on an eager Tensor
CASES = {
    "F.normalize": lambda x: F.normalize(x, axis=-1),
    "F.normalize, p=1": lambda x: F.normalize(x, p=1, axis=1),
    "fft.fft": lambda x: paddle.fft.fft(x),
    "fft.ifft, n": lambda x: paddle.fft.ifft(x, n=6),
    "fft.rfft then irfft": lambda x: paddle.fft.irfft(paddle.fft.rfft(x)),
    "fft.ihfft": lambda x: paddle.fft.ihfft(x),
    "fft.fft2": lambda x: paddle.fft.fft2(x),
    "fft.rfftn": lambda x: paddle.fft.rfftn(x, norm="ortho"),
    "fft.ifftn then irfftn": lambda x: paddle.fft.irfftn(paddle.fft.ifftn(x), s=[4, 4]),
    "signal.stft": lambda x: paddle.signal.stft(x.reshape([3, 16]), 4, center=False),
    "linalg.solve": lambda x: paddle.linalg.solve(x, x[:, :, :2]),
    "linalg.matrix_exp": lambda x: paddle.linalg.matrix_exp(x * 0.1),
    "matrix_transpose": lambda x: paddle.matrix_transpose(x),
    "Variable.mT": lambda x: x.mT,
}


def _run_static(build, data):
    main, startup = paddle.static.Program(), paddle.static.Program()
    with paddle.static.program_guard(main, startup):
        out = build(paddle.static.data("x", list(data.shape), "float32"))
    exe = paddle.static.Executor(paddle.CPUPlace())
    exe.run(startup)
    (value,) = exe.run(main, feed={"x": data}, fetch_list=[out])
    return np.asarray(value)


def _run_eager(build, data):
    paddle.disable_static()
    try:
        return build(paddle.to_tensor(data)).numpy()
    finally:
        paddle.enable_static()


@pytest.mark.parametrize("name", sorted(CASES))
def test_static_computes_what_eager_paddle_does(name):
    static = _run_static(CASES[name], SQUARE)
    eager = _run_eager(CASES[name], SQUARE)
    assert static.dtype == eager.dtype and static.shape == eager.shape
    np.testing.assert_allclose(static, eager, rtol=1e-4, atol=1e-5)


def test_without_the_repair_paddle_fails_as_described():
    """The control: Paddle's own F.normalize still raises on a Variable, so the cases above
    test the repair and not a Paddle that was fixed meanwhile (then the repair is unused)."""
    with paddle.static.program_guard(paddle.static.Program()):
        x = paddle.static.data("x", [2, 4], "float32")
        with pytest.raises(UnboundLocalError, match="ret"):
            F.normalize.__wrapped__(x)


def test_gradients_through_normalize_match_eager():
    """A cosine-similarity head, as in metric learning: normalize features and weights."""
    weight = RNG.normal(size=(4, 3)).astype("float32")
    features = RNG.normal(size=(5, 4)).astype("float32")

    def loss_of(x, w):
        return paddle.mean(paddle.matmul(F.normalize(x, axis=1), F.normalize(w, axis=0)) ** 2)

    static_grad, eager_grad = weight_gradients(loss_of, features, weight)
    np.testing.assert_allclose(static_grad, eager_grad, rtol=1e-4, atol=1e-6)


def test_random_like_takes_the_runtime_shape_and_dtype():
    main, startup = paddle.static.Program(), paddle.static.Program()
    with paddle.static.program_guard(main, startup):
        x = paddle.static.data("x", [None, 4], "float32")
        uniform = paddle.rand_like(x)
        normal = paddle.randn_like(x, dtype="float64")
    exe = paddle.static.Executor(paddle.CPUPlace())
    exe.run(startup)
    u, n = exe.run(main, feed={"x": np.zeros((500, 4), "float32")}, fetch_list=[uniform, normal])
    assert u.shape == n.shape == (500, 4)  # the fed batch, not the declared -1
    assert u.dtype == np.float32 and n.dtype == np.float64
    assert 0.0 <= u.min() and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.05
    assert abs(n.mean()) < 0.1 and abs(n.std() - 1.0) < 0.1


def test_what_stays_unsupported_gets_a_clear_error():
    with paddle.static.program_guard(paddle.static.Program()):
        x = paddle.static.data("x", [2, 4, 4], "float32")
        with pytest.raises(LegacyIRRequiredError, match=r"solve: .*left=True"):
            paddle.linalg.solve(x, x, left=False)
        with pytest.raises(LegacyIRRequiredError, match=r"normalize\(out=\.\.\.\)"):
            F.normalize(x, out=x)
        with pytest.raises(ValueError, match="2 or more dimensions"):
            _ = x[0, 0].mT


def test_eager_calls_reach_paddle_unchanged_and_install_is_idempotent():
    assert legacy_branches.install() == []  # import paddle_qat already repaired them
    assert F.normalize.__wrapped__ is not None
    paddle.disable_static()
    try:
        value = F.normalize(paddle.to_tensor([[3.0, 4.0]]))
        assert isinstance(value, paddle.Tensor)
        np.testing.assert_allclose(value.numpy(), [[0.6, 0.8]], rtol=1e-6)
    finally:
        paddle.enable_static()

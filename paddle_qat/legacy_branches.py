"""Paddle 3.3.1 functions whose own legacy-IR code is broken, made to work.

Static QAT builds legacy programs (see :mod:`paddle_qat.legacy_ir`). On them, Paddle 3.3.1
fails in three ways that :mod:`paddle_qat.legacy_api` (functions moved to C++ bindings) does
not cover:

* **The result left in ``out``.** Paddle 3.3 gave many functions an ``out=`` parameter and
  a shared tail, ``if out is not None: paddle.assign(ret, out)`` / ``return ret``. In
  ``F.normalize``, ``paddle.linalg.solve`` and the six FFT kernels behind ``paddle.fft`` and
  ``paddle.signal.stft`` (``fft_c2c``, ``fft_r2c``, ``fft_c2r`` and their n-dimensional
  forms), the legacy branch binds its result to ``out`` instead of ``ret``: it appends the
  right ops, then raises ``UnboundLocalError: cannot access local variable 'ret'``. The
  wrapper runs Paddle's function and, on exactly that error raised at exactly that tail,
  returns the Variable the legacy branch built. ``paddle.linalg.matrix_exp``, which calls
  ``solve``, works with it. ``solve(left=False)`` fails earlier (it transposes ``ret``
  first) and gets a clear error instead.
* **``Variable.mT``**, which ``paddle.matrix_transpose`` uses: static Variables have no such
  property. It is added (a ``transpose2`` of the last two axes).
* **``paddle.rand_like`` / ``paddle.randn_like``** pass ``x.place``, a method on a Variable,
  as a device and stop with ``ValueError: place only support string``. On a Variable they
  become ``paddle.rand`` / ``paddle.randn`` of ``paddle.shape(x)``, so a batch dimension of
  -1 is fine.

Eager Tensors and PIR Values reach Paddle's functions unchanged.
"""

from __future__ import annotations

import inspect
import linecache
from collections.abc import Callable

from .errors import LegacyIRRequiredError
from .legacy_api import holds_legacy_variable, is_legacy_variable, wrap_everywhere

# Paddle's functions whose legacy branch leaves its result in the local ``out``
RESULT_IN_OUT: tuple[str, ...] = (
    "paddle.nn.functional.norm.normalize",
    "paddle.tensor.linalg.solve",
    "paddle.fft.fft_c2c", "paddle.fft.fft_r2c", "paddle.fft.fft_c2r",
    "paddle.fft.fftn_c2c", "paddle.fft.fftn_r2c", "paddle.fft.fftn_c2r",
)
_BROKEN_TAIL = "paddle.assign(ret, out)"
_RANDOM_LIKE = {"paddle.tensor.random.rand_like": "rand",
                "paddle.tensor.random.randn_like": "randn"}


def _innermost_frame(error: BaseException):
    traceback = error.__traceback__
    while traceback.tb_next is not None:
        traceback = traceback.tb_next
    return traceback.tb_frame, traceback.tb_lineno


def _code_of(function: Callable):
    while hasattr(function, "__wrapped__"):  # Paddle's argument-alias decorators
        function = function.__wrapped__
    return function.__code__


def _result_in_out(label: str, paddle_function: Callable) -> Callable:
    code = _code_of(paddle_function)

    def function(*args, **kwargs):
        if not holds_legacy_variable(args, kwargs):
            return paddle_function(*args, **kwargs)
        if kwargs.get("out") is not None:
            raise LegacyIRRequiredError(
                f"{label}(out=...) has no legacy-IR form; use the returned Variable instead")
        try:
            return paddle_function(*args, **kwargs)
        except UnboundLocalError as error:
            frame, line = _innermost_frame(error)
            built = frame.f_locals.get("out")
            at_tail = linecache.getline(code.co_filename, line).strip() == _BROKEN_TAIL
            if frame.f_code is not code or not (at_tail and is_legacy_variable(built)):
                raise LegacyIRRequiredError(
                    f"{label}: Paddle's own legacy-IR code fails for these arguments "
                    f"({error}); on the legacy IR (static QAT) call it with its defaults "
                    f"(for solve: left=True on transposed inputs)") from error
            del frame
            return built

    return _wrapper(function, paddle_function)


def _random_like(label: str, paddle_function: Callable) -> Callable:
    draw = _RANDOM_LIKE[label]
    signature = inspect.signature(paddle_function)
    first = next(iter(signature.parameters))  # rand_like's input, randn_like's x

    def function(*args, **kwargs):
        if not holds_legacy_variable(args, kwargs):
            return paddle_function(*args, **kwargs)
        import paddle

        arguments = signature.bind(*args, **kwargs).arguments
        x = arguments[first]
        out = getattr(paddle, draw)(paddle.shape(x), dtype=arguments.get("dtype") or x.dtype)
        out.stop_gradient = not arguments.get("requires_grad", False)
        return out

    return _wrapper(function, paddle_function)


def _wrapper(function: Callable, paddle_function: Callable) -> Callable:
    function.__name__ = function.__qualname__ = paddle_function.__name__
    function.__doc__ = paddle_function.__doc__
    function.__wrapped__ = paddle_function
    function._paddle_qat_legacy_branch = True
    return function


def _matrix_transpose(self):
    """``x.mT``: ``x`` with its last two axes swapped."""
    import paddle

    if len(self.shape) < 2:
        raise ValueError(f"x.mT needs a tensor of 2 or more dimensions, got shape {self.shape}")
    perm = list(range(len(self.shape)))
    perm[-2], perm[-1] = perm[-1], perm[-2]
    return paddle.transpose(self, perm)


def install() -> list[str]:
    """Repair the functions above wherever Paddle's code or a user's finds them; returns the
    dotted names wrapped (none on a repeat call)."""
    from paddle.base.framework import Variable

    wrapped = []
    if not hasattr(Variable, "mT"):
        Variable.mT = property(_matrix_transpose)
        wrapped.append("Variable.mT")
    makers = {**{label: _result_in_out for label in RESULT_IN_OUT},
              **{label: _random_like for label in _RANDOM_LIKE}}

    def wrapper_for(name, value):
        label = f"{getattr(value, '__module__', '')}.{getattr(value, '__name__', '')}"
        if label not in makers or getattr(value, "_paddle_qat_legacy_branch", False):
            return None
        return makers[label](label, value)

    return wrapped + wrap_everywhere({label.rsplit(".", 1)[1] for label in makers},
                                     wrapper_for)

"""Keep Paddle on its legacy program IR, which fleet's static minimize and the quant passes need.

Paddle 3 defaults to PIR. ``FLAGS_enable_pir_api`` is read once, when paddle is imported, so
``import paddle_qat`` sets it when paddle is not imported yet, and switches the running
process back to the legacy IR when paddle already is. Only a user who *explicitly* asked for
PIR (``FLAGS_enable_pir_api=1`` in the environment) keeps it, and then gets
:class:`LegacyIRRequiredError` from the first call that needs the legacy IR.
"""

from __future__ import annotations

import logging
import os
import sys

from .errors import LegacyIRRequiredError

_FLAG = "FLAGS_enable_pir_api"
_FALSE_WORDS = {"0", "n", "no", "f", "false", "off"}
_logger = logging.getLogger(__name__)

FIX_MESSAGE = (
    f"Set {_FLAG}=0 in the environment before Python imports paddle "
    f"(e.g. `export {_FLAG}=0`), or unset it and `import paddle_qat` before paddle."
)


def _user_forced_pir() -> bool:
    value = os.environ.get(_FLAG)
    return bool(value and value.strip()) and value.strip().lower() not in _FALSE_WORDS


def ensure_legacy_ir() -> None:
    """Make the legacy IR the static mode of this process unless the user forced PIR."""
    if _user_forced_pir():
        return
    if "paddle" not in sys.modules:
        os.environ[_FLAG] = "0"
        return
    import paddle
    from paddle import pir_utils

    if not paddle.get_flags([_FLAG])[_FLAG]:
        return
    paddle.set_flags({_FLAG: False})
    pir_utils._switch_to_old_ir_()
    _logger.warning(
        "paddle_qat switched this process from PIR to Paddle's legacy program IR, "
        "which static QAT needs. Import paddle_qat before paddle to avoid the switch."
    )


def in_pir_mode() -> bool:
    import paddle

    return bool(paddle.get_flags([_FLAG])[_FLAG]) or paddle.framework.in_pir_mode()


def require_legacy_program(obj, what: str) -> None:
    """Raise a clear error when ``obj`` (a Program or Variable) belongs to PIR."""
    import paddle

    legacy_types = (paddle.base.framework.Program, paddle.base.framework.Variable)
    if isinstance(obj, legacy_types) and not in_pir_mode():
        return
    raise LegacyIRRequiredError(
        f"{what} is a PIR object (type {type(obj).__name__}), but paddle_qat's static QAT "
        f"works on Paddle's legacy program IR and PIR is on. {FIX_MESSAGE}"
    )

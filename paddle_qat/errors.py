"""Exceptions raised for bad input. Each message names the problem and the fix."""


class QATError(Exception):
    """Base class of every error paddle_qat raises on purpose."""


class QATConfigError(QATError, ValueError):
    """A QAT configuration key or value is invalid."""


class LegacyIRRequiredError(QATError, RuntimeError):
    """Static QAT was asked for while Paddle runs in PIR mode."""


class UnsupportedOpError(QATConfigError):
    """An op type was requested for quantization that no pass can quantize."""


class ScaleError(QATError, ValueError):
    """A quantization scale is missing, non-finite or not positive."""

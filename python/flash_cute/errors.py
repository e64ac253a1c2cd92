"""Exception types. The official flash_attn raises RuntimeError for every bad input; flash_cute
raises the precise Python type and derives it from RuntimeError too, so code written as
``except RuntimeError`` keeps working."""

__all__ = ["FlashAttnTypeError", "FlashAttnValueError", "FlashAttnNotImplementedError"]


class FlashAttnTypeError(TypeError, RuntimeError):
    """An argument has the wrong type or dtype."""


class FlashAttnValueError(ValueError, RuntimeError):
    """An argument has the wrong shape, stride, size or value."""


class FlashAttnNotImplementedError(NotImplementedError):
    """An option flash_cute does not support yet (NotImplementedError derives from RuntimeError)."""

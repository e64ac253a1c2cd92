"""flash_cute: FlashAttention-2 written on CuTe (CUTLASS 4.2), a drop-in for ``flash_attn``.

    import flash_cute as flash_attn
    out = flash_attn.flash_attn_func(q, k, v, causal=True)
"""

__version__ = "0.1.0"

from . import bert_padding, reference
from .errors import FlashAttnNotImplementedError, FlashAttnTypeError, FlashAttnValueError
from .flash_attn_interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)

__all__ = [
    "__version__",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "bert_padding",
    "reference",
    "FlashAttnTypeError",
    "FlashAttnValueError",
    "FlashAttnNotImplementedError",
    "build_info",
]


def build_info() -> dict:
    """What the compiled module was built with (architectures, head dims, dtypes, CUTLASS) and
    the list of forward kernels it holds. Raises ImportError when the extension is missing."""
    from . import _C

    info = dict(_C.build_config)
    info["fwd_kernels"] = _C.built_fwd_kernels()
    return info

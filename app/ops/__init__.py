"""The Python face of the compiled extension: custom ops with input checks, autograd and fake kernels."""

from app.ops._extension import extension_loaded, has_cuda_kernels
from app.ops.gaussian_message import gaussian_message
from app.ops.segment_mean import segment_mean

__all__ = ["extension_loaded", "gaussian_message", "has_cuda_kernels", "segment_mean"]

"""The Python face of the compiled extension: custom ops with input checks, autograd and fake kernels."""

from app.ops._extension import extension_loaded, has_cuda_kernels
from app.ops.gaussian_message import gaussian_message
from app.ops.message_passing import message_passing
from app.ops.reference.message_passing import trws
from app.ops.reference.mrf import Pairwise, mrf_energy
from app.ops.segment_mean import segment_mean

__all__ = [
    "Pairwise",
    "extension_loaded",
    "gaussian_message",
    "has_cuda_kernels",
    "message_passing",
    "mrf_energy",
    "segment_mean",
    "trws",
]

"""Convolution weight gradients as one forward convolution, for CPUs where oneDNN's is slow.

On CPUs without AVX-512 oneDNN computes the weight gradient of a 3D convolution with its im2col + GEMM
implementation (``x64:gemm:jit`` in ``ONEDNN_VERBOSE``), several times slower than its direct JIT forward
kernel of the same size, and it dominates the importance pass of RANP (Alg. 5) and the training step of a
3D network. 2D convolutions, and 3D ones on AVX-512 CPUs (``jit:avx512_core``), have a direct JIT weight
pass that beats the formula below, so they are left alone by default
(:func:`slow_weight_grad_types`). The same gradient is a forward convolution of the input with the output
gradient, batch and channels swapped:

``dW[o, i, k] = sum_{b, z} dY[b, o, z] X_pad[b, i, s z + d k]
= conv(X^T, dY^T, stride=d, padding=p, dilation=s)[i, o, k]`` (cropped to the kernel size),

for stride ``s``, padding ``p`` and dilation ``d``. :func:`fast_conv_weight_grad` routes the CPU
convolutions of a model (3D ones on CPUs without AVX-512 by default; any dimension on request; zero
padding, ``groups == 1``) through that formula while it is active; the input gradient still comes from ``convolution_backward``. Results equal autograd's up to
floating-point rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = ["conv_weight_grad", "fast_conv_weight_grad", "slow_weight_grad_types"]

_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def conv_weight_grad(
    x: torch.Tensor,
    grad_output: torch.Tensor,
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
) -> torch.Tensor:
    """Weight gradient of an ungrouped, zero-padded convolution as a forward convolution.

    Args:
        x: the convolution's input ``(B, C_in, *S_in)``.
        grad_output: gradient of its output ``(B, C_out, *S_out)``.
        kernel_size, stride, padding, dilation: the convolution's, one entry per spatial dimension.

    Returns:
        ``(C_out, C_in, *kernel_size)``.
    """
    conv = _CONV_FUNCTIONS[x.dim() - 2]
    swapped = conv(x.transpose(0, 1), grad_output.transpose(0, 1), None, dilation, padding, stride)
    crop = (slice(None), slice(None)) + tuple(slice(0, k) for k in kernel_size)
    return swapped[crop].transpose(0, 1)


class _ConvFastWeightGrad(torch.autograd.Function):
    """``conv(x, weight, bias)`` whose backward computes the weight gradient by :func:`conv_weight_grad`."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, module: nn.Module
    ):
        ctx.save_for_backward(x, weight)
        ctx.geometry = (module.kernel_size, module.stride, module.padding, module.dilation)
        ctx.has_bias = bias is not None
        return _CONV_FUNCTIONS[x.dim() - 2](x, weight, bias, module.stride, module.padding, module.dilation)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor):
        x, weight = ctx.saved_tensors
        kernel_size, stride, padding, dilation = ctx.geometry
        grad_output = grad_output.contiguous()
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_output, x, weight, None, stride, padding, dilation, False, [0] * len(stride), 1,
                [True, False, False],
            )[0]  # fmt: skip
        if ctx.needs_input_grad[1]:
            grad_weight = conv_weight_grad(x, grad_output, kernel_size, stride, padding, dilation)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_output.sum(dim=[d for d in range(grad_output.dim()) if d != 1])
        return grad_x, grad_weight, grad_bias, None


CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def slow_weight_grad_types() -> tuple[type[nn.Module], ...]:
    """The convolution types whose CPU weight pass oneDNN takes through im2col + GEMM on this CPU:
    ``(nn.Conv3d,)`` below AVX-512 (``torch.backends.cpu.get_cpu_capability()``), else none."""
    if torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return ()
    return (nn.Conv3d,)


def _supported(module: nn.Module, layer_types: tuple[type[nn.Module], ...]) -> bool:
    return (
        type(module) in layer_types
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


@contextlib.contextmanager
def fast_conv_weight_grad(
    model: nn.Module, layer_types: tuple[type[nn.Module], ...] | None = None
) -> Iterator[None]:
    """While active, CPU convolutions of ``model`` compute weight gradients as forward convolutions.

    Applies to the ``layer_types`` (among ``nn.Conv1d/2d/3d``; default :func:`slow_weight_grad_types`)
    with ``groups == 1`` and zero padding, on CPU tensors; other layers and devices keep PyTorch's
    backward. The modules are restored on exit. A graph built while it is active keeps the fast backward
    after exit.
    """
    if layer_types is None:
        layer_types = slow_weight_grad_types()
    unknown = [t for t in layer_types if t not in CONV_TYPES]
    if unknown:
        raise ValueError(f"layer_types must be among {CONV_TYPES}, got {unknown}")
    patched = []
    for module in model.modules():
        if not _supported(module, layer_types) or "_conv_forward" in vars(module):
            continue
        original = module._conv_forward

        def conv_forward(x, weight, bias, module=module, original=original):
            if x.device.type != "cpu" or not torch.is_grad_enabled():
                return original(x, weight, bias)
            return _ConvFastWeightGrad.apply(x, weight, bias, module)

        module._conv_forward = conv_forward
        patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module._conv_forward

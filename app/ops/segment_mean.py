"""Superpixel logit consistency (thesis Eq. 4.13) as a compiled op with O(C*H*W) memory."""

from __future__ import annotations

import torch

from app.ops._checks import FLOATING, check_same_device, check_tensor
from app.ops._extension import extension_loaded, require_extension


def segment_mean(
    values: torch.Tensor, segments: torch.Tensor, num_segments: int | None = None
) -> torch.Tensor:
    """Average ``values`` over every segment and broadcast the mean back to the segment's pixels.

    Implements ``x_s(p) <- 1/|P_s| sum_{p in P_s} x_s(p)`` (Eq. 4.13) without the dense N_s x N_p matrix
    of Eq. 4.14: the work is O(C*H*W) and the scratch O(C*N_s). Differentiable in ``values``; the op is a
    symmetric projection, so its backward is the same op applied to the incoming gradient.

    Args:
        values: (B, C, H, W) floating tensor (logits).
        segments: (B, H, W) int64 segment ids >= 0; ids need not be contiguous and may skip values.
        num_segments: an upper bound on the ids (all ids < num_segments). Computed from ``segments``
            when omitted; pass it to avoid a device sync (on CUDA the ids are then checked by a device
            assert in the kernel instead of a ValueError).

    Returns:
        (B, C, H, W) tensor of the same dtype as ``values``.
    """
    require_extension()
    check_tensor("values", values, ndim=4, dtypes=FLOATING)
    check_tensor("segments", segments, ndim=3, dtypes=(torch.int64,))
    check_same_device(values=values, segments=segments)
    batch, _, height, width = values.shape
    if tuple(segments.shape) != (batch, height, width):
        raise ValueError(
            f"segments must have shape (B, H, W) = {(batch, height, width)} to match values "
            f"{tuple(values.shape)}, got {tuple(segments.shape)}"
        )
    if height * width == 0:
        raise ValueError(f"values must have at least one pixel, got shape {tuple(values.shape)}")
    if num_segments is not None and num_segments < 1:
        raise ValueError(f"num_segments must be >= 1, got {num_segments}")
    if num_segments is None or not (segments.is_cuda and num_segments <= height * width):
        # on CUDA with num_segments given the kernel checks the ids (a device assert): no host sync
        lowest, highest = (int(v) for v in torch.aminmax(segments))
        if lowest < 0:
            raise ValueError(f"segments must be >= 0, found id {lowest}")
        if num_segments is None:
            num_segments = highest + 1
        elif highest >= num_segments:
            raise ValueError(f"segments contains id {highest} >= num_segments={num_segments}")
    if num_segments > height * width:
        # Sparse, huge ids: relabel to 0..n-1 so the scratch stays bounded by the pixel count.
        _, segments = torch.unique(segments, return_inverse=True)
        num_segments = int(segments.max()) + 1
    return torch.ops.app.segment_mean(values.contiguous(), segments.contiguous(), num_segments)


def _segment_mean_backward(ctx, grad_output: torch.Tensor):
    grad_values = torch.ops.app.segment_mean(grad_output.contiguous(), ctx.segments, ctx.num_segments)
    return grad_values, None, None


def _segment_mean_setup_context(ctx, inputs, output) -> None:
    _, segments, num_segments = inputs
    ctx.segments = segments
    ctx.num_segments = num_segments


if extension_loaded():

    @torch.library.register_fake("app::segment_mean")
    def _segment_mean_fake(values: torch.Tensor, segments: torch.Tensor, num_segments: int) -> torch.Tensor:
        torch._check(segments.dim() == 3)
        return torch.empty_like(values)

    torch.library.register_autograd(
        "app::segment_mean", _segment_mean_backward, setup_context=_segment_mean_setup_context
    )

"""ConvCRF's truncated-Gaussian message passing (Eq. 6) as a compiled op, the kernel never materialised."""

from __future__ import annotations

import torch

from app.ops._checks import FLOATING, all_finite, check_same_device, check_tensor
from app.ops._extension import extension_loaded, require_extension


def check_filter_size(filter_size: int) -> None:
    """Raise a ``ValueError`` unless ``filter_size`` is an odd int >= 3."""
    if (
        isinstance(filter_size, bool)
        or not isinstance(filter_size, int)
        or filter_size < 3
        or filter_size % 2 == 0
    ):
        raise ValueError(f"filter_size must be an odd int >= 3, got {filter_size!r}")


def gaussian_message(q: torch.Tensor, features: torch.Tensor, filter_size: int) -> torch.Tensor:
    """Message of ConvCRF's mean-field step with one truncated Gaussian kernel (Eq. 5-6).

    ``Q'[b,c,x,y] = sum K[b,dx,dy,x,y] Q[b,c,x+dx,y+dy]`` over ``|dx|, |dy| <= filter_size // 2``,
    ``(dx, dy) != (0, 0)``, with ``K = exp(-1/2 sum_f (f[x,y] - f[x+dx,y+dy])^2)``. Features are taken
    pre-scaled by their bandwidths (``f = p / theta``). ``K`` is computed on the fly: memory is
    O(C*H*W), not the (B, k, k, H, W) kernel of the ``unfold`` formulation. Neighbours outside the
    image contribute zero. Differentiable in ``q`` and ``features`` (learnable Gaussian features, +T).

    Args:
        q: (B, C, H, W) floating tensor, e.g. the class probabilities Q.
        features: (B, F, H, W) finite features of the same dtype, device and spatial size.
        filter_size: odd window size k >= 3.

    Returns:
        (B, C, H, W) message of the dtype of ``q``.
    """
    require_extension()
    check_filter_size(filter_size)
    check_tensor("q", q, ndim=4, dtypes=FLOATING)
    check_tensor("features", features, ndim=4, dtypes=(q.dtype,))
    check_same_device(q=q, features=features)
    if features.shape[0] != q.shape[0] or features.shape[2:] != q.shape[2:]:
        raise ValueError(
            f"features must have shape (B, F, H, W) with B, H, W of q {tuple(q.shape)}, "
            f"got {tuple(features.shape)}"
        )
    for name, tensor in (("q", q), ("features", features)):
        if not all_finite(tensor):
            raise ValueError(f"{name} contains non-finite values")
    return torch.ops.app.gaussian_message(q.contiguous(), features.contiguous(), filter_size)


def _gaussian_message_backward(ctx, grad_output: torch.Tensor):
    q, features = ctx.saved_tensors
    grad_output = grad_output.contiguous()
    grad_q = grad_features = None
    if ctx.needs_input_grad[0]:  # the kernel is symmetric: the adjoint is the same message passing
        grad_q = torch.ops.app.gaussian_message(grad_output, features, ctx.filter_size)
    if ctx.needs_input_grad[1]:
        grad_features = torch.ops.app.gaussian_message_features_backward(
            grad_output, q, features, ctx.filter_size
        )
    return grad_q, grad_features, None


def _gaussian_message_setup_context(ctx, inputs, output) -> None:
    q, features, filter_size = inputs
    ctx.save_for_backward(q, features)
    ctx.filter_size = filter_size


if extension_loaded():

    @torch.library.register_fake("app::gaussian_message")
    def _gaussian_message_fake(q: torch.Tensor, features: torch.Tensor, filter_size: int) -> torch.Tensor:
        torch._check(features.dim() == 4 and features.shape[0] == q.shape[0])
        return torch.empty_like(q)

    @torch.library.register_fake("app::gaussian_message_features_backward")
    def _features_backward_fake(
        grad: torch.Tensor, q: torch.Tensor, features: torch.Tensor, filter_size: int
    ) -> torch.Tensor:
        return torch.empty_like(features)

    torch.library.register_autograd(
        "app::gaussian_message", _gaussian_message_backward, setup_context=_gaussian_message_setup_context
    )

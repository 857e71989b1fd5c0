"""Plain-PyTorch ``unfold`` reference of ConvCRF's truncated-Gaussian message passing (Eq. 5-6).

This is the formulation of the original ConvCRF code: the kernel is materialised as a
(B, k*k, H*W) tensor and applied to the unfolded Q. For tests and benchmarks only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def gaussian_message_reference(q: Tensor, features: Tensor, filter_size: int) -> Tensor:
    """Q'[b,c,x,y] = sum_{0 < |(dx,dy)|_inf <= k//2} K[b,dx,dy,x,y] Q[b,c,x+dx,y+dy] (Eq. 6).

    With ``K = exp(-1/2 sum_f (f[x,y] - f[x+dx,y+dy])^2)`` (Eq. 5, features pre-scaled by their
    bandwidths). Neighbours outside the image contribute nothing, nor does the centre pixel.

    Args:
        q: (B, C, H, W) probabilities (or any per-class values).
        features: (B, F, H, W) pre-scaled Gaussian features.
        filter_size: odd window size k >= 3.

    Returns:
        (B, C, H, W) message.
    """
    batch, channels, height, width = q.shape
    radius = filter_size // 2
    window = filter_size * filter_size

    def unfold(tensor: Tensor) -> Tensor:  # (B, N, H, W) -> (B, N, k*k, H*W)
        columns = F.unfold(tensor, filter_size, padding=radius)
        return columns.view(tensor.shape[0], tensor.shape[1], window, height * width)

    inside = unfold(torch.ones_like(q[:, :1]))[:, 0]  # (B, k*k, H*W): 1 where the neighbour exists
    inside[:, window // 2] = 0  # the centre pixel sends no message to itself
    neighbours = unfold(features)
    centre = features.reshape(batch, -1, 1, height * width)
    kernel = torch.exp(-0.5 * (neighbours - centre).pow(2).sum(dim=1)) * inside
    message = (kernel[:, None] * unfold(q)).sum(dim=2)
    return message.view(batch, channels, height, width)

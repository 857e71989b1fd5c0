"""Plain-PyTorch segment mean (Eq. 4.13) by scatter-add: the reference the compiled op is tested against."""

from __future__ import annotations

import torch


def segment_mean_reference(values: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """values: (B, C, H, W), segments: (B, H, W) int64 >= 0 -> (B, C, H, W) per-segment means."""
    batch, channels, height, width = values.shape
    num_segments = int(segments.max()) + 1
    flat_segments = segments.reshape(batch, 1, height * width).expand(batch, channels, height * width)
    flat_values = values.reshape(batch, channels, height * width)
    sums = values.new_zeros(batch, channels, num_segments).scatter_add(2, flat_segments, flat_values)
    counts = torch.zeros(batch, 1, num_segments, dtype=values.dtype, device=values.device)
    counts.scatter_add_(2, flat_segments[:, :1], torch.ones_like(flat_values[:, :1]))
    means = sums / counts.clamp_min(1)
    return means.gather(2, flat_segments).reshape(batch, channels, height, width)


def segment_mean_dense(values: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """The dense-matrix form of Eq. 4.14 (encode with M (N_s, N_p), decode with M^T), for benchmarks.

    values: (B, C, H, W), segments: (B, H, W) -> (B, C, H, W). Memory O(N_s * N_p) per image.
    """
    batch, channels, height, width = values.shape
    num_segments = int(segments.max()) + 1
    flat = segments.reshape(batch, height * width)
    membership = (
        torch.nn.functional.one_hot(flat, num_segments).to(values.dtype).transpose(1, 2)
    )  # (B, N_s, N_p)
    logits = values.reshape(batch, channels, height * width).transpose(1, 2)  # (B, N_p, C)
    encoded = membership @ logits / membership.sum(2, keepdim=True).clamp_min(1)  # (B, N_s, C)
    decoded = membership.transpose(1, 2) @ encoded  # (B, N_p, C)
    return decoded.transpose(1, 2).reshape(batch, channels, height, width)

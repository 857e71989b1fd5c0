"""Superpixels by a fully convolutional network (Yang et al., 2020), as thesis Sec. 4.3.1 uses them.

The image is covered by a regular grid of square cells of side S (the last row and column may be
partial). Every cell seeds one superpixel. For each pixel p the network predicts the association
``Q: (B, 9, H, W)``, the probability that p belongs to the superpixel of one of the 9 cells around its own
cell; channel ``k`` is the offset ``NEIGHBOUR_OFFSETS[k] = (dy, dx)`` in cells, ``k = 4`` the own cell.
Neighbours outside the grid get probability 0. The loss (Eq. 4.1-4.2) pools pixel properties into
superpixels with Q, spreads them back with Q and compares the reconstruction with the input; the hard
superpixel map assigns every pixel to its most probable neighbour cell.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

NEIGHBOUR_OFFSETS: tuple[tuple[int, int], ...] = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
PROPERTY_LOSSES = ("cross_entropy", "l2")


def cell_grid(height: int, width: int, cell_size: int) -> tuple[int, int]:
    """Rows and columns of the grid of ``cell_size`` cells covering an ``height x width`` image."""
    if isinstance(cell_size, bool) or not isinstance(cell_size, int) or cell_size < 1:
        raise ValueError(f"cell_size must be an int >= 1, got {cell_size!r}")
    return math.ceil(height / cell_size), math.ceil(width / cell_size)


def _cell_of_pixels(size: int, cell_size: int, device: torch.device) -> torch.Tensor:
    return torch.arange(size, device=device) // cell_size


def neighbour_mask(
    height: int, width: int, cell_size: int, device: torch.device | None = None
) -> torch.Tensor:
    """(9, H, W) bool: whether neighbour cell ``k`` of each pixel's cell lies inside the grid."""
    rows, cols = cell_grid(height, width, cell_size)
    row = _cell_of_pixels(height, cell_size, device)
    col = _cell_of_pixels(width, cell_size, device)
    masks = []
    for dy, dx in NEIGHBOUR_OFFSETS:
        inside_rows = ((row + dy) >= 0) & ((row + dy) < rows)
        inside_cols = ((col + dx) >= 0) & ((col + dx) < cols)
        masks.append(inside_rows[:, None] & inside_cols[None, :])
    return torch.stack(masks)


def _check_association(association: torch.Tensor, cell_size: int) -> None:
    if not isinstance(association, torch.Tensor) or association.dim() != 4 or association.shape[1] != 9:
        raise ValueError(
            f"association must be a (B, 9, H, W) tensor, got {tuple(getattr(association, 'shape', ()))}"
        )
    if not association.is_floating_point():
        raise ValueError(f"association must be floating, got {association.dtype}")
    cell_grid(association.shape[2], association.shape[3], cell_size)


def _sum_over_cells(values: torch.Tensor, cell_size: int) -> torch.Tensor:
    """(B, K, H, W) -> (B, K, rows, cols) sums over each cell (zero padding for partial cells)."""
    batch, channels, height, width = values.shape
    rows, cols = cell_grid(height, width, cell_size)
    values = F.pad(values, (0, cols * cell_size - width, 0, rows * cell_size - height))
    return values.reshape(batch, channels, rows, cell_size, cols, cell_size).sum((3, 5))


def _spread_to_pixels(cell_values: torch.Tensor, cell_size: int, height: int, width: int) -> torch.Tensor:
    """(B, K, rows, cols) -> (B, K, H, W): each pixel gets its cell's value."""
    spread = cell_values.repeat_interleave(cell_size, 2).repeat_interleave(cell_size, 3)
    return spread[:, :, :height, :width]


def pool_to_superpixels(values: torch.Tensor, association: torch.Tensor, cell_size: int) -> torch.Tensor:
    """Superpixel properties ``u_s = sum_p f(p) q_s(p) / sum_p q_s(p)`` (Eq. 4.2a).

    Args:
        values: (B, K, H, W) pixel properties f.
        association: (B, 9, H, W) weights q (the association map, or it times a validity mask).
        cell_size: grid cell side S.

    Returns:
        (B, K, rows, cols): one property vector per grid cell's superpixel (0 where no weight falls).
    """
    _check_association(association, cell_size)
    if (
        values.dim() != 4
        or values.shape[0] != association.shape[0]
        or values.shape[2:] != association.shape[2:]
    ):
        raise ValueError(
            f"values must be (B, K, H, W) matching association {tuple(association.shape)}, "
            f"got {tuple(values.shape)}"
        )
    batch, channels = values.shape[:2]
    rows, cols = cell_grid(values.shape[2], values.shape[3], cell_size)
    # Pixels of cell c weighted by q_k belong to superpixel c + offset_k: accumulate on a padded canvas.
    numerator = values.new_zeros(batch, channels, rows + 2, cols + 2)
    denominator = values.new_zeros(batch, 1, rows + 2, cols + 2)
    for k, (dy, dx) in enumerate(NEIGHBOUR_OFFSETS):
        weight = association[:, k : k + 1]
        target = (slice(None), slice(None), slice(1 + dy, 1 + dy + rows), slice(1 + dx, 1 + dx + cols))
        numerator[target] = numerator[target] + _sum_over_cells(values * weight, cell_size)
        denominator[target] = denominator[target] + _sum_over_cells(weight, cell_size)
    inner = (slice(None), slice(None), slice(1, 1 + rows), slice(1, 1 + cols))
    return numerator[inner] / denominator[inner].clamp_min(1e-8)


def unpool_from_superpixels(
    superpixel_values: torch.Tensor, association: torch.Tensor, cell_size: int
) -> torch.Tensor:
    """Pixel reconstruction ``f'(p) = sum_{s in N_p} u_s q_s(p)`` (Eq. 4.2b).

    Args:
        superpixel_values: (B, K, rows, cols) superpixel properties u.
        association: (B, 9, H, W) association map Q.
        cell_size: grid cell side S.

    Returns:
        (B, K, H, W).
    """
    _check_association(association, cell_size)
    height, width = association.shape[2:]
    rows, cols = superpixel_values.shape[2:]
    padded = F.pad(superpixel_values, (1, 1, 1, 1))
    reconstruction = None
    for k, (dy, dx) in enumerate(NEIGHBOUR_OFFSETS):
        neighbour = padded[:, :, 1 + dy : 1 + dy + rows, 1 + dx : 1 + dx + cols]
        term = _spread_to_pixels(neighbour, cell_size, height, width) * association[:, k : k + 1]
        reconstruction = term if reconstruction is None else reconstruction + term
    return reconstruction


def soft_superpixel_mean(values: torch.Tensor, association: torch.Tensor, cell_size: int) -> torch.Tensor:
    """values: (B, K, H, W) -> (B, K, H, W) pooled into soft superpixels and spread back (Eq. 4.2)."""
    return unpool_from_superpixels(
        pool_to_superpixels(values, association, cell_size), association, cell_size
    )


def pixel_coordinates(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """(1, 2, H, W) float32 pixel coordinates c(p) = (x, y)."""
    y, x = torch.meshgrid(
        torch.arange(height, device=device, dtype=torch.float32),
        torch.arange(width, device=device, dtype=torch.float32),
        indexing="ij",
    )
    return torch.stack([x, y])[None]


def superpixel_loss(
    association: torch.Tensor,
    properties: torch.Tensor,
    cell_size: int,
    compactness: float = 0.003,
    property_loss: Literal["cross_entropy", "l2"] = "cross_entropy",
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The superpixel FCN loss of Eq. 4.1-4.2, as per-pixel means.

    ``E(f(p), f'(p))`` is ``-sum_l f_l(p) log f'_l(p)`` (``cross_entropy``; f one-hot labels, or any
    distribution) or ``||f(p) - f'(p)||_2`` (``l2``, e.g. colours); the position term is
    ``m / S * ||c(p) - c'(p)||_2`` in pixels with m = ``compactness``. Eq. 4.1 sums over pixels; the
    means here divide both terms by the same pixel count (Yang et al. divide sums by the batch size).

    Args:
        association: (B, 9, H, W) association map Q.
        properties: (B, K, H, W) pixel properties f.
        cell_size: grid cell side S (the superpixel sampling interval D of Eq. 4.1).
        compactness: m, the weight of the position term.
        property_loss: ``cross_entropy`` or ``l2``.
        valid: (B, H, W) bool pixels whose property is known (ignore labels excluded); all when None.
            Invalid pixels add no weight to ``u_s`` and no property term.

    Returns:
        ``(property_term, position_term)``, two scalars; the loss is their sum.
    """
    _check_association(association, cell_size)
    if property_loss not in PROPERTY_LOSSES:
        raise ValueError(f"property_loss must be one of {PROPERTY_LOSSES}, got {property_loss!r}")
    if not math.isfinite(compactness) or compactness < 0:
        raise ValueError(f"compactness must be finite and >= 0, got {compactness}")
    batch, _, height, width = association.shape
    if valid is None:
        valid = torch.ones(batch, height, width, dtype=torch.bool, device=association.device)
    elif valid.shape != (batch, height, width) or valid.dtype != torch.bool:
        raise ValueError(
            f"valid must be a (B, H, W) = {(batch, height, width)} bool tensor, got {valid.shape}"
        )
    weight = association * valid[:, None]
    superpixel_properties = pool_to_superpixels(properties, weight, cell_size)
    reconstruction = unpool_from_superpixels(superpixel_properties, association, cell_size)
    if property_loss == "cross_entropy":
        per_pixel = -(properties * reconstruction.clamp_min(1e-8).log()).sum(1)
    else:
        per_pixel = (properties - reconstruction).norm(dim=1)
    property_term = per_pixel[valid].sum() / valid.sum().clamp_min(1)
    coordinates = pixel_coordinates(height, width, association.device).expand(batch, -1, -1, -1)
    coordinates = coordinates.to(association.dtype)
    centres = soft_superpixel_mean(coordinates, association, cell_size)
    position_term = (coordinates - centres).norm(dim=1).mean() * (compactness / cell_size)
    return property_term, position_term


def hard_superpixels(association: torch.Tensor, cell_size: int) -> torch.Tensor:
    """The hard superpixel map: each pixel joins its most probable neighbour cell.

    Args:
        association: (B, 9, H, W) association map Q.
        cell_size: grid cell side S.

    Returns:
        (B, H, W) int64 ids ``row * cols + col`` of the chosen cell, unique per image and below
        ``rows * cols`` (cells that win no pixel leave gaps).
    """
    _check_association(association, cell_size)
    height, width = association.shape[2:]
    rows, cols = cell_grid(height, width, cell_size)
    mask = neighbour_mask(height, width, cell_size, association.device)
    choice = association.masked_fill(~mask, -1.0).argmax(1)  # out-of-grid neighbours never win
    offsets = torch.tensor(NEIGHBOUR_OFFSETS, device=association.device)
    row = _cell_of_pixels(height, cell_size, association.device)[:, None] + offsets[choice, 0]
    col = _cell_of_pixels(width, cell_size, association.device)[None, :] + offsets[choice, 1]
    return row * cols + col


def _conv_block(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(0.1),
    )


class SuperpixelFCN(nn.Module):
    """Encoder-decoder predicting the association map Q over a grid of ``cell_size`` cells (Yang et al.).

    Yang et al.'s layout at a smaller width: an encoder of 3x3 conv-BN-LeakyReLU blocks that halves the
    resolution ``len(widths) - 1`` times, a decoder of transposed convolutions with skip connections back
    to full resolution, and a 3x3 convolution to 9 association logits; neighbour cells outside the grid
    are masked before the softmax. Any input size works: the image is replicate-padded to a multiple of
    the encoder's stride and Q is cropped back.

    Args:
        cell_size: S, side of the grid cells that seed the superpixels (pixels).
        widths: channels per encoder level, full resolution first.
        in_channels: image channels.

    Shape:
        - Input: ``(B, in_channels, H, W)``.
        - Output: ``(B, 9, H, W)`` probabilities summing to 1 over dim 1 (see :data:`NEIGHBOUR_OFFSETS`).
    """

    def __init__(
        self, cell_size: int = 8, widths: Sequence[int] = (16, 32, 64, 64), in_channels: int = 3
    ) -> None:
        super().__init__()
        cell_grid(1, 1, cell_size)
        widths = tuple(widths)
        if len(widths) < 2 or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"widths must name >= 2 positive ints (one per encoder level), got {widths!r}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        self.cell_size = cell_size
        self.widths = widths
        self.stride = 2 ** (len(widths) - 1)
        self.encoder = nn.ModuleList(
            [nn.Sequential(_conv_block(in_channels, widths[0]), _conv_block(widths[0], widths[0]))]
            + [
                nn.Sequential(
                    _conv_block(widths[i - 1], widths[i], stride=2), _conv_block(widths[i], widths[i])
                )
                for i in range(1, len(widths))
            ]
        )
        self.upsample = nn.ModuleList(
            [
                nn.ConvTranspose2d(widths[i], widths[i - 1], 4, stride=2, padding=1)
                for i in range(len(widths) - 1, 0, -1)
            ]
        )
        self.decoder = nn.ModuleList(
            [_conv_block(2 * widths[i - 1], widths[i - 1]) for i in range(len(widths) - 1, 0, -1)]
        )
        self.predict = nn.Conv2d(widths[0], 9, 3, padding=1)

    def num_superpixels(self, height: int, width: int) -> int:
        """Upper bound on the hard map's ids for an ``height x width`` image (the grid's cell count)."""
        rows, cols = cell_grid(height, width, self.cell_size)
        return rows * cols

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image: (B, C_in, H, W) -> association Q: (B, 9, H, W)."""
        if not isinstance(image, torch.Tensor) or image.dim() != 4:
            raise ValueError(f"image must be a (B, C, H, W) tensor, got {tuple(getattr(image, 'shape', ()))}")
        if image.shape[1] != self.encoder[0][0][0].in_channels:
            raise ValueError(
                f"image has {image.shape[1]} channels, the network expects {self.encoder[0][0][0].in_channels}"
            )
        height, width = image.shape[2:]
        if height == 0 or width == 0:
            raise ValueError(f"image must have at least one pixel, got shape {tuple(image.shape)}")
        padded_height = math.ceil(height / self.stride) * self.stride
        padded_width = math.ceil(width / self.stride) * self.stride
        x = F.pad(image, (0, padded_width - width, 0, padded_height - height), mode="replicate")
        skips = []
        for level in self.encoder:
            x = level(x)
            skips.append(x)
        for upsample, decode, skip in zip(self.upsample, self.decoder, reversed(skips[:-1]), strict=True):
            x = decode(torch.cat([upsample(x), skip], 1))
        logits = self.predict(x)[:, :, :height, :width]
        mask = neighbour_mask(height, width, self.cell_size, image.device)
        return logits.masked_fill(~mask, float("-inf")).softmax(1)

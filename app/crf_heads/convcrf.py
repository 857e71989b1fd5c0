"""ConvCRF (Teichmann & Cipolla): mean-field inference with truncated Gaussian kernels (Alg. 1, Eq. 3-6)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from app.crf_heads.base import HEADS, StructuredHead
from app.ops import gaussian_message
from app.ops.gaussian_message import check_filter_size


def _positive(name: str, value: float) -> float:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


@HEADS.register("convcrf")
class ConvCRF(StructuredHead):
    """Convolutional CRF head: logits (B, C, H, W) and ``batch["image_raw"]`` in, refined logits out.

    Mean-field as Alg. 1 with ``n_iterations`` steps, starting from ``Q = softmax(logits)``:

    1. message passing (Eq. 6) with the two FullCRF kernels (Eq. 3-4) merged by their weights,
       ``appearance_weight * k_a + smoothness_weight * k_s``, where ``k_a`` uses the features
       ``(p / theta_alpha, I / theta_beta)`` and ``k_s`` the features ``p / theta_gamma``
       (``p``: pixel coordinates in pixels of the input, ``I``: RGB in [0, 1]), each truncated to a
       ``filter_size`` window of the blurred grid (Eq. 5, the conditional-independence assumption);
    2. compatibility transform: Potts (the message is added as is: a neighbour's probability for
       class ``l`` favours ``l``, equivalent to the Potts penalty up to a per-pixel constant) or,
       with ``learnable_compatibility`` (+C), a 1x1 convolution over classes initialised to Potts;
    3. adding the unary: ``logits + message``; 4. normalising: ``Q = softmax(.)``.

    The final logits (before the last softmax) are returned. Blur (Sec. 4.2): Q and the image are
    average-pooled by ``blur`` (the input is replicate-padded to a multiple of ``blur`` first, so any
    size works), the message computed on the pooled grid with positions still in input pixels, then
    upsampled bilinearly; the effective window is ``filter_size * blur`` pixels.

    The defaults are the FullCRF ones of Krahenbuhl & Koltun: ``theta_alpha = 80`` px,
    ``theta_beta = 13 / 255`` (13 grey levels on the 0-255 scale, expressed for ``image_raw`` in
    [0, 1]), ``theta_gamma = 3`` px, weights 10 (appearance) and 3 (smoothness). Bandwidths (as logs)
    and weights are learnable when ``learn_kernels``. ``learn_features`` (+T) adds a learnable 1x1 map
    of the appearance features to the smoothness features, initialised to zero so training starts
    from the hand-crafted kernel; it keeps the head size-agnostic where the paper learns one feature
    vector per pixel.

    Args:
        filter_size: odd window size k >= 3 of the truncated kernels, on the blurred grid.
        blur: pooling factor >= 1 of Q and the features.
        n_iterations: mean-field iterations >= 1.
        theta_alpha: position bandwidth of the appearance kernel, input pixels.
        theta_beta: colour bandwidth of the appearance kernel, ``image_raw`` units ([0, 1]).
        theta_gamma: position bandwidth of the smoothness kernel, input pixels.
        appearance_weight: ``w^(1)`` of Eq. 3.
        smoothness_weight: ``w^(2)`` of Eq. 3.
        learn_kernels: make the bandwidths and weights trainable.
        learnable_compatibility: +C, a 1x1 convolution as compatibility transform.
        learn_features: +T, trainable smoothness features.
    """

    required_keys = ("image_raw",)

    def __init__(
        self,
        filter_size: int = 7,
        blur: int = 4,
        n_iterations: int = 5,
        theta_alpha: float = 80.0,
        theta_beta: float = 13.0 / 255.0,
        theta_gamma: float = 3.0,
        appearance_weight: float = 10.0,
        smoothness_weight: float = 3.0,
        learn_kernels: bool = True,
        learnable_compatibility: bool = False,
        learn_features: bool = False,
    ) -> None:
        super().__init__()
        check_filter_size(filter_size)
        for name, value in (("blur", blur), ("n_iterations", n_iterations)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        bandwidths = [_positive(n, v) for n, v in (("theta_alpha", theta_alpha), ("theta_beta", theta_beta))]
        bandwidths.append(_positive("theta_gamma", theta_gamma))
        weights = [float(appearance_weight), float(smoothness_weight)]
        if not all(math.isfinite(w) for w in weights):
            raise ValueError(f"kernel weights must be finite, got {weights}")
        self.filter_size = filter_size
        self.blur = blur
        self.n_iterations = n_iterations
        self.learnable_compatibility = learnable_compatibility
        # log(theta_alpha, theta_beta, theta_gamma) and (w_appearance, w_smoothness)
        self.log_bandwidths = nn.Parameter(torch.tensor(bandwidths).log(), requires_grad=learn_kernels)
        self.kernel_weights = nn.Parameter(torch.tensor(weights), requires_grad=learn_kernels)
        self.feature_transform = nn.Conv2d(5, 2, 1, bias=False) if learn_features else None
        if self.feature_transform is not None:
            nn.init.zeros_(self.feature_transform.weight)
        self.compatibility: nn.Conv2d | None = None

    def set_num_classes(self, num_classes: int) -> None:
        """Builds the +C compatibility, a (C -> C) 1x1 convolution initialised to the identity (Potts)."""
        super().set_num_classes(num_classes)
        if self.learnable_compatibility:
            self.compatibility = nn.Conv2d(num_classes, num_classes, 1, bias=False)
            with torch.no_grad():
                self.compatibility.weight.copy_(torch.eye(num_classes).view(num_classes, num_classes, 1, 1))

    def _pool(self, tensor: Tensor) -> Tensor:
        """(B, N, H, W) -> (B, N, ceil(H / blur), ceil(W / blur)), replicate-padded to a multiple of blur."""
        if self.blur == 1:
            return tensor
        height, width = tensor.shape[-2:]
        pad = (0, -width % self.blur, 0, -height % self.blur)
        if any(pad):
            tensor = F.pad(tensor, pad, mode="replicate")
        return F.avg_pool2d(tensor, self.blur)

    def kernel_features(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """Pre-scaled features on the blurred grid: appearance (B, 5, h, w) and smoothness (B, 2, h, w).

        image: (B, 3, H, W) RGB in [0, 1].
        """
        colour = self._pool(image)
        batch, _, height, width = colour.shape
        rows = torch.arange(height, device=image.device, dtype=image.dtype) * self.blur
        columns = torch.arange(width, device=image.device, dtype=image.dtype) * self.blur
        position = torch.stack(torch.meshgrid(rows, columns, indexing="ij")).expand(batch, 2, height, width)
        theta_alpha, theta_beta, theta_gamma = self.log_bandwidths.to(image.dtype).exp()
        appearance = torch.cat([position / theta_alpha, colour / theta_beta], dim=1)
        smoothness = position / theta_gamma
        if self.feature_transform is not None:
            smoothness = smoothness + self.feature_transform(appearance)
        return appearance, smoothness

    def message(self, q: Tensor, appearance: Tensor, smoothness: Tensor) -> Tensor:
        """Merged-kernel message of Alg. 1 for Q (B, C, H, W), upsampled back to (B, C, H, W)."""
        pooled = self._pool(q)
        w_appearance, w_smoothness = self.kernel_weights.to(q.dtype)
        message = w_appearance * gaussian_message(pooled, appearance, self.filter_size)
        message = message + w_smoothness * gaussian_message(pooled, smoothness, self.filter_size)
        if self.blur > 1:
            message = F.interpolate(message, scale_factor=self.blur, mode="bilinear", align_corners=False)
        return message[..., : q.shape[-2], : q.shape[-1]]

    def forward(self, logits: Tensor, batch: Mapping[str, Any]) -> Tensor:
        """logits: (B, C, H, W); batch["image_raw"]: (B, 3, H, W) in [0, 1]. Returns (B, C, H, W)."""
        self.check_batch(batch)
        image = batch["image_raw"].to(logits.dtype)
        if image.shape[0] != logits.shape[0] or image.shape[1] != 3 or image.shape[2:] != logits.shape[2:]:
            raise ValueError(
                f"image_raw must be (B, 3, H, W) matching logits {tuple(logits.shape)}, got {tuple(image.shape)}"
            )
        if self.learnable_compatibility and self.compatibility is None:
            raise RuntimeError("ConvCRF with learnable_compatibility needs set_num_classes() before forward")
        appearance, smoothness = self.kernel_features(image)
        refined = logits
        for _ in range(self.n_iterations):
            message = self.message(torch.softmax(refined, dim=1), appearance, smoothness)
            if self.compatibility is not None:
                message = self.compatibility(message)
            refined = logits + message
        return refined

"""3D networks of thesis Sec. 5.6.1.2: 3D-UNet (15 / 23 conv layers), MobileNetV2-3D and I3D.

* :class:`UNet3D` (Cicek et al. 2016): ``L`` levels of two "conv 3^3 + norm + ReLU" each, max pooling
  between encoder levels, upsampling + skip concatenation + two convs per decoder level, a final 1^3
  conv: ``4L - 1`` conv layers, so 15 for ``L = 4`` and 23 for ``L = 6``. The first conv of an encoder
  level has half the level width (at least its input width), as in the thesis' 3D-UNet, whose 15-layer
  version with ``base_width=64`` has 62.26 MB of parameters (Table 5.2).
* :class:`MobileNetV2_3D` (Sandler et al. 2018, 3D by Kopuklu et al. 2019): 52 conv layers (18 with
  3^3 kernels) and a linear classifier.
* :class:`I3D` (Carreira and Zisserman 2017): inflated Inception-V1, 57 conv layers (one 7^3, 19 3^3)
  and a linear classifier.

Shapes: ``UNet3D: (B, C_in, D, H, W) -> (B, num_classes, D, H, W)`` logits;
``MobileNetV2_3D`` and ``I3D``: clips ``(B, 3, T, H, W) -> (B, num_classes)`` logits.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["I3D", "INITS", "ClipClassifier3d", "MobileNetV2_3D", "NORMS", "UNet3D", "init_weights"]

NORMS = ("batch", "group", "instance", "none")
INITS = ("glorot", "orthogonal", "default")
UPSAMPLES = ("nearest", "trilinear", "transposed")


def init_weights(module: nn.Module, init: str = "glorot") -> None:
    """Initialise conv / linear weights: Glorot normal (the thesis' "xn"), orthogonal ("ort") or
    PyTorch's default; biases to zero and norms to identity for the first two."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if init == "default":
        return
    for m in module.modules():
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d, nn.Linear)):
            if init == "glorot":
                nn.init.xavier_normal_(m.weight)
            else:
                nn.init.orthogonal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm3d, nn.GroupNorm, nn.InstanceNorm3d)) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "group":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    return nn.Identity()


class ConvNormAct3d(nn.Sequential):
    """Conv3d + norm + activation (``relu``, ``relu6`` or ``none``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int] = 3,
        stride: int | tuple[int, int, int] = 1,
        groups: int = 1,
        norm: str = "batch",
        activation: str = "relu",
    ) -> None:
        k = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        padding = tuple(s // 2 for s in k)
        layers: list[nn.Module] = [
            nn.Conv3d(in_channels, out_channels, k, stride, padding, groups=groups, bias=norm == "none"),
            _norm(norm, out_channels),
        ]
        if activation == "relu":
            layers.append(nn.ReLU(inplace=True))
        elif activation == "relu6":
            layers.append(nn.ReLU6(inplace=True))
        super().__init__(*layers)


class UNet3D(nn.Module):
    """3D-UNet for volumetric segmentation (15 or 23 conv layers in the thesis).

    Args:
        in_channels: input channels.
        num_classes: output classes (channels of the final 1^3 conv).
        n_layers: conv layers ``4L - 1`` for ``L`` levels: 15 (4 levels) or 23 (6 levels), any
            ``4L - 1 >= 7`` works.
        base_width: width of the first level (thesis: 64 on ShapeNet, 32 on BraTS'18); level ``i`` has
            ``base_width * 2**i`` channels.
        max_width: cap on the level width (None: no cap).
        norm: ``batch`` (thesis), ``group``, ``instance`` or ``none``.
        upsample: ``nearest`` / ``trilinear`` interpolation or ``transposed`` (ConvTranspose3d 2^3).
        init: ``glorot`` (thesis), ``orthogonal`` or ``default``.

    Shapes: ``(B, in_channels, D, H, W) -> (B, num_classes, D, H, W)``; D, H, W divisible by 2^(L-1).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 4,
        n_layers: int = 15,
        base_width: int = 64,
        max_width: int | None = None,
        norm: str = "batch",
        upsample: str = "nearest",
        init: str = "glorot",
    ) -> None:
        super().__init__()
        if n_layers < 7 or (n_layers + 1) % 4:
            raise ValueError(f"n_layers must be 4 * levels - 1 >= 7 (15 or 23 in the thesis), got {n_layers}")
        if in_channels < 1 or num_classes < 1 or base_width < 1:
            raise ValueError("in_channels, num_classes and base_width must be >= 1")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if upsample not in UPSAMPLES:
            raise ValueError(f"upsample must be one of {UPSAMPLES}, got {upsample!r}")
        self.levels = (n_layers + 1) // 4
        self.num_classes = num_classes
        self.upsample_mode = upsample
        widths = [base_width * 2**i for i in range(self.levels)]
        if max_width is not None:
            widths = [min(w, max_width) for w in widths]
        self.encoders = nn.ModuleList()
        c_in = in_channels
        for w in widths:
            mid = max(w // 2, c_in)
            self.encoders.append(
                nn.Sequential(ConvNormAct3d(c_in, mid, norm=norm), ConvNormAct3d(mid, w, norm=norm))
            )
            c_in = w
        self.pool = nn.MaxPool3d(2)
        self.upsamplers = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for i in range(self.levels - 2, -1, -1):
            below = widths[i + 1]
            if upsample == "transposed":
                self.upsamplers.append(nn.ConvTranspose3d(below, below, 2, stride=2))
            else:
                self.upsamplers.append(nn.Upsample(scale_factor=2, mode=upsample))
            self.decoders.append(
                nn.Sequential(
                    ConvNormAct3d(widths[i] + below, widths[i], norm=norm),
                    ConvNormAct3d(widths[i], widths[i], norm=norm),
                )
            )
        self.head = nn.Conv3d(widths[0], num_classes, 1)
        init_weights(self, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = 2 ** (self.levels - 1)
        if x.dim() != 5 or any(s % factor for s in x.shape[2:]):
            raise ValueError(
                f"input must be (B, C, D, H, W) with D, H, W divisible by {factor}, got {tuple(x.shape)}"
            )
        skips = []
        for i, encoder in enumerate(self.encoders):
            x = encoder(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for upsampler, decoder in zip(self.upsamplers, self.decoders):
            x = decoder(torch.cat([skips.pop(), upsampler(x)], dim=1))
        return self.head(x)


class InvertedResidual3d(nn.Module):
    """MobileNetV2 block: 1^3 expansion, depthwise 3^3, linear 1^3 projection, residual when shapes match."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: tuple[int, int, int], expand_ratio: int
    ) -> None:
        super().__init__()
        hidden = round(in_channels * expand_ratio)
        self.use_residual = stride == (1, 1, 1) and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvNormAct3d(in_channels, hidden, 1, activation="relu6"))
        layers += [
            ConvNormAct3d(hidden, hidden, 3, stride, groups=hidden, activation="relu6"),
            ConvNormAct3d(hidden, out_channels, 1, activation="none"),
        ]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_residual else self.block(x)


class ClipClassifier3d(nn.Module):
    """Shared tail of the clip networks: ``features`` -> global average pool -> dropout -> linear.

    Shapes: ``(B, C, T, H, W) -> (B, num_classes)``.
    """

    def __init__(
        self, features: nn.Module, channels: int, num_classes: int, dropout: float, init: str
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.features = features
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(channels, num_classes)
        init_weights(self, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"input must be a clip (B, C, T, H, W), got {tuple(x.shape)}")
        x = self.pool(self.features(x)).flatten(1)
        return self.classifier(self.dropout(x))


class MobileNetV2_3D(ClipClassifier3d):  # noqa: N801 - the thesis' name
    """3D MobileNetV2 for clip classification (52 conv layers + a linear layer).

    Args:
        num_classes: classes.
        in_channels: clip channels.
        width_mult: channel multiplier of the blocks (1.0 in the thesis).
        last_channel: width of the last 1^3 conv (1280).
        dropout: dropout before the classifier.
        init: ``glorot``, ``orthogonal`` or ``default``.
        temporal_strides: how many of the four downsampling stages also halve time, counted from the
            last (4: all, as Kopuklu et al. for 16 frames, which reach one frame only in the 160-channel
            stage). Short clips need fewer: with 8 frames and 4, time is one frame from the 64-channel
            stage on and the network barely learns motion; 1 keeps all 8 frames up to the last stage.

    Shapes: ``(B, in_channels, T, H, W) -> (B, num_classes)``.
    """

    # expansion t, channels c, repeats n, first stride s
    SETTINGS = (
        (1, 16, 1, (1, 1, 1)),
        (6, 24, 2, (2, 2, 2)),
        (6, 32, 3, (2, 2, 2)),
        (6, 64, 4, (2, 2, 2)),
        (6, 96, 3, (1, 1, 1)),
        (6, 160, 3, (2, 2, 2)),
        (6, 320, 1, (1, 1, 1)),
    )

    def __init__(
        self,
        num_classes: int = 101,
        in_channels: int = 3,
        width_mult: float = 1.0,
        last_channel: int = 1280,
        dropout: float = 0.2,
        init: str = "glorot",
        temporal_strides: int = 4,
    ) -> None:
        if num_classes < 1 or in_channels < 1 or last_channel < 1 or width_mult <= 0:
            raise ValueError("num_classes, in_channels, last_channel and width_mult must be positive")
        downsampling = [i for i, setting in enumerate(self.SETTINGS) if setting[3] != (1, 1, 1)]
        if not 0 <= temporal_strides <= len(downsampling):
            raise ValueError(f"temporal_strides must be in [0, {len(downsampling)}], got {temporal_strides}")
        spatial_only = downsampling[: len(downsampling) - temporal_strides]
        c = max(1, int(32 * width_mult))
        layers: list[nn.Module] = [ConvNormAct3d(in_channels, c, 3, (1, 2, 2), activation="relu6")]
        for stage, (t, channels, n, s) in enumerate(self.SETTINGS):
            s = (1, *s[1:]) if stage in spatial_only else s
            out = max(1, int(channels * width_mult))
            for i in range(n):
                layers.append(InvertedResidual3d(c, out, s if i == 0 else (1, 1, 1), t))
                c = out
        layers.append(ConvNormAct3d(c, last_channel, 1, activation="relu6"))
        super().__init__(nn.Sequential(*layers), last_channel, num_classes, dropout, init)


class InceptionBlock3d(nn.Module):
    """I3D inception module: 1^3 | 1^3 -> 3^3 | 1^3 -> 3^3 | maxpool 3^3 -> 1^3, concatenated."""

    def __init__(self, in_channels: int, widths: tuple[int, int, int, int, int, int]) -> None:
        super().__init__()
        b0, b1a, b1b, b2a, b2b, b3 = widths
        self.branch0 = ConvNormAct3d(in_channels, b0, 1)
        self.branch1 = nn.Sequential(ConvNormAct3d(in_channels, b1a, 1), ConvNormAct3d(b1a, b1b, 3))
        self.branch2 = nn.Sequential(ConvNormAct3d(in_channels, b2a, 1), ConvNormAct3d(b2a, b2b, 3))
        self.branch3 = nn.Sequential(nn.MaxPool3d(3, 1, 1), ConvNormAct3d(in_channels, b3, 1))
        self.out_channels = b0 + b1b + b2b + b3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)], dim=1)


class I3D(ClipClassifier3d):
    """Inflated Inception-V1 for clip classification (57 conv layers + a linear layer).

    Args:
        num_classes: classes.
        in_channels: clip channels.
        width_mult: channel multiplier (1.0 in the thesis).
        dropout: dropout before the classifier.
        init: ``glorot``, ``orthogonal`` or ``default``.

    Shapes: ``(B, in_channels, T, H, W) -> (B, num_classes)``.
    """

    MIXED = (
        ("3b", (64, 96, 128, 16, 32, 32)),
        ("3c", (128, 128, 192, 32, 96, 64)),
        ("pool", None),
        ("4b", (192, 96, 208, 16, 48, 64)),
        ("4c", (160, 112, 224, 24, 64, 64)),
        ("4d", (128, 128, 256, 24, 64, 64)),
        ("4e", (112, 144, 288, 32, 64, 64)),
        ("4f", (256, 160, 320, 32, 128, 128)),
        ("pool", None),
        ("5b", (256, 160, 320, 32, 128, 128)),
        ("5c", (384, 192, 384, 48, 128, 128)),
    )

    def __init__(
        self,
        num_classes: int = 101,
        in_channels: int = 3,
        width_mult: float = 1.0,
        dropout: float = 0.5,
        init: str = "glorot",
    ) -> None:
        if num_classes < 1 or in_channels < 1 or width_mult <= 0:
            raise ValueError("num_classes, in_channels and width_mult must be positive")

        def w(c: int) -> int:
            return max(1, int(c * width_mult))

        layers: list[nn.Module] = [
            ConvNormAct3d(in_channels, w(64), 7, 2),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1), ceil_mode=True),
            ConvNormAct3d(w(64), w(64), 1),
            ConvNormAct3d(w(64), w(192), 3),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1), ceil_mode=True),
        ]
        c = w(192)
        pools = iter([nn.MaxPool3d(3, 2, 1, ceil_mode=True), nn.MaxPool3d(2, 2, ceil_mode=True)])
        for _name, widths in self.MIXED:
            if widths is None:
                layers.append(next(pools))
                continue
            block = InceptionBlock3d(c, tuple(w(x) for x in widths))
            layers.append(block)
            c = block.out_channels
        super().__init__(nn.Sequential(*layers), c, num_classes, dropout, init)

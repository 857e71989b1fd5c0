"""Backbone registry: every segmentation-models-pytorch architecture with any SMP or timm encoder, and
the 3D networks of the pruning experiments (``unet3d``, ``mobilenetv2_3d``, ``i3d``)."""

from __future__ import annotations

from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from app.models.nets3d import I3D, MobileNetV2_3D, UNet3D
from app.registry import Registry

BACKBONES: Registry[nn.Module] = Registry("backbone")

SMP_ARCHITECTURES: dict[str, str] = {
    cls.__name__.lower(): cls.__name__ for cls in smp.MODEL_ARCHITECTURES_MAPPING.values()
}


class SMPBackbone(nn.Module):
    """An SMP segmentation network that accepts any input size.

    Inputs whose sides are not multiples of the encoder's output stride are padded (reflect) before the
    network and the logits are cropped back, so any image size works.

    Args:
        arch: SMP architecture name, e.g. ``Unet``, ``DeepLabV3Plus``, ``FPN``, ``Segformer``.
        encoder_name: an SMP encoder (``resnet18``) or any timm encoder with the ``tu-`` prefix
            (``tu-convnext_tiny``).
        encoder_weights: pretrained weights to load (``imagenet``); ``None`` (the default) never touches
            the network.
        num_classes: output channels (linked from the datamodule by the CLI).
        in_channels: input image channels.
        arch_kwargs: extra keyword arguments of the SMP architecture (``decoder_channels``, ...).

    Shapes: ``image: (B, in_channels, H, W) -> logits: (B, num_classes, H, W)``.
    """

    def __init__(
        self,
        arch: str = "Unet",
        encoder_name: str = "resnet18",
        encoder_weights: str | None = None,
        num_classes: int = 2,
        in_channels: int = 3,
        arch_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if arch.lower() not in SMP_ARCHITECTURES:
            known = ", ".join(sorted(SMP_ARCHITECTURES.values()))
            raise ValueError(f"unknown SMP architecture {arch!r}; choose one of: {known}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.arch = SMP_ARCHITECTURES[arch.lower()]
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.network = smp.create_model(
            self.arch,
            encoder_name=encoder_name,
            encoder_weights=encoder_weights,
            in_channels=in_channels,
            classes=num_classes,
            **(arch_kwargs or {}),
        )
        self.size_multiple = int(getattr(self.network.encoder, "output_stride", 32))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        pad_bottom = -height % self.size_multiple
        pad_right = -width % self.size_multiple
        if pad_bottom or pad_right:
            mode = "reflect" if pad_bottom < height and pad_right < width else "replicate"
            image = F.pad(image, (0, pad_right, 0, pad_bottom), mode=mode)
        return self.network(image)[..., :height, :width]


def _register_smp(arch: str) -> None:
    @BACKBONES.register(f"smp:{arch}")
    def build(num_classes: int, encoder_name: str = "resnet18", **kwargs: Any) -> nn.Module:
        return SMPBackbone(arch=arch, encoder_name=encoder_name, num_classes=num_classes, **kwargs)


for _arch in SMP_ARCHITECTURES.values():
    _register_smp(_arch)

for _name, _network in (("unet3d", UNet3D), ("mobilenetv2_3d", MobileNetV2_3D), ("i3d", I3D)):
    BACKBONES.register(_name)(_network)


def create_backbone(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build a registered backbone by its short name, e.g. ``create_backbone("smp:FPN", 4, encoder_name=...)``."""
    return BACKBONES.create(name, num_classes=num_classes, **kwargs)

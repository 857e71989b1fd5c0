"""Backbones (registry), tasks (LightningModules) and model building blocks."""

from app.models.backbones import BACKBONES, SMPBackbone, create_backbone
from app.models.classification_task import ClassificationTask
from app.models.nets3d import I3D, MobileNetV2_3D, UNet3D
from app.models.segmentation_task import SegmentationTask
from app.models.superpixel_fcn import SuperpixelFCN
from app.models.task_base import BackboneTask

__all__ = [
    "BACKBONES",
    "I3D",
    "BackboneTask",
    "ClassificationTask",
    "MobileNetV2_3D",
    "SMPBackbone",
    "SegmentationTask",
    "SuperpixelFCN",
    "UNet3D",
    "create_backbone",
]

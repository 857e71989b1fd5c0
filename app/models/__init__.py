"""Backbones (registry), tasks (LightningModules) and model building blocks."""

from app.models.backbones import BACKBONES, SMPBackbone, create_backbone
from app.models.segmentation_task import SegmentationTask
from app.models.superpixel_fcn import SuperpixelFCN

__all__ = ["BACKBONES", "SMPBackbone", "SegmentationTask", "SuperpixelFCN", "create_backbone"]

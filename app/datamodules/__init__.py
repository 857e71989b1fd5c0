"""2D segmentation datamodules: SyntheticShapes (the embedded default) and VOC-style folders.

Every batch is a dict: ``image`` (B, 3, H, W) normalised, ``image_raw`` (B, 3, H, W) in [0, 1],
``mask`` (B, H, W) int64 (255 = ignore), ``index`` (B,), and optionally ``superpixels`` (B, H, W) int64
and ``edges`` (B, H, W) float32. ``SyntheticVolumes`` and ``SyntheticClips`` are the 3D data of the pruning
experiments (``image`` (B, 1, D, H, W) with ``mask`` (B, D, H, W); ``image`` (B, 3, T, H, W) with ``label`` (B,)).
"""

from app.datamodules.common import (
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SegmentationDataModule,
    SegmentationDataset,
    SplitDataModule,
    build_augmentations,
    collate_segmentation,
    compute_edges,
    compute_superpixels,
    normalize,
    seed_worker,
)
from app.datamodules.shapes import SHAPE_KINDS, ShapesDataset, SyntheticShapes, render_shapes
from app.datamodules.voc import VOC_CLASS_NAMES, VOCDataset, VOCFolder
from app.datamodules.volumes import ClipsDataset, SyntheticClips, SyntheticVolumes, VolumesDataset

__all__ = [
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ClipsDataset",
    "SHAPE_KINDS",
    "VOC_CLASS_NAMES",
    "SegmentationDataModule",
    "SegmentationDataset",
    "SplitDataModule",
    "ShapesDataset",
    "SyntheticClips",
    "SyntheticShapes",
    "SyntheticVolumes",
    "VOCDataset",
    "VOCFolder",
    "VolumesDataset",
    "build_augmentations",
    "collate_segmentation",
    "compute_edges",
    "compute_superpixels",
    "normalize",
    "render_shapes",
    "seed_worker",
]

"""VOCFolder: a PASCAL VOC style segmentation folder.

Layout under ``root``::

    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png          palette (or greyscale) PNG; pixel value = class id, 255 = ignore
    ImageSets/Segmentation/train.txt    one id per line
    ImageSets/Segmentation/val.txt
    ImageSets/Segmentation/test.txt     optional; the val list is used when it is missing
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from app.datamodules.common import (
    IGNORE_INDEX,
    SegmentationDataModule,
    SegmentationDataset,
    build_augmentations,
)

VOC_CLASS_NAMES: tuple[str, ...] = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


def read_split_ids(list_file: Path) -> list[str]:
    """Ids listed in an ImageSets file (one per line, blank lines skipped).

    Raises:
        FileNotFoundError: the list file does not exist.
        ValueError: the list is empty.
    """
    if not list_file.is_file():
        raise FileNotFoundError(f"missing split list file: {list_file}")
    ids = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"split list file {list_file} lists no ids")
    return ids


def read_image(path: Path) -> np.ndarray:
    """Read an RGB image: (H, W, 3) uint8.

    Raises:
        FileNotFoundError: missing file. OSError: unreadable or corrupt file (the path is in the message).
    """
    if not path.is_file():
        raise FileNotFoundError(f"missing image file: {path}")
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise OSError(f"cannot read image file {path} (corrupt or not an image): {err}") from err


def read_mask(path: Path, num_classes: int) -> np.ndarray:
    """Read a class-id mask from a palette ('P') or greyscale ('L') PNG: (H, W) uint8.

    Raises:
        FileNotFoundError: missing file. OSError: unreadable file.
        ValueError: RGB-coded mask, or class ids >= ``num_classes`` other than 255.
    """
    if not path.is_file():
        raise FileNotFoundError(f"missing mask file: {path}")
    try:
        with Image.open(path) as img:
            mode = img.mode
            mask = np.array(img, dtype=np.uint8) if mode in ("P", "L") else None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise OSError(f"cannot read mask file {path} (corrupt or not an image): {err}") from err
    if mask is None:
        raise ValueError(f"mask {path} has mode {mode!r}; expected a palette ('P') or greyscale ('L') PNG")
    ids = np.unique(mask)
    bad = ids[(ids >= num_classes) & (ids != IGNORE_INDEX)]
    if bad.size:
        raise ValueError(
            f"mask {path} has class ids {bad.tolist()} >= num_classes={num_classes} "
            "(only 255 = ignore is allowed above)"
        )
    return mask


class VOCDataset(SegmentationDataset):
    """One split of a VOC folder.

    Args:
        root: dataset root.
        ids: sample ids (file stems).
        num_classes: number of classes; mask values must be < num_classes or 255.
        **kwargs: passed to :class:`SegmentationDataset` (augmentations, superpixels, edges, ...).

    Raises:
        FileNotFoundError: an id has no image, or an image without a mask (both paths in the message).
    """

    def __init__(self, root: str | Path, ids: list[str], num_classes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = Path(root)
        self.ids = list(ids)
        self.num_classes = num_classes
        for sample_id in self.ids:
            image_path, mask_path = self.paths(sample_id)
            if not image_path.is_file():
                raise FileNotFoundError(f"listed id {sample_id!r} has no image: missing {image_path}")
            if not mask_path.is_file():
                raise FileNotFoundError(f"image without a mask: {image_path} has no mask {mask_path}")

    def paths(self, sample_id: str) -> tuple[Path, Path]:
        """(image path, mask path) of ``sample_id``."""
        return (
            self.root / "JPEGImages" / f"{sample_id}.jpg",
            self.root / "SegmentationClass" / f"{sample_id}.png",
        )

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """image: (H, W, 3) uint8, mask: (H, W) uint8 of sample ``index``."""
        image_path, mask_path = self.paths(self.ids[index])
        image = read_image(image_path)
        mask = read_mask(mask_path, self.num_classes)
        if image.shape[:2] != mask.shape:
            raise ValueError(
                f"image {image_path} is {image.shape[:2]} but its mask {mask_path} is {mask.shape}"
            )
        return image, mask


class VOCFolder(SegmentationDataModule):
    """PASCAL VOC style folder (see the module docstring for the layout).

    Training samples are randomly cropped to ``crop_size`` (images padded with 0 and masks with 255
    when smaller) after the configured augmentations; val / test samples keep their size, so
    ``val_batch_size`` defaults to 1. ``test`` and ``predict`` use ``test.txt`` if present, else ``val.txt``.

    Args:
        root: dataset root folder.
        num_classes: classes including background (21 for VOC).
        class_names: names of the classes (None: the VOC names when ``num_classes == 21``,
            else ``class_<i>``).
        crop_size: side of the random training crop, or None for no crop.
        seed: seed of shuffling and augmentation.
        batch_size: training batch size.
        val_batch_size: batch size of val / test / predict.
        num_workers: DataLoader workers.
        train_augmentations: albumentations config dicts for training.
        val_augmentations: same for val / test / predict.
        superpixels: SLIC ``n_segments`` for a ``superpixels`` batch key, or None.
        edges: add a Canny ``edges`` batch key.
        edge_sigma: Canny smoothing sigma.
        superpixel_compactness: SLIC compactness.
        superpixel_sigma: Gaussian smoothing before SLIC (pixels).

    Raises:
        FileNotFoundError: ``root`` is not a directory (at construction); a split list is missing (setup).
    """

    def __init__(
        self,
        root: str,
        num_classes: int = 21,
        class_names: list[str] | None = None,
        crop_size: int | None = 320,
        seed: int = 0,
        batch_size: int = 8,
        val_batch_size: int | None = 1,
        num_workers: int = 0,
        train_augmentations: list[dict[str, Any]] | None = None,
        val_augmentations: list[dict[str, Any]] | None = None,
        superpixels: int | None = None,
        edges: bool = False,
        edge_sigma: float = 1.0,
        superpixel_compactness: float = 10.0,
        superpixel_sigma: float = 1.0,
    ) -> None:
        super().__init__(batch_size, val_batch_size, num_workers, seed)
        if not Path(root).is_dir():
            raise FileNotFoundError(f"VOC root folder does not exist: {root}")
        if not 1 <= num_classes <= 255:
            raise ValueError(f"num_classes must be in [1, 255] (255 is the ignore id), got {num_classes}")
        if crop_size is not None and crop_size < 1:
            raise ValueError(f"crop_size must be >= 1 or None, got {crop_size}")
        if superpixels is not None and superpixels < 1:
            raise ValueError(f"superpixels (SLIC n_segments) must be >= 1 or None, got {superpixels}")
        if edge_sigma <= 0:
            raise ValueError(f"edge_sigma must be > 0, got {edge_sigma}")
        if class_names is None:
            if num_classes == len(VOC_CLASS_NAMES):
                class_names = list(VOC_CLASS_NAMES)
            else:
                class_names = [f"class_{i}" for i in range(num_classes)]
        if len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names but num_classes is {num_classes}")
        self.save_hyperparameters()
        self.root = Path(root)
        self.num_classes = num_classes
        self.class_names: list[str] = list(class_names)
        self.crop_size = crop_size
        self.train_augmentations = train_augmentations
        self.val_augmentations = val_augmentations
        self.superpixels = superpixels
        self.edges = edges
        self.edge_sigma = edge_sigma
        self.superpixel_compactness = superpixel_compactness
        self.superpixel_sigma = superpixel_sigma
        # Bad augmentation configs fail at construction, not at the first batch.
        build_augmentations(train_augmentations, where="train_augmentations")
        build_augmentations(val_augmentations, where="val_augmentations")

    def _split_file(self, split: str) -> Path:
        lists = self.root / "ImageSets" / "Segmentation"
        if split == "test" and not (lists / "test.txt").is_file():
            return lists / "val.txt"
        return lists / f"{split}.txt"

    def _make(self, split: str) -> VOCDataset:
        train = split == "train"
        extra: list[A.BasicTransform] = []
        if train and self.crop_size is not None:
            c = self.crop_size
            extra = [
                A.PadIfNeeded(
                    min_height=c, min_width=c, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=IGNORE_INDEX
                ),
                A.RandomCrop(height=c, width=c),
            ]
        return VOCDataset(
            self.root,
            read_split_ids(self._split_file(split)),
            self.num_classes,
            augmentations=self.train_augmentations if train else self.val_augmentations,
            superpixels=self.superpixels,
            edges=self.edges,
            edge_sigma=self.edge_sigma,
            superpixel_compactness=self.superpixel_compactness,
            superpixel_sigma=self.superpixel_sigma,
            seed=self.seed + {"train": 0, "val": 1, "test": 2}[split],
            extra_transforms=extra,
            where="train_augmentations" if train else "val_augmentations",
        )

"""ClassificationTask: a clip (or image) classifier trained and evaluated by Lightning."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from app.models.task_base import BackboneTask

Batch = Mapping[str, Any]


class ClassificationTask(BackboneTask):
    """Classification of clips ``(B, C, T, H, W)`` (MobileNetV2-3D, I3D on ``SyntheticClips``) or images.

    The loss is cross-entropy (with ``label_smoothing``) of ``backbone(image)`` against ``label``.
    Validation and test log top-1 accuracy (``acc``) and, with more than ``top_k`` classes, top-k
    accuracy (``acc_top{k}``), over the whole split.

    Args:
        backbone: ``(B, C, ...) -> (B, num_classes)`` logits, e.g. ``MobileNetV2_3D``.
        num_classes: class count (the CLI links it from the datamodule).
        class_names: names of the classes (linked from the datamodule).
        lr: learning rate.
        weight_decay: AdamW / SGD weight decay.
        optimizer: ``adamw`` or ``sgd`` (momentum 0.9).
        scheduler: ``cosine`` (per step, to zero), ``poly`` (power 0.9, per step) or ``none``.
        label_smoothing: of the cross-entropy.
        top_k: the second accuracy logged (the thesis reports top-1 and top-5).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int = 2,
        class_names: list[str] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        scheduler: Literal["cosine", "poly", "none"] = "cosine",
        label_smoothing: float = 0.0,
        top_k: int = 5,
    ) -> None:
        super().__init__(backbone, num_classes, class_names)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if top_k < 2:
            raise ValueError(f"top_k must be >= 2, got {top_k}")
        self.save_hyperparameters(ignore=["backbone"])
        metrics = {"acc": MulticlassAccuracy(num_classes, average="micro")}
        if num_classes > top_k:
            metrics[f"acc_top{top_k}"] = MulticlassAccuracy(num_classes, top_k=top_k, average="micro")
        self.val_metrics = MetricCollection(metrics, prefix="val/")
        self.test_metrics = self.val_metrics.clone(prefix="test/")

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image: (B, C, T, H, W) -> logits (B, num_classes)."""
        return self.backbone(image)

    def _check_label(self, label: torch.Tensor) -> None:
        if label.dim() != 1:
            raise ValueError(f"label must be (B,) class ids, got shape {tuple(label.shape)}")
        if label.numel() and (int(label.min()) < 0 or int(label.max()) >= self.num_classes):
            raise ValueError(
                f"label contains class ids outside [0, {self.num_classes}); check the datamodule's num_classes"
            )

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        """Scalar training loss of one batch (also used by pruning at initialization)."""
        self._check_label(batch["label"])
        logits = self.backbone(batch["image"])
        return F.cross_entropy(logits, batch["label"], label_smoothing=self.hparams.label_smoothing)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["label"].shape[0])
        return loss

    def _evaluate(self, batch: Batch, stage: str) -> None:
        label = batch["label"]
        self._check_label(label)
        logits = self.backbone(batch["image"])
        batch_size = label.shape[0]
        self.log(f"{stage}/loss", F.cross_entropy(logits, label), sync_dist=True, batch_size=batch_size)
        metrics = getattr(self, f"{stage}_metrics")
        metrics.update(logits, label)
        self.log_dict(metrics, on_epoch=True, prog_bar=stage == "val", batch_size=batch_size)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, torch.Tensor]:
        logits = self.backbone(batch["image"])
        return {"prediction": logits.argmax(1), "probabilities": logits.softmax(1)}

"""SegmentationTask: backbone + optional structured head, trained and evaluated by Lightning, on images
(B, C, H, W) or volumes (B, C, D, H, W)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from app.crf_heads.base import StructuredHead
from app.metrics import EdgeMetrics
from app.models.task_base import BackboneTask

Batch = Mapping[str, Any]


class SegmentationTask(BackboneTask):
    """Semantic segmentation with a swappable structured head.

    ``logits = backbone(image)``; with a head, ``refined = head(logits, batch)``. The loss is
    cross-entropy on the refined logits plus ``aux_loss_weight`` times the cross-entropy of the
    pre-head logits plus the head's own losses (``StructuredHead.forward_with_losses``). With
    ``head_warmup_epochs``, the first epochs of ``fit`` train the backbone alone (the head is skipped, as
    if ``head`` were None) and the head joins after them: the thesis protocol of a trained backbone
    fine-tuned with its head (Sec. 3.6.2.2), in one run. Validation and test log mIoU over the whole split
    (``MulticlassJaccardIndex``) and pixel accuracy, for the final logits and, with a head, for the
    backbone alone (``*_backbone``), and the edge F-measure and performance ratio at 1-5 px (thesis
    Eq. 4.15-4.16).

    Volumes work the same way (the 3D-UNet on ``SyntheticVolumes``): ``image`` (B, C, D, H, W) ->
    logits (B, num_classes, D, H, W), ``mask`` (B, D, H, W); mIoU and accuracy count voxels, the edge
    metrics are 2D only (set ``edge_tolerances: []``) and the W&B panel shows the middle slice.

    Args:
        backbone: image ``(B, 3, H, W)`` -> logits ``(B, num_classes, H, W)``, e.g. ``SMPBackbone``, or
            a volumetric network such as ``UNet3D``.
        head: a ``StructuredHead`` or ``None``.
        num_classes: class count (the CLI links it from the datamodule).
        class_names: names used in logged image panels (linked from the datamodule).
        lr: learning rate of the backbone.
        head_lr: learning rate of the head's parameters (defaults to ``lr``); a head may put parts of
            itself in groups at their own rates (``StructuredHead.param_groups``).
        weight_decay: AdamW / SGD weight decay.
        optimizer: ``adamw`` or ``sgd`` (momentum 0.9).
        scheduler: ``cosine`` (per step, to zero), ``poly`` (power 0.9, per step) or ``none``.
        aux_loss_weight: weight of the auxiliary loss on the pre-head logits (0 turns it off).
        ignore_index: mask value excluded from loss and metrics.
        log_images: how many validation images to log as a W&B panel each epoch (0 turns it off).
        edge_tolerances: pixel tolerances of the edge metrics (empty turns them off).
        freeze_backbone: train the head only (decoupled training, ConvCRF Sec. 5.2): the backbone's
            parameters get no gradient and it stays in eval mode (frozen batch-norm statistics).
        backbone_checkpoint: a Lightning checkpoint of a trained SegmentationTask whose ``backbone.*``
            weights are loaded into ``backbone`` (the unary of decoupled training).
        head_warmup_epochs: epochs of ``fit`` during which the head is skipped (the backbone trains
            alone); 0 uses the head from the first step.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: StructuredHead | None = None,
        num_classes: int = 2,
        class_names: list[str] | None = None,
        lr: float = 1e-3,
        head_lr: float | None = None,
        weight_decay: float = 1e-4,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        scheduler: Literal["cosine", "poly", "none"] = "cosine",
        aux_loss_weight: float = 0.0,
        ignore_index: int = 255,
        log_images: int = 4,
        edge_tolerances: tuple[int, ...] = (1, 2, 3, 4, 5),
        freeze_backbone: bool = False,
        backbone_checkpoint: str | None = None,
        head_warmup_epochs: int = 0,
    ) -> None:
        super().__init__(backbone, num_classes, class_names)
        if head_warmup_epochs < 0:
            raise ValueError(f"head_warmup_epochs must be >= 0, got {head_warmup_epochs}")
        if head is not None:
            head.set_num_classes(num_classes)
        self.save_hyperparameters(ignore=["backbone", "head"])
        if backbone_checkpoint is not None:
            state = torch.load(backbone_checkpoint, map_location="cpu", weights_only=False)["state_dict"]
            backbone.load_state_dict(
                {
                    key.removeprefix("backbone."): value
                    for key, value in state.items()
                    if key.startswith("backbone.")
                }
            )
        if freeze_backbone:  # Lightning keeps each module's mode, train() below keeps it on task.train()
            backbone.requires_grad_(False).eval()
        self.head = head
        self.ignore_index = ignore_index
        metrics = MetricCollection(
            {
                "mIoU": MulticlassJaccardIndex(num_classes, average="macro", ignore_index=ignore_index),
                "pixel_acc": MulticlassAccuracy(num_classes, average="micro", ignore_index=ignore_index),
            }
        )
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.val_edges = EdgeMetrics(num_classes, edge_tolerances, ignore_index) if edge_tolerances else None
        self.test_edges = self.val_edges.clone() if self.val_edges is not None else None
        if head is not None:
            self.val_backbone_metrics = metrics.clone(prefix="val/", postfix="_backbone")
            self.test_backbone_metrics = metrics.clone(prefix="test/", postfix="_backbone")

    def train(self, mode: bool = True) -> SegmentationTask:
        super().train(mode)
        if self.hparams.freeze_backbone:
            self.backbone.eval()
        return self

    # ---- forward and loss -------------------------------------------------------------------------

    def forward(self, image: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        """image: (B, 3, H, W) or (B, C, D, H, W) -> final logits (B, num_classes, H, W) or (..., D, H, W)."""
        return self.predict_logits({"image": image} if batch is None else batch)[0]

    def predict_logits(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(final_logits, backbone_logits)``, both (B, num_classes, H, W)."""
        logits, backbone_logits, _ = self._logits_and_head_losses(batch, with_losses=False)
        return logits, backbone_logits

    def _logits_and_head_losses(
        self, batch: Batch, with_losses: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``predict_logits`` plus the head's own weighted losses (``StructuredHead.forward_with_losses``)."""
        backbone_logits = self.backbone(batch["image"])
        if self.head is None or self.in_head_warmup():
            return backbone_logits, backbone_logits, {}
        self.head.check_batch(batch)
        if not with_losses:
            return self.head(backbone_logits, batch), backbone_logits, {}
        logits, head_losses = self.head.forward_with_losses(backbone_logits, batch)
        return logits, backbone_logits, head_losses

    def in_head_warmup(self) -> bool:
        """True during the first ``head_warmup_epochs`` epochs of ``fit`` (the head is skipped)."""
        if self._trainer is None or self.trainer.state.fn != TrainerFn.FITTING:
            return False
        return self.current_epoch < self.hparams.head_warmup_epochs

    def _check_mask(self, mask: torch.Tensor) -> None:
        valid = mask[mask != self.ignore_index]
        if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= self.num_classes):
            bad = torch.unique(valid[(valid < 0) | (valid >= self.num_classes)]).tolist()
            raise ValueError(
                f"mask contains class ids {bad} outside [0, {self.num_classes}) "
                f"(ignore index {self.ignore_index}); check the datamodule's num_classes"
            )

    def _loss(
        self,
        logits: torch.Tensor,
        backbone_logits: torch.Tensor,
        mask: torch.Tensor,
        head_losses: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        loss = F.cross_entropy(logits, mask, ignore_index=self.ignore_index)
        if self.head is not None and self.hparams.aux_loss_weight > 0 and not self.in_head_warmup():
            aux = F.cross_entropy(backbone_logits, mask, ignore_index=self.ignore_index)
            loss = loss + self.hparams.aux_loss_weight * aux
        for head_loss in (head_losses or {}).values():
            loss = loss + head_loss
        return loss

    def _training_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self._check_mask(batch["mask"])
        logits, backbone_logits, head_losses = self._logits_and_head_losses(batch)
        return self._loss(logits, backbone_logits, batch["mask"], head_losses), head_losses

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        """Scalar training loss of one batch (also used by pruning at initialization)."""
        return self._training_loss(batch)[0]

    # ---- steps --------------------------------------------------------------------------------------

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss, head_losses = self._training_loss(batch)
        batch_size = batch["image"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        for name, value in head_losses.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
        return loss

    def _evaluate(self, batch: Batch, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        mask = batch["mask"]
        self._check_mask(mask)
        logits, backbone_logits, head_losses = self._logits_and_head_losses(batch)
        batch_size = mask.shape[0]
        loss = self._loss(logits, backbone_logits, mask, head_losses)
        self.log(f"{stage}/loss", loss, sync_dist=True, batch_size=batch_size)
        metrics = getattr(self, f"{stage}_metrics")
        metrics.update(logits, mask)
        self.log_dict(metrics, on_epoch=True, prog_bar=stage == "val", batch_size=batch_size)
        if self.head is not None:
            backbone_metrics = getattr(self, f"{stage}_backbone_metrics")
            backbone_metrics.update(backbone_logits, mask)
            self.log_dict(backbone_metrics, on_epoch=True, batch_size=batch_size)
        edges = getattr(self, f"{stage}_edges")
        if edges is not None:
            if mask.dim() != 3:
                raise ValueError(
                    f"edge metrics need 2D masks (B, H, W), got {tuple(mask.shape)}: "
                    "set edge_tolerances: [] for volumes"
                )
            edges.update(logits.argmax(1), mask)
        return logits, backbone_logits

    def _log_edges(self, stage: str) -> None:
        edges = getattr(self, f"{stage}_edges")
        if edges is not None:
            scores = edges.compute()  # synced across processes by torchmetrics
            self.log_dict({f"{stage}/{name}": value for name, value in scores.items()})
            edges.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_edges("val")

    def on_test_epoch_end(self) -> None:
        self._log_edges("test")

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        logits, backbone_logits = self._evaluate(batch, "val")
        if batch_idx == 0 and self.hparams.log_images > 0:
            self._log_examples(batch, logits, backbone_logits)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, torch.Tensor]:
        logits, _ = self.predict_logits(batch)
        return {"prediction": logits.argmax(1), "probabilities": logits.softmax(1)}

    # ---- optimisation -------------------------------------------------------------------------------

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The backbone at ``lr`` and the head's parameters at ``head_lr`` (default ``lr``)."""
        groups = super().parameter_groups()
        if self.head is not None:
            hp = self.hparams
            groups += self.head.param_groups(hp.head_lr if hp.head_lr is not None else hp.lr)
        return groups

    # ---- logging ------------------------------------------------------------------------------------

    def _log_examples(self, batch: Batch, logits: torch.Tensor, backbone_logits: torch.Tensor) -> None:
        """A W&B panel per validation epoch: image with ground truth, prediction and pre-head masks."""
        loggers = [logger for logger in self.loggers if isinstance(logger, WandbLogger)]
        if not loggers or self.trainer.sanity_checking:
            return
        count = min(self.hparams.log_images, logits.shape[0])
        raw = batch.get("image_raw")
        images = raw[:count] if raw is not None else batch["image"][:count]
        mask = batch["mask"]
        if mask.dim() == 4:  # volumes: the middle slice
            middle = mask.shape[1] // 2
            images, mask = images[:, :, middle], mask[:, middle]
            logits, backbone_logits = logits[:, :, middle], backbone_logits[:, :, middle]
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        labels = dict(enumerate(self.class_names))
        labels[self.ignore_index] = "ignore"
        masks = []
        for i in range(count):
            layers = {
                "ground_truth": mask[i],
                "prediction": logits[i].argmax(0),
            }
            if self.head is not None:
                layers["prediction_before_head"] = backbone_logits[i].argmax(0)
            masks.append(
                {name: {"mask_data": m.cpu().numpy(), "class_labels": labels} for name, m in layers.items()}
            )
        pictures = [
            (image.float().clamp(0, 1) * 255).byte().permute(1, 2, 0).cpu().numpy() for image in images
        ]
        for logger in loggers:
            logger.log_image(key="val/examples", images=pictures, masks=masks)

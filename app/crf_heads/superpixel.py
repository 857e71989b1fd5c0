"""Superpixel refinement (thesis Ch. 4, Fig. 4.2): logit consistency over superpixels from SLIC or from a
superpixel FCN, optionally after transparent-init fusion layers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from app.crf_heads.base import HEADS, StructuredHead
from app.models.superpixel_fcn import SuperpixelFCN, hard_superpixels, soft_superpixel_mean, superpixel_loss
from app.models.transparent_init import TransparentLayers
from app.ops import segment_mean


@HEADS.register("logit_consistency")
class LogitConsistency(StructuredHead):
    """+SP: every pixel of a superpixel gets the superpixel's mean logit (Eq. 4.13, ``app.ops.segment_mean``).

    The superpixels come from the batch (``superpixels``, SLIC from the datamodule) when
    ``superpixel_fcn`` is None, else from the hard map (argmax of Q) of the superpixel FCN run on
    ``batch["image"]``. The hard map carries no gradient; a trainable FCN learns from its own loss
    (Eq. 4.1-4.2, weighted by ``superpixel_loss_weight``, returned by :meth:`forward_with_losses`) and,
    in :class:`SuperpixelFusion`, from the segmentation loss through its soft association.

    Args:
        superpixel_fcn: a :class:`~app.models.superpixel_fcn.SuperpixelFCN`, or None for SLIC from the batch.
        fcn_checkpoint: a ``state_dict`` file (``torch.save``) of the FCN, e.g. pretrained on the dataset.
        train_fcn: fine-tune the FCN (otherwise frozen, in eval mode).
        fcn_lr: learning rate of the FCN (default: the task's ``head_lr``).
        superpixel_loss_weight: weight of the FCN's loss in the training loss (0 turns it off).
        superpixel_property: what the FCN loss reconstructs: ``labels`` (cross-entropy on one-hot
            ``batch["mask"]``, ignored pixels excluded) or ``colour`` (L2 on ``batch["image_raw"]``).
        compactness: m of the position term m/S (Eq. 4.1).

    Shape: logits ``(B, C, H, W)`` -> ``(B, C, H, W)``, constant over each superpixel.
    """

    def __init__(
        self,
        superpixel_fcn: SuperpixelFCN | None = None,
        fcn_checkpoint: str | None = None,
        train_fcn: bool = True,
        fcn_lr: float | None = None,
        superpixel_loss_weight: float = 0.0,
        superpixel_property: Literal["labels", "colour"] = "labels",
        compactness: float = 0.003,
    ) -> None:
        super().__init__()
        if superpixel_fcn is None and fcn_checkpoint is not None:
            raise ValueError("fcn_checkpoint needs a superpixel_fcn to load into")
        if superpixel_property not in ("labels", "colour"):
            raise ValueError(f"superpixel_property must be 'labels' or 'colour', got {superpixel_property!r}")
        if superpixel_loss_weight < 0:
            raise ValueError(f"superpixel_loss_weight must be >= 0, got {superpixel_loss_weight}")
        if fcn_lr is not None and fcn_lr < 0:
            raise ValueError(f"fcn_lr must be >= 0, got {fcn_lr}")
        if superpixel_fcn is not None and fcn_checkpoint is not None:
            superpixel_fcn.load_state_dict(torch.load(fcn_checkpoint, map_location="cpu", weights_only=True))
        self.superpixel_fcn = superpixel_fcn
        self.train_fcn = train_fcn and superpixel_fcn is not None
        if superpixel_fcn is not None and not train_fcn:
            superpixel_fcn.requires_grad_(False).eval()
        self.fcn_lr = fcn_lr
        self.superpixel_loss_weight = superpixel_loss_weight
        self.superpixel_property = superpixel_property
        self.compactness = compactness
        self.required_keys = ("superpixels",) if superpixel_fcn is None else ()

    def train(self, mode: bool = True) -> LogitConsistency:
        super().train(mode)
        if self.superpixel_fcn is not None and not self.train_fcn:
            self.superpixel_fcn.eval()  # a frozen FCN keeps its batch-norm statistics
        return self

    def _check_logits(self, logits: torch.Tensor) -> None:
        if not isinstance(logits, torch.Tensor) or logits.dim() != 4 or not logits.is_floating_point():
            raise ValueError(
                f"logits must be a floating (B, C, H, W) tensor, got {getattr(logits, 'dtype', type(logits))} "
                f"{tuple(getattr(logits, 'shape', ()))}"
            )

    def superpixels(
        self, logits: torch.Tensor, batch: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None, int | None]:
        """``(ids (B, H, W), association Q (B, 9, H, W) or None for SLIC, id bound or None)``."""
        if self.superpixel_fcn is None:
            segments = batch["superpixels"]
            if not isinstance(segments, torch.Tensor) or segments.shape != (
                logits.shape[0],
                *logits.shape[2:],
            ):
                raise ValueError(
                    f"batch['superpixels'] must be (B, H, W) = {(logits.shape[0], *logits.shape[2:])}, "
                    f"got {tuple(getattr(segments, 'shape', ()))}"
                )
            return segments, None, None
        image = batch["image"]
        if image.shape[0] != logits.shape[0] or image.shape[2:] != logits.shape[2:]:
            raise ValueError(
                f"batch['image'] {tuple(image.shape)} and logits {tuple(logits.shape)} differ in batch or size"
            )
        association = self.superpixel_fcn(image)
        segments = hard_superpixels(association, self.superpixel_fcn.cell_size)
        return segments, association, self.superpixel_fcn.num_superpixels(*logits.shape[2:])

    def refine(
        self, logits: torch.Tensor, batch: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(refined logits, association or None)``."""
        self._check_logits(logits)
        segments, association, bound = self.superpixels(logits, batch)
        return segment_mean(logits, segments, bound), association

    def forward(self, logits: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        return self.refine(logits, batch)[0]

    def forward_with_losses(
        self, logits: torch.Tensor, batch: Mapping[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Refined logits and ``{"superpixel_loss": weight * (property + position)}`` for a trained FCN."""
        refined, association = self.refine(logits, batch)
        if association is None or not self.train_fcn or self.superpixel_loss_weight == 0:
            return refined, {}
        if self.superpixel_property == "labels":
            mask = batch["mask"]
            valid = (mask >= 0) & (mask < logits.shape[1])
            properties = F.one_hot(mask.clamp(0, logits.shape[1] - 1), logits.shape[1])
            properties = properties.permute(0, 3, 1, 2).to(association.dtype) * valid[:, None]
            property_loss = "cross_entropy"
        else:
            properties, valid, property_loss = batch["image_raw"].to(association.dtype), None, "l2"
        property_term, position_term = superpixel_loss(
            association, properties, self.superpixel_fcn.cell_size, self.compactness, property_loss, valid
        )
        return refined, {"superpixel_loss": self.superpixel_loss_weight * (property_term + position_term)}

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """The FCN's trainable parameters at ``fcn_lr`` (default ``lr``), the rest at ``lr``."""
        fcn_params = set()
        groups = []
        if self.superpixel_fcn is not None:
            fcn_params = {id(p) for p in self.superpixel_fcn.parameters()}
            trainable = [p for p in self.superpixel_fcn.parameters() if p.requires_grad]
            if trainable:
                groups.append({"params": trainable, "lr": self.fcn_lr if self.fcn_lr is not None else lr})
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in fcn_params]
        if rest:
            groups.append({"params": rest, "lr": lr})
        return groups


@HEADS.register("superpixel_fusion")
class SuperpixelFusion(LogitConsistency):
    """+SP +TI (Fig. 4.2): logits and superpixel-pooled logits through transparent-init 1x1 layers, then
    logit consistency.

    The fusion input is ``[logits, pooled]`` (2C channels), where ``pooled`` carries the superpixel
    information: with the FCN, the logits pooled into its soft superpixels and spread back with Q
    (Eq. 4.2 with f = logits, differentiable in Q, so the segmentation loss reaches the FCN); with SLIC,
    ``segment_mean(logits)``. The k = ``len(hidden_features) + 1`` transparent layers map the 2C channels
    to themselves and are the identity at initialization (Sec. 4.3.2); their first C output channels go
    through logit consistency. At initialization the head therefore outputs
    ``segment_mean(logits, superpixels)`` exactly (up to float rounding), the +SP result, and fine-tuning
    starts from there. The thesis fine-tunes at 1e-6 (networks) and 1e-7 (TI layers); the task's
    ``head_lr`` sets the TI layers' rate, ``fcn_lr`` the FCN's.

    Args:
        hidden_features: widths of the hidden transparent layers, each >= 2C (Theorem 1).
        activation: activation between the transparent layers (``relu``, ``leaky_relu``, ``softplus``,
            ``log_sigmoid`` or None).
        seed: seed of the transparent layers' random weights.

    The other arguments are those of :class:`LogitConsistency`.
    """

    def __init__(
        self,
        superpixel_fcn: SuperpixelFCN | None = None,
        fcn_checkpoint: str | None = None,
        train_fcn: bool = True,
        fcn_lr: float | None = None,
        superpixel_loss_weight: float = 0.0,
        superpixel_property: Literal["labels", "colour"] = "labels",
        compactness: float = 0.003,
        hidden_features: Sequence[int] = (32, 32),
        activation: str | None = "relu",
        seed: int = 0,
    ) -> None:
        super().__init__(
            superpixel_fcn,
            fcn_checkpoint,
            train_fcn,
            fcn_lr,
            superpixel_loss_weight,
            superpixel_property,
            compactness,
        )
        self.hidden_features = tuple(hidden_features)
        self.activation = activation
        self.seed = seed
        self.transparent: TransparentLayers | None = None

    def set_num_classes(self, num_classes: int) -> None:
        super().set_num_classes(num_classes)
        self.transparent = TransparentLayers(
            2 * num_classes, self.hidden_features, self.activation, layer_type="conv1x1", seed=self.seed
        )

    def refine(
        self, logits: torch.Tensor, batch: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._check_logits(logits)
        if self.transparent is None:
            raise ValueError("SuperpixelFusion needs set_num_classes(num_classes) before its first call")
        classes = logits.shape[1]
        if 2 * classes != self.transparent.in_features:
            raise ValueError(
                f"logits have {classes} channels, the head was built for {self.transparent.in_features // 2}"
            )
        segments, association, bound = self.superpixels(logits, batch)
        if association is None:
            pooled = segment_mean(logits, segments)
        else:
            pooled = soft_superpixel_mean(logits, association, self.superpixel_fcn.cell_size)
        fused = self.transparent(torch.cat([logits, pooled], 1))[:, :classes]
        return segment_mean(fused, segments, bound), association

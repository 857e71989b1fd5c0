"""What every task shares: a backbone that predicts ``num_classes``, the optimiser and its schedule, and
the rebuild of a RANP-pruned backbone before a checkpoint's weights are loaded."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import nn

from app.pruning.callback import restore_channel_spec
from app.pruning.fast_conv import fast_conv_weight_grad

OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", "poly", "none")


class BackboneTask(LightningModule):
    """Base of the tasks. Subclasses call ``save_hyperparameters`` with ``lr``, ``weight_decay``,
    ``optimizer`` (``adamw`` or ``sgd`` with momentum 0.9) and ``scheduler`` (``cosine`` or ``poly``
    power 0.9, both per step to zero, or ``none``), and implement ``compute_loss(batch)`` (the training
    loss, also used by the RANP callback).

    Args:
        backbone: the network; when it has a ``num_classes`` attribute it must equal ``num_classes``.
        num_classes: class count (the CLI links it from the datamodule).
        class_names: names of the classes (linked from the datamodule); default ``class i``.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, class_names: list[str] | None) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        backbone_classes = getattr(backbone, "num_classes", num_classes)
        if backbone_classes != num_classes:
            raise ValueError(f"backbone predicts {backbone_classes} classes but num_classes is {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for {num_classes} classes")
        self.backbone = backbone
        self.num_classes = num_classes
        self.class_names = list(class_names or [f"class {i}" for i in range(num_classes)])

    def compute_loss(self, batch: Any) -> torch.Tensor:
        """Scalar training loss of one batch."""
        raise NotImplementedError

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimiser parameter groups: the trainable backbone parameters at ``lr``."""
        return [{"params": [p for p in self.backbone.parameters() if p.requires_grad], "lr": self.hparams.lr}]

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        if hp.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {hp.optimizer!r}")
        if hp.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {hp.scheduler!r}")
        groups = [group for group in self.parameter_groups() if group["params"]]
        if not groups:
            raise ValueError(f"{type(self).__name__} has no trainable parameters")
        if hp.optimizer == "adamw":
            optimizer = torch.optim.AdamW(groups, weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.SGD(groups, momentum=0.9, weight_decay=hp.weight_decay)
        if hp.scheduler == "none":
            return {"optimizer": optimizer}
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        if hp.scheduler == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
        else:
            scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=total_steps, power=0.9)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        """From here to the end of training, the backbone's 3D convolutions on a CPU without AVX-512 take
        their weight gradients as forward convolutions (:func:`~app.pruning.fast_conv_weight_grad`: the
        same values, several times faster than oneDNN's im2col + GEMM weight pass there; 2D layers,
        AVX-512 CPUs and GPUs keep PyTorch's backward)."""
        self._fast_weight_grads = contextlib.ExitStack()
        self._fast_weight_grads.enter_context(fast_conv_weight_grad(self.backbone))

    def on_train_end(self) -> None:
        self._fast_weight_grads.close()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild a RANP-pruned backbone's slim structure before its weights are loaded."""
        restore_channel_spec(self.backbone, checkpoint)

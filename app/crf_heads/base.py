"""The structured-head interface: logits in, logits out, guidance read from the batch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from app.registry import Registry

HEADS: Registry[StructuredHead] = Registry("head")


class StructuredHead(nn.Module):
    """Base class of every structured head.

    A head refines segmentation logits ``(B, C, H, W)`` into logits of the same shape. Guidance such as
    the raw image, superpixels or edges is read from the batch dict; ``required_keys`` names the keys a
    head needs so the task and the datamodule can check for them before the first step.
    Message-passing heads turn logits into unary costs by negation and return the negated final costs.
    """

    required_keys: tuple[str, ...] = ()

    def set_num_classes(self, num_classes: int) -> None:
        """Called once by the task with the dataset's class count, before any optimizer exists.

        Heads whose parameters depend on the class count (a learnable compatibility matrix, ...) build
        them here; the default only validates the count.
        """
        if num_classes < 2:
            raise ValueError(f"a structured head needs num_classes >= 2, got {num_classes}")

    def forward(self, logits: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def forward_with_losses(
        self, logits: torch.Tensor, batch: Mapping[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Refined logits and the head's own training losses, already weighted, by name.

        The task adds every loss to its objective and logs it as ``train/<name>``. Heads with a loss of
        their own (the superpixel FCN's) override this; the default has none.
        """
        return self(logits, batch), {}

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups of the head's trainable parameters.

        ``lr`` is the task's ``head_lr``; heads that train parts at their own rates (a superpixel network
        inside the head) override this. The default is one group at ``lr``.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr}] if params else []

    def check_batch(self, batch: Mapping[str, Any]) -> None:
        """Raise a ``KeyError`` naming the guidance keys this head needs but the batch lacks."""
        missing = [key for key in self.required_keys if key not in batch]
        if missing:
            raise KeyError(
                f"{type(self).__name__} needs batch keys {missing}; enable them in the datamodule "
                f"(batch has {sorted(batch)})"
            )


def create_head(name: str, **kwargs: Any) -> StructuredHead:
    """Build a registered head by its short name, e.g. ``create_head("trwp", num_classes=21)``."""
    return HEADS.create(name, **kwargs)

"""Lightning callback: RANP pruning of ``pl_module.backbone`` before training (thesis Fig. 5.2).

The callback prunes in ``setup(stage="fit")``, before any optimizer exists, with
``pl_module.compute_loss(batch)`` as the loss on ``n_batches`` batches of
``trainer.datamodule.train_dataloader()`` drawn under a fixed seed. The selection is broadcast from
rank 0, so every rank builds the same slim network. The channel spec of the pruned module is stored in
every checkpoint under ``"ranp_channel_spec"``; a task rebuilds the slim structure in
``on_load_checkpoint`` with :func:`restore_channel_spec` before the state dict is loaded.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import move_data_to_device, rank_zero_info
from torch import nn

from app.pruning.api import (
    PruningReport,
    _check_options,
    _check_sparsity,
    analyze_model,
    apply_selection,
    select_checked,
)
from app.pruning.surgery import INITS, apply_channel_spec, channel_spec

__all__ = ["CHECKPOINT_KEY", "RANP", "restore_channel_spec"]

CHECKPOINT_KEY = "ranp_channel_spec"


def restore_channel_spec(module: nn.Module, checkpoint: Mapping[str, Any]) -> bool:
    """Give ``module`` the pruned structure stored in ``checkpoint`` (call from ``on_load_checkpoint``).

    Returns:
        Whether the checkpoint had a RANP channel spec.
    """
    spec = checkpoint.get(CHECKPOINT_KEY)
    if spec is None:
        return False
    apply_channel_spec(module, spec)
    return True


class RANP(Callback):
    """Prune ``pl_module.<module>`` at initialization with RANP or a baseline.

    Args:
        sparsity: neuron sparsity in [0, 1) (parameter sparsity for ``snip``); ``None``: the largest
            feasible one (Alg. 6).
        method: ``ranp_f``, ``ranp_m``, ``vanilla``, ``weighted``, ``random``, ``layerwise`` or ``snip``.
        importance: ``mpmg`` or ``mnmg``.
        reduction: ``sum``, ``mean`` or ``max``.
        lam: lambda of Eq. (5.10).
        n_batches: training batches used for the importance (Alg. 5).
        ignored_layers: module names (relative to the pruned module) whose neurons are kept.
        init: ``glorot`` (re-initialise the slim network) or ``keep``.
        on_empty_layer: ``raise`` or ``keep_top``.
        seed: seeds the batches drawn, random NP and the re-initialisation.
        module: attribute of the LightningModule to prune.
    """

    def __init__(
        self,
        sparsity: float | None = 0.5,
        method: str = "ranp_f",
        importance: str = "mpmg",
        reduction: str = "sum",
        lam: float = 11.0,
        n_batches: int = 4,
        ignored_layers: list[str] | None = None,
        init: str = "glorot",
        on_empty_layer: str = "raise",
        seed: int = 0,
        module: str = "backbone",
    ) -> None:
        super().__init__()
        _check_options(method, importance, reduction, lam, on_empty_layer)
        _check_sparsity(sparsity)
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if n_batches < 1:
            raise ValueError(f"n_batches must be >= 1, got {n_batches}")
        self.sparsity = sparsity
        self.method = method
        self.importance = importance
        self.reduction = reduction
        self.lam = lam
        self.n_batches = n_batches
        self.ignored_layers = list(ignored_layers or [])
        self.init = init
        self.on_empty_layer = on_empty_layer
        self.seed = seed
        self.module = module
        self.report: PruningReport | None = None

    def _target(self, pl_module: pl.LightningModule) -> nn.Module:
        target = getattr(pl_module, self.module, None)
        if not isinstance(target, nn.Module):
            raise ValueError(
                f"RANP prunes pl_module.{self.module}, but the LightningModule has no such module"
            )
        if not callable(getattr(pl_module, "compute_loss", None)):
            raise ValueError("RANP needs pl_module.compute_loss(batch) -> scalar loss")
        return target

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.report is not None:
            return
        target = self._target(pl_module)
        if trainer.datamodule is None:
            raise ValueError(
                "RANP draws its batches from trainer.datamodule.train_dataloader(); fit with a datamodule"
            )
        device = trainer.strategy.root_device
        original = next(itertools.chain(pl_module.parameters(), [torch.empty(0)])).device
        cuda = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(self.seed)
            loader = trainer.datamodule.train_dataloader()
            batches = [move_data_to_device(b, device) for b in itertools.islice(loader, self.n_batches)]
            pl_module.to(device)
            try:
                analysis = analyze_model(
                    target,
                    batches,
                    lambda m, b: pl_module.compute_loss(b),
                    self.n_batches,
                    self.ignored_layers,
                    progress=trainer.is_global_zero and trainer.progress_bar_callback is not None,
                )
                selection, max_sparsity = select_checked(
                    analysis,
                    self.method,
                    self.sparsity,
                    self.importance,
                    self.reduction,
                    self.lam,
                    self.seed,
                    self.on_empty_layer,
                )
                selection = trainer.strategy.broadcast(selection, src=0)
                torch.manual_seed(self.seed)
                report = apply_selection(target, analysis, selection, self.init)
            finally:
                pl_module.to(original)
        report.max_sparsity = max_sparsity
        self.report = report
        self._log(trainer, report)

    def _log(self, trainer: pl.Trainer, report: PruningReport) -> None:
        rank_zero_info(report.markdown())
        before, after, reduction = report.before.totals(), report.after.totals(), report.reductions()
        metrics = {"ranp/sparsity": report.sparsity}
        for key in ("params_mb", "gflops", "memory_mb"):
            metrics[f"ranp/{key}_full"] = before[key]
            metrics[f"ranp/{key}_pruned"] = after[key]
        metrics.update({f"ranp/{key}_reduction_pct": value for key, value in reduction.items()})
        rows = [[name, kept, total, kept / total] for name, (kept, total) in report.kept.items()]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=0)
            if hasattr(logger, "log_table"):  # W&B: table and neuron distribution plot (Fig. 5.3, 5.13)
                logger.log_table(
                    key="ranp/layers", columns=["layer", "kept", "total", "kept_ratio"], data=rows
                )
                self._log_wandb_plot(logger, rows)

    @staticmethod
    def _log_wandb_plot(logger: Any, rows: list[list[Any]]) -> None:
        import wandb

        table = wandb.Table(columns=["layer", "kept", "total", "kept_ratio"], data=rows)
        plot = wandb.plot.bar(table, "layer", "kept_ratio", title="RANP: retained neurons per layer")
        logger.experiment.log({"ranp/neuron_distribution": plot})

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        target = getattr(pl_module, self.module, None)
        if isinstance(target, nn.Module):
            checkpoint[CHECKPOINT_KEY] = channel_spec(target)

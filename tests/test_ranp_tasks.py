"""The RANP configs end to end: `lightning fit` on the 3D-UNet (volumes) and MobileNetV2-3D (clips) with
the RANP callback, then the checkpoint reloads into the slim network (CLI validate, load_from_checkpoint)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from app.cli import build_cli
from app.datamodules import SyntheticClips, SyntheticVolumes
from app.models import ClassificationTask, MobileNetV2_3D, SegmentationTask, UNet3D
from app.pruning.callback import CHECKPOINT_KEY
from app.pruning.surgery import channel_spec

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "ranp_unet3d": (
        {"base_width": 4},
        {"volume_size": 16, "n_train": 4, "n_val": 2, "n_test": 2, "batch_size": 2},
        "val/mIoU",
    ),
    "ranp_mobilenet3d": (
        {"width_mult": 0.25, "last_channel": 32},
        {"frames": 4, "frame_size": 16, "n_train": 8, "n_val": 4, "n_test": 4, "batch_size": 4},
        "val/acc",
    ),
}


def tiny_config(tmp_path: Path, name: str) -> Path:
    """The shipped config with a CPU-tiny network and data, a CSV logger and no progress bar."""
    config = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    backbone, data, monitor = TINY[name]
    config["model"]["init_args"]["backbone"]["init_args"].update(backbone)
    config["data"]["init_args"].update(data)
    trainer = config["trainer"]
    trainer.update(
        accelerator="cpu",
        max_epochs=1,
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        logger={
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(tmp_path), "name": name},
        },
    )
    callbacks = [c for c in trainer["callbacks"] if not c["class_path"].endswith("RichProgressBar")]
    for callback in callbacks:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["dirpath"] = str(tmp_path / "ckpt")
            assert callback["init_args"]["monitor"] == monitor
        if callback["class_path"].endswith("RANP"):
            callback["init_args"]["sparsity"] = 0.4  # the tiny networks have few neurons per layer
    trainer["callbacks"] = callbacks
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("name", ["ranp_unet3d", "ranp_mobilenet3d"])
def test_ranp_config_fits_and_the_checkpoint_reloads_slim(tmp_path, name):
    config = tiny_config(tmp_path, name)
    fitted = build_cli(["fit", "--config", str(config)])
    task = fitted.model
    (ranp,) = [c for c in fitted.trainer.callbacks if type(c).__name__ == "RANP"]
    assert ranp.report is not None
    reductions = ranp.report.reductions()
    assert reductions["flops"] > 0 and reductions["memory"] > 0
    slim = sum(p.numel() for p in task.backbone.parameters())
    assert slim == ranp.report.after.params < ranp.report.before.params

    path = tmp_path / "ckpt" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint[CHECKPOINT_KEY] == channel_spec(task.backbone)

    # the CLI builds the full network from the config; the checkpoint's channel spec makes it slim again
    validated = build_cli(["validate", "--config", str(config), "--ckpt_path", str(path)])
    assert sum(p.numel() for p in validated.model.backbone.parameters()) == slim
    metric = TINY[name][2]
    assert 0.0 <= float(validated.trainer.callback_metrics[metric]) <= 1.0

    if name == "ranp_unet3d":
        full = UNet3D(1, 4, 15, base_width=4)
        loaded = SegmentationTask.load_from_checkpoint(path, backbone=full)
        x = torch.randn(1, 1, 16, 16, 16)
    else:
        full = MobileNetV2_3D(8, width_mult=0.25, last_channel=32, temporal_strides=1)  # as the config
        loaded = ClassificationTask.load_from_checkpoint(path, backbone=full)
        x = torch.randn(1, 3, 4, 16, 16)
    assert channel_spec(loaded.backbone) == checkpoint[CHECKPOINT_KEY]
    trained = SegmentationTask if name == "ranp_unet3d" else ClassificationTask
    reference = trained.load_from_checkpoint(path, backbone=task.backbone)
    with torch.no_grad():
        torch.testing.assert_close(loaded.backbone.eval()(x), reference.backbone.eval()(x))


def test_classification_task_metrics_and_bad_labels():
    data = SyntheticClips(num_classes=8, frames=4, frame_size=16, n_train=4, n_val=4, batch_size=4)
    task = ClassificationTask(MobileNetV2_3D(8, width_mult=0.25, last_channel=16), num_classes=8)
    batch = next(iter(data.train_dataloader()))
    loss = task.compute_loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert set(task.val_metrics.keys()) == {"val/acc", "val/acc_top5"}
    with pytest.raises(ValueError, match="outside"):
        task.compute_loss({**batch, "label": batch["label"] + 8})
    with pytest.raises(ValueError, match="backbone predicts 8 classes"):
        ClassificationTask(MobileNetV2_3D(8, width_mult=0.25), num_classes=5)
    with pytest.raises(ValueError, match="label_smoothing"):
        ClassificationTask(MobileNetV2_3D(8, width_mult=0.25), num_classes=8, label_smoothing=1.0)


def test_segmentation_task_on_volumes():
    data = SyntheticVolumes(num_classes=3, volume_size=16, n_train=2, n_val=2, batch_size=2)
    assert data.class_names == ["background", "ellipsoid 1", "box 2"]
    task = SegmentationTask(UNet3D(1, 3, 7, base_width=4), num_classes=3, edge_tolerances=())
    batch = next(iter(data.train_dataloader()))
    assert task(batch["image"]).shape == (2, 3, 16, 16, 16)
    assert torch.isfinite(task.compute_loss(batch))
    with_edges = SegmentationTask(UNet3D(1, 3, 7, base_width=4), num_classes=3)
    with pytest.raises(ValueError, match="edge_tolerances"):
        with_edges._evaluate(batch, "val")


def test_training_routes_3d_weight_gradients_through_forward_convolutions(tmp_path, monkeypatch):
    from lightning.pytorch import Callback, Trainer

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")  # where the formula is used

    seen = []

    class Probe(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append("_conv_forward" in vars(pl_module.backbone.head))

    data = SyntheticVolumes(num_classes=3, volume_size=16, n_train=4, n_val=2, batch_size=2)
    task = SegmentationTask(UNet3D(1, 3, 7, base_width=4), num_classes=3, edge_tolerances=())
    trainer = Trainer(
        accelerator="cpu", max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[Probe()], default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(task, datamodule=data)
    assert seen == [True, True]
    assert not any("_conv_forward" in vars(m) for m in task.backbone.modules())

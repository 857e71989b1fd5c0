import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch import nn

from app.crf_heads import StructuredHead
from app.models import SegmentationTask, SMPBackbone, create_backbone
from app.models.backbones import BACKBONES, SMP_ARCHITECTURES


class ConvBackbone(nn.Module):
    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, num_classes, 1))

    def forward(self, image):
        return self.net(image)


class ScaleHead(StructuredHead):
    required_keys = ("image_raw",)

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, logits, batch):
        return logits * self.scale


def make_batch(batch_size=2, num_classes=3, size=16):
    image = torch.randn(batch_size, 3, size, size)
    return {
        "image": image,
        "image_raw": image.sigmoid(),
        "mask": torch.randint(0, num_classes, (batch_size, size, size)),
    }


def test_smp_backbone_any_size_and_registry():
    names = BACKBONES.names()
    assert {"smp:Unet", "smp:DeepLabV3Plus", "smp:FPN"} <= set(names)
    assert len([n for n in names if n.startswith("smp:")]) == len(SMP_ARCHITECTURES)
    backbone = create_backbone("smp:FPN", num_classes=5, encoder_name="resnet18")
    assert isinstance(backbone, SMPBackbone)
    assert backbone(torch.randn(2, 3, 45, 70)).shape == (2, 5, 45, 70)


def test_timm_encoder_through_tu_prefix():
    backbone = SMPBackbone("Unet", encoder_name="tu-mobilenetv3_small_050", num_classes=3)
    assert backbone(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def test_unknown_architecture_names_the_choices():
    with pytest.raises(ValueError, match="unknown SMP architecture 'Unett'.*DeepLabV3Plus"):
        SMPBackbone("Unett")


def test_unknown_registry_name():
    with pytest.raises(ValueError, match="unknown backbone 'smp:Nope'"):
        create_backbone("smp:Nope", num_classes=2)


def test_loss_includes_auxiliary_term_with_head():
    batch = make_batch()
    torch.manual_seed(0)
    without = SegmentationTask(ConvBackbone(), head=ScaleHead(), num_classes=3, aux_loss_weight=0.0)
    torch.manual_seed(0)
    with_aux = SegmentationTask(ConvBackbone(), head=ScaleHead(), num_classes=3, aux_loss_weight=0.5)
    logits, backbone_logits = with_aux.predict_logits(batch)
    torch.testing.assert_close(logits, 2 * backbone_logits)
    aux = nn.functional.cross_entropy(backbone_logits, batch["mask"])
    torch.testing.assert_close(with_aux.compute_loss(batch), without.compute_loss(batch) + 0.5 * aux)


def test_ignore_index_is_excluded_from_loss():
    task = SegmentationTask(ConvBackbone(), num_classes=3)
    batch = make_batch()
    reference = task.compute_loss(batch)
    batch["mask"][:, :4] = 255
    assert not torch.isclose(task.compute_loss(batch), reference)
    assert torch.isfinite(task.compute_loss(batch))


def test_head_without_its_guidance_names_the_key():
    task = SegmentationTask(ConvBackbone(), head=ScaleHead(), num_classes=3)
    batch = make_batch()
    del batch["image_raw"]
    with pytest.raises(KeyError, match="image_raw"):
        task.compute_loss(batch)


def test_mask_with_class_id_out_of_range():
    task = SegmentationTask(ConvBackbone(), num_classes=3)
    batch = make_batch()
    batch["mask"][0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"class ids \[7\] outside \[0, 3\)"):
        task.compute_loss(batch)


def test_class_count_mismatch():
    with pytest.raises(ValueError, match="backbone predicts 3 classes but num_classes is 4"):
        SegmentationTask(ConvBackbone(3), num_classes=4)


def test_head_gets_its_own_learning_rate():
    task = SegmentationTask(
        ConvBackbone(), head=ScaleHead(), num_classes=3, lr=1e-3, head_lr=1e-1, scheduler="none"
    )
    optimizer = task.configure_optimizers()["optimizer"]
    lrs = [group["lr"] for group in optimizer.param_groups]
    assert lrs == [1e-3, 1e-1]
    assert optimizer.param_groups[1]["params"][0] is task.head.scale


class TinyLoader(torch.utils.data.Dataset):
    def __init__(self, n=8):
        self.samples = [make_batch(1) for _ in range(n)]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return {key: value[0] for key, value in self.samples[index].items()}


def fit_two_epochs(task, tmp_path, callbacks=()):
    """Fit ``task`` for 2 epochs on TinyLoader (train and val) without logger or checkpoints."""
    loader = torch.utils.data.DataLoader(TinyLoader(), batch_size=4)
    trainer = Trainer(
        max_epochs=2,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=list(callbacks),
    )
    trainer.fit(task, loader, loader)
    return trainer


def test_fit_logs_epoch_metrics_for_head_and_backbone(tmp_path):
    task = SegmentationTask(ConvBackbone(), head=ScaleHead(), num_classes=3)
    trainer = fit_two_epochs(task, tmp_path)
    metrics = trainer.callback_metrics
    for key in (
        "val/mIoU",
        "val/pixel_acc",
        "val/mIoU_backbone",
        "val/pixel_acc_backbone",
        "val/loss",
        "val/edge_f1@1px",
        "val/edge_area_f1@1px",
    ):
        assert key in metrics, key
        assert 0.0 <= float(metrics[key]) <= (1.0 if "loss" not in key else 100.0)
    assert trainer.lr_scheduler_configs[0].interval == "step"


def test_frozen_backbone_from_checkpoint_trains_the_head_only(tmp_path):
    trained = SegmentationTask(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)), num_classes=3)
    checkpoint = tmp_path / "unary.ckpt"
    torch.save({"state_dict": trained.state_dict()}, checkpoint)
    backbone = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    task = SegmentationTask(
        backbone,
        head=ScaleHead(),
        num_classes=3,
        freeze_backbone=True,
        backbone_checkpoint=str(checkpoint),
        scheduler="none",
    )
    assert torch.equal(backbone[0].weight, trained.backbone[0].weight)
    task.train()
    assert not task.backbone.training and task.head.training
    optimizer = task.configure_optimizers()["optimizer"]
    assert [group["params"] for group in optimizer.param_groups] == [[task.head.scale]]
    running_mean = backbone[1].running_mean.clone()
    task.compute_loss(make_batch()).backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert torch.equal(backbone[1].running_mean, running_mean)


def test_head_warmup_trains_the_backbone_alone_first(tmp_path):
    """head_warmup_epochs=1: epoch 0 skips the head (its parameter stays put), epoch 1 trains it."""
    task = SegmentationTask(
        ConvBackbone(), head=ScaleHead(), num_classes=3, head_warmup_epochs=1, aux_loss_weight=0.5
    )
    scales = []

    class RecordScale(Callback):
        def on_train_epoch_end(self, trainer, module):
            scales.append(float(module.head.scale))

    fit_two_epochs(task, tmp_path, [RecordScale()])
    assert scales[0] == 2.0 and scales[1] != 2.0
    assert not task.in_head_warmup()  # outside fit the head always runs
    batch = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(
            task(batch["image"], batch), task.head(task.backbone(batch["image"]), batch)
        )
    with pytest.raises(ValueError, match="head_warmup_epochs"):
        SegmentationTask(ConvBackbone(), head=ScaleHead(), num_classes=3, head_warmup_epochs=-1)

"""3D zoo (3D-UNet, MobileNetV2-3D, I3D), synthetic volumes / clips, and RANP on them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from app.datamodules.volumes import ClipsDataset, SyntheticClips, SyntheticVolumes, VolumesDataset
from app.models.nets3d import I3D, MobileNetV2_3D, UNet3D
from app.pruning import channel_spec, measure_resources, prune_at_init


@pytest.fixture(autouse=True)
def _no_onednn():
    """oneDNN builds a kernel per new 3D conv shape on the CPU, which costs seconds for these tiny,
    many-shaped nets (and pruning creates new shapes); the plain kernels are faster here."""
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    yield
    torch.backends.mkldnn.enabled = enabled


def _convs(model: nn.Module) -> list[nn.Conv3d]:
    return [m for m in model.modules() if type(m) is nn.Conv3d]


def _params_mb(model: nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) * 4 / 2**20


@pytest.mark.parametrize(("n_layers", "levels"), [(15, 4), (23, 6)])
def test_unet3d_layer_counts_and_shapes(n_layers, levels):
    model = UNet3D(in_channels=2, num_classes=5, n_layers=n_layers, base_width=4)
    convs = _convs(model)
    assert len(convs) == n_layers and model.levels == levels
    assert sum(c.kernel_size == (3, 3, 3) for c in convs) == n_layers - 1
    x = torch.randn(2, 2, 32, 32, 32)  # batch 2: the 6-level bottom is 1^3, batch norm needs 2 values
    assert model(x).shape == (2, 5, 32, 32, 32)


def test_unet3d_matches_thesis_parameter_count_and_options():
    # Table 5.2: the 15-layer 3D-UNet on ShapeNet (50 classes, base width 64) has 62.26 MB of parameters
    assert _params_mb(UNet3D(1, 50, 15, base_width=64)) == pytest.approx(62.26, abs=0.01)
    model = UNet3D(1, 3, 15, base_width=4, norm="group", upsample="transposed", init="orthogonal")
    assert sum(isinstance(m, nn.ConvTranspose3d) for m in model.modules()) == 3
    assert model(torch.randn(2, 1, 16, 16, 16)).shape == (2, 3, 16, 16, 16)
    with pytest.raises(ValueError, match="n_layers"):
        UNet3D(n_layers=16)
    with pytest.raises(ValueError, match="norm"):
        UNet3D(norm="layer")
    with pytest.raises(ValueError, match="divisible by 8"):
        UNet3D(base_width=2)(torch.randn(1, 1, 12, 16, 16))


def test_glorot_init_of_the_zoo():
    conv = UNet3D(1, 3, 15, base_width=16).encoders[1][0][0]
    fan_in, fan_out = conv.in_channels * 27, conv.out_channels * 27
    assert float(conv.weight.std()) == pytest.approx((2 / (fan_in + fan_out)) ** 0.5, rel=0.1)


def test_clip_networks_match_the_thesis_layout():
    mobilenet = MobileNetV2_3D(num_classes=101)
    convs = _convs(mobilenet)
    assert len(convs) == 52 and sum(c.kernel_size == (3, 3, 3) for c in convs) == 18
    assert _params_mb(mobilenet) == pytest.approx(9.47, abs=0.01)  # Table 5.2
    i3d = I3D(num_classes=101)
    convs = _convs(i3d)
    assert len(convs) == 57
    assert (
        sum(c.kernel_size == (3, 3, 3) for c in convs) == 19
        and sum(c.kernel_size == (7, 7, 7) for c in convs) == 1
    )
    assert _params_mb(i3d) == pytest.approx(47.27, abs=0.01)  # Table 5.2
    clip = torch.randn(2, 3, 8, 32, 32)
    assert MobileNetV2_3D(7, width_mult=0.25, last_channel=32)(clip).shape == (2, 7)
    assert I3D(7, width_mult=0.125)(clip).shape == (2, 7)
    with pytest.raises(ValueError, match="clip"):
        I3D(7, width_mult=0.125)(torch.randn(2, 3, 32, 32))


def _frames_per_block(net: MobileNetV2_3D, clip: torch.Tensor) -> list[int]:
    frames = []
    for layer in net.features:
        clip = layer(clip)
        frames.append(clip.shape[2])
    return frames


def test_mobilenet3d_keeps_time_for_short_clips():
    """The config's 8-frame clips: with all four temporal strides (Kopuklu et al.'s 16-frame layout) time
    is a single frame from the 64-channel stage on, and the network did not learn the motion classes;
    ``temporal_strides=1`` keeps all 8 frames up to the last downsampling stage, same layers."""
    config = yaml.safe_load((Path(__file__).parents[1] / "configs/ranp_mobilenet3d.yaml").read_text())
    options = config["model"]["init_args"]["backbone"]["init_args"]
    frames = config["data"]["init_args"]["frames"]
    clip = torch.randn(2, 3, frames, 32, 32)
    net = MobileNetV2_3D(8, width_mult=0.25, last_channel=32, temporal_strides=options["temporal_strides"])
    with torch.no_grad():
        kept = _frames_per_block(net.eval(), clip)
        thesis = _frames_per_block(MobileNetV2_3D(8, width_mult=0.25, last_channel=32).eval(), clip)
    assert kept[-2] > 1  # the last downsampling stage still sees motion over time
    assert thesis[7:] == [1] * len(thesis[7:])  # 64-channel stage and after: one frame
    assert len(_convs(net)) == 52 and [c.weight.shape for c in _convs(net)] == [
        c.weight.shape for c in _convs(MobileNetV2_3D(8, width_mult=0.25, last_channel=32))
    ]
    with pytest.raises(ValueError, match="temporal_strides"):
        MobileNetV2_3D(8, temporal_strides=5)


def test_synthetic_volumes_are_pure_functions_of_seed_and_index():
    a = VolumesDataset("train", 4, num_classes=4, volume_size=16, seed=1)
    b = VolumesDataset("train", 4, num_classes=4, volume_size=16, seed=1)
    c = VolumesDataset("train", 4, num_classes=4, volume_size=16, seed=2)
    s = a[3]
    assert s["image"].shape == (1, 16, 16, 16) and s["image"].dtype == torch.float32
    assert s["mask"].shape == (16, 16, 16) and s["mask"].dtype == torch.int64
    assert torch.equal(s["image"], b[3]["image"]) and torch.equal(s["mask"], b[3]["mask"])
    assert not torch.equal(s["mask"], c[3]["mask"])
    assert not torch.equal(a[0]["mask"], a[1]["mask"])
    assert set(s["mask"].unique().tolist()) <= {0, 1, 2, 3} and len(s["mask"].unique()) >= 3
    # classes differ in mean intensity: the voxel mean grows with the class id
    masks = torch.stack([a[i]["mask"] for i in range(4)])
    images = torch.stack([a[i]["image"][0] for i in range(4)])
    means = [float(images[masks == k].mean()) for k in range(4)]
    assert means == sorted(means)
    with pytest.raises(ValueError, match="num_classes"):
        VolumesDataset(num_classes=1)
    with pytest.raises(IndexError):
        a[4]


def test_synthetic_clips_motion_defines_the_class():
    ds = ClipsDataset("val", 6, num_classes=4, frames=6, frame_size=24, noise_std=0.0, seed=3)
    s = ds[2]
    assert s["image"].shape == (3, 6, 24, 24) and s["label"].dtype == torch.int64
    assert torch.equal(s["image"], ClipsDataset("val", 6, 4, 6, 24, 0.0, 3)[2]["image"])
    # frames differ (the disc moves); the centroid moves along the class direction
    disc = s["image"].std(0)
    assert not torch.equal(disc[0], disc[-1])
    with pytest.raises(ValueError, match="frames"):
        ClipsDataset(frames=1)


def test_datamodules_batches():
    dm = SyntheticVolumes(num_classes=3, volume_size=16, n_train=4, n_val=2, batch_size=2)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 1, 16, 16, 16) and batch["mask"].shape == (2, 16, 16, 16)
    first = [b["index"].tolist() for b in dm.train_dataloader()]
    assert first == [b["index"].tolist() for b in dm.train_dataloader()]  # seeded shuffling
    assert len(list(dm.val_dataloader())) == 1
    clips = SyntheticClips(num_classes=5, frames=4, frame_size=16, n_train=6, batch_size=3)
    batch = next(iter(clips.train_dataloader()))
    assert batch["image"].shape == (3, 3, 4, 16, 16) and batch["label"].shape == (3,)
    with pytest.raises(ValueError, match="n_val|length"):
        SyntheticVolumes(n_val=0)
    with pytest.raises(ValueError, match="batch_size"):
        SyntheticClips(batch_size=0)


def _seg_loss(model, batch):
    return F.cross_entropy(model(batch["image"]), batch["mask"])


def _clip_loss(model, batch):
    return F.cross_entropy(model(batch["image"]), batch["label"])


def test_ranp_on_unet3d_reduces_flops_and_memory():
    torch.manual_seed(0)
    dm = SyntheticVolumes(num_classes=3, volume_size=16, n_train=4, batch_size=2)
    batches = list(dm.train_dataloader())
    model = UNet3D(1, 3, 15, base_width=8)
    report = prune_at_init(model, batches, _seg_loss, sparsity=0.7, method="ranp_f")
    assert report.kept["head"] == (3, 3)
    assert report.reductions()["flops"] > 70 and report.reductions()["memory"] > 30
    assert model(batches[0]["image"]).shape == (2, 3, 16, 16, 16)
    after = measure_resources(model, batches[0]["image"])
    assert after.flops == report.after.flops
    assert channel_spec(model)["encoders.0.0.0.out_channels"] == report.kept["encoders.0.0.0"][0]


@pytest.mark.parametrize("net", ["mobilenet", "i3d"])
def test_ranp_on_clip_networks(net):
    torch.manual_seed(1)
    dm = SyntheticClips(num_classes=4, frames=4, frame_size=16, n_train=2, batch_size=2)
    batches = list(dm.train_dataloader())
    model = (
        MobileNetV2_3D(4, width_mult=0.25, last_channel=64)
        if net == "mobilenet"
        else I3D(4, width_mult=0.125)
    )
    report = prune_at_init(
        model, batches, _clip_loss, sparsity=0.3, method="ranp_f", on_empty_layer="keep_top"
    )
    assert report.kept["classifier"] == (4, 4)
    assert report.after.flops < report.before.flops
    assert model(batches[0]["image"]).shape == (2, 4)
    if net == "mobilenet":  # residual blocks keep equal widths, depthwise convs follow their input
        for block in model.features:
            if getattr(block, "use_residual", False):
                assert block.block[-1][0].out_channels == block.block[0][0].in_channels
            if hasattr(block, "block"):
                dw = next(m for m in block.block.modules() if isinstance(m, nn.Conv3d) and m.groups > 1)
                assert dw.groups == dw.in_channels == dw.out_channels

import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from skimage import io as skimage_io
from test_cli import csv_logger, last_metrics

from app.cli import build_cli
from app.crf_heads import HEADS, LogitConsistency, SuperpixelFusion
from app.datamodules import SyntheticShapes
from app.models import SegmentationTask, SuperpixelFCN
from app.models.superpixel_fcn import (
    NEIGHBOUR_OFFSETS,
    cell_grid,
    hard_superpixels,
    neighbour_mask,
    soft_superpixel_mean,
    superpixel_loss,
)
from app.ops import segment_mean
from app.ops.reference import segment_mean_reference

ROOT = Path(__file__).resolve().parents[1]


def own_cell_association(batch: int, height: int, width: int) -> torch.Tensor:
    """Q that puts every pixel in its own grid cell (channel 4)."""
    association = torch.zeros(batch, 9, height, width)
    association[:, 4] = 1
    return association


def grid_ids(height: int, width: int, cell_size: int) -> torch.Tensor:
    _, cols = cell_grid(height, width, cell_size)
    rows_of = torch.arange(height)[:, None] // cell_size
    cols_of = torch.arange(width)[None, :] // cell_size
    return rows_of * cols + cols_of


@pytest.mark.parametrize(("height", "width"), [(37, 53), (8, 8), (5, 19)])
def test_fcn_any_size_gives_a_distribution_over_valid_neighbours(height, width):
    fcn = SuperpixelFCN(cell_size=4, widths=(4, 8, 8)).eval()
    with torch.no_grad():
        association = fcn(torch.randn(2, 3, height, width))
    assert association.shape == (2, 9, height, width)
    torch.testing.assert_close(association.sum(1), torch.ones(2, height, width))
    outside = ~neighbour_mask(height, width, 4)
    assert float(association[:, outside].abs().max()) == 0.0


def test_fcn_pads_by_replication_and_crops_back():
    fcn = SuperpixelFCN(cell_size=8, widths=(4, 8, 8, 8)).eval()  # stride 8
    image = torch.randn(1, 3, 37, 53)  # padded to 40 x 56: the same 5 x 7 grid of cells
    padded = F.pad(image, (0, 3, 0, 3), mode="replicate")
    with torch.no_grad():
        torch.testing.assert_close(fcn(image), fcn(padded)[:, :, :37, :53])


def test_loss_terms_match_a_hand_computation():
    # A 1 x 2 image with 1-pixel cells: pixel 0 is in cell 0 with q = a (cell 1: 1 - a), pixel 1 in cell 1
    # with q = b (cell 0: 1 - b); labels 0 and 1; coordinates x = 0 and 1.
    a, b, m = 0.8, 0.6, 0.5
    association = torch.zeros(1, 9, 1, 2, dtype=torch.float64)
    association[0, 4, 0, 0], association[0, 5, 0, 0] = a, 1 - a  # own, right neighbour
    association[0, 4, 0, 1], association[0, 3, 0, 1] = b, 1 - b  # own, left neighbour
    labels = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)[None]  # (1, 2, 1, 2) one-hot
    u0 = torch.tensor([a, 1 - b], dtype=torch.float64) / (a + 1 - b)  # superpixel 0's label distribution
    u1 = torch.tensor([1 - a, b], dtype=torch.float64) / (1 - a + b)
    recon0, recon1 = a * u0 + (1 - a) * u1, (1 - b) * u0 + b * u1
    expected_property = (-math.log(recon0[0]) - math.log(recon1[1])) / 2
    l0, l1 = (1 - b) / (a + 1 - b), b / (1 - a + b)  # x of the superpixel centres
    c0, c1 = a * l0 + (1 - a) * l1, (1 - b) * l0 + b * l1
    expected_position = (abs(0 - c0) + abs(1 - c1)) / 2 * m / 1
    property_term, position_term = superpixel_loss(association, labels, 1, compactness=m)
    assert float(property_term) == pytest.approx(expected_property, rel=1e-9)
    assert float(position_term) == pytest.approx(expected_position, rel=1e-9)
    colour_term, _ = superpixel_loss(association, labels, 1, compactness=m, property_loss="l2")
    expected_colour = (
        float((labels[0, :, 0, 0] - recon0).norm()) + float((labels[0, :, 0, 1] - recon1).norm())
    ) / 2
    assert float(colour_term) == pytest.approx(expected_colour, rel=1e-9)


def test_loss_ignores_invalid_pixels():
    association = torch.softmax(torch.randn(1, 9, 6, 6), 1) * neighbour_mask(6, 6, 3)
    association = association / association.sum(1, keepdim=True)
    labels = F.one_hot(torch.randint(0, 3, (1, 6, 6)), 3).permute(0, 3, 1, 2).float()
    valid = torch.ones(1, 6, 6, dtype=torch.bool)
    valid[0, :2] = False
    changed = labels.clone()
    changed[0, :, :2] = torch.tensor([0.0, 0.0, 1.0])[:, None, None]
    first = superpixel_loss(association, labels, 3, valid=valid)
    second = superpixel_loss(association, changed, 3, valid=valid)
    torch.testing.assert_close(first, second)


def test_own_cell_association_pools_like_segment_mean_over_the_grid():
    values = torch.randn(2, 3, 11, 13)
    pooled = soft_superpixel_mean(values, own_cell_association(2, 11, 13), 4)
    ids = grid_ids(11, 13, 4).expand(2, -1, -1)
    torch.testing.assert_close(pooled, segment_mean_reference(values, ids))
    assert torch.equal(hard_superpixels(own_cell_association(2, 11, 13), 4), ids)


def test_hard_map_ids_are_neighbour_cells_of_the_pixel():
    height, width, cell = 21, 30, 4
    rows, cols = cell_grid(height, width, cell)
    association = torch.softmax(torch.randn(3, 9, height, width) * 5, 1)  # some point outside the grid
    ids = hard_superpixels(association, cell)
    assert ids.dtype == torch.int64 and ids.shape == (3, height, width)
    assert int(ids.min()) >= 0 and int(ids.max()) < rows * cols
    own = grid_ids(height, width, cell)
    neighbour_ids = torch.stack([own + dy * cols + dx for dy, dx in NEIGHBOUR_OFFSETS])
    assert bool((ids[:, None] == neighbour_ids).any(1).all())
    row_step = (ids // cols - own // cols).abs()
    col_step = (ids % cols - own % cols).abs()
    assert int(row_step.max()) <= 1 and int(col_step.max()) <= 1  # no wrap-around across rows


def slic_batch(batch: int = 2, height: int = 12, width: int = 16) -> dict:
    superpixels = (torch.arange(height)[:, None] // 3 * 10 + torch.arange(width)[None, :] // 5).expand(
        batch, -1, -1
    )
    return {
        "image": torch.randn(batch, 3, height, width),
        "image_raw": torch.rand(batch, 3, height, width),
        "mask": torch.randint(0, 4, (batch, height, width)),
        "superpixels": superpixels.contiguous(),
    }


@pytest.mark.parametrize("source", ["slic", "fcn"])
def test_fusion_head_at_init_is_logit_consistency(source):
    batch = slic_batch()
    fcn = SuperpixelFCN(cell_size=4, widths=(4, 8)) if source == "fcn" else None
    head = SuperpixelFusion(superpixel_fcn=fcn, hidden_features=(16, 16))
    head.set_num_classes(4)
    logits = torch.randn(2, 4, 12, 16) * 5
    refined = head(logits, batch)
    if fcn is None:
        segments = batch["superpixels"]
    else:
        segments = hard_superpixels(fcn(batch["image"]), 4)
    torch.testing.assert_close(refined, segment_mean(logits, segments), rtol=1e-5, atol=1e-4)
    plain = LogitConsistency(superpixel_fcn=fcn)
    torch.testing.assert_close(plain(logits, batch), segment_mean(logits, segments))


def test_gradients_reach_logits_transparent_layers_and_fcn():
    batch = slic_batch()
    fcn = SuperpixelFCN(cell_size=4, widths=(4, 8))
    head = SuperpixelFusion(superpixel_fcn=fcn, hidden_features=(8, 8), superpixel_loss_weight=1.0)
    head.set_num_classes(4)
    logits = torch.randn(2, 4, 12, 16, requires_grad=True)
    refined, losses = head.forward_with_losses(logits, batch)
    assert set(losses) == {"superpixel_loss"}
    (F.cross_entropy(refined, batch["mask"]) + losses["superpixel_loss"]).backward()
    assert float(logits.grad.abs().sum()) > 0
    assert all(float(p.grad.abs().sum()) > 0 for p in head.transparent.parameters())
    assert float(fcn.predict.weight.grad.abs().sum()) > 0
    # The segmentation loss alone reaches the FCN through the soft pooled logits.
    fcn.zero_grad()
    F.cross_entropy(head(logits, batch), batch["mask"]).backward()
    assert float(fcn.predict.weight.grad.abs().sum()) > 0


def test_frozen_fcn_gets_no_loss_and_stays_in_eval_mode():
    fcn = SuperpixelFCN(cell_size=4, widths=(4, 8))
    head = LogitConsistency(superpixel_fcn=fcn, train_fcn=False, superpixel_loss_weight=1.0).train()
    assert not fcn.training and not any(p.requires_grad for p in fcn.parameters())
    _, losses = head.forward_with_losses(torch.randn(2, 4, 12, 16), slic_batch())
    assert losses == {}
    assert head.param_groups(0.1) == []


def test_task_trains_with_head_losses_and_separate_learning_rates():
    head = HEADS.create(
        "superpixel_fusion",
        superpixel_fcn=SuperpixelFCN(cell_size=4, widths=(4, 8)),
        fcn_lr=0.01,
        superpixel_loss_weight=0.5,
        hidden_features=(8, 8),
    )
    backbone = torch.nn.Conv2d(3, 4, 1)
    task = SegmentationTask(backbone, head, num_classes=4, lr=0.1, head_lr=0.001, scheduler="none")
    groups = task.configure_optimizers()["optimizer"].param_groups
    by_lr = {group["lr"]: {id(p) for p in group["params"]} for group in groups}
    assert by_lr[0.1] == {id(p) for p in backbone.parameters()}
    assert by_lr[0.01] == {id(p) for p in head.superpixel_fcn.parameters()}
    assert by_lr[0.001] == {id(p) for p in head.transparent.parameters()}
    batch = slic_batch()
    logits, backbone_logits = task.predict_logits(batch)
    plain = F.cross_entropy(logits, batch["mask"])
    _, losses = head.forward_with_losses(backbone_logits, batch)
    torch.testing.assert_close(task.compute_loss(batch), plain + losses["superpixel_loss"])


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="cell_size"):
        SuperpixelFCN(cell_size=0)
    with pytest.raises(ValueError, match="widths"):
        SuperpixelFCN(widths=(16,))
    with pytest.raises(ValueError, match="channels"):
        SuperpixelFCN(widths=(4, 8))(torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="association"):
        hard_superpixels(torch.rand(1, 8, 4, 4), 2)
    with pytest.raises(ValueError, match="property_loss"):
        superpixel_loss(own_cell_association(1, 4, 4), torch.rand(1, 3, 4, 4), 2, property_loss="l1")
    with pytest.raises(ValueError, match="fcn_checkpoint"):
        LogitConsistency(fcn_checkpoint="x.pt")
    with pytest.raises(ValueError, match="superpixel_property"):
        LogitConsistency(superpixel_property="depth")
    with pytest.raises(ValueError, match="hidden_features"):
        SuperpixelFusion(hidden_features=(4, 4)).set_num_classes(4)  # below 2C = 8
    head = SuperpixelFusion(hidden_features=(8, 8))
    head.set_num_classes(4)
    with pytest.raises(ValueError, match="channels"):
        head(torch.randn(2, 3, 12, 16), slic_batch())
    with pytest.raises(KeyError, match="superpixels"):
        head.check_batch({"image": torch.randn(1, 3, 4, 4)})
    batch = slic_batch()
    batch["superpixels"] = batch["superpixels"][:, :6]
    with pytest.raises(ValueError, match="superpixels"):
        LogitConsistency()(torch.randn(2, 4, 12, 16), batch)


def test_superpixel_config_fits_through_the_cli(tmp_path):
    config = yaml.safe_load((ROOT / "configs/superpixel_shapes.yaml").read_text())
    config["trainer"].update(
        default_root_dir=str(tmp_path),
        max_epochs=1,
        log_every_n_steps=1,
        logger=csv_logger(tmp_path),
        callbacks=[],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    config["data"]["init_args"].update(image_size=32, n_train=8, n_val=4, batch_size=4)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = build_cli(["fit", "--config", str(path)])
    assert cli.trainer.global_step == 2
    assert isinstance(cli.model.head, SuperpixelFusion)
    assert last_metrics(tmp_path, "run", "train/superpixel_loss")
    assert 0.0 <= float(cli.trainer.callback_metrics["val/mIoU"]) <= 1.0
    assert "val/edge_f1@2px" in cli.trainer.callback_metrics


@pytest.fixture
def superpixel_benchmark(monkeypatch):
    """``benchmarks/superpixel.py`` as a module (it imports ``common`` from its own folder)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("superpixel")


def test_benchmark_defaults_to_the_thesis_deeplabv3plus(superpixel_benchmark):
    assert superpixel_benchmark.parse_args([]).backbone == "deeplabv3plus"
    backbone = superpixel_benchmark.build_backbone("deeplabv3plus", 4)
    assert backbone.arch == "DeepLabV3Plus" and backbone.size_multiple == 16
    with pytest.raises(ValueError, match="backbone"):
        superpixel_benchmark.build_backbone("deeplab", 4)


@pytest.mark.parametrize("name", ["deeplabv3plus", "unet"])
def test_benchmark_backbones_train_under_logit_consistency(superpixel_benchmark, name):
    args = superpixel_benchmark.parse_args(
        ["--backbone", name, "--image-size", "48", "--n-train", "2", "--num-classes", "9"]
    )
    data = SyntheticShapes(num_classes=9, image_size=48, n_train=2, n_val=1, batch_size=2, superpixels=36)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    backbone = superpixel_benchmark.build_backbone(args.backbone, args.num_classes)
    model = superpixel_benchmark.task(backbone, args.num_classes, LogitConsistency(), lr=1e-3)
    logits, backbone_logits = model.predict_logits(batch)
    assert logits.shape == backbone_logits.shape == (2, 9, 48, 48)
    torch.testing.assert_close(logits, segment_mean(backbone_logits, batch["superpixels"]))
    model.compute_loss(batch).backward()
    assert all(p.grad is not None for p in backbone.parameters())


def test_benchmark_names_runs_and_summarises_seeds(superpixel_benchmark, monkeypatch, tmp_path):
    """Runs are saved under names that keep sizes and seeds apart; the seed summary averages the saved rows
    and their paired differences, and names a missing run instead of averaging fewer."""
    monkeypatch.setattr(superpixel_benchmark, "RESULTS", tmp_path)
    monkeypatch.setattr(sys.modules["common"], "RESULTS", tmp_path)
    parse = superpixel_benchmark.parse_args
    name = superpixel_benchmark.result_name
    assert name(parse([]), 0) == "superpixel_deeplabv3plus"
    assert name(parse(["--backbone", "unet", "--image-size", "192"]), 2) == "superpixel_unet_192px_seed2"
    assert name(parse(["--finetune-epochs", "6"]), 0) == "superpixel_deeplabv3plus_ft6"
    assert name(parse(["--noise-std", "0.02"]), 3) == "superpixel_deeplabv3plus_noise0.02_seed3"
    assert name(parse(["--num-classes", "9", "--backbone", "unet"]), 1) == "superpixel_unet_9classes_seed1"
    assert name(parse(["--epochs", "24", "--finetune-epochs", "6"]), 0) == "superpixel_deeplabv3plus_ep24_ft6"
    assert (
        name(parse(["--image-size", "192", "--cell-size", "8"]), None)
        == "superpixel_deeplabv3plus_192px_cell8_seeds"
    )
    tolerances = superpixel_benchmark.TOLERANCES
    metrics = ["mIoU", *(f"{kind}@{t}" for kind in ("FM", "P", "R") for t in tolerances)]
    bench = superpixel_benchmark
    manners = [bench.BACKBONE_ALONE, bench.SP_SLIC, bench.SP_FCN, bench.CONTROL, bench.SP_TI]

    def summarize(seed_metrics: dict[int, list[str]], recall_lost: dict | None = None) -> dict:
        for seed, offset in ((0, 0.0), (1, 2.0)):
            rows = {m: {k: 60.0 + 5 * i + offset for k in seed_metrics[seed]} for i, m in enumerate(manners)}
            run = {"rows": rows} | ({"recall_lost": recall_lost} if recall_lost else {})
            (tmp_path / f"{name(parse([]), seed)}.json").write_text(json.dumps(run))
        superpixel_benchmark.summarize_seeds(parse(["--summarize-seeds", "0", "1"]))
        return json.loads((tmp_path / "superpixel_deeplabv3plus_seeds.json").read_text())

    # precision and recall are summarised only when every run saved them (runs before session 8 did not)
    summary = summarize({0: metrics[:6], 1: metrics})
    assert set(summary["rows"]["backbone alone"]) == set(metrics[:6])
    assert "recall_lost" not in summary
    counts = {source: {"lost": 10, "gained": 2, "lost near shrunk regions": 4} for source in bench.SOURCES}
    summary = summarize({0: metrics, 1: metrics}, counts)
    assert summary["rows"][f"{bench.SP_SLIC} - {bench.BACKBONE_ALONE}"]["R@5"]["values"] == [5.0, 5.0]
    assert summary["recall_lost"]["SLIC"]["lost"] == [10, 10]
    assert summary["seeds"] == [0, 1]
    assert summary["rows"]["backbone alone"]["mIoU"] == {"mean": 61.0, "values": [60.0, 62.0]}
    assert summary["rows"][f"{bench.SP_TI} - {bench.CONTROL}"]["FM@3"]["values"] == [5.0, 5.0]
    assert summary["rows"][f"{bench.SP_FCN} - {bench.BACKBONE_ALONE}"]["mIoU"]["mean"] == 10.0
    with pytest.raises(SystemExit, match="seed 7"):
        superpixel_benchmark.summarize_seeds(parse(["--summarize-seeds", "0", "7"]))


def test_benchmark_finds_regions_that_superpixels_shrink(superpixel_benchmark):
    """A region counts as shrunk when less than ``keep`` of its pixels keep its class; each connected
    region of a class is judged on its own."""
    before = torch.zeros(6, 8, dtype=torch.long)
    before[1:3, 1:3] = 1  # a 4-pixel region, half of it kept below
    before[1:3, 5:7] = 1  # another region of the same class, all of it kept
    after = torch.zeros_like(before)
    after[1:3, 1] = 1
    after[1:3, 5:7] = 1
    shrunk = superpixel_benchmark._shrunk_regions(before.numpy(), after.numpy(), keep=0.75)
    expected = torch.zeros(6, 8, dtype=torch.bool)
    expected[1:3, 1:3] = True
    assert torch.equal(torch.from_numpy(shrunk), expected)
    lenient = superpixel_benchmark._shrunk_regions(before.numpy(), after.numpy(), keep=0.5)
    assert not lenient.any()  # background keeps 40 of 40 pixels, the first square 2 of 4


def test_benchmark_counts_recall_lost_to_superpixels_and_draws_examples(superpixel_benchmark, tmp_path):
    bench = superpixel_benchmark
    torch.manual_seed(0)
    data = SyntheticShapes(num_classes=4, image_size=48, n_train=2, n_val=3, batch_size=2, superpixels=144)
    backbone = bench.build_backbone("unet", 4)
    fcn = SuperpixelFCN(cell_size=4, widths=(4, 4, 4, 4))
    path = tmp_path / "examples.png"
    counts = bench.recall_lost_to_superpixels(backbone, data, fcn, examples=2, examples_path=path)
    assert set(counts) == set(bench.SOURCES)
    for source in bench.SOURCES:
        assert 0 <= counts[source]["lost near shrunk regions"] <= counts[source]["lost"]
        assert counts[source]["gained"] >= 0
    figure = skimage_io.imread(path)
    assert figure.shape == (2 * 3 * 50, 3 * 5 * 48, 3)  # 2 rows of 5 panels (48 px + 2 px of separator), 3x

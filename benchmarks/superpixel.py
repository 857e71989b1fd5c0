"""Thesis Table 4.4 layout (and the edge metrics of Table 4.7) on SyntheticShapes: superpixel refinement.

Protocol, as the thesis at CPU scale: 1. train the backbone alone (by default DeepLabV3+ with a ResNet18
encoder, the thesis' family: output stride 16, decoder at 1/4 resolution; ``--backbone unet`` the quickstart
U-Net; random initialization, no download); 2. pretrain the superpixel FCN (Yang et al. 2020) on the
training images with the label-reconstruction loss (Eq. 4.1-4.2); 3. evaluate on the validation split: the
backbone alone, + SP (logit consistency, Eq. 4.13, with SLIC superpixels), + SP with the FCN's hard
superpixels (frozen), and + SP + TI: the backbone, the FCN and transparent-init fusion layers fine-tuned
jointly (fixed learning rates, networks 10x the TI layers as the thesis' 1e-6 / 1e-7) from the trained
networks. A control row fine-tunes the backbone alone on the same schedule, so the gain of + SP + TI is not
mistaken for the gain of more training.
Metrics: mIoU and the edge performance ratio (Eq. 4.16) and F-measure (Eq. 4.15) at 1-5 px, x100, by tolerance
matching and over the extended edge area. The superpixel oracle (the ground truth averaged over each source's
superpixels) bounds what +SP can reach.
Superpixel sizes (FCN cell 4 px, SLIC with as many segments as the FCN has cells, compactness 20) were
chosen on the training split for each backbone (docs/superpixel_experiments.md), never on the validation
split.

    python benchmarks/superpixel.py [--backbone deeplabv3plus|unet] [--epochs 6] [--fcn-steps 1000]
        [--cell-size 4] [--finetune-epochs 2] [--noise-std 0.1] [--num-classes 4] [--seed 0] [--examples N]
    python benchmarks/superpixel.py --summarize-seeds 0 1 2 3 4 [the same options]  # saved runs, mean ± std

Prints markdown tables and writes benchmarks/results/superpixel_<backbone>.json (``_<size>px`` appended
when ``--image-size`` is not the default, ``_cell<size>`` when ``--cell-size`` is not, ``_ep<n>`` when
``--epochs`` is not, ``_ft<n>`` when ``--finetune-epochs`` is not, ``_noise<std>`` when ``--noise-std`` is not,
``_<n>classes`` when ``--num-classes`` is not, ``_seed<n>`` when ``--seed`` is not 0); with ``--examples N``
also ``<that name>_examples.png``, the N validation images where + SP (SLIC) loses the most edge F-measure at
5 px. Edge precision and recall at 1-5 px are printed and saved as well, the PR and FM of the extended edge area
(aPR, aFM: our pixel-by-pixel reading of Table 4.7's "edge areas extended by n pixels", app.metrics.EdgeMetrics), and
the ground-truth edges that + SP no longer recalls at 5 px. The logit-consistency speed table (512x512,
21 classes, ~1000 superpixels, compiled vs the dense form of Eq. 4.14) is benchmarks/segment_mean.py.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from common import RESULTS, machine, markdown_table, mean_and_spread, save_json
from scipy import ndimage
from skimage import io
from torchmetrics.classification import MulticlassJaccardIndex

from app.crf_heads import LogitConsistency, StructuredHead, SuperpixelFusion
from app.datamodules import SyntheticShapes
from app.metrics import EdgeMetrics, label_edges, within_tolerance
from app.models import SegmentationTask, SuperpixelFCN, create_backbone
from app.models.superpixel_fcn import hard_superpixels, superpixel_loss
from app.ops import segment_mean

TOLERANCES = (1, 2, 3, 4, 5)
# The rows of the Table 4.4 layout, in order.
BACKBONE_ALONE = "backbone alone"
SP_SLIC = "+ SP (SLIC)"
SP_FCN = "+ SP (superpixel FCN)"
CONTROL = "backbone fine-tuned alone (control)"
SP_TI = "+ SP + TI (joint fine-tuning)"
# Runs at other image sizes, cell sizes, fine-tuning budgets or seeds are saved under their own name.
SOURCES = ("SLIC", "superpixel FCN")  # superpixels of the + SP rows
# Short names of the rows' edge metrics (EdgeMetrics' keys): tolerance matching, then the extended edge area
# (our reading of thesis Table 4.7's "edge areas extended by n pixels"; its precision is the tolerance precision P).
EDGE_METRICS = {
    "PR": "pr",
    "FM": "f1",
    "P": "precision",
    "R": "recall",
    "aPR": "area_pr",
    "aFM": "area_f1",
    "aR": "area_recall",
}
DEFAULT_IMAGE_SIZE = 96
DEFAULT_EPOCHS = 6
DEFAULT_CELL_SIZE = 4
DEFAULT_FINETUNE_EPOCHS = 2
DEFAULT_NOISE_STD = 0.1  # SyntheticShapes' default
DEFAULT_NUM_CLASSES = 4  # background + disc, square, triangle; 9 adds ring, star, cross, ellipse, hexagon
# Registry name and keyword arguments of each backbone. DeepLabV3+ is the thesis' family (Table 4.4: encoder
# output stride 16, decoder at 1/4 resolution, logits upsampled bilinearly); the U-Net is the quickstart's,
# whose full-resolution decoder already delineates boundaries sharply.
BACKBONE_SPECS: dict[str, tuple[str, dict]] = {
    "deeplabv3plus": ("smp:DeepLabV3Plus", {"encoder_name": "resnet18"}),
    "unet": (
        "smp:Unet",
        {"encoder_name": "resnet18", "arch_kwargs": {"decoder_channels": [128, 64, 32, 16, 16]}},
    ),
}


def build_backbone(name: str, num_classes: int) -> torch.nn.Module:
    """The benchmark's backbone ``name`` (a key of ``BACKBONE_SPECS``), random weights, ``num_classes`` outputs."""
    if name not in BACKBONE_SPECS:
        raise ValueError(f"backbone must be one of {sorted(BACKBONE_SPECS)}, got {name!r}")
    registry_name, kwargs = BACKBONE_SPECS[name]
    return create_backbone(registry_name, num_classes, **copy.deepcopy(kwargs))


def shapes(args: argparse.Namespace, superpixels: int | None) -> SyntheticShapes:
    """The benchmark's data; SLIC ``superpixels`` segments (compactness ``args.slic_compactness``) or none."""
    return SyntheticShapes(
        num_classes=args.num_classes,
        image_size=args.image_size,
        noise_std=args.noise_std,
        n_train=args.n_train,
        n_val=args.n_val,
        batch_size=16,
        superpixels=superpixels,
        superpixel_compactness=args.slic_compactness,
        superpixel_sigma=1.0,
        train_augmentations=[{"name": "HorizontalFlip", "p": 0.5}, {"name": "VerticalFlip", "p": 0.5}],
    )


def trainer(epochs: int) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        inference_mode=False,  # the joint task is validated before and after fitting: no inference tensors
    )


def task(
    backbone: torch.nn.Module, num_classes: int, head: StructuredHead | None = None, **kwargs
) -> SegmentationTask:
    return SegmentationTask(backbone, head, num_classes=num_classes, log_images=0, **kwargs)


def evaluate(model: SegmentationTask, data: SyntheticShapes) -> dict[str, float]:
    (metrics,) = trainer(1).validate(model, datamodule=data, verbose=False)
    row = {"mIoU": 100 * metrics["val/mIoU"]}
    for short, key in EDGE_METRICS.items():
        row.update({f"{short}@{t}": 100 * metrics[f"val/edge_{key}@{t}px"] for t in TOLERANCES})
    print(
        f"evaluated {type(model.head).__name__}: mIoU {row['mIoU']:.2f}, FM@1 {row['FM@1']:.2f}", flush=True
    )
    return row


def superpixel_oracle(data: SyntheticShapes, fcn: SuperpixelFCN | None = None) -> dict[str, float]:
    """Best achievable +SP on the validation split: the one-hot ground truth averaged over the superpixels
    (SLIC from the batch, or the FCN's hard map) in place of the logits; mIoU and FM at 1-5 px, x100."""
    data.setup("validate")
    iou = MulticlassJaccardIndex(data.num_classes, average="macro")
    edges = EdgeMetrics(data.num_classes, TOLERANCES)
    straddling, superpixels, images = 0, 0, 0
    for batch in data.val_dataloader():
        if fcn is None:
            segments = batch["superpixels"]
        else:
            with torch.no_grad():
                segments = hard_superpixels(fcn.eval()(batch["image"]), fcn.cell_size)
        one_hot = torch.nn.functional.one_hot(batch["mask"], data.num_classes).permute(0, 3, 1, 2).float()
        mean_one_hot = segment_mean(one_hot, segments)
        oracle = mean_one_hot.argmax(1)
        iou.update(oracle, batch["mask"])
        edges.update(oracle, batch["mask"])
        # a superpixel straddles a boundary when its mean one-hot label is not one-hot
        for image_segments, image_purity in zip(segments, mean_one_hot.amax(1)):
            straddling += image_segments[image_purity < 1 - 1e-6].unique().numel()
            superpixels += image_segments.unique().numel()
            images += 1
    metrics = edges.compute()
    row = {"mIoU": 100 * float(iou.compute())}
    row.update({f"FM@{t}": 100 * float(metrics[f"edge_f1@{t}px"]) for t in TOLERANCES})
    row["superpixels per image"] = superpixels / images
    row["straddling %"] = 100 * straddling / superpixels
    return row


def _shrunk_regions(before: np.ndarray, after: np.ndarray, keep: float) -> np.ndarray:
    """(H, W) bool: the connected one-class regions of the label map ``before`` of which less than ``keep``
    of the pixels still carry their class in ``after``."""
    shrunk = np.zeros(before.shape, dtype=bool)
    for label in np.unique(before):
        regions, count = ndimage.label(before == label)
        kept = np.bincount(regions[after == label], minlength=count + 1) / np.bincount(regions.ravel())
        shrunk |= (kept < keep)[regions] & (regions > 0)
    return shrunk


def recall_lost_to_superpixels(
    backbone: torch.nn.Module,
    data: SyntheticShapes,
    fcn: SuperpixelFCN,
    examples: int = 0,
    examples_path: Path | None = None,
) -> dict[str, dict[str, int]]:
    """Where + SP loses edge recall at the widest tolerance (d = max TOLERANCES), per superpixel source.

    Counts the ground-truth edge pixels that the backbone alone recalls within d px and + SP does not
    (``lost``), the reverse (``gained``), and how many of the lost lie within d px of a backbone region (one
    class, connected) that + SP erases or shrinks to less than 3/4 of its pixels (``lost near shrunk
    regions``). With ``examples`` > 0, writes a PNG of the ``examples`` validation images where + SP (SLIC)
    lowers FM@d the most to ``examples_path`` (:func:`save_edge_examples`).
    """
    tolerance = max(TOLERANCES)
    model = task(backbone, data.num_classes).eval()
    fcn = fcn.eval()
    data.setup("validate")
    counts = {source: {"lost": 0, "gained": 0, "lost near shrunk regions": 0} for source in SOURCES}
    panels = []
    with torch.no_grad():
        for batch in data.val_dataloader():
            logits = model(batch["image"])
            mask = batch["mask"]
            target_edges = label_edges(mask)
            prediction = logits.argmax(1)
            recalled = target_edges & within_tolerance(label_edges(prediction), tolerance)
            segments = {
                "SLIC": batch["superpixels"],
                "superpixel FCN": hard_superpixels(fcn(batch["image"]), fcn.cell_size),
            }
            for source in SOURCES:
                refined = segment_mean(logits, segments[source]).argmax(1)
                refined_recalled = target_edges & within_tolerance(label_edges(refined), tolerance)
                lost = recalled & ~refined_recalled
                shrunk = [
                    _shrunk_regions(*maps, keep=0.75) for maps in zip(prediction.numpy(), refined.numpy())
                ]
                near_shrunk = within_tolerance(torch.from_numpy(np.stack(shrunk)), tolerance)
                counts[source]["lost"] += int(lost.sum())
                counts[source]["gained"] += int((refined_recalled & ~recalled).sum())
                counts[source]["lost near shrunk regions"] += int((lost & near_shrunk).sum())
                if examples and source == "SLIC":
                    for sample in zip(batch["image_raw"], segments[source], mask, prediction, refined, lost):
                        _, _, target, before, after, _ = sample
                        change = _f_measure(after, target, tolerance, data.num_classes) - _f_measure(
                            before, target, tolerance, data.num_classes
                        )
                        panels.append((change, sample))
    if examples:
        panels.sort(key=lambda panel: panel[0])
        save_edge_examples([sample for _, sample in panels[:examples]], examples_path)
        print(f"saved {examples_path}")
    return counts


def rows_table(rows: dict[str, dict[str, float]], metrics: list[str], first_header: str = "manner") -> str:
    """The ``metrics`` of each row as a markdown table, to two decimals, the rows' names in the first column."""
    table = [[name, *(f"{row[metric]:.2f}" for metric in metrics)] for name, row in rows.items()]
    return markdown_table([first_header, *metrics], table)


def recall_lost_table(recall_lost: dict[str, dict[str, object]]) -> str:
    """The counts of :func:`recall_lost_to_superpixels` (or their summary over seeds) as a titled table."""
    title = f"ground-truth edge pixels recalled within {max(TOLERANCES)} px by the backbone alone and not by + SP:"
    table = [[source, *recall_lost[source].values()] for source in SOURCES]
    return f"{title}\n{markdown_table(['superpixels', *recall_lost[SOURCES[0]]], table)}"


def _f_measure(prediction: torch.Tensor, target: torch.Tensor, tolerance: int, num_classes: int) -> float:
    """Edge F-measure of one (H, W) label map at ``tolerance`` px."""
    metric = EdgeMetrics(num_classes, (tolerance,))
    metric.update(prediction[None], target[None])
    return float(metric.compute()[f"edge_f1@{tolerance}px"])


CLASS_COLOURS = np.array(  # background black, then one colour per shape kind (SHAPE_KINDS' order)
    [
        [0, 0, 0],
        [230, 60, 60],
        [60, 200, 60],
        [60, 90, 230],
        [220, 200, 50],
        [200, 70, 210],
        [60, 210, 210],
        [240, 140, 40],
        [150, 150, 150],
    ],
    dtype=np.uint8,
)


def save_edge_examples(panels: list[tuple[torch.Tensor, ...]], path: Path) -> None:
    """One row per ``(image_raw (3, H, W), superpixels, mask, prediction, refined, lost edges)``: the image,
    the image with its superpixel boundaries in yellow, the three label maps in class colours, the lost
    ground-truth edges white on the last; rows separated by grey lines, scaled 3x."""
    rows = []
    for image_raw, segments, mask, prediction, refined, lost in panels:
        image = (255 * image_raw.permute(1, 2, 0).clamp(0, 1).numpy()).astype(np.uint8)
        outlined = image.copy()
        outlined[label_edges(segments[None].long())[0].numpy()] = (255, 255, 0)
        refined_map = CLASS_COLOURS[refined.numpy()]
        refined_map[lost.numpy()] = 255
        maps = [CLASS_COLOURS[mask.numpy()], CLASS_COLOURS[prediction.numpy()], refined_map]
        row = np.concatenate([image, outlined, *maps], axis=1)
        rows.append(np.pad(row, ((0, 2), (0, 0), (0, 0)), constant_values=128))
    figure = np.concatenate(rows).repeat(3, axis=0).repeat(3, axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    io.imsave(path, figure, check_contrast=False)


def pretrain_fcn(fcn: SuperpixelFCN, data: SyntheticShapes, steps: int, compactness: float) -> float:
    """Adam on the label-reconstruction loss (Eq. 4.1-4.2); returns the final loss."""
    data.setup("fit")
    optimizer = torch.optim.Adam(fcn.parameters(), lr=2e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    fcn.train()
    step, loss = 0, torch.tensor(0.0)
    while step < steps:
        for batch in data.train_dataloader():
            one_hot = torch.nn.functional.one_hot(batch["mask"], data.num_classes).permute(0, 3, 1, 2).float()
            property_term, position_term = superpixel_loss(
                fcn(batch["image"]), one_hot, fcn.cell_size, compactness
            )
            loss = property_term + position_term
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if step == steps:
                break
    return float(loss)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--backbone", choices=sorted(BACKBONE_SPECS), default="deeplabv3plus", help="segmentation network"
    )
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="backbone training epochs")
    parser.add_argument("--fcn-steps", type=int, default=1000, help="superpixel FCN pretraining steps")
    parser.add_argument(
        "--finetune-epochs", type=int, default=DEFAULT_FINETUNE_EPOCHS, help="joint fine-tuning epochs"
    )
    parser.add_argument("--finetune-lr", type=float, default=1e-4, help="networks; TI layers get 1/10")
    parser.add_argument("--superpixel-loss-weight", type=float, default=1.0)
    parser.add_argument("--cell-size", type=int, default=DEFAULT_CELL_SIZE, help="FCN grid cell (pixels)")
    parser.add_argument(
        "--slic-segments", type=int, default=None, help="SLIC n_segments (default: the FCN grid's cell count)"
    )
    parser.add_argument("--slic-compactness", type=float, default=20.0, help="SLIC compactness")
    parser.add_argument("--fcn-widths", type=int, nargs="+", default=[8, 16, 32, 32], help="FCN channels")
    parser.add_argument("--compactness", type=float, default=0.003, help="m of Eq. 4.1")
    parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    parser.add_argument(
        "--noise-std", type=float, default=DEFAULT_NOISE_STD, help="SyntheticShapes' image noise level"
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        default=DEFAULT_NUM_CLASSES,
        help="SyntheticShapes' classes with background (9: also rings, stars, crosses, ellipses, hexagons)",
    )
    parser.add_argument("--n-train", type=int, default=256)
    parser.add_argument("--n-val", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--examples",
        type=int,
        default=0,
        metavar="N",
        help="save the N validation images where + SP (SLIC) lowers FM@5 most as <result name>_examples.png",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="initialization and training order (the data are fixed)"
    )
    parser.add_argument(
        "--summarize-seeds",
        type=int,
        nargs="+",
        default=None,
        metavar="SEED",
        help="train nothing: mean and spread over the saved runs of these seeds (same other arguments)",
    )
    return parser.parse_args(argv)


def result_name(args: argparse.Namespace, seed: int | None) -> str:
    """Name of the JSON of one run (``seed``) or of the seed summary (None) for these arguments."""
    size = "" if args.image_size == DEFAULT_IMAGE_SIZE else f"_{args.image_size}px"
    cell = "" if args.cell_size == DEFAULT_CELL_SIZE else f"_cell{args.cell_size}"
    epochs = "" if args.epochs == DEFAULT_EPOCHS else f"_ep{args.epochs}"
    finetune = "" if args.finetune_epochs == DEFAULT_FINETUNE_EPOCHS else f"_ft{args.finetune_epochs}"
    noise = "" if args.noise_std == DEFAULT_NOISE_STD else f"_noise{args.noise_std:g}"
    classes = "" if args.num_classes == DEFAULT_NUM_CLASSES else f"_{args.num_classes}classes"
    suffix = "_seeds" if seed is None else "" if seed == 0 else f"_seed{seed}"
    return f"superpixel_{args.backbone}{size}{cell}{epochs}{finetune}{noise}{classes}{suffix}"


def summarize_seeds(args: argparse.Namespace) -> None:
    """Mean and sample standard deviation over the saved runs of ``args.summarize_seeds``, of each row and of
    the paired differences that the Table 4.4 target is about (each step against the one before it, and
    + SP + TI against the control fine-tuned on the same schedule): mIoU and FM, and edge precision and
    recall and the extended-area PR and FM when every run saved them."""
    saved = []
    for seed in args.summarize_seeds:
        path = RESULTS / f"{result_name(args, seed)}.json"
        if not path.is_file():
            raise SystemExit(f"no saved run for seed {seed}: {path} (run the benchmark with --seed {seed})")
        saved.append(json.loads(path.read_text()))
    runs = [run["rows"] for run in saved]
    tables = [["mIoU", *(f"FM@{t}" for t in TOLERANCES)]]
    for kinds in (("P", "R"), ("aPR", "aFM")):  # in the runs saved since these were
        edge_metrics = [f"{kind}@{t}" for kind in kinds for t in TOLERANCES]
        if all(metric in row for run in runs for row in run.values() for metric in edge_metrics):
            tables.append(edge_metrics)
    metrics = [metric for table in tables for metric in table]
    steps = {
        f"{later} - {earlier}": (later, earlier)
        for later, earlier in (
            (SP_SLIC, BACKBONE_ALONE),
            (SP_FCN, BACKBONE_ALONE),
            (SP_TI, SP_FCN),
            (SP_TI, CONTROL),
        )
    }
    series = {name: {m: [run[name][m] for run in runs] for m in metrics} for name in runs[0]}
    series |= {
        name: {m: [run[a][m] - run[b][m] for run in runs] for m in metrics} for name, (a, b) in steps.items()
    }

    print(f"{result_name(args, None)}: seeds {args.summarize_seeds}, mean ± standard deviation")
    for table_metrics in tables:
        table = [
            [name, *(mean_and_spread(values[m], name in steps) for m in table_metrics)]
            for name, values in series.items()
        ]
        print(markdown_table(["manner", *table_metrics], table))
    summary = {
        name: {m: {"mean": statistics.fmean(v), "values": v} for m, v in values.items()}
        for name, values in series.items()
    }
    payload = {"seeds": args.summarize_seeds, "rows": summary}
    if all("recall_lost" in run for run in saved):
        counts = {
            source: {
                key: [run["recall_lost"][source][key] for run in saved]
                for key in saved[0]["recall_lost"][source]
            }
            for source in SOURCES
        }
        print(
            recall_lost_table(
                {source: {k: mean_and_spread(v) for k, v in counts[source].items()} for source in SOURCES}
            )
        )
        payload["recall_lost"] = counts
    path = save_json(result_name(args, None), payload)
    print(f"saved {path}")


def main() -> None:
    args = parse_args()
    if args.summarize_seeds:
        summarize_seeds(args)
        return
    torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, verbose=False)
    started = time.perf_counter()
    timings = {}

    slic_segments = args.slic_segments or (args.image_size // args.cell_size) ** 2
    data = shapes(args, superpixels=slic_segments)
    plain_data = shapes(args, superpixels=None)  # training needs no SLIC

    classes = args.num_classes
    backbone = build_backbone(args.backbone, classes)
    trainer(args.epochs).fit(task(backbone, classes, lr=2e-3), datamodule=plain_data)
    timings["backbone_s"] = time.perf_counter() - started

    fcn = SuperpixelFCN(cell_size=args.cell_size, widths=args.fcn_widths)
    fcn_loss = pretrain_fcn(fcn, plain_data, args.fcn_steps, args.compactness)
    timings["fcn_s"] = time.perf_counter() - started - timings["backbone_s"]

    rows = {
        BACKBONE_ALONE: evaluate(task(backbone, classes), data),
        SP_SLIC: evaluate(task(backbone, classes, LogitConsistency()), data),
        SP_FCN: evaluate(
            task(backbone, classes, LogitConsistency(copy.deepcopy(fcn), train_fcn=False)), data
        ),
    }

    oracles = {"SLIC": superpixel_oracle(data), "superpixel FCN": superpixel_oracle(data, fcn)}

    lr = args.finetune_lr
    fine_tuned = task(copy.deepcopy(backbone), classes, lr=lr, scheduler="none")
    trainer(args.finetune_epochs).fit(fine_tuned, datamodule=plain_data)
    rows[CONTROL] = evaluate(task(fine_tuned.backbone, classes), data)

    head = SuperpixelFusion(
        copy.deepcopy(fcn),
        fcn_lr=lr,
        superpixel_loss_weight=args.superpixel_loss_weight,
        compactness=args.compactness,
        hidden_features=(32, 32),
    )
    joint = task(copy.deepcopy(backbone), classes, head, lr=lr, head_lr=lr / 10, scheduler="none")
    at_init = evaluate(joint, data)
    trainer(args.finetune_epochs).fit(joint, datamodule=plain_data)
    rows[SP_TI] = evaluate(joint, data)
    # after the fine-tuning: iterating a data loader draws from the global generator
    examples_path = RESULTS / f"{result_name(args, args.seed)}_examples.png"
    recall_lost = recall_lost_to_superpixels(backbone, data, fcn, args.examples, examples_path)
    timings["total_s"] = time.perf_counter() - started

    title = (
        f"SyntheticShapes {classes} classes, {args.image_size}px, {args.n_train} train / {args.n_val} val, "
        f"backbone {args.backbone} {args.epochs} epochs, FCN {args.fcn_steps} steps (final loss {fcn_loss:.3f}), "
        f"fine-tuning {args.finetune_epochs} epochs at {lr:g} / TI {lr / 10:g}; SLIC n_segments "
        f"{slic_segments}, FCN cell {args.cell_size}px; {machine()}; {timings['total_s'] / 60:.1f} min"
    )
    print(title)
    print(rows_table(rows, ["mIoU", *(f"{kind}@{t}" for kind in ("PR", "FM") for t in TOLERANCES)]))
    print("edge precision and recall:")
    print(rows_table(rows, [f"{kind}@{t}" for kind in ("P", "R") for t in TOLERANCES]))
    print(
        "extended edge area (our reading of Table 4.7: predicted edges against the ground truth's extended by n px):"
    )
    print(rows_table(rows, [f"{kind}@{t}" for kind in ("aPR", "aFM") for t in TOLERANCES]))
    print(recall_lost_table(recall_lost))
    print("superpixel oracle (ground truth averaged over the superpixels), validation:")
    print(rows_table(oracles, list(oracles["SLIC"]), first_header="superpixels"))
    print(f"+ SP + TI at initialization (must equal + SP (superpixel FCN)): mIoU {at_init['mIoU']:.2f}")
    path = save_json(
        result_name(args, args.seed),
        {
            "title": title,
            "args": vars(args),
            "rows": rows,
            "oracle": oracles,
            "recall_lost": recall_lost,
            "at_init": at_init,
            "timings_s": timings,
        },
    )
    print(f"saved {path}")


if __name__ == "__main__":
    main()

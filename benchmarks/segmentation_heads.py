"""Structured heads on SyntheticShapes, same backbone, same data, same budget (thesis Table 3.5 layout).

Every row is trained through the configs and the LightningCLI (``app.cli.build_cli``), with the same
overrides for the data, the budget and the optimiser:

* ``--protocol finetune`` (default, the thesis protocol, Sec. 3.6.2.2): the quickstart U-Net is trained
  once for ``--pretrain-epochs``; then every row starts from that checkpoint and trains
  ``--finetune-epochs`` more with the same optimiser, schedule and backbone learning rate
  (``--finetune-lr``): the backbone alone (the quickstart config, no head), + SGM-8, + MF-4, + ISGMR-8,
  + TRWP-4 (the configs' heads), + ConvCRF end to end (backbone and CRF trained) and + ConvCRF decoupled
  (backbone frozen, CRF only, Sec. 5.2). Head parameters use the configs' ``head_lr``.
* ``--protocol joint``: every row trains from scratch, backbone and head together from the first step,
  for ``--pretrain-epochs + --finetune-epochs`` (the decoupled row still starts from a trained backbone).

Columns: validation mIoU, pixel accuracy and edge F-measure at 2 px of the final logits, and the mIoU of
the backbone's own logits in the same model (before the head). The default budget is reduced from the
configs' so that the seven rows fit in minutes on one core (3 min idle, ~20 min on a loaded host): 64x64
images, 256 training and 128 validation images, 8 + 2 epochs, one thread.

    python benchmarks/segmentation_heads.py [--rows unary,trwp4] [--protocol finetune|joint]
        [--pretrain-epochs 8] [--finetune-epochs 2] [--finetune-lr 2e-4] [--image-size 64]
        [--n-train 256] [--n-val 128] [--threads 1] [--checkpoint pretrained.ckpt] [--seed 0]
    python benchmarks/segmentation_heads.py --summarize-seeds 0 1 2 3 [--protocol ...]  # saved runs

Prints a markdown table and writes benchmarks/results/segmentation_heads.json (``_joint`` for the joint
protocol, ``_seed<n>`` for ``--seed`` n > 0: initialization and training order; the data are fixed).
``--summarize-seeds`` trains nothing: mean ± standard deviation over the saved runs of each row and of each
row's difference from the backbone alone and from its own backbone's logits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, machine, markdown_table, mean_and_spread, save_json

from app.cli import build_cli

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def head_override(class_name: str, **init_args: object) -> list[str]:
    head = {"class_path": f"app.crf_heads.{class_name}", "init_args": init_args}
    return [f"--model.init_args.head={json.dumps(head)}"]


# name -> (label, config, extra overrides). SGM-8 and MF-4 reuse the TRWP config (Canny edges in the data
# block, the same head options) with their own head and thesis term weight (Table 3.5).
ROWS: dict[str, tuple[str, str, list[str]]] = {
    "unary": ("backbone alone (unary)", "quickstart.yaml", []),
    "sgm8": (
        "+ SGM-8",
        "trwp_shapes.yaml",
        head_override("SGM", n_directions=8, n_iterations=1, term_weight=1.0, log_softmax=True),
    ),
    "mf4": (
        "+ MF-4",
        "trwp_shapes.yaml",
        head_override("MeanField", n_directions=4, n_iterations=5, term_weight=1.0, log_softmax=True),
    ),
    "isgmr8": ("+ ISGMR-8", "isgmr_shapes.yaml", []),
    "trwp4": ("+ TRWP-4", "trwp_shapes.yaml", []),
    "convcrf": ("+ ConvCRF end to end", "convcrf_shapes.yaml", []),
    "convcrf_decoupled": ("+ ConvCRF decoupled (backbone frozen)", "convcrf_decoupled.yaml", []),
}


def common_overrides(args: argparse.Namespace, epochs: int, root: Path) -> list[str]:
    return [
        f"--seed_everything={args.seed}",
        f"--trainer.max_epochs={epochs}",
        "--trainer.logger=false",
        "--trainer.callbacks=[]",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={root}",
        "--model.init_args.log_images=0",
        f"--data.init_args.image_size={args.image_size}",
        f"--data.init_args.n_train={args.n_train}",
        f"--data.init_args.n_val={args.n_val}",
        "--model.init_args.head_warmup_epochs=0",  # the rows with a head start from a trained backbone
    ]


def train(config: str, overrides: list[str], save_to: Path | None = None) -> tuple[dict[str, float], float]:
    """Fit one config; returns the last validation metrics and the wall time in seconds."""
    cli = build_cli(["--config", str(CONFIGS / config), *overrides], run=False)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule)
    seconds = time.perf_counter() - start
    if save_to is not None:
        cli.trainer.save_checkpoint(save_to)
    metrics = {name: float(value) for name, value in cli.trainer.callback_metrics.items()}
    return metrics, seconds


def result_name(protocol: str, seed: int) -> str:
    return (
        "segmentation_heads" + ("" if protocol == "finetune" else "_joint") + (f"_seed{seed}" if seed else "")
    )


def summarize_seeds(protocol: str, seeds: list[int]) -> None:
    """Mean ± standard deviation (points of mIoU / edge F) over the saved runs of ``seeds``: every row, and the
    paired differences from the backbone alone (same seed) and from the row's own backbone logits."""
    runs = []
    for seed in seeds:
        path = RESULTS / f"{result_name(protocol, seed)}.json"
        if not path.is_file():
            raise SystemExit(f"no saved run for seed {seed}: {path} (run the benchmark with --seed {seed})")
        runs.append({row["row"]: row for row in json.loads(path.read_text())["rows"]})
    rows = [row for row in runs[0] if all(row in run for run in runs)]
    if "unary" not in rows:
        raise SystemExit("the saved runs need the row 'unary' (the backbone alone) to compare with")

    def points(
        metric: str, row: str, minus: str | None = None, minus_metric: str | None = None
    ) -> list[float]:
        return [
            100 * (run[row][metric] - (run[minus][minus_metric or metric] if minus else 0.0)) for run in runs
        ]

    table = [
        [
            runs[0][row]["method"],
            mean_and_spread(points("mIoU", row)),
            mean_and_spread(points("mIoU", row, "unary"), signed=True),
            sum(value > 0 for value in points("mIoU", row, "unary")),
            mean_and_spread(points("mIoU", row, row, "mIoU_backbone"), signed=True),
            mean_and_spread(points("edge_f1@2px", row)),
            mean_and_spread(points("edge_f1@2px", row, "unary"), signed=True),
        ]
        for row in rows
    ]
    headers = [
        "method",
        "val mIoU",
        "vs backbone alone",
        f"above it (of {len(seeds)})",
        "vs own backbone",
        "edge F@2px",
        "vs backbone alone",
    ]
    print(f"{result_name(protocol, 0)}: seeds {seeds}, mean ± standard deviation, points")
    print(markdown_table(headers, table))
    summary = {
        row: {
            "mIoU": points("mIoU", row),
            "mIoU_vs_unary": points("mIoU", row, "unary"),
            "mIoU_vs_own_backbone": points("mIoU", row, row, "mIoU_backbone"),
            "edge_f1@2px": points("edge_f1@2px", row),
            "mean_mIoU_vs_unary": statistics.fmean(points("mIoU", row, "unary")),
        }
        for row in rows
    }
    print(f"wrote {save_json(result_name(protocol, 0) + '_seeds', {'seeds': seeds, 'rows': summary})}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {list(ROWS)}")
    parser.add_argument("--protocol", choices=("finetune", "joint"), default="finetune")
    parser.add_argument("--pretrain-epochs", type=int, default=8)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument(
        "--finetune-lr", type=float, default=2e-4, help="backbone learning rate of every fine-tuning row"
    )
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--n-train", type=int, default=256)
    parser.add_argument("--n-val", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="pretrained quickstart checkpoint: reused if it exists, else written there",
    )
    parser.add_argument("--seed", type=int, default=0, help="initialization and training order (data fixed)")
    parser.add_argument(
        "--summarize-seeds",
        type=int,
        nargs="+",
        metavar="SEED",
        help="train nothing: mean and spread over the saved runs of these seeds",
    )
    args = parser.parse_args()
    if args.summarize_seeds:
        summarize_seeds(args.protocol, args.summarize_seeds)
        return
    sys.argv = sys.argv[:1]  # the trainings get their arguments from build_cli(args=...)
    rows = args.rows.split(",")
    unknown = [row for row in rows if row not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {list(ROWS)}")
    torch.set_num_threads(args.threads)

    root = Path(tempfile.mkdtemp(prefix="segmentation_heads_"))
    needs_checkpoint = args.protocol == "finetune" or "convcrf_decoupled" in rows
    checkpoint = args.checkpoint or root / "pretrained.ckpt"
    pretrain_seconds = 0.0
    if needs_checkpoint and not checkpoint.exists():
        pretrained, pretrain_seconds = train(
            "quickstart.yaml", common_overrides(args, args.pretrain_epochs, root), save_to=checkpoint
        )
        print(
            f"pretrained U-Net ({checkpoint}): val/mIoU {pretrained['val/mIoU']:.4f} in {pretrain_seconds:.0f} s"
        )

    results = []
    for row in rows:
        label, config, extra = ROWS[row]
        from_checkpoint = args.protocol == "finetune" or row == "convcrf_decoupled"
        epochs = args.finetune_epochs if from_checkpoint else args.pretrain_epochs + args.finetune_epochs
        overrides = common_overrides(args, epochs, root) + extra
        if from_checkpoint:
            overrides.append(f"--model.init_args.backbone_checkpoint={checkpoint}")
            overrides.append(f"--model.init_args.lr={args.finetune_lr}")
        metrics, seconds = train(config, overrides)
        result = {
            "row": row,
            "method": label,
            "config": config,
            "epochs": f"{args.pretrain_epochs} + {epochs}" if from_checkpoint else str(epochs),
            "mIoU": metrics["val/mIoU"],
            "pixel_acc": metrics["val/pixel_acc"],
            "edge_f1@2px": metrics["val/edge_f1@2px"],
            "mIoU_backbone": metrics.get("val/mIoU_backbone", metrics["val/mIoU"]),
            "train_s": seconds,
        }
        results.append(result)
        print(json.dumps(result), flush=True)

    headers = ["method", "config", "epochs", "val mIoU", "pixel acc", "edge F@2px", "mIoU before head", "s"]
    table = [
        [
            r["method"],
            f"`{r['config']}`",
            r["epochs"],
            f"{r['mIoU']:.4f}",
            f"{r['pixel_acc']:.4f}",
            f"{r['edge_f1@2px']:.4f}",
            f"{r['mIoU_backbone']:.4f}",
            f"{r['train_s']:.0f}",
        ]
        for r in results
    ]
    print(f"\n## Heads on SyntheticShapes, protocol {args.protocol} ({machine()})\n")
    print(markdown_table(headers, table))
    payload = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "rows": results}
    payload["pretrain_s"] = pretrain_seconds
    print(f"\nwrote {save_json(result_name(args.protocol, args.seed), payload)}")


if __name__ == "__main__":
    main()

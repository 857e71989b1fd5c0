"""Thesis Table 5.2 (and Fig. 5.9) on synthetic data: RANP against the neuron-pruning baselines.

For the 15-layer 3D-UNet on :class:`~app.datamodules.volumes.SyntheticVolumes` and MobileNetV2-3D on
:class:`~app.datamodules.volumes.SyntheticClips`, one importance analysis (Alg. 5, ``--n-batches``
batches) feeds every manner: the neuron sparsity of random, layer-wise, vanilla, weighted NP and
RANP-m/f is ``--sparsity`` for the 3D-UNet (default 0.8; 0 gives the thesis protocol, vanilla NP's largest
feasible one by Alg. 6) and ``--clip-sparsity`` for the clips (default: vanilla NP's largest), and SNIP NP
uses its own largest feasible *parameter* sparsity. Each pruned network (Glorot re-initialised, as the thesis) and the
full one are then trained with the same budget (``--train-steps`` Adam steps at ``--lr`` with a cosine
schedule, same batches; ``--bf16``: under bfloat16 autocast, about twice as fast on CPUs with AVX512-BF16)
and evaluated on the validation split: mIoU (macro, background included) for the 3D-UNet, top-1 for
MobileNetV2-3D. Resources are per sample: parameters (MB, float32), GFLOPs (Eq. 5.12a) and the memory of
the layer outputs (MB, Eq. 5.12b). Also reported: the largest feasible sparsity of every manner, the time
the pruning takes, the measured peak memory and time of one training step (full vs RANP-f), and
Fig. 5.9-style curves of FLOPs and memory against neuron sparsity with (RANP-f) and without (vanilla NP)
reweighting.

Run (CPU-sized: 24^3 volumes, base width 16, 300 steps; clips of width 0.5, 8 frames of 32^2, time halved
only in the last downsampling stage, 400 Adam steps at ``--clip-lr`` on fresh clips): ``python benchmarks/ranp.py``
Thesis-scale resources (3D-UNet with base width 64 at 64^3, no training):
``python benchmarks/ranp.py --size 64 --base-width 64 --train-steps 0 --skip-clips``
Prints markdown tables and writes ``benchmarks/results/ranp.json`` (one entry per configuration).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from common import RESULTS, machine, markdown_table, peak_memory_mib, timed
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex
from tqdm.auto import tqdm

from app.datamodules.volumes import SyntheticClips, SyntheticVolumes
from app.models.nets3d import MobileNetV2_3D, UNet3D
from app.pruning import PruningAnalysis, analyze_model, apply_selection, fast_conv_weight_grad

MANNERS = (
    ("Full", None),
    ("SNIP NP", "snip"),
    ("Random NP", "random"),
    ("Layer-wise NP", "layerwise"),
    ("Vanilla NP", "vanilla"),
    ("Weighted NP", "weighted"),
    ("RANP-m", "ranp_m"),
    ("RANP-f", "ranp_f"),
)
LossFn = Callable[[nn.Module, dict], torch.Tensor]


def seg_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return F.cross_entropy(model(batch["image"]), batch["mask"])


def clip_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return F.cross_entropy(model(batch["image"]), batch["label"])


def per_sample(totals: dict[str, float], batch_size: int) -> dict[str, float]:
    """Resource totals of a batch divided by its size (parameters are not per sample)."""
    return {
        "params_mb": totals["params_mb"],
        "gflops": totals["gflops"] / batch_size,
        "memory_mb": totals["memory_mb"] / batch_size,
    }


def prune_all(
    model: nn.Module, batches: list[dict], loss_fn: LossFn, lam: float, sparsity: float | None
) -> tuple[PruningAnalysis, dict[str, Any], dict[str, nn.Module], dict[str, float], dict[str, float]]:
    """One analysis, then every manner of Table 5.2 on a deep copy of ``model``, at ``sparsity`` (default
    the protocol of the thesis: vanilla NP's largest feasible sparsity; SNIP's own for SNIP NP).

    Returns:
        The analysis, the result rows and the models by manner, the largest feasible sparsity by method
        (Alg. 6) and the RANP-f pruning time (s): ``analysis_s`` (channel graph, resources and the
        importance over the batches, Alg. 5), ``select_s`` (Eq. 5.9-5.11), ``surgery_s`` and their sum
        ``pruning_s``.
    """
    start = time.perf_counter()
    analysis = analyze_model(model, batches, loss_fn, progress=True)
    timing = {"analysis_s": time.perf_counter() - start}
    batch_size = int(batches[0]["image"].shape[0])
    max_sparsity = {method: analysis.max_sparsity(method, lam=lam) for _, method in MANNERS if method}
    full = per_sample(analysis.resources.totals(), batch_size)
    rows: dict[str, Any] = {"Full": {"sparsity": 0.0, **full, "reduction_pct": {}, "kept": {}}}
    models: dict[str, nn.Module] = {"Full": copy.deepcopy(model)}
    neuron_sparsity = sparsity or max_sparsity["vanilla"]
    for name, method in MANNERS[1:]:
        kappa = max_sparsity["snip"] if method == "snip" else neuron_sparsity
        start = time.perf_counter()
        # keep_top: a manner that empties a layer (random NP on a small net) keeps that layer's best neuron
        selection = analysis.select(method, kappa, lam=lam, keep_top=True)
        selected = time.perf_counter()
        pruned = copy.deepcopy(model)
        copied = time.perf_counter()
        torch.manual_seed(0)
        report = apply_selection(pruned, analysis, selection, init="glorot")
        if method == "ranp_f":
            timing.update(select_s=selected - start, surgery_s=time.perf_counter() - copied)
        after = per_sample(report.after.totals(), batch_size)
        rows[name] = {
            "sparsity": kappa,
            "neuron_sparsity": report.sparsity,
            **after,
            "reduction_pct": {
                k: 100.0 * (1 - after[k] / full[k]) for k in ("params_mb", "gflops", "memory_mb")
            },
            "kept": {layer: kept for layer, (kept, _) in report.kept.items()},
            "repaired_layers": selection.repaired_layers,
        }
        models[name] = pruned
    timing["pruning_s"] = timing["analysis_s"] + timing["select_s"] + timing["surgery_s"]
    return analysis, rows, models, max_sparsity, timing


def curves(
    model: nn.Module, analysis: PruningAnalysis, lam: float, points: int, batch_size: int
) -> dict[str, list[dict[str, float]]]:
    """Fig. 5.9: FLOPs and memory against neuron sparsity, without (vanilla NP) and with (RANP-f)
    reweighting, from 0 to each method's largest feasible sparsity."""
    out = {}
    for method in ("vanilla", "ranp_f"):
        top = analysis.max_sparsity(method, lam=lam)
        series = []
        for i in range(points):
            sparsity = top * i / (points - 1)
            pruned = copy.deepcopy(model)
            report = apply_selection(
                pruned, analysis, analysis.select(method, sparsity, lam=lam), init="keep"
            )
            series.append({"sparsity": report.sparsity, **per_sample(report.after.totals(), batch_size)})
        out[method] = series
    return out


def plot_curves(curve: dict[str, list[dict[str, float]]], title: str, path: Any) -> None:
    """Fig. 5.9 as a PNG: GFLOPs and memory against neuron sparsity, w/o and w/ reweighting (needs
    matplotlib, the ``bench`` extra; skipped with a message without it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (the bench extra; pip install matplotlib): Fig. 5.9 PNG skipped")
        return
    labels = {"vanilla": "w/o reweighting (vanilla NP)", "ranp_f": "w/ reweighting (RANP-f)"}
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for axis, resource, unit in zip(axes, ("gflops", "memory_mb"), ("GFLOPs", "Memory (MB)")):
        for method, series in curve.items():
            sparsity = [100 * point["sparsity"] for point in series]
            axis.plot(sparsity, [point[resource] for point in series], "o-", label=labels[method])
        axis.set_xlabel("neuron sparsity (%)")
        axis.set_ylabel(unit)
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    print(f"wrote {path}")


def compute_precision(bf16: bool) -> torch.autocast:
    """The CPU autocast context of training and evaluation: bfloat16 matmuls and convolutions (about 2x
    faster on CPUs with AVX512-BF16 or AMX; parameters, gradients and the loss stay float32) or none."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


def train(
    model: nn.Module,
    loader: Any,
    loss_fn: LossFn,
    steps: int,
    lr: float,
    seed: int,
    desc: str = "train",
    bf16: bool = False,
) -> float:
    """``steps`` Adam steps over ``loader`` (cycled), the learning rate cosine-annealed to zero, with a
    progress bar named ``desc``; returns the last loss. 3D weight gradients as every task trains them
    (:func:`fast_conv_weight_grad`); ``bf16``: forward under :func:`compute_precision`."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    model.train()
    loss = torch.zeros(())
    done = 0
    with fast_conv_weight_grad(model), tqdm(total=steps, desc=desc, unit="step") as progress:
        while done < steps:
            for batch in loader:
                optimizer.zero_grad(set_to_none=True)
                with compute_precision(bf16):
                    loss = loss_fn(model, batch)
                loss.backward()
                optimizer.step()
                schedule.step()
                done += 1
                progress.update()
                progress.set_postfix(loss=f"{float(loss.detach()):.4f}", refresh=False)
                if done == steps:
                    break
    return float(loss.detach())


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Any, num_classes: int, segmentation: bool, bf16: bool = False
) -> float:
    """Validation mIoU (segmentation) or top-1 accuracy, in percent, in the training's precision."""
    model.eval()
    if segmentation:
        metric = MulticlassJaccardIndex(num_classes, average="macro")
    else:
        metric = MulticlassAccuracy(num_classes, average="micro")
    for batch in loader:
        with compute_precision(bf16):
            logits = model(batch["image"])
        metric.update(logits.argmax(1), batch["mask"] if segmentation else batch["label"])
    return 100.0 * float(metric.compute())


def step_cost(model: nn.Module, batch: dict, loss_fn: LossFn) -> dict[str, float]:
    """Measured peak memory (MiB, CPU profiler) and median time (ms) of one float32 training step, with the 3D
    weight gradients the tasks use in training (:func:`fast_conv_weight_grad`)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        optimizer.step()

    with fast_conv_weight_grad(model):
        return {
            "peak_memory_mib": peak_memory_mib(step, "cpu"),
            "step_ms": timed(step, "cpu", repeats=3, warmup=3),
        }


def run_experiment(
    key: str,
    title: str,
    model: nn.Module,
    datamodule: Any,
    loss_fn: LossFn,
    args: argparse.Namespace,
    lam: float,
    segmentation: bool,
    num_classes: int,
) -> dict[str, Any]:
    prune_batches = [b for _, b in zip(range(args.n_batches), datamodule.train_dataloader())]
    analysis, rows, models, maxima, timing = prune_all(model, prune_batches, loss_fn, lam, args.sparsity)
    batch_size = int(prune_batches[0]["image"].shape[0])
    metric_name = "mIoU" if segmentation else "Top-1"
    if args.train_steps > 0:
        for name, net in models.items():
            if args.train_manners and name not in args.train_manners:
                continue
            start = time.perf_counter()
            # a fresh loader per manner: the same batches in the same order for every network
            last = train(
                net,
                datamodule.train_dataloader(),
                loss_fn,
                args.train_steps,
                args.lr,
                args.seed,
                desc=name,
                bf16=args.bf16,
            )
            rows[name]["train_s"] = time.perf_counter() - start
            rows[name]["final_loss"] = last
            rows[name][metric_name] = evaluate(
                net, datamodule.val_dataloader(), num_classes, segmentation, bf16=args.bf16
            )
    payoff = {
        **timing,
        "full": step_cost(copy.deepcopy(models["Full"]), prune_batches[0], loss_fn),
        "ranp_f": step_cost(copy.deepcopy(models["RANP-f"]), prune_batches[0], loss_fn),
    }
    curve = curves(model, analysis, lam, args.curve_points, batch_size) if args.curve_points > 1 else {}

    def cell(name: str, resource: str) -> str:
        row = rows[name]
        reduction = row["reduction_pct"].get(resource)
        return f"{row[resource]:.3f}" + (f" ({reduction:.1f}↓)" if reduction is not None else "")

    table = [
        [
            name,
            f"{100 * rows[name]['sparsity']:.2f}",
            cell(name, "params_mb"),
            cell(name, "gflops"),
            cell(name, "memory_mb"),
            f"{rows[name][metric_name]:.2f}" if metric_name in rows[name] else "-",
        ]
        for name, _ in MANNERS
    ]
    print(f"\n### {title}\n")
    print(
        markdown_table(
            ["Manner", "Sparsity(%)", "Param(MB)", "GFLOPs", "Memory(MB)", f"{metric_name}(%)"], table
        )
    )
    repaired = {name: row["repaired_layers"] for name, row in rows.items() if row.get("repaired_layers")}
    if repaired:
        print(f"\nLayers that kept only their best neuron (the manner would have emptied them): {repaired}")
    print("\nLargest feasible sparsity (Alg. 6; parameter sparsity for SNIP NP):")
    print(markdown_table(["method", "max sparsity (%)"], [[m, f"{100 * v:.2f}"] for m, v in maxima.items()]))
    full, slim = payoff["full"], payoff["ranp_f"]
    print(
        f"\nPruning (RANP-f, {args.n_batches} batches of {batch_size}): {payoff['pruning_s']:.1f} s "
        f"(importance {payoff['analysis_s']:.1f} s, selection {payoff['select_s']:.2f} s, "
        f"surgery {payoff['surgery_s']:.1f} s). "
        f"One training step, full vs RANP-f: peak memory {full['peak_memory_mib']:.1f} vs "
        f"{slim['peak_memory_mib']:.1f} MiB "
        f"({full['peak_memory_mib'] / slim['peak_memory_mib']:.1f}x), time {full['step_ms']:.0f} vs "
        f"{slim['step_ms']:.0f} ms ({full['step_ms'] / slim['step_ms']:.1f}x)."
    )
    if curve:
        print("\nFig. 5.9: resources against neuron sparsity, w/o (vanilla NP) and w/ (RANP-f) reweighting:")
        curve_rows = [
            [method, f"{100 * p['sparsity']:.1f}", f"{p['gflops']:.3f}", f"{p['memory_mb']:.2f}"]
            for method, series in curve.items()
            for p in series
        ]
        print(markdown_table(["method", "sparsity(%)", "GFLOPs", "Memory(MB)"], curve_rows))
        plot_curves(curve, title, RESULTS / f"ranp_fig5_9_{key}.png")
    return {
        "title": title,
        "lambda": lam,
        "sparsity": args.sparsity,
        "n_batches": args.n_batches,
        "train_steps": args.train_steps,
        "bf16": args.bf16,
        "manners": rows,
        "max_sparsity": maxima,
        "payoff": payoff,
        "curves": curve,
        "key": key,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=24, help="volume side (thesis: 64)")
    parser.add_argument("--base-width", type=int, default=16, help="3D-UNet base width (thesis: 64)")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument(
        "--sparsity", type=float, default=0.8, help="3D-UNet neuron sparsity (0: vanilla NP's largest)"
    )
    parser.add_argument("--n-batches", type=int, default=4, help="batches of the importance (Alg. 5)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--n-train", type=int, default=32, help="training volumes")
    parser.add_argument("--n-val", type=int, default=16, help="validation volumes")
    parser.add_argument("--train-steps", type=int, default=300, help="0: resources only")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (cosine to zero)")
    parser.add_argument(
        "--bf16", action="store_true", help="train and evaluate under bfloat16 autocast (CPU)"
    )
    parser.add_argument(
        "--train-manners", type=lambda s: s.split(","), default=None, help='e.g. "Full,RANP-f" (default: all)'
    )
    parser.add_argument("--lam", type=float, default=11.0, help="lambda of Eq. 5.10 (thesis ShapeNet: 11)")
    parser.add_argument(
        "--lam-clips", type=float, default=80.0, help="lambda for the clips (thesis UCF101: 80)"
    )
    parser.add_argument("--clip-frames", type=int, default=8)
    parser.add_argument("--clip-size", type=int, default=32)
    parser.add_argument("--clip-classes", type=int, default=8)
    parser.add_argument("--clip-width", type=float, default=0.5, help="MobileNetV2-3D width multiplier")
    parser.add_argument(
        "--clip-temporal-strides",
        type=int,
        default=1,
        help="MobileNetV2-3D stages that halve time (4: the 16-frame layout; 8 frames need 1)",
    )
    parser.add_argument(
        "--clip-n-train", type=int, default=6400, help="training clips (few are memorised, not generalised)"
    )
    parser.add_argument("--clip-lr", type=float, default=3e-3, help="Adam learning rate for the clips")
    parser.add_argument("--clip-batch-size", type=int, default=16)
    parser.add_argument("--clip-sparsity", type=float, default=None, help="default: vanilla NP's largest")
    parser.add_argument("--clip-train-steps", type=int, default=400, help="0: resources only")
    parser.add_argument("--curve-points", type=int, default=6)
    parser.add_argument("--skip-clips", action="store_true")
    parser.add_argument("--skip-unet", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    def suffix(run: argparse.Namespace) -> str:
        text = f"_k{run.sparsity}" if run.sparsity else ""
        if (run.n_train, run.n_val) != (parser.get_default("n_train"), parser.get_default("n_val")):
            text += f"_n{run.n_train}v{run.n_val}"
        if run.train_manners:
            text += f"_{'+'.join(run.train_manners)}_steps{run.train_steps}".replace(" ", "")
        if run.bf16:
            text += "_bf16"
        return text

    results: dict[str, Any] = {}
    if not args.skip_unet:
        torch.manual_seed(args.seed)
        volumes = SyntheticVolumes(
            args.classes,
            args.size,
            n_train=args.n_train,
            n_val=args.n_val,
            batch_size=args.batch_size,
            seed=args.seed,
        )
        unet = UNet3D(1, args.classes, 15, base_width=args.base_width)
        key = f"unet3d15_w{args.base_width}_s{args.size}" + suffix(args)
        title = f"3D-UNet (15 layers, base width {args.base_width}) on SyntheticVolumes {args.size}^3"
        results[key] = run_experiment(key, title, unet, volumes, seg_loss, args, args.lam, True, args.classes)
        results[key]["machine"] = machine()
    if not args.skip_clips:
        clip_args = argparse.Namespace(
            **{
                **vars(args),
                "sparsity": args.clip_sparsity,
                "train_steps": args.clip_train_steps,
                "lr": args.clip_lr,
            }
        )
        torch.manual_seed(args.seed)
        clips = SyntheticClips(
            args.clip_classes,
            args.clip_frames,
            args.clip_size,
            n_train=args.clip_n_train,
            n_val=256,
            batch_size=args.clip_batch_size,
            seed=args.seed,
        )
        net = MobileNetV2_3D(
            args.clip_classes, width_mult=args.clip_width, temporal_strides=args.clip_temporal_strides
        )
        key = (
            f"mobilenetv2_3d_w{args.clip_width}_t{args.clip_frames}_s{args.clip_size}"
            f"_ts{args.clip_temporal_strides}" + suffix(clip_args)
        )
        frames = f"{args.clip_frames}x{args.clip_size}^2"
        title = f"MobileNetV2-3D (width {args.clip_width}) on SyntheticClips {frames}"
        results[key] = run_experiment(
            key, title, net, clips, clip_loss, clip_args, args.lam_clips, False, args.clip_classes
        )
        results[key]["machine"] = machine()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "ranp.json"
    if path.exists():  # read last: runs of other configurations may have written meanwhile
        results = {**json.loads(path.read_text()), **results}
    path.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

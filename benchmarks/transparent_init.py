"""Reproduce thesis Tables 4.2 and 4.3: transparent initialization against Random, Xavier and Net2Net.

Table 4.2: init rate (percentage of parameters with |p| > eps) and recovery rate (percentage of output
values within eps of the input value) without and with ReLU between the layers, and whether non-square
layers are supported; 3 layers 42->64->64->42 as 1x1 convolutions (42x42 for Net2Net), inputs uniform in
[-10, 10] of shape (4, 42, 512, 512), eps = 1e-4.
Table 4.3: max |output - input| of ours for inputs uniform in [-r, r], r = 1, 10, 1e2, 1e3.

Baselines (biases zero, the usual convention; with it the thesis' 98.2% init rate is the share of
weights among 42*64 + 64*64 + 64*42 weights and 170 biases):
- Random: Kaiming-normal weights (std sqrt(2 / fan_in)).
- Xavier: Xavier-uniform weights.
- Net2Net (Net2DeeperNet): identity weights; defined for square layers only, so it is measured on
  42->42->42->42 and the 42->64->64->42 stack is reported unsupported.
Ours is ``app.models.transparent_init.TransparentLayers``: with ReLU its hidden layers are 2 x 64 wide
(the duplicate/subtract form, Eq. 4.8-4.10).

Run: ``python benchmarks/transparent_init.py`` (about a minute on 2 CPU cores); ``--size 128`` for a
quick look. Prints markdown tables and writes ``benchmarks/results/transparent_init.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from app.models.transparent_init import TransparentLayers

WIDTHS = (42, 64, 64, 42)
SQUARE_WIDTHS = (42, 42, 42, 42)
RANGES = (1.0, 10.0, 1e2, 1e3)
THESIS_TABLE_4_2 = {  # init rate, recovery w/o activation, recovery w/ ReLU, non-square supported
    "Random": (98.2, 0.0, 0.0, True),
    "Xavier": (98.2, 0.0, 0.0, True),
    "Net2Net": (2.3, 100.0, 50.0, False),
    "Ours": (99.9, 100.0, 100.0, True),
}
THESIS_TABLE_4_3 = {1.0: 6.8e-6, 10.0: 6.6e-5, 1e2: 6.5e-4, 1e3: 6.6e-3}


def _stack(widths: tuple[int, ...], relu: bool, init: Callable[[nn.Conv2d], None]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for index in range(len(widths) - 1):
        conv = nn.Conv2d(widths[index], widths[index + 1], kernel_size=1)
        init(conv)
        layers.append(conv)
        if relu and index < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _kaiming(conv: nn.Conv2d) -> None:
    nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
    nn.init.zeros_(conv.bias)


def _xavier(conv: nn.Conv2d) -> None:
    nn.init.xavier_uniform_(conv.weight)
    nn.init.zeros_(conv.bias)


def _net2net(conv: nn.Conv2d) -> None:
    if conv.in_channels != conv.out_channels:
        raise ValueError(
            f"Net2DeeperNet inserts identity layers, which need in_channels == out_channels "
            f"(got {conv.in_channels} -> {conv.out_channels})"
        )
    with torch.no_grad():
        conv.weight.copy_(torch.eye(conv.in_channels)[:, :, None, None])
    nn.init.zeros_(conv.bias)


def build(method: str, widths: tuple[int, ...], relu: bool, seed: int) -> nn.Module:
    """One of the compared stacks of 1x1 convolutions; raises ValueError where the method cannot."""
    torch.manual_seed(seed)
    if method == "Ours":
        hidden = widths[1:-1]
        return TransparentLayers(
            widths[0], hidden, activation="relu" if relu else None, layer_type="conv1x1", seed=seed
        )
    init = {"Random": _kaiming, "Xavier": _xavier, "Net2Net": _net2net}[method]
    return _stack(widths, relu, init)


def init_rate(module: nn.Module, eps: float) -> float:
    """Percentage of parameters (weights and biases) with absolute value > eps."""
    values = torch.cat([p.detach().flatten() for p in module.parameters()])
    return 100.0 * float((values.abs() > eps).double().mean())


def inputs(index: int, shape: tuple[int, ...], bound: float, seed: int, device: torch.device) -> torch.Tensor:
    """The ``index``-th input image, uniform in [-bound, bound], identical for every method."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return ((torch.rand(shape, generator=generator) * 2 - 1) * bound).to(device)


@torch.no_grad()
def recovery(
    module: nn.Module, batch: int, size: int, bound: float, eps: float, seed: int, device: torch.device
) -> tuple[float, float]:
    """(recovery rate in %, max |output - input|) over ``batch`` images of (42, size, size)."""
    module = module.to(device)
    dtype = next(module.parameters()).dtype
    recovered = 0
    total = 0
    worst = 0.0
    for index in range(batch):
        x = inputs(index, (1, WIDTHS[0], size, size), bound, seed, device).to(dtype)
        error = (module(x) - x).abs()
        recovered += int((error < eps).sum())
        total += error.numel()
        worst = max(worst, float(error.max()))
    return 100.0 * recovered / total, worst


def table_4_2(args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows = []
    for method in THESIS_TABLE_4_2:
        try:
            build(method, WIDTHS, relu=False, seed=args.seed)
            non_square = True
        except ValueError:
            non_square = False
        widths = WIDTHS if non_square else SQUARE_WIDTHS
        row: dict = {"method": method, "widths": list(widths), "non_square_supported": non_square}
        for relu in (False, True):
            module = build(method, widths, relu=relu, seed=args.seed)
            rate, worst = recovery(module, args.batch, args.size, 10.0, args.eps, args.seed, device)
            suffix = "relu" if relu else "no_activation"
            row[f"init_rate_{suffix}"] = init_rate(module, args.eps)
            row[f"recovery_rate_{suffix}"] = rate
            row[f"max_error_{suffix}"] = worst
            row[f"layer_shapes_{suffix}"] = [
                list(m.weight.shape[:2]) for m in module.modules() if isinstance(m, nn.Conv2d)
            ]
        rows.append(row)
    return rows


def table_4_3(args: argparse.Namespace, device: torch.device) -> list[dict]:
    variants = [
        ("none", None, torch.float32),
        ("relu", "relu", torch.float32),
        ("leaky_relu", "leaky_relu", torch.float32),
        ("softplus", "softplus", torch.float32),
        ("relu (float64)", "relu", torch.float64),
    ]
    rows = []
    for name, activation, dtype in variants:
        module = TransparentLayers(
            WIDTHS[0], WIDTHS[1:-1], activation=activation, layer_type="conv1x1", seed=args.seed
        ).to(dtype)
        module.reset_parameters()  # redraw in the working dtype: float64 layers invert in float64
        errors = {}
        for bound in RANGES:
            errors[bound] = recovery(module, args.batch, args.size, bound, args.eps, args.seed, device)[1]
        rows.append({"activation": name, "dtype": str(dtype).replace("torch.", ""), "max_error": errors})
    return rows


def markdown(rows_4_2: list[dict], rows_4_3: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"Table 4.2: inputs uniform in [-10, 10], {args.batch} x 42 x {args.size} x {args.size}, "
        f"eps = {args.eps:g} (thesis values in brackets)",
        "",
        "| Manner | layers | init rate % (no act. / ReLU) | recovery % w/o act. | recovery % w/ ReLU "
        "| non-square |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows_4_2:
        thesis = THESIS_TABLE_4_2[row["method"]]
        lines.append(
            f"| {row['method']} | {'->'.join(map(str, row['widths']))} "
            f"| {row['init_rate_no_activation']:.1f} / {row['init_rate_relu']:.1f} ({thesis[0]}) "
            f"| {row['recovery_rate_no_activation']:.1f} ({thesis[1]}) "
            f"| {row['recovery_rate_relu']:.1f} ({thesis[2]}) "
            f"| {'yes' if row['non_square_supported'] else 'no'} ({'yes' if thesis[3] else 'no'}) |"
        )
    header = " | ".join(f"[-{bound:g}, {bound:g}]" for bound in RANGES)
    lines += [
        "",
        "Table 4.3: max |output - input| of ours, 42->64->64->42 (ReLU variants 42->128->128->42)",
        "",
        f"| activation | dtype | {header} | max error / range |",
        "| --- | --- |" + " --- |" * (len(RANGES) + 1),
    ]
    for row in rows_4_3:
        errors = row["max_error"]
        per_range = [errors[bound] / bound for bound in RANGES]
        lines.append(
            f"| {row['activation']} | {row['dtype']} | "
            + " | ".join(f"{errors[bound]:.2g}" for bound in RANGES)
            + f" | {min(per_range):.2g} - {max(per_range):.2g} |"
        )
    lines.append(
        "| thesis | float32 | " + " | ".join(f"{THESIS_TABLE_4_3[bound]:.2g}" for bound in RANGES) + " | |"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=512, help="height = width of each input (thesis: 512)")
    parser.add_argument("--eps", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).parent / "results" / "transparent_init.json"
    )
    args = parser.parse_args()
    if args.batch < 1 or args.size < 1 or args.eps <= 0:
        raise ValueError("--batch and --size must be >= 1 and --eps > 0")
    device = torch.device(args.device)
    rows_4_2 = table_4_2(args, device)
    rows_4_3 = table_4_3(args, device)
    print(markdown(rows_4_2, rows_4_3, args))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "command": "python benchmarks/transparent_init.py "
        + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "output"),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "table_4_2": rows_4_2,
        "table_4_3": [
            {**row, "max_error": {f"{bound:g}": error for bound, error in row["max_error"].items()}}
            for row in rows_4_3
        ],
        "thesis_table_4_2": THESIS_TABLE_4_2,
        "thesis_table_4_3": {f"{bound:g}": error for bound, error in THESIS_TABLE_4_3.items()},
    }
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()

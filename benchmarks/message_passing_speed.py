"""Message-passing speed, thesis Tables 3.6-3.7 layout: TRWP, ISGMR and mean-field (MF) at 4/8/16 directions,
32 and 96 labels, 256x512, 5 iterations, forward and backward, the compiled op against the plain-PyTorch
reference.

    python benchmarks/message_passing_speed.py [--device cpu|cuda]
        [--pairwise potts|truncated_linear|truncated_quadratic|matrix]
        [--labels 32 96] [--directions 4 8 16] [--methods trwp isgmr meanfield] [--reference-directions 4]
        [--repeats 3] [--profile] [--cuda-block-sweeps] [--batch 1] [--size 256 512] [--all-gradients]

The forms take the kernels' O(L) paths (on CUDA: the band of the warp sweeps up to 256 labels); ``matrix``
is the truncated quadratic of ``truncated_quadratic`` (term weight 1, truncation 16) given as an (L, L) matrix,
which takes the O(L^2) min-convolution. The reference is slow (a Python loop over image rows), so it is timed
once and only at ``--reference-directions``. "stored" is the backward's state: for TRWP / ISGMR the indices
(Sec. 3.7.4): per message its q and ``index_row`` uint8 entries (one per label, Potts one bit per label plus the
label of its jumps); for MF the distributions of every
iteration, one float32 per label, pixel and iteration. Prints a markdown table (seconds on the CPU,
milliseconds on a GPU) and writes benchmarks/results/message_passing_speed_<device>_<pairwise>_L<labels>.json.
``--profile`` first prints the torch profiler's table of one forward and backward of the first method /
directions / labels (per-kernel times). ``--cuda-block-sweeps`` times the CUDA block sweeps (one block per
scanline) at every label count instead of the warp sweeps up to 256 labels (APP_CUDA_BLOCK_SWEEPS=1); the JSON
name then ends in ``_block``. ``--batch`` and ``--size`` change the input from one 256x512 image (the thesis'
tables) to, e.g., a head's batch of small images with few labels (``--batch 8 --size 96 96 --labels 4``); the
JSON name then ends in ``_b<batch>_<H>x<W>``. ``--all-gradients`` differentiates the edge weights (ones) and the
pairwise's term weight (or matrix) too, as a head's training step does (JSON name ``..._all_gradients``).
"""

from __future__ import annotations

import argparse
import os

import torch
from common import machine, markdown_table, save_json, timed

from app.ops import Pairwise, message_passing
from app.ops.message_passing import _pairwise_kind, index_dtype, index_row
from app.ops.reference import message_passing as reference

HEIGHT, WIDTH, ITERATIONS = 256, 512, 5  # the default input: one image (--batch, --size change it)


def make_pairwise(kind: str, n_labels: int, device: str, learnable: bool = False) -> torch.Tensor | Pairwise:
    """The benchmark's pairwise; ``learnable``: its term weight (a form) or matrix requires a gradient."""
    weight = torch.tensor(1.0, device=device, requires_grad=True) if learnable else 1.0
    if kind == "potts":
        return Pairwise("potts", weight)
    if kind == "truncated_linear":
        return Pairwise("truncated_linear", weight, 4.0)
    quadratic = Pairwise("truncated_quadratic", weight, 16.0)
    if kind == "truncated_quadratic":
        return quadratic
    return quadratic.matrix(n_labels, device=device).detach().requires_grad_(learnable)


def pairwise_parameters(pairwise: torch.Tensor | Pairwise) -> list[torch.Tensor]:
    """The tensors of ``pairwise`` that require a gradient."""
    tensors = [pairwise] if isinstance(pairwise, torch.Tensor) else [pairwise.term_weight]
    return [t for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad]


def stored_mib(method: str, n_directions: int, n_labels: int, pairwise_kind: int, pixels: int) -> float:
    """What the forward keeps for the backward (``pixels`` = B H W): argmin indices, or mean-field's float32
    distributions."""
    if method == "meanfield":
        return ITERATIONS * pixels * n_labels * 4 / 2**20
    messages = ITERATIONS * n_directions * pixels
    return messages * (index_row(n_labels, pairwise_kind) + 1) * index_dtype(n_labels).itemsize / 2**20


def time_pair(
    fn, unary: torch.Tensor, device: str, repeats: int, warmup: int, others: tuple[torch.Tensor, ...] = ()
) -> tuple[float, float]:
    """(forward ms, backward ms) of ``fn(unary)``, medians over ``repeats`` after ``warmup`` untimed calls; the
    backward differentiates ``unary`` and ``others``."""
    with torch.no_grad():
        forward = timed(lambda: fn(unary), device, repeats=repeats, warmup=warmup)
    costs = fn(unary)
    grad = torch.ones_like(costs)
    backward = timed(
        lambda: torch.autograd.grad(costs, (unary, *others), grad, retain_graph=True),
        device,
        repeats=repeats,
        warmup=warmup,
    )
    return forward, backward


def print_profile(args: argparse.Namespace) -> None:
    """The profiler's per-operator / per-kernel table of one forward + backward (after warm-up calls)."""
    n_labels, method, n_directions = args.labels[0], args.methods[0], args.directions[0]
    unary = torch.rand(args.batch, n_labels, *args.size, device=args.device, requires_grad=True)
    pairwise = make_pairwise(args.pairwise, n_labels, args.device)

    def step() -> None:
        costs = message_passing(unary, pairwise, None, method, n_directions, ITERATIONS)
        torch.autograd.grad(costs, unary, torch.ones_like(costs))

    on_gpu = args.device == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU]
    if on_gpu:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    for _ in range(3):
        step()
    with torch.profiler.profile(activities=activities) as profile:
        step()
        if on_gpu:
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
    print(f"profile: {method}-{n_directions}, {n_labels} labels, one forward + backward")
    print(profile.key_averages().table(sort_by=sort, row_limit=15))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--pairwise",
        default="potts",
        choices=("potts", "truncated_linear", "truncated_quadratic", "matrix"),
    )
    parser.add_argument("--labels", type=int, nargs="+", default=[32, 96])
    parser.add_argument("--directions", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--methods", nargs="+", default=["trwp", "isgmr", "meanfield"])
    parser.add_argument("--reference-directions", type=int, nargs="*", default=[4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="per-kernel times of the first configuration")
    parser.add_argument("--batch", type=int, default=1, help="images per call")
    parser.add_argument("--size", type=int, nargs=2, default=[HEIGHT, WIDTH], metavar=("H", "W"))
    parser.add_argument(
        "--all-gradients",
        action="store_true",
        help="the backward differentiates the edge weights and the pairwise too, as a head's training step does",
    )
    parser.add_argument(
        "--cuda-block-sweeps", action="store_true", help="CUDA block sweeps at every label count"
    )
    args = parser.parse_args()
    if args.cuda_block_sweeps:
        os.environ["APP_CUDA_BLOCK_SWEEPS"] = "1"

    if args.profile:
        print_profile(args)
    unit, scale = ("ms", 1.0) if args.device == "cuda" else ("s", 1e-3)
    rows, results = [], []
    for n_labels in args.labels:
        gen = torch.Generator().manual_seed(0)
        unary = torch.rand(args.batch, n_labels, *args.size, generator=gen).to(args.device).requires_grad_()
        pairwise = make_pairwise(args.pairwise, n_labels, args.device, args.all_gradients)
        for method in args.methods:
            for n_directions in args.directions:
                edge_weights = None
                others = ()
                if args.all_gradients:
                    shape = (args.batch, n_directions // 2, *args.size)
                    edge_weights = torch.ones(shape, device=args.device, requires_grad=True)
                    others = (edge_weights, *pairwise_parameters(pairwise))

                def compiled(x, method=method, n_directions=n_directions, pairwise=pairwise, w=edge_weights):
                    return message_passing(x, pairwise, w, method, n_directions, ITERATIONS)

                # three warm-up calls: on the CPU the first two or three calls of a process are up to 3x
                # slower (among other warm-up costs, fresh buffers are faulted in until malloc reuses freed ones)
                forward, backward = time_pair(compiled, unary, args.device, args.repeats, 3, others)
                entry = {"method": method, "directions": n_directions, "labels": n_labels}
                entry.update(forward_ms=forward, backward_ms=backward)
                if n_directions in args.reference_directions:

                    def plain(x, method=method, n_directions=n_directions, pairwise=pairwise, w=edge_weights):
                        return reference(x, pairwise, w, method, n_directions, ITERATIONS)

                    entry["reference_forward_ms"], entry["reference_backward_ms"] = time_pair(
                        plain, unary, args.device, 1, 0, others
                    )
                entry["stored_mib"] = stored_mib(
                    method, n_directions, n_labels, _pairwise_kind(pairwise), unary[:, 0].numel()
                )
                results.append(entry)
                ref_f, ref_b = entry.get("reference_forward_ms"), entry.get("reference_backward_ms")
                rows.append(
                    [
                        f"{'MF' if method == 'meanfield' else method.upper()}-{n_directions}",
                        n_labels,
                        f"{forward * scale:.3f}",
                        f"{backward * scale:.3f}",
                        "-" if ref_f is None else f"{ref_f * scale:.2f}",
                        "-" if ref_b is None else f"{ref_b * scale:.2f}",
                        "-" if ref_f is None else f"{ref_f / forward:.0f}x / {ref_b / backward:.0f}x",
                        f"{entry['stored_mib']:.0f}",
                    ]
                )
    headers = [
        "method",
        "labels",
        f"fwd ({unit})",
        f"bwd ({unit})",
        f"ref fwd ({unit})",
        f"ref bwd ({unit})",
        "speed-up",
        "stored (MiB)",
    ]
    sweeps = ", CUDA block sweeps" if args.cuda_block_sweeps else ""
    height, width = args.size
    print(
        f"{args.batch} x {height}x{width}, {ITERATIONS} iterations, {args.pairwise} pairwise{sweeps}, {machine()}\n"
    )
    print(markdown_table(headers, rows))
    path = save_json(
        f"message_passing_speed_{args.device}_{args.pairwise}_L{'-'.join(map(str, args.labels))}"
        + ("_block" if args.cuda_block_sweeps else "")
        + ("_all_gradients" if args.all_gradients else "")
        + ("" if (args.batch, height, width) == (1, HEIGHT, WIDTH) else f"_b{args.batch}_{height}x{width}"),
        {
            "machine": machine(),
            "pairwise": args.pairwise,
            "all_gradients": args.all_gradients,
            "batch": args.batch,
            "size": [height, width],
            "results": results,
        },
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

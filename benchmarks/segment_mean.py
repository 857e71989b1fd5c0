"""Logit consistency (thesis Eq. 4.13-4.14): the compiled segment mean vs the scatter reference and the
dense N_s x N_p matrix form, forward + backward, at 512x512 with 21 classes and ~1000 SLIC superpixels.

    python benchmarks/segment_mean.py [--device cpu|cuda] [--repeats 5]

Prints a markdown table and writes benchmarks/results/segment_mean_<device>.json.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from common import machine, markdown_table, peak_memory_mib, save_json, timed
from skimage import data
from skimage.segmentation import slic

from app.ops import segment_mean
from app.ops.reference import segment_mean_dense, segment_mean_reference


def superpixels_of_astronaut(n_segments: int) -> torch.Tensor:
    """(1, 512, 512) SLIC ids of scikit-image's astronaut photograph, at least ``n_segments`` of them."""
    image = data.astronaut()
    requested = n_segments
    while True:  # SLIC returns fewer segments than asked for; ask for more until there are enough
        labels = slic(image, n_segments=requested, compactness=10, start_label=0)
        if labels.max() + 1 >= n_segments:
            return torch.from_numpy(labels.astype(np.int64))[None]
        requested = int(requested * 1.1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--segments", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    segments = superpixels_of_astronaut(args.segments).to(args.device)
    n_superpixels = int(segments.max()) + 1
    values = torch.randn(1, args.classes, *segments.shape[1:], device=args.device, requires_grad=True)
    grad = torch.randn_like(values)
    implementations = {
        "compiled (app.ops.segment_mean)": lambda x: segment_mean(x, segments),
        "PyTorch scatter reference": lambda x: segment_mean_reference(x, segments),
        "dense matrix (Eq. 4.14)": lambda x: segment_mean_dense(x, segments),
    }
    expected = segment_mean_reference(values, segments)
    rows, results = [], {}
    for name, fn in implementations.items():
        torch.testing.assert_close(fn(values), expected, rtol=1e-4, atol=1e-4)

        def forward(fn=fn):
            with torch.no_grad():
                fn(values)

        def forward_backward(fn=fn):
            values.grad = None
            fn(values).backward(grad)

        forward_ms = timed(forward, args.device, args.repeats)
        total_ms = timed(forward_backward, args.device, args.repeats)
        peak = peak_memory_mib(forward_backward, args.device)
        results[name] = {"forward_ms": forward_ms, "forward_backward_ms": total_ms, "peak_mib": peak}
        rows.append([name, f"{forward_ms:.2f}", f"{total_ms:.2f}", f"{peak:.1f}"])
    compiled = results["compiled (app.ops.segment_mean)"]["forward_backward_ms"]
    for row, name in zip(rows, results):
        row.append(f"{results[name]['forward_backward_ms'] / compiled:.1f}x")
    title = (
        f"segment mean, 1x{args.classes}x512x512, {n_superpixels} SLIC superpixels, "
        f"{args.device} ({machine()})"
    )
    print(title)
    print(
        markdown_table(
            ["implementation", "forward ms", "fwd+bwd ms", "peak MiB (fwd+bwd)", "slower by"], rows
        )
    )
    path = save_json(f"segment_mean_{args.device}", {"title": title, "results": results})
    print(f"saved {path}")


if __name__ == "__main__":
    main()

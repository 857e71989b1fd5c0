"""MRF energies reached by each method, thesis Table 3.1 layout, on the Middlebury 2014 motorcycle stereo pair
shipped by scikit-image (``skimage.data.stereo_motorcycle()``), downsampled.

    python benchmarks/energy.py [--scale 0.25] [--labels 16] [--iterations 1 50]

Data term: ``theta_p(d) = min(mean_c |I_left(p) - I_right(p - d)|, 0.1) * 255 / 10`` on the downsampled pair in
[0, 1] (a pixel whose match leaves the image gets the truncation), ``d`` in ``[0, labels)``. Pairwise:
truncated linear, ``term_weight * min(|a - b|, truncation)``. Every method at D directions is scored by the
energy of the D-connected MRF (Eq. 3.1) at the labelling ``argmin_l c_p(l)`` (Eq. 3.8); TRW-S on the
4-connected MRF is the reference. Prints a markdown table, writes benchmarks/results/energy.json and the
disparity maps as PNG under benchmarks/results/energy/.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import RESULTS, markdown_table, save_json
from skimage import data, io
from skimage.transform import rescale

from app.ops import Pairwise, message_passing, mrf_energy, trws

METHODS = ("meanfield", "sgm", "isgmr", "trwp")


def stereo_unary(scale: float, n_labels: int) -> torch.Tensor:
    """(1, L, H, W) float64 truncated absolute-difference data term of the downsampled motorcycle pair."""
    left, right, _ = data.stereo_motorcycle()
    left, right = (
        rescale(image / 255.0, scale, channel_axis=-1, anti_aliasing=True) for image in (left, right)
    )
    height, width, _ = left.shape
    truncation = 0.1
    unary = np.full((n_labels, height, width), truncation)
    for d in range(n_labels):
        difference = np.abs(left[:, d:] - right[:, : width - d]).mean(axis=-1)
        unary[d, :, d:] = np.minimum(difference, truncation)
    return torch.from_numpy(unary * 255 / 10)[None]


def save_disparity(labels: torch.Tensor, n_labels: int, name: str) -> None:
    folder = RESULTS / "energy"
    folder.mkdir(parents=True, exist_ok=True)
    image = (labels[0].numpy() * (255 // (n_labels - 1))).astype(np.uint8)
    io.imsave(folder / f"{name}.png", image, check_contrast=False)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", type=float, default=0.25)
    parser.add_argument("--labels", type=int, default=16)
    parser.add_argument("--term-weight", type=float, default=1.0)
    parser.add_argument("--truncation", type=float, default=4.0)
    parser.add_argument("--iterations", type=int, nargs="+", default=[1, 50])
    parser.add_argument("--directions", type=int, nargs="+", default=[4, 8, 16])
    args = parser.parse_args()

    unary = stereo_unary(args.scale, args.labels)
    pairwise = Pairwise("truncated_linear", args.term_weight, args.truncation)
    headers = ["method", *(f"{n} it." for n in args.iterations)]
    rows, results = [], {}
    for n_directions in args.directions:
        for method in METHODS:
            name = f"{method.upper() if method != 'meanfield' else 'MF'}-{n_directions}"
            energies = []
            for n_iterations in args.iterations:
                start = time.perf_counter()
                costs = message_passing(unary, pairwise, None, method, n_directions, n_iterations)
                labels = costs.argmin(dim=1)
                energies.append(float(mrf_energy(labels, unary, pairwise, None, n_directions)))
                results[f"{name}/{n_iterations}"] = {
                    "energy": energies[-1],
                    "seconds": time.perf_counter() - start,
                }
            save_disparity(labels, args.labels, name)
            rows.append([name, *(f"{e:.1f}" for e in energies)])
    energies = []
    for n_iterations in args.iterations:
        labels, energy = trws(unary, pairwise, None, 4, n_iterations)
        energies.append(float(energy))
        results[f"TRWS-4/{n_iterations}"] = {"energy": energies[-1]}
    save_disparity(labels, args.labels, "TRWS-4")
    rows.append(["TRWS-4", *(f"{e:.1f}" for e in energies)])
    height, width = unary.shape[-2:]
    print(f"motorcycle {height}x{width}, {args.labels} disparities, truncated linear")
    print(f"(term weight {args.term_weight}, truncation {args.truncation}), energy of Eq. 3.1\n")
    print(markdown_table(headers, rows))
    path = save_json("energy", {"size": [height, width], "labels": args.labels, "results": results})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

"""MRF energies reached by each method, thesis Table 3.1 / 3.3 layout, on two scikit-image problems.

    python benchmarks/energy.py [--problem stereo denoise] [--iterations 1 50] [--directions 4 8 16]
        [--scale 0.25] [--labels 16] [--denoise-scale 0.125] [--levels 32] [--noise 0.1]

(a) ``stereo`` (Table 3.1): the Middlebury 2014 motorcycle pair shipped by scikit-image
(``skimage.data.stereo_motorcycle()``), downsampled by ``--scale``. Data term:
``theta_p(d) = min(mean_c |I_left(p) - I_right(p - d)|, 0.1) * 255 / 10`` on the pair in [0, 1] (a pixel whose
match leaves the image gets the truncation), ``d`` in ``[0, labels)``. Pairwise: truncated linear,
``term_weight * min(|a - b|, truncation)``.

(b) ``denoise`` (Table 3.3): ``skimage.data.camera()`` downsampled by ``--denoise-scale``, Gaussian noise of
standard deviation ``--noise`` (image in [0, 1], fixed seed) added, labels the ``--levels`` grey levels
``l / (levels - 1)``. Data term ``theta_p(l) = (x_p - l)^2`` with ``x_p`` the noisy intensity in label units;
pairwise truncated quadratic, ``term_weight * min((a - b)^2, truncation)``.

Every method at D directions is scored by the energy of the D-connected MRF (Eq. 3.1) at the labelling
``argmin_l c_p(l)`` (Eq. 3.8); TRW-S on the 4-connected MRF is the reference. Prints a markdown table per
problem, writes benchmarks/results/energy.json (stereo) and energy_denoise.json, and the disparity maps and
denoised images as PNG under benchmarks/results/energy/ (git-ignored).
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


def denoising_unary(scale: float, n_levels: int, noise: float) -> torch.Tensor:
    """(1, L, H, W) float64 squared-difference data term of the noisy, downsampled camera image."""
    image = rescale(data.camera() / 255.0, scale, anti_aliasing=True)
    noisy = np.clip(image + np.random.default_rng(0).normal(0.0, noise, image.shape), 0.0, 1.0)
    levels = np.arange(n_levels)[:, None, None]
    return torch.from_numpy((noisy[None] * (n_levels - 1) - levels) ** 2)[None]


def save_labels(labels: torch.Tensor, n_labels: int, name: str) -> None:
    """Writes labels (1, H, W) as an 8-bit grey PNG, label l at grey l * 255 / (L - 1)."""
    folder = RESULTS / "energy"
    folder.mkdir(parents=True, exist_ok=True)
    image = np.round(labels[0].numpy() * (255 / (n_labels - 1))).astype(np.uint8)
    io.imsave(folder / f"{name}.png", image, check_contrast=False)


def energy_table(
    unary: torch.Tensor,
    pairwise: Pairwise,
    iterations: list[int],
    directions: list[int],
    prefix: str,
) -> tuple[list[list[str]], dict]:
    """Rows ``[name, energy at each iteration count]`` and the JSON results; saves each final labelling."""
    n_labels = unary.shape[1]
    rows, results = [], {}
    for n_directions in directions:
        for method in METHODS:
            name = f"{method.upper() if method != 'meanfield' else 'MF'}-{n_directions}"
            energies = []
            for n_iterations in iterations:
                start = time.perf_counter()
                costs = message_passing(unary, pairwise, None, method, n_directions, n_iterations)
                labels = costs.argmin(dim=1)
                energies.append(float(mrf_energy(labels, unary, pairwise, None, n_directions)))
                results[f"{name}/{n_iterations}"] = {
                    "energy": energies[-1],
                    "seconds": time.perf_counter() - start,
                }
            save_labels(labels, n_labels, f"{prefix}{name}")
            rows.append([name, *(f"{e:.1f}" for e in energies)])
    energies = []
    for n_iterations in iterations:
        labels, energy = trws(unary, pairwise, None, 4, n_iterations)
        energies.append(float(energy))
        results[f"TRWS-4/{n_iterations}"] = {"energy": energies[-1]}
    save_labels(labels, n_labels, f"{prefix}TRWS-4")
    rows.append(["TRWS-4", *(f"{e:.1f}" for e in energies)])
    return rows, results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--problem", nargs="+", default=["stereo", "denoise"], choices=("stereo", "denoise"))
    parser.add_argument("--iterations", type=int, nargs="+", default=[1, 50])
    parser.add_argument("--directions", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--scale", type=float, default=0.25)
    parser.add_argument("--labels", type=int, default=16)
    parser.add_argument("--term-weight", type=float, default=1.0)
    parser.add_argument("--truncation", type=float, default=4.0)
    parser.add_argument("--denoise-scale", type=float, default=0.125)
    parser.add_argument("--levels", type=int, default=32)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--denoise-term-weight", type=float, default=1.0)
    parser.add_argument("--denoise-truncation", type=float, default=16.0)
    args = parser.parse_args()

    headers = ["method", *(f"{n} it." for n in args.iterations)]
    if "stereo" in args.problem:
        unary = stereo_unary(args.scale, args.labels)
        pairwise = Pairwise("truncated_linear", args.term_weight, args.truncation)
        rows, results = energy_table(unary, pairwise, args.iterations, args.directions, "")
        height, width = unary.shape[-2:]
        print(f"motorcycle {height}x{width}, {args.labels} disparities, truncated linear")
        print(f"(term weight {args.term_weight}, truncation {args.truncation}), energy of Eq. 3.1\n")
        print(markdown_table(headers, rows))
        path = save_json("energy", {"size": [height, width], "labels": args.labels, "results": results})
        print(f"\nwrote {path}\n")
    if "denoise" in args.problem:
        unary = denoising_unary(args.denoise_scale, args.levels, args.noise)
        pairwise = Pairwise("truncated_quadratic", args.denoise_term_weight, args.denoise_truncation)
        save_labels(unary.argmin(dim=1), args.levels, "denoise_noisy")
        rows, results = energy_table(unary, pairwise, args.iterations, args.directions, "denoise_")
        height, width = unary.shape[-2:]
        print(f"camera {height}x{width}, noise {args.noise}, {args.levels} grey levels, truncated quadratic")
        print(
            f"(term weight {args.denoise_term_weight}, truncation {args.denoise_truncation}), "
            "energy of Eq. 3.1\n"
        )
        print(markdown_table(headers, rows))
        payload = {"size": [height, width], "levels": args.levels, "noise": args.noise, "results": results}
        print(f"\nwrote {save_json('energy_denoise', payload)}")


if __name__ == "__main__":
    main()

"""ConvCRF Table 1 (Sec. 5.1) on SyntheticShapes label maps, and the fused message op vs its unfold reference.

The synthetic task: each ground-truth label map is down-sampled by 8, a share of the low-resolution labels
is flipped to a random class, the result is up-sampled (nearest) and used as the unary (probability
``--confidence`` on the noisy label, the rest spread evenly); the CRF, guided by the image, must restore
the labels. Rows: the unary alone, ConvCRF with k = 5, 7, 11, 13 (blur 4, 5 iterations, FullCRF kernel
parameters) and FullCRF (pydensecrf2, the same parameters, 5 iterations) when it is installed.
Also timed: the fused message op against the unfold reference (512x384, 21 classes, k = 7), and the
ConvCRF head itself at full PASCAL VOC size (500x375, 21 classes, Conv11, blur 4, 5 iterations; the paper's
26 ms on a GTX 1080 Ti), on the CPU and on the GPU when there is one.

    python benchmarks/convcrf.py [--device cpu|cuda] [--images 20] [--size 256] [--threads 1]

Prints markdown tables and writes benchmarks/results/convcrf_<device>.json.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import machine, markdown_table, peak_memory_mib, save_json, timed

from app.crf_heads import ConvCRF
from app.datamodules.shapes import SHAPE_KINDS, ShapesDataset
from app.ops import gaussian_message
from app.ops.reference import gaussian_message_reference

NUM_CLASSES = len(SHAPE_KINDS) + 1
# FullCRF's kernels (Krahenbuhl & Koltun), the ConvCRF defaults: colour bandwidth in 0-255 grey levels.
THETA_ALPHA, THETA_BETA, THETA_GAMMA, W_APPEARANCE, W_SMOOTHNESS = 80.0, 13.0, 3.0, 10.0, 3.0

try:
    import pydensecrf.densecrf as densecrf
except ImportError:  # optional benchmark dependency
    densecrf = None


def synthetic_case(
    dataset: ShapesDataset, index: int, flip: float, confidence: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """image (S, S, 3) uint8, truth (S, S) int64, unary probabilities (C, S, S) float32 (Sec. 5.1)."""
    image, truth = dataset.load(index)
    truth = truth.astype(np.int64)
    coarse = truth[4::8, 4::8].copy()  # the centre pixel of each 8 x 8 cell
    flipped = rng.random(coarse.shape) < flip
    coarse[flipped] = rng.integers(0, NUM_CLASSES, int(flipped.sum()))
    noisy = np.kron(coarse, np.ones((8, 8), dtype=np.int64))[: truth.shape[0], : truth.shape[1]]
    probabilities = np.full((NUM_CLASSES, *truth.shape), (1 - confidence) / (NUM_CLASSES - 1), np.float32)
    np.put_along_axis(probabilities, noisy[None], confidence, axis=0)
    return image, truth, probabilities


def convcrf_predict(head: ConvCRF, image: np.ndarray, probabilities: np.ndarray, device: str) -> torch.Tensor:
    raw = torch.from_numpy(image).permute(2, 0, 1)[None].float().div(255).to(device)
    logits = torch.from_numpy(probabilities)[None].log().to(device)
    with torch.no_grad():
        return head(logits, {"image_raw": raw}).argmax(1)[0].cpu()


def fullcrf_predict(image: np.ndarray, probabilities: np.ndarray) -> torch.Tensor:
    height, width = image.shape[:2]
    crf = densecrf.DenseCRF2D(width, height, NUM_CLASSES)
    crf.setUnaryEnergy(np.ascontiguousarray(-np.log(probabilities).reshape(NUM_CLASSES, -1)))
    crf.addPairwiseGaussian(sxy=THETA_GAMMA, compat=W_SMOOTHNESS)
    crf.addPairwiseBilateral(
        sxy=THETA_ALPHA, srgb=THETA_BETA, rgbim=np.ascontiguousarray(image), compat=W_APPEARANCE
    )
    q = np.array(crf.inference(5)).reshape(NUM_CLASSES, height, width)
    return torch.from_numpy(q.argmax(0))


def scores(confusion: torch.Tensor) -> tuple[float, float]:
    """Pixel accuracy and mean IoU (over classes present in truth or prediction) in %, from (C, C) counts."""
    true_positive = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    present = union > 0
    accuracy = 100 * true_positive.sum() / confusion.sum()
    miou = 100 * (true_positive[present] / union[present]).mean()
    return float(accuracy), float(miou)


def table1(args: argparse.Namespace) -> list[dict]:
    dataset = ShapesDataset("val", args.images, NUM_CLASSES, args.size, seed=0, noise_std=0.1, blur_sigma=1.0)
    rng = np.random.default_rng(0)
    cases = [synthetic_case(dataset, i, args.flip, args.confidence, rng) for i in range(args.images)]
    methods = {"Unary": lambda image, probabilities: torch.from_numpy(probabilities.argmax(0))}
    for k in (5, 7, 11, 13):
        head = ConvCRF(filter_size=k, blur=4, n_iterations=5, theta_beta=THETA_BETA / 255).to(args.device)
        methods[f"Conv{k}"] = lambda image, probabilities, head=head: convcrf_predict(
            head, image, probabilities, args.device
        )
    if densecrf is not None:
        methods["FullCRF (pydensecrf2)"] = fullcrf_predict
    rows = []
    for name, predict in methods.items():
        predict(*cases[0][::2])  # warm-up
        confusion = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.float64)
        seconds = 0.0
        for image, truth, probabilities in cases:
            start = time.perf_counter()
            prediction = predict(image, probabilities)
            seconds += time.perf_counter() - start
            pairs = torch.from_numpy(truth).flatten() * NUM_CLASSES + prediction.flatten()
            confusion += torch.bincount(pairs, minlength=NUM_CLASSES**2).view(NUM_CLASSES, NUM_CLASSES)
        accuracy, miou = scores(confusion)
        device = "cpu" if name.startswith(("Unary", "FullCRF")) else args.device
        rows.append(
            {
                "method": name,
                "accuracy": accuracy,
                "mIoU": miou,
                "ms_per_image": 1e3 * seconds / len(cases),
                "device": device,
            }
        )
    return rows


def fused_vs_unfold(args: argparse.Namespace) -> list[dict]:
    """The op at 512 x 384, 21 classes, k = 7, appearance features (F = 5), forward only."""
    generator = torch.Generator().manual_seed(0)
    q = torch.rand(1, 21, 384, 512, generator=generator).softmax(1)
    features = torch.randn(1, 5, 384, 512, generator=generator)
    rows = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        q_d, f_d = q.to(device), features.to(device)
        for name, op in (
            ("fused (app.ops.gaussian_message)", gaussian_message),
            ("unfold reference", gaussian_message_reference),
        ):
            run = lambda op=op, q_d=q_d, f_d=f_d: op(q_d, f_d, 7)  # noqa: E731
            rows.append(
                {
                    "op": name,
                    "device": device,
                    "ms": timed(run, device, repeats=args.repeats),
                    "peak_MiB": peak_memory_mib(run, device),
                }
            )
    return rows


def pascal_speed(args: argparse.Namespace) -> list[dict]:
    """ConvCRF head forward (Conv11, blur 4, 5 iterations) on a 500x375 image with 21 classes, per device."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 21, 375, 500, generator=generator)
    image = torch.rand(1, 3, 375, 500, generator=generator)
    rows = []
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        head = ConvCRF(filter_size=11, blur=4, n_iterations=5).to(device)
        batch = {"image_raw": image.to(device)}
        logits_d = logits.to(device)

        def run(head=head, logits_d=logits_d, batch=batch) -> torch.Tensor:
            with torch.no_grad():
                return head(logits_d, batch)

        rows.append({"device": device, "ms": timed(run, device, repeats=args.repeats)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--flip", type=float, default=0.3, help="share of low-resolution labels flipped")
    parser.add_argument("--confidence", type=float, default=0.6, help="unary probability of the noisy label")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads of torch (pydensecrf2 runs on one: the same budget)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = table1(args)
    print(
        f"## ConvCRF Table 1 layout, synthetic task of Sec. 5.1 ({args.images} SyntheticShapes val label maps, "
        f"{args.size}x{args.size}, {NUM_CLASSES} classes, flip {args.flip}, {machine()})\n"
    )
    print(
        markdown_table(
            ["method", "accuracy %", "mIoU %", "ms / image", "device"],
            [
                [
                    r["method"],
                    f"{r['accuracy']:.2f}",
                    f"{r['mIoU']:.2f}",
                    f"{r['ms_per_image']:.1f}",
                    r["device"],
                ]
                for r in rows
            ],
        )
    )
    if densecrf is None:
        print("\nFullCRF row missing: pydensecrf2 is not installed (pip install pydensecrf2).")
    ops = fused_vs_unfold(args)
    print("\n## Message passing, 512x384, 21 classes, k = 7, F = 5 (forward)\n")
    print(
        markdown_table(
            ["op", "device", "ms", "peak MiB"],
            [[r["op"], r["device"], f"{r['ms']:.1f}", f"{r['peak_MiB']:.1f}"] for r in ops],
        )
    )
    pascal = pascal_speed(args)
    print(
        "\n## ConvCRF head at PASCAL VOC size: 500x375, 21 classes, Conv11, blur 4, 5 iterations (forward)\n"
    )
    print(markdown_table(["device", "ms"], [[r["device"], f"{r['ms']:.1f}"] for r in pascal]))
    path = save_json(
        f"convcrf_{args.device}",
        {"machine": machine(), "args": vars(args), "table1": rows, "message_op": ops, "pascal_head": pascal},
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

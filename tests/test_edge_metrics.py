"""EdgeMetrics (thesis Eq. 4.15-4.16): known answers, tolerance matching, extended edge areas, ignore, accumulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from app.metrics import EdgeMetrics, edge_match_counts, label_edges, within_tolerance


def halves(boundary: int, size: int = 12) -> torch.Tensor:
    """(1, size, size) map: label 0 left of column ``boundary``, label 1 from it on."""
    labels = torch.zeros(1, size, size, dtype=torch.long)
    labels[:, :, boundary:] = 1
    return labels


def blobs(batch: int, size: int, num_classes: int, seed: int) -> torch.Tensor:
    """Piecewise-constant random label maps (upsampled coarse noise), so edges are lines, not noise."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, num_classes, (batch, 1, size // 4, size // 4), generator=generator)
    return torch.nn.functional.interpolate(coarse.float(), size=(size, size), mode="nearest")[:, 0].long()


def brute_force_counts(
    pred: np.ndarray, target: np.ndarray, tolerance: int
) -> tuple[int, int, int, int, int]:
    """(#pred edges, #matched pred, #target edges, #matched target, #pixels within ``tolerance`` of a target
    edge) by explicit distance checks."""

    def edges(labels: np.ndarray) -> np.ndarray:
        out = np.zeros(labels.shape, dtype=bool)
        out[:, :-1] |= labels[:, :-1] != labels[:, 1:]
        out[:-1, :] |= labels[:-1, :] != labels[1:, :]
        return out

    def matched(source: np.ndarray, other: np.ndarray) -> int:
        others = np.argwhere(other)
        count = 0
        for y, x in np.argwhere(source):
            if len(others) and np.abs(others - (y, x)).max(axis=1).min() <= tolerance:
                count += 1
        return count

    pred_edges, target_edges = edges(pred), edges(target)
    return (
        int(pred_edges.sum()),
        matched(pred_edges, target_edges),
        int(target_edges.sum()),
        matched(target_edges, pred_edges),
        matched(np.ones(target.shape, dtype=bool), target_edges),
    )


def test_label_edges_marks_left_and_top_side_of_boundaries() -> None:
    labels = torch.tensor([[[0, 0, 1], [0, 0, 1], [2, 2, 2]]])
    expected = torch.tensor([[[0, 1, 0], [1, 1, 1], [0, 0, 0]]], dtype=torch.bool)
    assert torch.equal(label_edges(labels), expected)


def test_identical_maps_score_one() -> None:
    target = blobs(2, 32, 4, seed=0)
    metric = EdgeMetrics(num_classes=4)
    metric.update(target.clone(), target)
    result = metric.compute()
    names = ("precision", "recall", "f1", "pr", "area_recall", "area_f1", "area_pr")
    assert set(result) == {f"edge_{name}@{d}px" for name in names for d in range(1, 6)}
    for tolerance in range(1, 6):
        assert result[f"edge_f1@{tolerance}px"] == pytest.approx(1.0)
        assert result[f"edge_precision@{tolerance}px"] == pytest.approx(1.0)
        assert result[f"edge_recall@{tolerance}px"] == pytest.approx(1.0)
        assert math.isinf(float(result[f"edge_pr@{tolerance}px"]))


def test_shift_by_two_pixels_matches_from_tolerance_two() -> None:
    metric = EdgeMetrics(num_classes=2, tolerances=(0, 1, 2, 3, 5))
    metric.update(halves(7), halves(5))
    result = metric.compute()
    for tolerance in (0, 1):
        assert result[f"edge_f1@{tolerance}px"] == 0.0
        assert result[f"edge_pr@{tolerance}px"] == 0.0
    for tolerance in (2, 3, 5):
        assert result[f"edge_f1@{tolerance}px"] == pytest.approx(1.0)


def test_spurious_edge_counts_known_fractions() -> None:
    # Ground truth: one vertical boundary (12 edge pixels in column 4). Prediction: the same boundary
    # plus a spurious one 3 columns away (12 more edge pixels in column 7).
    target = halves(5)
    pred = halves(5)
    pred[:, :, 8:] = 0
    metric = EdgeMetrics(num_classes=2, tolerances=(1, 3))
    metric.update(pred, target)
    result = metric.compute()
    assert result["edge_precision@1px"] == pytest.approx(0.5)
    assert result["edge_recall@1px"] == pytest.approx(1.0)
    assert result["edge_f1@1px"] == pytest.approx(2 / 3)
    assert result["edge_pr@1px"] == pytest.approx(12 / 12)  # TP / (FP + FN) = 12 / (12 + 0)
    assert result["edge_precision@3px"] == pytest.approx(1.0)


def test_extended_area_counts_known_fractions() -> None:
    # One vertical boundary: 12 ground-truth edge pixels in column 4 of a 12 x 12 map; extended by d px it is
    # the 12 x (2d + 1) band of columns 4 - d .. 4 + d.
    target = halves(5)
    metric = EdgeMetrics(num_classes=2, tolerances=(1, 2))
    metric.update(target.clone(), target)
    result = metric.compute()
    for d in (1, 2):
        # the exact boundary: TP 12, FP 0, FN the band's other 12 * 2d pixels
        assert result[f"edge_area_recall@{d}px"] == pytest.approx(1 / (2 * d + 1))
        assert result[f"edge_area_f1@{d}px"] == pytest.approx(2 / (2 * d + 2))
        assert result[f"edge_area_pr@{d}px"] == pytest.approx(1 / (2 * d))
    metric.reset()
    metric.update(halves(7), target)  # the boundary two columns off: outside the band at 1 px, inside at 2
    result = metric.compute()
    assert result["edge_area_f1@1px"] == 0.0
    assert result["edge_area_f1@2px"] == pytest.approx(2 / 6)
    assert result["edge_precision@2px"] == pytest.approx(1.0)


def test_extended_area_rises_then_falls_where_the_precision_rises_first() -> None:
    """The shape of most rows of thesis Table 4.7 (a peak at 2-4 px): out of reach of tolerance matching."""
    target = halves(6, size=24)
    pred = halves(8, size=24)  # two columns off
    metric = EdgeMetrics(num_classes=2, tolerances=(1, 2, 3, 4, 5))
    metric.update(pred, target)
    result = metric.compute()
    area = [float(result[f"edge_area_f1@{d}px"]) for d in range(1, 6)]
    tolerance = [float(result[f"edge_f1@{d}px"]) for d in range(1, 6)]
    assert area[0] == 0.0 and area[1] == max(area) and area[1] > area[2] > area[3] > area[4] > 0.0
    assert tolerance == sorted(tolerance)


def test_extended_area_leaves_out_ignored_pixels() -> None:
    target = halves(5)
    target[:, :, 6:] = 255  # ignored from column 6 on
    metric = EdgeMetrics(num_classes=2, tolerances=(2,))
    metric.update(halves(5), target)
    # the edge in column 4 extended by 2 px: columns 2-6, of which 6 is ignored
    assert int(metric.target_area[0]) == 12 * 4
    assert metric.compute()["edge_area_recall@2px"] == pytest.approx(1 / 4)


@pytest.mark.parametrize(
    ("valid", "message"),
    [
        (torch.ones(1, 12, 11, dtype=torch.bool), "valid .* differ in shape"),
        (torch.ones(1, 12, 12), "valid must"),
    ],
)
def test_bad_valid_mask_raises(valid: torch.Tensor, message: str) -> None:
    edges = label_edges(halves(5))
    with pytest.raises(ValueError, match=message):
        edge_match_counts(edges, edges, (1,), valid)


def test_empty_prediction_edges_give_zero_recall() -> None:
    target = blobs(1, 32, 3, seed=1)
    metric = EdgeMetrics(num_classes=3, tolerances=(1, 5))
    metric.update(torch.zeros_like(target), target)
    result = metric.compute()
    for tolerance in (1, 5):
        assert result[f"edge_recall@{tolerance}px"] == 0.0
        assert result[f"edge_precision@{tolerance}px"] == 0.0
        assert result[f"edge_f1@{tolerance}px"] == 0.0
        assert result[f"edge_pr@{tolerance}px"] == 0.0


@pytest.mark.parametrize("tolerance", [0, 1, 2, 4])
def test_counts_match_brute_force_distances(tolerance: int) -> None:
    pred = blobs(1, 24, 3, seed=2)[0]
    target = blobs(1, 24, 3, seed=3)[0]
    matched_pred, matched_target, target_area = edge_match_counts(
        label_edges(pred[None]), label_edges(target[None]), (tolerance,)
    )
    n_pred, expected_pred, n_target, expected_target, expected_area = brute_force_counts(
        pred.numpy(), target.numpy(), tolerance
    )
    assert n_pred > 0 and n_target > 0
    assert int(matched_pred[0]) == expected_pred
    assert int(matched_target[0]) == expected_target
    assert int(target_area[0]) == expected_area


def test_unsorted_tolerances_keep_their_order() -> None:
    pred, target = blobs(2, 32, 3, seed=4), blobs(2, 32, 3, seed=5)
    edges = label_edges(pred), label_edges(target)
    forward = edge_match_counts(*edges, (1, 2, 5))
    backward = edge_match_counts(*edges, (5, 1, 2))
    assert torch.equal(backward[0], forward[0][[2, 0, 1]])
    assert torch.equal(backward[1], forward[1][[2, 0, 1]])
    assert torch.equal(backward[2], forward[2][[2, 0, 1]])
    assert bool((forward[0][:-1] <= forward[0][1:]).all())  # matches grow with the tolerance


def test_accumulated_batches_equal_one_update() -> None:
    pred, target = blobs(6, 32, 4, seed=6), blobs(6, 32, 4, seed=7)
    whole = EdgeMetrics(num_classes=4)
    whole.update(pred, target)
    pieces = EdgeMetrics(num_classes=4)
    for start, stop in ((0, 1), (1, 4), (4, 6)):
        pieces.update(pred[start:stop], target[start:stop])
    expected, got = whole.compute(), pieces.compute()
    assert 0.0 < float(expected["edge_f1@1px"]) < 1.0
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_merged_states_equal_one_update() -> None:
    """What a DDP sync does: the per-process count states are summed."""
    pred, target = blobs(4, 32, 4, seed=8), blobs(4, 32, 4, seed=9)
    whole = EdgeMetrics(num_classes=4)
    whole.update(pred, target)
    first, second = EdgeMetrics(num_classes=4), EdgeMetrics(num_classes=4)
    first.update(pred[:2], target[:2])
    second.update(pred[2:], target[2:])
    first.merge_state(second)
    for key, value in whole.compute().items():
        assert torch.equal(first.compute()[key], value), key


def test_logits_equal_their_argmax_labels() -> None:
    target = blobs(2, 32, 5, seed=10)
    logits = torch.randn(2, 5, 32, 32, generator=torch.Generator().manual_seed(11))
    logits = logits + 3 * torch.nn.functional.one_hot(blobs(2, 32, 5, seed=12), 5).permute(0, 3, 1, 2)
    from_logits, from_labels = EdgeMetrics(num_classes=5), EdgeMetrics(num_classes=5)
    from_logits.update(logits, target)
    from_labels.update(logits.argmax(1), target)
    for key, value in from_labels.compute().items():
        assert torch.equal(from_logits.compute()[key], value), key


def test_ignored_pixels_are_excluded() -> None:
    target = halves(5)
    target[:, :, 8:] = 255  # an ignored band on the right
    pred = halves(5)
    pred[:, :, 9:] = 0  # a prediction boundary inside the ignored band must not count as a false edge
    metric = EdgeMetrics(num_classes=2, tolerances=(1,))
    metric.update(pred, target)
    result = metric.compute()
    assert result["edge_precision@1px"] == pytest.approx(1.0)
    assert result["edge_recall@1px"] == pytest.approx(1.0)
    assert int(metric.target_edges) == 12  # the valid/ignore border is not a ground-truth edge


def test_reset_clears_counts() -> None:
    target = halves(5)
    metric = EdgeMetrics(num_classes=2, tolerances=(1,))
    metric.update(target.clone(), target)
    metric.reset()
    metric.update(torch.zeros_like(target), target)
    assert metric.compute()["edge_recall@1px"] == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 3, "tolerances": ()}, "tolerances"),
        ({"num_classes": 3, "tolerances": (1, 1)}, "distinct"),
        ({"num_classes": 3, "tolerances": (-1,)}, "tolerances"),
        ({"num_classes": 3, "ignore_index": 2}, "ignore_index"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EdgeMetrics(**kwargs)


@pytest.mark.parametrize(
    ("preds", "target", "message"),
    [
        (torch.zeros(1, 4, 8, 8), torch.zeros(1, 8, 8, dtype=torch.long), "channels"),
        (torch.zeros(1, 8, 8, dtype=torch.long), torch.zeros(1, 8, 8), "target"),
        (torch.zeros(1, 8, 9, dtype=torch.long), torch.zeros(1, 8, 8, dtype=torch.long), "differ in shape"),
        (torch.full((1, 8, 8), 3), torch.zeros(1, 8, 8, dtype=torch.long), "preds has labels"),
        (torch.zeros(1, 8, 8, dtype=torch.long), torch.full((1, 8, 8), 7), "target has labels"),
        (torch.zeros(8, 8, dtype=torch.long), torch.zeros(1, 8, 8, dtype=torch.long), "preds must be"),
    ],
)
def test_bad_inputs_raise(preds: torch.Tensor, target: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EdgeMetrics(num_classes=3).update(preds, target)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu() -> None:
    pred, target = blobs(3, 64, 4, seed=13), blobs(3, 64, 4, seed=14)
    cpu, gpu = EdgeMetrics(num_classes=4), EdgeMetrics(num_classes=4).cuda()
    cpu.update(pred, target)
    gpu.update(pred.cuda(), target.cuda())
    for key, value in cpu.compute().items():
        assert torch.equal(gpu.compute()[key].cpu(), value), key


def test_within_tolerance_is_the_chebyshev_square_clipped_at_the_border():
    edges = torch.zeros(1, 6, 7, dtype=torch.bool)
    edges[0, 1, 5] = True
    expected = torch.zeros_like(edges)
    expected[0, 0:4, 3:7] = True  # rows -1..3 and columns 3..7, clipped to the image
    assert torch.equal(within_tolerance(edges, 2), expected)
    assert torch.equal(within_tolerance(edges, 0), edges)

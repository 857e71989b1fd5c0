"""Edge quality of a segmentation (thesis Sec. 4.4.2.3): precision, recall, F-measure (Eq. 4.15) and
performance ratio (Eq. 4.16) of the predicted label map's edges against the ground truth's edges, at n pixels,
in two readings: tolerance matching (each side's edge pixels matched within n px of the other's) and the
extended edge area, our reading of thesis Table 4.7 (the predicted edge pixels against the ground-truth edges
extended by n px, counted pixel by pixel as in Fig. 4.5)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchmetrics import Metric

INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def label_edges(labels: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Edge pixels of label maps: a pixel whose label differs from its right or bottom neighbour.

    A pair of neighbours counts only when both pixels are valid, so edges never appear against (or
    inside) an ignored region.

    Args:
        labels: (B, H, W) integer label maps.
        valid: (B, H, W) bool mask of pixels to evaluate; all pixels when None.

    Returns:
        (B, H, W) bool edge map.
    """
    if not isinstance(labels, torch.Tensor) or labels.dim() != 3:
        raise ValueError(f"labels must be a (B, H, W) tensor, got {getattr(labels, 'shape', type(labels))}")
    if labels.dtype not in INTEGER_DTYPES:
        raise ValueError(f"labels must have an integer dtype, got {labels.dtype}")
    if valid is not None and (valid.shape != labels.shape or valid.dtype != torch.bool):
        raise ValueError(
            f"valid must be a bool tensor of shape {tuple(labels.shape)}, "
            f"got {valid.dtype} {tuple(valid.shape)}"
        )
    edges = torch.zeros_like(labels, dtype=torch.bool)
    right = labels[:, :, :-1] != labels[:, :, 1:]
    below = labels[:, :-1, :] != labels[:, 1:, :]
    if valid is not None:
        right &= valid[:, :, :-1] & valid[:, :, 1:]
        below &= valid[:, :-1, :] & valid[:, 1:, :]
    edges[:, :, :-1] |= right
    edges[:, :-1, :] |= below
    return edges


def _check_tolerances(tolerances: Sequence[int]) -> tuple[int, ...]:
    if isinstance(tolerances, (str, bytes)) or not isinstance(tolerances, Sequence) or len(tolerances) == 0:
        raise ValueError(f"tolerances must be a non-empty sequence of ints, got {tolerances!r}")
    for tolerance in tolerances:
        if isinstance(tolerance, bool) or not isinstance(tolerance, int) or tolerance < 0:
            raise ValueError(f"tolerances must be ints >= 0 (pixels), got {tolerance!r}")
    if len(set(tolerances)) != len(tolerances):
        raise ValueError(f"tolerances must be distinct, got {tuple(tolerances)}")
    return tuple(tolerances)


def within_tolerance(edges: torch.Tensor, tolerance: int) -> torch.Tensor:
    """Pixels within ``tolerance`` px of an edge pixel (Chebyshev distance: the (2d+1) x (2d+1) square).

    Args:
        edges: (B, H, W) bool map (edges, or any set of pixels).
        tolerance: int >= 0.

    Returns:
        (B, H, W) bool map.
    """
    size = 2 * tolerance + 1
    return F.max_pool2d(edges[:, None].float(), size, stride=1, padding=tolerance)[:, 0] > 0


def edge_match_counts(
    pred_edges: torch.Tensor,
    target_edges: torch.Tensor,
    tolerances: Sequence[int],
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Count edge pixels matched within each tolerance (:func:`within_tolerance`), and the extended edge areas.

    A predicted edge pixel is a true positive at tolerance d when a ground-truth edge pixel lies within
    d pixels (the (2d+1) x (2d+1) square around it); a ground-truth edge pixel is recalled when a
    predicted edge pixel lies within d pixels. The ground truth's edge area extended by d px is every
    (valid) pixel within d px of a ground-truth edge pixel.

    Args:
        pred_edges: (B, H, W) bool predicted edges.
        target_edges: (B, H, W) bool ground-truth edges.
        tolerances: distinct ints >= 0.
        valid: (B, H, W) bool mask of the pixels the extended areas may cover; all pixels when None.

    Returns:
        ``(matched_pred, matched_target, target_area)``, three (T,) int64 tensors in the order of ``tolerances``.
    """
    tolerances = _check_tolerances(tolerances)
    for name, edges in (("target_edges", target_edges), ("pred_edges", pred_edges), ("valid", valid)):
        if edges is None and name == "valid":
            continue
        if not isinstance(edges, torch.Tensor) or edges.dim() != 3 or edges.dtype != torch.bool:
            raise ValueError(f"{name} must be a (B, H, W) bool tensor, got {getattr(edges, 'shape', edges)}")
        if edges.shape != target_edges.shape:
            raise ValueError(
                f"{name} {tuple(edges.shape)} and target_edges {tuple(target_edges.shape)} differ in shape"
            )
    matched_pred, matched_target, target_area = [], [], []
    for d in tolerances:
        near_target = within_tolerance(target_edges, d)
        if valid is not None:
            near_target &= valid
        matched_pred.append((pred_edges & near_target).sum())
        matched_target.append((target_edges & within_tolerance(pred_edges, d)).sum())
        target_area.append(near_target.sum())
    return torch.stack(matched_pred), torch.stack(matched_target), torch.stack(target_area)


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator as float32, 0 where the denominator is 0."""
    numerator = numerator.float()
    denominator = denominator.float()
    positive = denominator > 0
    return torch.where(positive, numerator / torch.where(positive, denominator, 1.0), 0.0)


class EdgeMetrics(Metric):
    """Precision, recall, F-measure (Eq. 4.15) and performance ratio (Eq. 4.16) of segmentation edges.

    Edges are the pixels whose label differs from the right or bottom neighbour (:func:`label_edges`),
    in the prediction and in the target; pixels whose target is ``ignore_index`` are excluded from both.
    At tolerance d (in pixels, Chebyshev distance), two readings:

    Tolerance matching (``edge_*`` keys):

    - TP: predicted edge pixels with a ground-truth edge within d; FP: the other predicted edge pixels.
    - FN: ground-truth edge pixels with no predicted edge within d.
    - P = TP / (TP + FP); R = (ground-truth edges recalled) / (all ground-truth edges) = 1 - FN / #GT;
      FM = 2 / (1/R + 1/P) (Eq. 4.15); PR = TP / (FP + FN) (Eq. 4.16, a ratio; the thesis prints x100).

    Extended edge area (``edge_area_*`` keys; our reading of thesis Table 4.7, "on edge areas extended by 1
    to 5 pixels", counted pixel by pixel as in Fig. 4.5): the ground truth's edge pixel set is its edges
    extended by d px (every valid pixel within d px of one), the prediction's stays its edges.

    - TP and FP as above (so the precision is the same); FN: pixels of the extended area that are not
      predicted edge pixels. R = TP / #area, FM and PR as above from these counts.
    - R is at most #predicted edges / #area, so FM falls as d widens the area unless the precision rises
      faster: 9 of the 10 rows of thesis Table 4.7 peak at 2-4 px and then fall, which tolerance matching,
      whose precision and recall can only grow with d, cannot produce.

    A ratio with a zero denominator is 0, except PR, which is ``inf`` when TP > 0 and FP + FN = 0.
    The states are sums of counts, so the result over a dataset is independent of how it is batched and
    synchronises exactly under DDP.

    Args:
        num_classes: number of classes; logits must have this many channels and labels lie below it.
        tolerances: matching tolerances and area extensions in pixels (thesis Table 4.7: 1 to 5).
        ignore_index: target label of pixels to exclude.

    Shape:
        - preds: (B, H, W) integer label map, or (B, num_classes, H, W) floating logits (argmax is taken).
        - target: (B, H, W) integer labels in [0, num_classes) or ``ignore_index``.

    ``compute()`` returns ``{"edge_precision@1px", "edge_recall@1px", "edge_f1@1px", "edge_pr@1px",
    "edge_area_recall@1px", "edge_area_f1@1px", "edge_area_pr@1px", ...}`` with one float32 scalar tensor per
    metric and tolerance; log it with ``self.log_dict(metric.compute())``.

    Example:
        >>> target = torch.zeros(1, 8, 8, dtype=torch.long)
        >>> target[:, :, 4:] = 1
        >>> metric = EdgeMetrics(num_classes=2, tolerances=(1,))
        >>> metric.update(target.clone(), target)
        >>> result = metric.compute()
        >>> float(result["edge_f1@1px"]), float(result["edge_area_recall@1px"])
        (1.0, 0.3333333432674408)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    pred_edges: torch.Tensor
    target_edges: torch.Tensor
    matched_pred: torch.Tensor
    matched_target: torch.Tensor
    target_area: torch.Tensor

    def __init__(
        self, num_classes: int, tolerances: tuple[int, ...] = (1, 2, 3, 4, 5), ignore_index: int = 255
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f"ignore_index={ignore_index} collides with a class id (num_classes={num_classes})"
            )
        self.num_classes = num_classes
        self.tolerances = _check_tolerances(tolerances)
        self.ignore_index = ignore_index
        count = len(self.tolerances)
        self.add_state("pred_edges", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("target_edges", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("matched_pred", torch.zeros(count, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("matched_target", torch.zeros(count, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("target_area", torch.zeros(count, dtype=torch.int64), dist_reduce_fx="sum")

    def _labels(self, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not isinstance(target, torch.Tensor) or target.dim() != 3 or target.dtype not in INTEGER_DTYPES:
            raise ValueError(
                f"target must be a (B, H, W) integer tensor, got {getattr(target, 'dtype', type(target))} "
                f"{tuple(getattr(target, 'shape', ()))}"
            )
        if not isinstance(preds, torch.Tensor):
            raise ValueError(f"preds must be a tensor, got {type(preds).__name__}")
        if preds.device != target.device:
            raise ValueError(f"preds on {preds.device} and target on {target.device} must share a device")
        if preds.dim() == 4:
            if not preds.is_floating_point():
                raise ValueError(f"preds of shape (B, C, H, W) must be floating logits, got {preds.dtype}")
            if preds.shape[1] != self.num_classes:
                raise ValueError(
                    f"preds has {preds.shape[1]} channels, expected num_classes={self.num_classes}"
                )
            preds = preds.argmax(dim=1)
        elif preds.dim() != 3 or preds.dtype not in INTEGER_DTYPES:
            raise ValueError(
                f"preds must be a (B, H, W) integer label map or (B, C, H, W) logits, got {preds.dtype} "
                f"{tuple(preds.shape)}"
            )
        if preds.shape != target.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} differ in shape")
        if preds.numel() > 0:
            low, high = (int(v) for v in torch.aminmax(preds))
            if low < 0 or high >= self.num_classes:
                raise ValueError(f"preds has labels in [{low}, {high}], outside [0, {self.num_classes})")
            labelled = target[target != self.ignore_index]
            if labelled.numel() > 0:
                low, high = (int(v) for v in torch.aminmax(labelled))
                if low < 0 or high >= self.num_classes:
                    raise ValueError(
                        f"target has labels in [{low}, {high}], outside [0, {self.num_classes}) and not "
                        f"ignore_index={self.ignore_index}"
                    )
        return preds

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Accumulate edge counts of a batch; see the class docstring for shapes."""
        preds = self._labels(preds, target)
        valid = target != self.ignore_index
        pred_edges = label_edges(preds, valid)
        target_edges = label_edges(target, valid)
        matched_pred, matched_target, target_area = edge_match_counts(
            pred_edges, target_edges, self.tolerances, valid
        )
        self.pred_edges += pred_edges.sum()
        self.target_edges += target_edges.sum()
        self.matched_pred += matched_pred
        self.matched_target += matched_target
        self.target_area += target_area

    def compute(self) -> dict[str, torch.Tensor]:
        """Return precision, recall, F-measure and performance ratio at every tolerance, in both readings."""
        precision = _ratio(self.matched_pred, self.pred_edges.expand_as(self.matched_pred))
        false_pred = self.pred_edges - self.matched_pred
        readings = {
            "edge": (self.matched_target, self.target_edges.expand_as(self.matched_target)),
            "edge_area": (self.matched_pred, self.target_area),
        }
        # the precision is the same in both readings
        results = {f"edge_precision@{t}px": precision[index] for index, t in enumerate(self.tolerances)}
        for prefix, (recalled, positives) in readings.items():
            recall = _ratio(recalled, positives)
            f_measure = _ratio(2 * precision * recall, precision + recall)
            false_edges = false_pred + (positives - recalled)
            performance_ratio = _ratio(self.matched_pred, false_edges)
            performance_ratio = torch.where(
                (false_edges == 0) & (self.matched_pred > 0),
                torch.full_like(performance_ratio, torch.inf),
                performance_ratio,
            )
            for index, tolerance in enumerate(self.tolerances):
                results[f"{prefix}_recall@{tolerance}px"] = recall[index]
                results[f"{prefix}_f1@{tolerance}px"] = f_measure[index]
                results[f"{prefix}_pr@{tolerance}px"] = performance_ratio[index]
        return results

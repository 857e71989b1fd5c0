"""Message-passing heads (thesis Ch. 3): ISGMR, TRWP, SGM and mean-field on a D-connected grid CRF.

Each head turns logits (B, C, H, W) into unary costs ``theta = -logits`` (optionally ``-log_softmax``),
runs :func:`app.ops.message_passing` with a Potts pairwise ``term_weight * [a != b]`` (learnable or fixed)
and image-dependent edge weights, and returns ``-costs`` (B, C, H, W).

Edge weights (``edge_weights``):

* ``"canny"``: ``w_ij = 1 - |e_i - e_j|`` from the binary Canny edges ``batch["edges"]`` (B, H, W): an edge
  that crosses an image edge costs nothing (thesis Sec. 3.6.3).
* ``"learned"``: a small conv net on ``batch["image_raw"]`` (B, 3, H, W) giving one weight in (0, 1) per
  edge offset, (B, D // 2, H, W), trained end to end.
* ``"none"``: all edges weigh 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from app.crf_heads.base import HEADS, StructuredHead
from app.ops import message_passing
from app.ops.reference.mrf import Pairwise, check_n_directions, grid_offsets, shift

EdgeWeights = Literal["canny", "learned", "none"]


def canny_edge_weights(edges: Tensor, n_directions: int) -> Tensor:
    """``w = 1 - |e_p - e_q|`` for every edge offset. edges: (B, H, W) in [0, 1] -> (B, D // 2, H, W)."""
    weights = [1 - (edges - shift(edges, -dy, -dx)).abs() for dy, dx in grid_offsets(n_directions)]
    return torch.stack(weights, dim=1)


class EdgeWeightNet(nn.Module):
    """image_raw (B, 3, H, W) -> edge weights (B, D // 2, H, W) in (0, 1): two 3x3 convs and a sigmoid."""

    def __init__(self, n_directions: int, hidden: int = 16) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(3, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, n_directions // 2, 3, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, image: Tensor) -> Tensor:
        return self.layers(image)


class MessagePassingHead(StructuredHead):
    """Shared implementation of the message-passing heads; see the module docstring.

    Subclasses set ``method`` and give their thesis defaults for the three leading arguments; the options
    after them are forwarded by keyword (LightningCLI reads them from this signature).

    Args:
        n_directions: 4, 8 or 16.
        n_iterations: message-passing iterations (>= 1).
        term_weight: Potts term weight (initial value when learnable).
        learn_term_weight: make the term weight a trained parameter.
        edge_weights: ``"canny"``, ``"learned"`` or ``"none"``.
        log_softmax: take ``theta = -log_softmax(logits)`` instead of ``-logits``.
    """

    method: ClassVar[str]

    def __init__(
        self,
        n_directions: int,
        n_iterations: int,
        term_weight: float,
        learn_term_weight: bool = True,
        edge_weights: EdgeWeights = "canny",
        log_softmax: bool = False,
    ) -> None:
        super().__init__()
        check_n_directions(n_directions)
        if edge_weights not in ("canny", "learned", "none"):
            raise ValueError(f"edge_weights must be 'canny', 'learned' or 'none', got {edge_weights!r}")
        self.n_directions, self.n_iterations = n_directions, n_iterations
        self.edge_weights, self.log_softmax = edge_weights, log_softmax
        weight = torch.tensor(float(term_weight))
        if learn_term_weight:
            self.term_weight = nn.Parameter(weight)
        else:
            self.register_buffer("term_weight", weight)
        self.edge_net = EdgeWeightNet(n_directions) if edge_weights == "learned" else None
        self.required_keys = {"canny": ("edges",), "learned": ("image_raw",), "none": ()}[edge_weights]

    def compute_edge_weights(self, batch: Mapping[str, Any], dtype: torch.dtype) -> Tensor | None:
        """(B, D // 2, H, W) edge weights from the batch, or None for ``"none"``."""
        if self.edge_weights == "canny":
            return canny_edge_weights(batch["edges"].to(dtype), self.n_directions)
        if self.edge_net is not None:
            return self.edge_net(batch["image_raw"].to(dtype))
        return None

    def forward(self, logits: Tensor, batch: Mapping[str, Any]) -> Tensor:
        """logits (B, C, H, W) -> refined logits (B, C, H, W), ``-costs`` of Eq. 3.6 / 3.7."""
        unary = -(torch.log_softmax(logits, dim=1) if self.log_softmax else logits)
        pairwise = Pairwise("potts", self.term_weight.to(unary.dtype))
        weights = self.compute_edge_weights(batch, unary.dtype)
        costs = message_passing(unary, pairwise, weights, self.method, self.n_directions, self.n_iterations)
        return -costs


@HEADS.register("trwp")
class TRWP(MessagePassingHead):
    """Tree-reweighted message passing head (Alg. 2); thesis defaults: 4 directions, term weight 20."""

    method = "trwp"

    def __init__(
        self, n_directions: int = 4, n_iterations: int = 5, term_weight: float = 20.0, **options: Any
    ) -> None:
        super().__init__(n_directions, n_iterations, term_weight, **options)


@HEADS.register("isgmr")
class ISGMR(MessagePassingHead):
    """Iterative semi-global matching revisited head (Alg. 1); thesis defaults: 8 directions, term weight 5."""

    method = "isgmr"

    def __init__(
        self, n_directions: int = 8, n_iterations: int = 5, term_weight: float = 5.0, **options: Any
    ) -> None:
        super().__init__(n_directions, n_iterations, term_weight, **options)


@HEADS.register("sgm")
class SGM(MessagePassingHead):
    """Semi-global matching head (Eq. 3.3, Hirschmuller); one pass by default (costs grow like D^iterations)."""

    method = "sgm"

    def __init__(
        self, n_directions: int = 8, n_iterations: int = 1, term_weight: float = 5.0, **options: Any
    ) -> None:
        super().__init__(n_directions, n_iterations, term_weight, **options)


@HEADS.register("meanfield")
class MeanField(MessagePassingHead):
    """Local mean-field head on the D-connected grid (the baseline of the thesis tables)."""

    method = "meanfield"

    def __init__(
        self, n_directions: int = 4, n_iterations: int = 5, term_weight: float = 5.0, **options: Any
    ) -> None:
        super().__init__(n_directions, n_iterations, term_weight, **options)

"""Pairwise MRFs on D-connected pixel grids: grid structure, pairwise forms and the energy (thesis Eq. 3.1).

Conventions shared by every message-passing method, the compiled kernels and their references:

* Grid (thesis Fig. 3.9). A ``D``-connected grid, ``D`` in ``{4, 8, 16}``, has ``D // 2`` undirected edge
  offsets ``(dy, dx)``, the first ``D // 2`` of :data:`GRID_OFFSETS`::

      k : 0       1       2       3        4       5       6        7
          (0, 1)  (1, 0)  (1, 1)  (1, -1)  (1, 2)  (2, 1)  (2, -1)  (1, -2)
          horiz.  vert.   diagonals        asymmetric wide / narrow trees

  Pixel ``p = (y, x)`` and ``q = p + offset_k`` are joined by an edge when both lie in the image; edges
  leaving the image do not exist. Every offset is raster-forward (``dy > 0``, or ``dy == 0`` and
  ``dx > 0``), so ``p`` precedes ``q`` in raster order.
* Edge weights: ``edge_weights: (B, D // 2, H, W)``; ``edge_weights[b, k, y, x]`` weights the edge between
  ``(y, x)`` and ``(y + dy_k, x + dx_k)``. Entries of edges that leave the image are ignored.
* Pairwise: ``theta_pq(a, b) = edge_weights[k, p] * V(a, b)`` with ``a`` the label of the first node ``p``
  and ``b`` the label of ``q = p + offset_k``. ``V`` is an ``(L, L)`` matrix, possibly non-symmetric, or
  a parametric :class:`Pairwise` form materialised by :func:`pairwise_matrix`.
* Directions (message passing): ``D`` directed scan directions, ``r = 2k`` steps by ``+offset_k`` and
  ``r = 2k + 1`` by ``-offset_k`` (:func:`grid_directions`); the opposite of ``r`` is ``r ^ 1``. For 4
  directions this is left-right, right-left, up-down, down-up (thesis Fig. 3.1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from app.ops._checks import all_finite

GRID_OFFSETS: tuple[tuple[int, int], ...] = (
    (0, 1),
    (1, 0),
    (1, 1),
    (1, -1),
    (1, 2),
    (2, 1),
    (2, -1),
    (1, -2),
)
"""Undirected edge offsets ``(dy, dx)``, canonical order; a D-connected grid uses the first ``D // 2``."""

N_DIRECTIONS: tuple[int, ...] = (4, 8, 16)
PAIRWISE_KINDS: tuple[str, ...] = ("potts", "truncated_linear", "truncated_quadratic")


def check_n_directions(n_directions: int) -> None:
    """Raise ``ValueError`` unless ``n_directions`` is one of 4, 8, 16."""
    if (
        isinstance(n_directions, bool)
        or not isinstance(n_directions, int)
        or n_directions not in N_DIRECTIONS
    ):
        raise ValueError(f"n_directions must be one of {N_DIRECTIONS}, got {n_directions!r}")


def grid_offsets(n_directions: int) -> tuple[tuple[int, int], ...]:
    """The ``n_directions // 2`` undirected edge offsets ``(dy, dx)`` of a D-connected grid (Fig. 3.9)."""
    check_n_directions(n_directions)
    return GRID_OFFSETS[: n_directions // 2]


def grid_directions(n_directions: int) -> tuple[tuple[int, int], ...]:
    """The ``n_directions`` scan steps ``(dy, dx)``: ``2k`` is ``+offset_k``, ``2k + 1`` is ``-offset_k``.

    A message in direction ``r`` travels from pixel ``i - step_r`` to pixel ``i``.
    """
    steps: list[tuple[int, int]] = []
    for dy, dx in grid_offsets(n_directions):
        steps += [(dy, dx), (-dy, -dx)]
    return tuple(steps)


def opposite_direction(direction: int) -> int:
    """Index of the direction opposite to ``direction`` (``r^-`` in the thesis)."""
    return direction ^ 1


def trwp_rho(n_directions: int) -> float:
    """TRWP coefficient ``rho = gamma_edge / gamma_node`` of the scanline tree decomposition (Eq. 3.10).

    The trees are the scanlines (maximal chains) of each of the ``D // 2`` undirected offsets. Every edge
    lies in exactly one tree, every pixel in ``D // 2`` trees (one per offset, single-pixel chains
    included), so ``rho = 1 / (D // 2) = 2 / D``: 0.5 for 4 directions (as in the thesis), 0.25 for 8 and
    0.125 for 16 (the thesis code kept 0.5 for every D).
    """
    check_n_directions(n_directions)
    return 2.0 / n_directions


def shift(tensor: Tensor, dy: int, dx: int) -> Tensor:
    """Translate the last two dims: ``out[..., y, x] = tensor[..., y - dy, x - dx]``, zero outside.

    tensor: (..., H, W) floating -> (..., H, W).
    """
    height, width = tensor.shape[-2:]
    padded = F.pad(tensor, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)))
    y0, x0 = max(-dy, 0), max(-dx, 0)
    return padded[..., y0 : y0 + height, x0 : x0 + width]


def _check_scalar_parameter(value: Tensor | float, name: str) -> None:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"pairwise {name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise ValueError(f"pairwise {name} must be a floating tensor, got {value.dtype}")
        if not bool(torch.isfinite(value.detach()).all()):
            raise ValueError(f"pairwise {name} must be finite, got {value.detach().item()}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"pairwise {name} must be a float or a scalar tensor, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"pairwise {name} must be finite, got {value}")


@dataclass(frozen=True, eq=False)
class Pairwise:
    """A parametric pairwise function ``V(a, b)`` of the label distance ``d = |a - b|``.

    * ``"potts"``: ``term_weight * [a != b]``
    * ``"truncated_linear"``: ``term_weight * min(d, truncation)``
    * ``"truncated_quadratic"``: ``term_weight * min(d ** 2, truncation)``

    ``truncation=None`` leaves the linear / quadratic forms untruncated (Potts takes none). Parameters may
    be floats or scalar tensors; tensors that require grad receive gradients through
    :meth:`matrix` (thesis Eq. 3.36 chained through the form).
    """

    kind: str
    term_weight: Tensor | float = 1.0
    truncation: Tensor | float | None = None

    def __post_init__(self) -> None:
        if self.kind not in PAIRWISE_KINDS:
            raise ValueError(f"pairwise kind must be one of {PAIRWISE_KINDS}, got {self.kind!r}")
        _check_scalar_parameter(self.term_weight, "term_weight")
        if self.truncation is not None:
            if self.kind == "potts":
                raise ValueError("pairwise truncation is not used by the potts form; leave it None")
            _check_scalar_parameter(self.truncation, "truncation")
            value = (
                self.truncation.detach().item() if isinstance(self.truncation, Tensor) else self.truncation
            )
            if value <= 0:
                raise ValueError(f"pairwise truncation must be > 0, got {value}")

    def tensors(self) -> tuple[Tensor, ...]:
        """The parameters that are tensors (for device checks)."""
        return tuple(p for p in (self.term_weight, self.truncation) if isinstance(p, Tensor))

    def matrix(
        self, n_labels: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        """Materialise ``V`` as an ``(L, L)`` tensor, differentiably in the parameters."""
        if isinstance(n_labels, bool) or not isinstance(n_labels, int) or n_labels < 2:
            raise ValueError(f"n_labels must be an int >= 2, got {n_labels!r}")
        params = self.tensors()
        if dtype is None:
            dtype = params[0].dtype if params else torch.get_default_dtype()
        if device is None and params:
            device = params[0].device
        labels = torch.arange(n_labels, dtype=dtype, device=device)
        distance = (labels[:, None] - labels[None, :]).abs()
        if self.kind == "potts":
            shape = (distance > 0).to(dtype)
        else:
            shape = distance if self.kind == "truncated_linear" else distance.square()
            if self.truncation is not None:
                shape = torch.minimum(shape, torch.as_tensor(self.truncation, dtype=dtype, device=device))
        return torch.as_tensor(self.term_weight, dtype=dtype, device=device) * shape


def pairwise_matrix(
    pairwise: Tensor | Pairwise,
    n_labels: int,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Validate ``pairwise`` and return it as an ``(L, L)`` matrix ``V(a, b)`` (differentiable).

    pairwise: (L, L) tensor or :class:`Pairwise` -> (L, L) in ``dtype`` on ``device``.
    """
    if isinstance(pairwise, Pairwise):
        if device is not None:
            for param in pairwise.tensors():
                if param.device != torch.device(device):
                    raise ValueError(f"pairwise parameters are on {param.device}, expected {device}")
        return pairwise.matrix(n_labels, dtype=dtype, device=device)
    if not isinstance(pairwise, Tensor):
        raise ValueError(f"pairwise must be an (L, L) tensor or a Pairwise, got {type(pairwise).__name__}")
    if pairwise.shape != (n_labels, n_labels):
        raise ValueError(
            f"pairwise must have shape (L, L) = ({n_labels}, {n_labels}), got {tuple(pairwise.shape)}"
        )
    if not pairwise.is_floating_point():
        raise ValueError(f"pairwise must be a floating tensor, got {pairwise.dtype}")
    if device is not None and pairwise.device != torch.device(device):
        raise ValueError(f"pairwise is on {pairwise.device}, expected {device} (the device of unary)")
    if not bool(torch.isfinite(pairwise.detach()).all()):
        raise ValueError("pairwise must contain only finite values")
    return pairwise.to(dtype=dtype) if dtype is not None else pairwise


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the references compute in: float16 / bfloat16 are computed in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def prepare_mrf_inputs(
    unary: Tensor,
    pairwise: Tensor | Pairwise,
    edge_weights: Tensor | None,
    n_directions: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Validate the MRF inputs and return them in the compute dtype.

    unary: (B, L, H, W) floating, finite, L >= 2.
    pairwise: (L, L) tensor or :class:`Pairwise`.
    edge_weights: (B, D // 2, H, W) finite and >= 0, or None (all ones).
    Returns ``(unary, V, edge_weights)``: (B, L, H, W), (L, L), (B, D // 2, H, W).
    Raises ``ValueError`` naming the offending argument.
    """
    check_n_directions(n_directions)
    if not isinstance(unary, Tensor):
        raise ValueError(f"unary must be a tensor, got {type(unary).__name__}")
    if unary.dim() != 4:
        raise ValueError(
            f"unary must have shape (B, L, H, W), got {unary.dim()}-D shape {tuple(unary.shape)}"
        )
    if not unary.is_floating_point():
        raise ValueError(f"unary must be a floating tensor, got {unary.dtype}")
    batch, n_labels, height, width = unary.shape
    if n_labels < 2:
        raise ValueError(f"unary must have at least 2 labels (dim 1), got {n_labels}")
    if batch == 0 or height == 0 or width == 0:
        raise ValueError(f"unary must not be empty, got shape {tuple(unary.shape)}")
    if not all_finite(unary):
        raise ValueError("unary must contain only finite values (NaN/inf would corrupt the minima)")
    dtype = compute_dtype(unary.dtype)
    matrix = pairwise_matrix(pairwise, n_labels, dtype=dtype, device=unary.device)
    expected = (batch, n_directions // 2, height, width)
    if edge_weights is None:
        weights = unary.new_ones(expected, dtype=dtype)
    else:
        if not isinstance(edge_weights, Tensor):
            raise ValueError(f"edge_weights must be a tensor or None, got {type(edge_weights).__name__}")
        if tuple(edge_weights.shape) != expected:
            raise ValueError(
                f"edge_weights must have shape (B, D//2, H, W) = {expected}, got {tuple(edge_weights.shape)}"
            )
        if not edge_weights.is_floating_point():
            raise ValueError(f"edge_weights must be a floating tensor, got {edge_weights.dtype}")
        if edge_weights.device != unary.device:
            raise ValueError(f"edge_weights is on {edge_weights.device}, unary on {unary.device}")
        if not all_finite(edge_weights):
            raise ValueError("edge_weights must contain only finite values")
        if bool(edge_weights.detach().min() < 0):
            raise ValueError("edge_weights must be non-negative")
        weights = edge_weights.to(dtype)
    return unary.to(dtype), matrix, weights


def mrf_energy(
    labels: Tensor,
    unary: Tensor,
    pairwise: Tensor | Pairwise,
    edge_weights: Tensor | None = None,
    n_directions: int = 4,
) -> Tensor:
    """Energy of a labelling, thesis Eq. 3.1: ``sum_i theta_i(x_i) + sum_(p,q) w_pq V(x_p, x_q)``.

    labels: (B, H, W) integer in ``[0, L)``; unary: (B, L, H, W); pairwise: (L, L) or :class:`Pairwise`;
    edge_weights: (B, D // 2, H, W) or None (all ones) -> (B,), differentiable in unary, pairwise and
    edge weights. Edges follow the D-connected grid of :data:`GRID_OFFSETS`.
    """
    unary_c, matrix, weights = prepare_mrf_inputs(unary, pairwise, edge_weights, n_directions)
    batch, n_labels, height, width = unary_c.shape
    if not isinstance(labels, Tensor):
        raise ValueError(f"labels must be a tensor, got {type(labels).__name__}")
    if tuple(labels.shape) != (batch, height, width):
        raise ValueError(
            f"labels must have shape (B, H, W) = {(batch, height, width)}, got {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.device != unary.device:
        raise ValueError(f"labels is on {labels.device}, unary on {unary.device}")
    labels = labels.long()
    if bool((labels < 0).any()) or bool((labels >= n_labels).any()):
        raise ValueError(
            f"labels must lie in [0, {n_labels}), got [{labels.min().item()}, {labels.max().item()}]"
        )
    energy = unary_c.gather(1, labels[:, None]).sum(dim=(1, 2, 3))
    for k, (dy, dx) in enumerate(grid_offsets(n_directions)):
        y0, y1 = max(0, -dy), height - max(0, dy)
        x0, x1 = max(0, -dx), width - max(0, dx)
        if y1 <= y0 or x1 <= x0:
            continue
        first = labels[:, y0:y1, x0:x1]
        second = labels[:, y0 + dy : y1 + dy, x0 + dx : x1 + dx]
        energy = energy + (weights[:, k, y0:y1, x0:x1] * matrix[first, second]).sum(dim=(1, 2))
    return energy

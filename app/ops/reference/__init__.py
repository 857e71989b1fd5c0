"""Plain-PyTorch versions of every compiled op, for tests and gradient checks only."""

from app.ops.reference.gaussian_message import gaussian_message_reference
from app.ops.reference.message_passing import METHODS, message_passing, trws
from app.ops.reference.mrf import GRID_OFFSETS, Pairwise, grid_offsets, mrf_energy, pairwise_matrix, trwp_rho
from app.ops.reference.segment_mean import segment_mean_dense, segment_mean_reference

__all__ = [
    "GRID_OFFSETS",
    "METHODS",
    "Pairwise",
    "gaussian_message_reference",
    "grid_offsets",
    "message_passing",
    "mrf_energy",
    "pairwise_matrix",
    "segment_mean_dense",
    "segment_mean_reference",
    "trwp_rho",
    "trws",
]

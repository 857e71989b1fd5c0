"""Compiled, differentiable min-sum message passing on D-connected grid MRFs (thesis Ch. 3, Alg. 1-4).

Same signature, checks and conventions as :func:`app.ops.reference.message_passing`; the forward stores the
argmin indices of every message (uint8 up to 256 labels, wider above; for Potts one bit per label and the one
label the others jump to, :func:`stored_argmins`) and the backward replays them in reverse (Sec. 3.5.3, 3.7.4).
Potts, truncated-linear and (on the CPU) truncated-quadratic
:class:`~app.ops.reference.mrf.Pairwise` forms with a non-negative term weight take O(L) forward paths: on the
CPU a vectorised pass over the labels below the cap where it is reached within a few dozen labels, else the
linear distance transform or the lower envelope of parabolas (the quadratic's results equal the dense path's,
argmins and ties included). A matrix always takes the O(L^2) min-convolution. Mean-field runs its
own compiled op (``app::meanfield``, csrc/message_passing/meanfield.h), which stores the distributions of
every iteration for the backward (O(L) products for Potts and truncated linear, GEMMs for other pairwise).
"""

from __future__ import annotations

import torch
from torch import Tensor

from app.ops._extension import extension_loaded, require_extension
from app.ops.reference.message_passing import METHODS, _check_n_iterations
from app.ops.reference.mrf import Pairwise, prepare_mrf_inputs

_METHOD_IDS = {"isgmr": 0, "trwp": 1, "sgm": 2}
# pairwise kinds of the kernels (csrc/message_passing/common.h PairwiseKind): 0 is the general O(L^2) matrix
_GENERAL = 0
_KIND_IDS = {"potts": 1, "truncated_linear": 2, "truncated_quadratic": 3}


def _pairwise_kind(pairwise: Tensor | Pairwise) -> int:
    """Which O(L) path the kernels may take for ``pairwise`` (general O(L^2) when none applies)."""
    if not isinstance(pairwise, Pairwise):
        return _GENERAL
    weight = pairwise.term_weight
    if float(weight.detach() if isinstance(weight, Tensor) else weight) < 0:
        return _GENERAL
    return _KIND_IDS[pairwise.kind]


def index_dtype(n_labels: int) -> torch.dtype:
    """dtype of the stored argmin indices for ``n_labels`` labels."""
    if n_labels <= 256:
        return torch.uint8
    return torch.int16 if n_labels <= 32768 else torch.int32


def index_row(n_labels: int, pairwise_kind: int) -> int:
    """Entries of :func:`index_dtype` the forward stores per message: ``n_labels`` argmins, or for Potts
    (``pairwise_kind`` 1) the bits ``[p(l) = l]`` in ``ceil(n_labels / bits per entry)`` entries and then ``m0``, the
    label every other label jumps to (Potts' argmins are ``l`` or ``m0``)."""
    if pairwise_kind != _KIND_IDS["potts"]:
        return n_labels
    bits = torch.iinfo(index_dtype(n_labels)).bits
    return -(-n_labels // bits) + 1


def stored_argmins(p: Tensor, n_labels: int, pairwise_kind: int) -> Tensor:
    """The argmins ``p(l)`` (..., L) of the stored indices ``p`` (..., :func:`index_row`) of ``app::message_passing``
    (int64). A message without a sender (a scanline's first) stores zeros, which read as ``p = 0``."""
    if pairwise_kind != _KIND_IDS["potts"]:
        return p.long()
    words = index_row(n_labels, pairwise_kind) - 1
    bit_bytes = p[..., :words].contiguous().view(torch.uint8)  # little-endian: bit l in byte l // 8
    labels = torch.arange(n_labels, device=p.device)
    stays = (bit_bytes[..., labels // 8].long() >> (labels % 8)) & 1
    return torch.where(stays.bool(), labels, p[..., words : words + 1].long())


def message_passing(
    unary: Tensor,
    pairwise: Tensor | Pairwise,
    edge_weights: Tensor | None = None,
    method: str = "trwp",
    n_directions: int = 4,
    n_iterations: int = 5,
) -> Tensor:
    """Min-sum message passing, returning the final costs ``c_i(lambda)`` (Eq. 3.7; SGM Eq. 3.6).

    ``isgmr``: Alg. 1 / Eq. 3.9; ``trwp``: Alg. 2 / Eq. 3.10 with ``rho = 2 / D``; ``sgm``: Eq. 3.3;
    ``meanfield``: the local mean-field baseline, ``c = theta + sum_j w_ij V softmax(-c_j)`` iterated (module
    docstring of :mod:`app.ops.reference.message_passing`); backward from the stored per-iteration distributions,
    ``n_iterations * B * H * W * L`` scalars.
    Differentiable in ``unary``, ``pairwise`` (matrix or form parameters, Eq. 3.36) and ``edge_weights``
    (Eq. 3.33).

    Args:
        unary: (B, L, H, W) unary costs, finite, L >= 2.
        pairwise: (L, L) matrix ``V(a, b)`` or a :class:`~app.ops.reference.mrf.Pairwise` form.
        edge_weights: (B, D // 2, H, W) non-negative edge weights, or None (all ones).
        method: ``"isgmr"``, ``"trwp"``, ``"sgm"`` or ``"meanfield"``.
        n_directions: 4, 8 or 16 (thesis Fig. 3.9).
        n_iterations: >= 1.

    Returns:
        (B, L, H, W) costs in the dtype of ``unary`` (float16 / bfloat16 computed in float32).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    _check_n_iterations(n_iterations)
    unary_c, matrix, weights = prepare_mrf_inputs(unary, pairwise, edge_weights, n_directions)
    require_extension()
    if method == "meanfield":
        costs, _ = torch.ops.app.meanfield(
            unary_c.contiguous(),
            matrix.contiguous(),
            weights.contiguous(),
            n_directions,
            n_iterations,
            _pairwise_kind(pairwise),
        )
    else:
        costs, _, _ = torch.ops.app.message_passing(
            unary_c.contiguous(),
            matrix.contiguous(),
            weights.contiguous(),
            _METHOD_IDS[method],
            n_directions,
            n_iterations,
            _pairwise_kind(pairwise),
        )
    return costs.to(unary.dtype)


def _backward(ctx, grad_costs: Tensor | None, grad_p: Tensor | None, grad_q: Tensor | None):
    if grad_costs is None:
        return (None,) * 7
    pairwise, edge_weights, p, q = ctx.saved_tensors
    grad_unary, grad_pairwise, grad_weights = torch.ops.app.message_passing_backward(
        grad_costs.contiguous(),
        pairwise,
        edge_weights,
        p,
        q,
        ctx.method,
        ctx.n_directions,
        ctx.n_iterations,
        ctx.kind,
        ctx.needs_input_grad[1],
        ctx.needs_input_grad[2],
    )
    return (
        grad_unary,
        grad_pairwise if ctx.needs_input_grad[1] else None,
        grad_weights if ctx.needs_input_grad[2] else None,
        None,
        None,
        None,
        None,
    )


def _setup_context(ctx, inputs, output) -> None:
    _, pairwise, edge_weights, method, n_directions, n_iterations, kind = inputs
    _, p, q = output
    ctx.save_for_backward(pairwise, edge_weights, p, q)
    ctx.method, ctx.n_directions, ctx.n_iterations, ctx.kind = method, n_directions, n_iterations, kind
    ctx.mark_non_differentiable(p, q)
    # the indices get no gradient: without this, autograd would fill zeros of their size (82 MiB at 256x512,
    # 32 labels, 5 iterations, 4 directions for a matrix pairwise) before every backward
    ctx.set_materialize_grads(False)


def _meanfield_backward(ctx, grad_costs: Tensor | None, grad_q: Tensor | None):
    if grad_costs is None:
        return (None,) * 6
    pairwise, edge_weights, q = ctx.saved_tensors
    grad_unary, grad_pairwise, grad_weights = torch.ops.app.meanfield_backward(
        grad_costs.contiguous(),
        pairwise,
        edge_weights,
        q,
        ctx.n_directions,
        ctx.kind,
        ctx.needs_input_grad[1],
    )
    return grad_unary, grad_pairwise, grad_weights, None, None, None


def _meanfield_setup_context(ctx, inputs, output) -> None:
    _, pairwise, edge_weights, n_directions, _, kind = inputs
    _, q = output
    ctx.save_for_backward(pairwise, edge_weights, q)
    ctx.n_directions, ctx.kind = n_directions, kind
    ctx.mark_non_differentiable(q)
    ctx.set_materialize_grads(False)  # as for message passing: no zeros of q's size before every backward


if extension_loaded():

    @torch.library.register_fake("app::message_passing")
    def _message_passing_fake(
        unary: Tensor,
        pairwise: Tensor,
        edge_weights: Tensor,
        method: int,
        n_directions: int,
        n_iterations: int,
        pairwise_kind: int,
    ) -> tuple[Tensor, Tensor, Tensor]:
        batch, n_labels, height, width = unary.shape
        indices = (n_iterations, n_directions, batch, height, width)
        dtype = index_dtype(n_labels)
        return (
            torch.empty_like(unary),
            unary.new_empty((*indices, index_row(n_labels, pairwise_kind)), dtype=dtype),
            unary.new_empty(indices, dtype=dtype),
        )

    @torch.library.register_fake("app::message_passing_backward")
    def _message_passing_backward_fake(
        grad_costs: Tensor,
        pairwise: Tensor,
        edge_weights: Tensor,
        p: Tensor,
        q: Tensor,
        method: int,
        n_directions: int,
        n_iterations: int,
        pairwise_kind: int,
        pairwise_grad: bool,
        weights_grad: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        return torch.empty_like(grad_costs), torch.empty_like(pairwise), torch.empty_like(edge_weights)

    torch.library.register_autograd("app::message_passing", _backward, setup_context=_setup_context)

    @torch.library.register_fake("app::meanfield")
    def _meanfield_fake(
        unary: Tensor,
        pairwise: Tensor,
        edge_weights: Tensor,
        n_directions: int,
        n_iterations: int,
        pairwise_kind: int,
    ) -> tuple[Tensor, Tensor]:
        return torch.empty_like(unary), unary.new_empty((n_iterations, *unary.shape))

    @torch.library.register_fake("app::meanfield_backward")
    def _meanfield_backward_fake(
        grad_costs: Tensor,
        pairwise: Tensor,
        edge_weights: Tensor,
        q: Tensor,
        n_directions: int,
        pairwise_kind: int,
        pairwise_grad: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        return torch.empty_like(grad_costs), torch.empty_like(pairwise), torch.empty_like(edge_weights)

    torch.library.register_autograd(
        "app::meanfield", _meanfield_backward, setup_context=_meanfield_setup_context
    )

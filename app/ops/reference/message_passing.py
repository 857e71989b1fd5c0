"""Plain-PyTorch reference of min-sum message passing on D-connected grid MRFs (thesis Ch. 3, Sec. 2.1.3).

Ground truth for the compiled kernels: written with torch ops only, so autograd differentiates it w.r.t.
the unary costs, the pairwise matrix (or the tensors of a :class:`~app.ops.reference.mrf.Pairwise` form)
and the edge weights. Grid, direction and pairwise conventions are those of :mod:`app.ops.reference.mrf`.

Message conventions (Alg. 1-2), shared by ``sgm``, ``isgmr`` and ``trwp``:

* ``m^r_i(lambda)`` is the message to pixel ``i`` from ``j = i - step_r`` (direction ``r``); all messages
  start at 0 and a pixel whose predecessor ``j`` lies outside the image (the first node of its scanline)
  keeps its initial message.
* A message is ``m^r_i(lambda) = min_mu [h_j(mu) + w_ji V_r(mu, lambda)]`` with ``V_r = V`` for the
  ``+offset`` directions and ``V^T`` for the ``-offset`` ones (``V(a, b)`` takes the label of the
  raster-first node first), followed by the reparametrisation of Eq. 3.5, ``m -= min_lambda m``. The
  argmin over ``mu`` (``p`` in Alg. 1-2) and over ``lambda`` (``q``) are what the compiled backward
  stores; here they are taken with ``argmin`` (first minimum on ties) and the minima read back with
  ``gather``, so autograd routes every gradient through those single indices and, on tie-free inputs,
  equals the stored-index backward of Alg. 3-4.
* Scanlines are processed line by line along the scan direction, all scanlines (and batch, labels) at
  once; for every step ``(dy, dx)`` the pixels of one image row (column when ``dy == 0``) depend only on
  earlier rows, so this equals the sequential per-scanline update exactly.

Methods:

* ``sgm``: Hirschmuller's update, Eq. 3.3, ``h_j = m^r_j`` with ``theta_i(lambda)`` added at the
  receiver; the first node of a scanline gets ``theta_i`` itself (Hirschmuller's ``L_r = C`` at the path
  start; the thesis kernels leave it 0, which over-counts unevenly near borders), so every direction
  counts each unary once. Messages are normalised by Eq. 3.5, subtracting their own minimum as the
  thesis kernels do (Hirschmuller's Eq. 2.34b subtracts the predecessor's minimum, which differs only by
  a per-pixel constant). Costs: Eq. 3.6, ``c_i = sum_r m^r_i``. More than one iteration repeats SGM on
  the reparametrised unary ``theta <- c`` with messages reset to 0 (the thesis' iterative SGM baseline,
  Sec. 3.6); cost values then grow like ``D ** n_iterations``, so many iterations with 8 or 16
  directions need float64.
* ``isgmr``: Alg. 1 / Eq. 3.9, ``h_j = theta_j + m^{r,k+1}_j + sum_{d not in {r, r^-}} m^{d,k}_j``; all
  directions are updated from the previous iteration's messages, which are replaced after the iteration.
* ``trwp``: Alg. 2 / Eq. 3.10, ``h_j = rho (theta_j + sum_d m^d_j) - m^{r^-}_j`` with the latest messages,
  direction by direction in the order of :func:`~app.ops.reference.mrf.grid_directions`, ``rho = 2 / D``
  (:func:`~app.ops.reference.mrf.trwp_rho`).
* ``isgmr`` and ``trwp`` return Eq. 3.7, ``c_i = theta_i + sum_r m^r_i``.
* ``meanfield``: the local mean-field baseline (Krahenbuhl & Koltun Eq. 4 restricted to the grid
  neighbourhood): ``Q = softmax(-theta)``, then ``n_iterations`` parallel updates
  ``c_i(lambda) = theta_i(lambda) + sum_{j in N(i)} w_ij sum_mu V(lambda, mu) Q_j(mu)`` (``V`` oriented by
  the edge), ``Q = softmax(-c)``; returns the last ``c``. Neighbour terms are summed, the exact
  mean-field update of the Eq. 3.1 energy (the thesis code averaged them over directions).
"""

from __future__ import annotations

import torch
from torch import Tensor

from app.ops.reference.mrf import (
    Pairwise,
    grid_directions,
    grid_offsets,
    mrf_energy,
    opposite_direction,
    prepare_mrf_inputs,
    shift,
    trwp_rho,
)

METHODS: tuple[str, ...] = ("isgmr", "trwp", "sgm", "meanfield")


def _check_n_iterations(n_iterations: int) -> None:
    if isinstance(n_iterations, bool) or not isinstance(n_iterations, int) or n_iterations < 1:
        raise ValueError(f"n_iterations must be an int >= 1, got {n_iterations!r}")


def _frame(step: tuple[int, int]) -> tuple[bool, bool, int, int]:
    """How to view the image so that ``step`` becomes ``(a, b)`` with ``a > 0``: (transpose, flip, a, b)."""
    dy, dx = step
    transpose = dy == 0
    a, b = (dx, 0) if transpose else (dy, dx)
    return transpose, a < 0, abs(a), b


def _into_frame(tensor: Tensor, transpose: bool, flip: bool) -> Tensor:
    if transpose:
        tensor = tensor.transpose(-1, -2)
    return tensor.flip(-2) if flip else tensor


def _out_of_frame(tensor: Tensor, transpose: bool, flip: bool) -> Tensor:
    if flip:
        tensor = tensor.flip(-2)
    return tensor.transpose(-1, -2) if transpose else tensor


def _sweep(
    step: tuple[int, int],
    matrix: Tensor,
    weights: Tensor,
    base: Tensor,
    scale: float,
    minus: Tensor | None,
    receiver: Tensor | None,
    first: Tensor,
) -> Tensor:
    """All scanlines of one direction (Alg. 1 lines 4-11, Alg. 2 lines 4-11).

    For ``i`` with predecessor ``j = i - step`` inside the image::

        m_i(lambda) = min_mu [scale * (base_j(mu) + m_j(mu)) - minus_j(mu) + w_i * matrix(mu, lambda)]
                      + receiver_i(lambda),    then  m_i -= min_lambda m_i          (Eq. 3.3/3.9/3.10, 3.5)

    with ``m_j`` the message just computed at ``j`` in this sweep; ``m_i = first_i`` otherwise.
    matrix: (L, L) indexed (sender label, receiver label); weights: (B, H, W) edge weight of
    ``(i - step, i)`` stored at the receiver ``i``; base, minus, receiver, first: (B, L, H, W).
    Returns the messages of this direction, (B, L, H, W).
    """
    transpose, flip, a, b = _frame(step)
    base, first, weights = (_into_frame(t, transpose, flip) for t in (base, first, weights))
    minus = None if minus is None else _into_frame(minus, transpose, flip)
    receiver = None if receiver is None else _into_frame(receiver, transpose, flip)
    height, width = base.shape[-2:]
    source_column = torch.arange(width, device=base.device) - b
    has_sender = (source_column >= 0) & (source_column < width)
    receiver_label = torch.arange(matrix.shape[1], device=base.device)[:, None]  # (L, 1)
    rows: list[Tensor] = []
    for y in range(height):
        if y < a:
            rows.append(first[..., y, :])
            continue
        j = y - a
        sender = scale * (base[..., j, :] + rows[j])
        if minus is not None:
            sender = sender - minus[..., j, :]
        sender = shift(sender.unsqueeze(-2), 0, b).squeeze(-2)  # column x now holds pixel x - b
        with torch.no_grad():  # Delta(lambda, mu) of Alg. 1-2 line 7, (B, L_mu, L_lambda, W)
            candidates = sender[:, :, None, :] + weights[:, None, None, y, :] * matrix[None, :, :, None]
            p = candidates.argmin(dim=1)  # (B, L, W): line 8, the stored index p
        # line 9, m(lambda) = Delta(lambda, p(lambda)) rebuilt from its terms (the same floating-point
        # operations), so that autograd keeps p, not Delta, and back-propagates as Eq. 3.30 / 3.33
        message = sender.gather(1, p) + weights[:, None, y, :] * matrix[p, receiver_label]
        if receiver is not None:
            message = message + receiver[..., y, :]
        q = message.argmin(dim=1, keepdim=True)  # line 10, the stored index q
        message = message - message.gather(1, q)  # line 11, Eq. 3.5
        rows.append(torch.where(has_sender, message, first[..., y, :]))
    return _out_of_frame(torch.stack(rows, dim=-2), transpose, flip)


def _direction_terms(
    matrix: Tensor, weights: Tensor, n_directions: int
) -> list[tuple[tuple[int, int], Tensor, Tensor]]:
    """Per direction ``r``: (step, V_r (L, L), receiver-indexed edge weights (B, H, W))."""
    terms = []
    for r, step in enumerate(grid_directions(n_directions)):
        k = r // 2
        if r % 2 == 0:  # +offset: sender is the first node of the edge, the weight sits there
            terms.append((step, matrix, shift(weights[:, k], *step)))
        else:  # -offset: the receiver is the first node
            terms.append((step, matrix.T, weights[:, k]))
    return terms


def _sgm(unary: Tensor, matrix: Tensor, weights: Tensor, n_directions: int, n_iterations: int) -> Tensor:
    terms = _direction_terms(matrix, weights, n_directions)
    zeros = torch.zeros_like(unary)
    for _ in range(n_iterations):
        first = unary - unary.gather(1, unary.argmin(dim=1, keepdim=True))  # Eq. 3.5 at the path start
        messages = [_sweep(step, v, w, zeros, 1.0, None, unary, first) for step, v, w in terms]
        unary = torch.stack(messages).sum(dim=0)  # Eq. 3.6, the next iteration's unary
    return unary


def _isgmr(unary: Tensor, matrix: Tensor, weights: Tensor, n_directions: int, n_iterations: int) -> Tensor:
    terms = _direction_terms(matrix, weights, n_directions)
    zeros = torch.zeros_like(unary)
    messages = [zeros] * n_directions
    for _ in range(n_iterations):
        updated = []
        for r, (step, v, w) in enumerate(terms):
            others = [messages[d] for d in range(n_directions) if d not in (r, opposite_direction(r))]
            base = unary + torch.stack(others).sum(dim=0)
            updated.append(_sweep(step, v, w, base, 1.0, None, None, zeros))
        messages = updated  # Alg. 1 line 12
    return unary + torch.stack(messages).sum(dim=0)  # Eq. 3.7


def _trwp(unary: Tensor, matrix: Tensor, weights: Tensor, n_directions: int, n_iterations: int) -> Tensor:
    terms = _direction_terms(matrix, weights, n_directions)
    rho = trwp_rho(n_directions)
    zeros = torch.zeros_like(unary)
    messages = [zeros] * n_directions
    for _ in range(n_iterations):
        for r, (step, v, w) in enumerate(terms):
            others = [messages[d] for d in range(n_directions) if d != r]
            base = unary + torch.stack(others).sum(dim=0)
            messages[r] = _sweep(step, v, w, base, rho, messages[opposite_direction(r)], None, zeros)
    return unary + torch.stack(messages).sum(dim=0)  # Eq. 3.7


def _meanfield(
    unary: Tensor, matrix: Tensor, weights: Tensor, n_directions: int, n_iterations: int
) -> Tensor:
    costs = unary
    for _ in range(n_iterations):
        q = torch.softmax(-costs, dim=1)
        expected = torch.zeros_like(unary)
        for k, (dy, dx) in enumerate(grid_offsets(n_directions)):
            w = weights[:, k : k + 1]
            # neighbour j = i + offset, i is the edge's first node: w_i V(lambda_i, mu_j)
            expected = expected + w * torch.einsum("lm,bmhw->blhw", matrix, shift(q, -dy, -dx))
            # neighbour j = i - offset, j is the edge's first node: w_j V(mu_j, lambda_i)
            expected = expected + torch.einsum("ml,bmhw->blhw", matrix, shift(w * q, dy, dx))
        costs = unary + expected
    return costs


_METHOD_FUNCTIONS = {"sgm": _sgm, "isgmr": _isgmr, "trwp": _trwp, "meanfield": _meanfield}


def message_passing(
    unary: Tensor,
    pairwise: Tensor | Pairwise,
    edge_weights: Tensor | None = None,
    method: str = "trwp",
    n_directions: int = 4,
    n_iterations: int = 5,
) -> Tensor:
    """Min-sum message passing on a D-connected grid MRF, returning the final costs ``c_i(lambda)``.

    ``isgmr``: Alg. 1 / Eq. 3.9; ``trwp``: Alg. 2 / Eq. 3.10; costs Eq. 3.7. ``sgm``: Eq. 3.3, costs
    Eq. 3.6. ``meanfield``: the local mean-field baseline. See the module docstring for the exact
    conventions. Differentiable by autograd in unary, pairwise (matrix or form parameters) and
    edge weights.

    Args:
        unary: (B, L, H, W) unary costs theta_i (lower is better), finite, L >= 2.
        pairwise: (L, L) matrix ``V(a, b)`` or a :class:`~app.ops.reference.mrf.Pairwise` form.
        edge_weights: (B, D // 2, H, W) non-negative weights of the grid edges, or None (all ones).
        method: one of ``"isgmr"``, ``"trwp"``, ``"sgm"``, ``"meanfield"``.
        n_directions: 4, 8 or 16 (thesis Fig. 3.9).
        n_iterations: >= 1.

    Returns:
        (B, L, H, W) final costs in the dtype of ``unary`` (float16 / bfloat16 are computed in float32);
        the labelling is ``costs.argmin(1)`` (Eq. 3.8).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    _check_n_iterations(n_iterations)
    unary_c, matrix, weights = prepare_mrf_inputs(unary, pairwise, edge_weights, n_directions)
    costs = _METHOD_FUNCTIONS[method](unary_c, matrix, weights, n_directions, n_iterations)
    return costs.to(unary.dtype)


def _wavefronts(height: int, width: int, n_directions: int) -> list[tuple[Tensor, Tensor]]:
    """Pixels grouped by ``t = K y + x``, ``K`` chosen so every offset has ``K dy + dx > 0``.

    Sorting by ``t`` orients every edge like raster order, and pixels with equal ``t`` are never
    neighbours, so a wavefront can be processed at once and TRW-S on wavefronts equals TRW-S on the
    raster order.
    """
    slope = max([0] + [-dx // dy for dy, dx in grid_offsets(n_directions) if dy > 0])
    factor = slope + 1
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    key = factor * ys + xs
    fronts = []
    for t in range(int(key.max()) + 1):
        mask = key == t
        if bool(mask.any()):
            fronts.append((ys[mask], xs[mask]))
    return fronts


def _trws_node_weights(height: int, width: int, n_directions: int) -> Tensor:
    """TRW-S ``gamma_s = rho_st / rho_s = 1 / max(#earlier, #later neighbours of s)``, (H, W).

    Kolmogorov's uniform monotonic-chain decomposition: the edges at ``s`` are covered by
    ``max(#earlier, #later)`` chains through ``s``, each edge by one of them.
    """
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    n_later = torch.zeros(height, width, dtype=torch.long)
    n_earlier = torch.zeros(height, width, dtype=torch.long)
    for dy, dx in grid_offsets(n_directions):
        n_later += ((ys + dy < height) & (xs + dx >= 0) & (xs + dx < width)).long()
        n_earlier += ((ys - dy >= 0) & (xs - dx >= 0) & (xs - dx < width)).long()
    return 1.0 / torch.maximum(n_later, n_earlier).clamp(min=1).double()


def _trws_single(
    theta: Tensor, matrix: Tensor, weights: Tensor, n_directions: int, n_iterations: int
) -> Tensor:
    """TRW-S on one image. theta: (L, H, W), matrix: (L, L), weights: (D // 2, H, W), float64 CPU.

    Returns the lowest-energy labelling seen, (H, W).
    """
    n_labels, height, width = theta.shape
    offsets = grid_offsets(n_directions)
    fronts = _wavefronts(height, width, n_directions)
    gamma = _trws_node_weights(height, width, n_directions).to(theta.dtype)

    def inside(y: Tensor, x: Tensor) -> Tensor:
        return (y >= 0) & (y < height) & (x >= 0) & (x < width)

    # messages[r, :, y, x]: message into (y, x) from (y, x) - step_r, as in message_passing
    messages = theta.new_zeros(n_directions, n_labels, height, width)

    def send(fy: Tensor, fx: Tensor, forward: bool) -> None:
        """Eq. 2.43-2.44: every pixel of a wavefront sends to its later (forward) or earlier neighbours."""
        belief = theta[:, fy, fx] + messages[:, :, fy, fx].sum(dim=0)  # theta-hat_s, (L, n)
        for k, (dy, dx) in enumerate(offsets):
            sy, sx = (dy, dx) if forward else (-dy, -dx)
            ok = inside(fy + sy, fx + sx)
            if not bool(ok.any()):
                continue
            src_y, src_x = fy[ok], fx[ok]
            dst_y, dst_x = src_y + sy, src_x + sx
            r_out = 2 * k if forward else 2 * k + 1
            h = gamma[src_y, src_x] * belief[:, ok] - messages[opposite_direction(r_out), :, src_y, src_x]
            if forward:  # edge (src, dst), weight at src, V(x_src, x_dst)
                pair = weights[k, src_y, src_x] * matrix[:, :, None]
            else:  # edge (dst, src), weight at dst, V(x_dst, x_src)
                pair = weights[k, dst_y, dst_x] * matrix.T[:, :, None]
            candidates = h[:, None, :] + pair  # (L_src, L_dst, n)
            message = candidates.gather(0, candidates.argmin(dim=0, keepdim=True)).squeeze(0)
            messages[r_out, :, dst_y, dst_x] = message - message.gather(
                0, message.argmin(dim=0, keepdim=True)
            )

    def labelling() -> Tensor:
        """Kolmogorov's rule: argmin theta_s + sum_{u<s} theta_us(x_u, .) + sum_{u>s} M_us, in order."""
        labels = torch.zeros(height, width, dtype=torch.long)
        for fy, fx in fronts:
            cost = theta[:, fy, fx].clone()
            for k, (dy, dx) in enumerate(offsets):
                cost += messages[2 * k + 1, :, fy, fx]  # from the later neighbour (zero where none)
                ok = inside(fy - dy, fx - dx)
                if bool(ok.any()):
                    uy, ux = fy[ok] - dy, fx[ok] - dx
                    cost[:, ok] += weights[k, uy, ux] * matrix[labels[uy, ux]].T
            labels[fy, fx] = cost.argmin(dim=0)
        return labels

    def energy(labels: Tensor) -> float:
        return float(mrf_energy(labels[None], theta[None], matrix, weights[None], n_directions)[0])

    best_labels = theta.argmin(dim=0)
    best_energy = energy(best_labels)
    for _ in range(n_iterations):
        for fy, fx in fronts:
            send(fy, fx, forward=True)
        for fy, fx in reversed(fronts):
            send(fy, fx, forward=False)
        labels = labelling()
        candidate = energy(labels)
        if candidate < best_energy:
            best_labels, best_energy = labels, candidate
    return best_labels


@torch.no_grad()
def trws(
    unary: Tensor,
    pairwise: Tensor | Pairwise,
    edge_weights: Tensor | None = None,
    n_directions: int = 4,
    n_iterations: int = 50,
) -> tuple[Tensor, Tensor]:
    """Kolmogorov's sequential tree-reweighted message passing (TRW-S, Eq. 2.43-2.44), the energy reference.

    Pixels are visited in raster order (processed by wavefronts, which is equivalent), forward then
    backward per iteration; node weight ``gamma_s = 1 / max(#earlier, #later neighbours)`` (monotonic
    chains). After each iteration a labelling is read off with Kolmogorov's sequential rule; the
    lowest-energy labelling seen is returned, starting from ``argmin unary``, so the returned energy never
    exceeds that of the unary-only labelling. Computed on CPU in float64, not differentiable.

    Args:
        unary: (B, L, H, W); pairwise: (L, L) or :class:`~app.ops.reference.mrf.Pairwise`;
        edge_weights: (B, D // 2, H, W) or None; n_directions: 4, 8 or 16; n_iterations: >= 1.

    Returns:
        labels (B, H, W) long and their energy (B,) (:func:`~app.ops.reference.mrf.mrf_energy`), on the
        device of ``unary``.
    """
    _check_n_iterations(n_iterations)
    unary_c, matrix, weights = prepare_mrf_inputs(unary, pairwise, edge_weights, n_directions)
    cpu = torch.device("cpu")
    theta = unary_c.to(cpu, torch.float64)
    matrix64 = matrix.to(cpu, torch.float64)
    weights64 = weights.to(cpu, torch.float64)
    labels = torch.stack(
        [
            _trws_single(theta[b], matrix64, weights64[b], n_directions, n_iterations)
            for b in range(theta.shape[0])
        ]
    ).to(unary.device)
    return labels, mrf_energy(labels, unary, pairwise, edge_weights, n_directions)

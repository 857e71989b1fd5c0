"""Tests of the plain-PyTorch MRF reference: grid, pairwise forms, energy (Eq. 3.1), SGM / ISGMR / TRWP /
mean-field message passing (Alg. 1-2, Eq. 3.3-3.10) and TRW-S (Eq. 2.43-2.44).

The message-passing methods are checked against brute force on chains and against a deliberately naive
per-pixel implementation written here from the equations, independent of the vectorised scanline code.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from app.ops._checks import all_finite
from app.ops.reference.message_passing import METHODS, _trws_node_weights, message_passing, trws
from app.ops.reference.mrf import (
    GRID_OFFSETS,
    Pairwise,
    grid_directions,
    grid_offsets,
    mrf_energy,
    opposite_direction,
    pairwise_matrix,
    prepare_mrf_inputs,
    shift,
    trwp_rho,
)

# Written out here on purpose: the tests pin the canonical order instead of reading it from the module.
OFFSETS = [(0, 1), (1, 0), (1, 1), (1, -1), (1, 2), (2, 1), (2, -1), (1, -2)]
F64 = torch.float64


def random_problem(seed, batch, n_labels, height, width, n_directions, symmetric=False):
    gen = torch.Generator().manual_seed(seed)
    unary = torch.rand(batch, n_labels, height, width, generator=gen, dtype=F64) * 4
    matrix = torch.rand(n_labels, n_labels, generator=gen, dtype=F64) * 2
    if symmetric:
        matrix = matrix + matrix.T
    weights = torch.rand(batch, n_directions // 2, height, width, generator=gen, dtype=F64) + 0.1
    return unary, matrix, weights


def brute_force(unary, matrix, weights, n_directions):
    """All labellings of a single image (batch 1) and their energies."""
    _, n_labels, height, width = unary.shape
    labellings = torch.tensor(list(itertools.product(range(n_labels), repeat=height * width)))
    labellings = labellings.view(-1, height, width)
    n = labellings.shape[0]
    energies = mrf_energy(
        labellings, unary.expand(n, -1, -1, -1), matrix, weights.expand(n, -1, -1, -1), n_directions
    )
    return labellings, energies


def min_marginals(labellings, energies, n_labels):
    """(L, H, W) exact min-marginals min_{x: x_i = l} E(x)."""
    _, height, width = labellings.shape
    out = torch.empty(n_labels, height, width, dtype=energies.dtype)
    for label, y, x in itertools.product(range(n_labels), range(height), range(width)):
        out[label, y, x] = energies[labellings[:, y, x] == label].min()
    return out


def normalised(costs):
    return costs - costs.min(dim=0, keepdim=True).values


# ----------------------------------------------------------------------------------------------------
# A naive per-pixel implementation of the equations (numpy, one image), the oracle for the scan code.
# ----------------------------------------------------------------------------------------------------


def naive_edge(i, j, matrix, weights, n_directions):
    """(w, M) with M[x_i, x_j] the pairwise of edge (i, j) as a function of the labels of i and j."""
    for k, (dy, dx) in enumerate(OFFSETS[: n_directions // 2]):
        if j == (i[0] + dy, i[1] + dx):
            return weights[k, i[0], i[1]], matrix
        if i == (j[0] + dy, j[1] + dx):
            return weights[k, j[0], j[1]], matrix.T
    raise AssertionError("not neighbours")


def naive_message_passing(unary, matrix, weights, method, n_directions, n_iterations):
    theta, matrix, weights = unary[0].numpy(), matrix.numpy(), weights[0].numpy()
    n_labels, height, width = theta.shape
    steps = []
    for dy, dx in OFFSETS[: n_directions // 2]:
        steps += [(dy, dx), (-dy, -dx)]
    rho = 2.0 / n_directions
    pixels = list(itertools.product(range(height), range(width)))

    def inside(p):
        return 0 <= p[0] < height and 0 <= p[1] < width

    def sweep(r, messages, sender_vector, receiver_vector, first_vector):
        sy, sx = steps[r]
        out = messages[r]
        for i in sorted(pixels, key=lambda p: p[0] * sy + p[1] * sx):  # predecessors come first
            j = (i[0] - sy, i[1] - sx)
            if not inside(j):
                out[:, i[0], i[1]] = first_vector(i)
                continue
            w, pair = naive_edge(j, i, matrix, weights, n_directions)  # pair[x_j, x_i]
            h = sender_vector(r, j)
            m = np.array(
                [min(h[mu] + w * pair[mu, lam] for mu in range(n_labels)) for lam in range(n_labels)]
            )
            m = m + receiver_vector(i)
            out[:, i[0], i[1]] = m - m.min()

    zero = np.zeros(n_labels)
    if method == "sgm":
        for _ in range(n_iterations):
            messages = np.zeros((n_directions, n_labels, height, width))
            for r in range(n_directions):
                sweep(
                    r,
                    messages,
                    lambda r, j, m=messages: m[r][:, j[0], j[1]],
                    lambda i, t=theta: t[:, i[0], i[1]],
                    lambda i, t=theta: t[:, i[0], i[1]] - t[:, i[0], i[1]].min(),
                )
            theta = messages.sum(axis=0)
        return theta
    messages = np.zeros((n_directions, n_labels, height, width))
    for _ in range(n_iterations):
        if method == "isgmr":
            previous = messages.copy()

            def sender(r, j, previous=previous, fresh=messages):
                others = sum(previous[d][:, j[0], j[1]] for d in range(n_directions) if d not in (r, r ^ 1))
                return theta[:, j[0], j[1]] + fresh[r][:, j[0], j[1]] + others

        else:

            def sender(r, j, current=messages):
                total = theta[:, j[0], j[1]] + sum(current[d][:, j[0], j[1]] for d in range(n_directions))
                return rho * total - current[r ^ 1][:, j[0], j[1]]

        for r in range(n_directions):
            sweep(r, messages, sender, lambda i: zero, lambda i: zero)
    return theta + messages.sum(axis=0)


def naive_meanfield(unary, matrix, weights, n_directions, n_iterations):
    theta, matrix, weights = unary[0].numpy(), matrix.numpy(), weights[0].numpy()
    n_labels, height, width = theta.shape
    costs = theta
    for _ in range(n_iterations):
        q = np.exp(-costs - (-costs).max(axis=0))
        q = q / q.sum(axis=0)
        new = theta.copy()
        for y, x in itertools.product(range(height), range(width)):
            for dy, dx in OFFSETS[: n_directions // 2]:
                for j in ((y + dy, x + dx), (y - dy, x - dx)):
                    if 0 <= j[0] < height and 0 <= j[1] < width:
                        w, pair = naive_edge((y, x), j, matrix, weights, n_directions)
                        new[:, y, x] += w * pair @ q[:, j[0], j[1]]
        costs = new
    return costs


def naive_trws(unary, matrix, weights, n_directions, n_iterations):
    """Kolmogorov's TRW-S pixel by pixel in raster order; returns the best labelling after each iteration."""

    def energy(labels):
        return mrf_energy(torch.from_numpy(labels)[None], unary, pairwise, edge_weights, n_directions).item()

    pairwise, edge_weights = matrix, weights
    theta, matrix, weights = unary[0].numpy(), matrix.numpy(), weights[0].numpy()
    n_labels, height, width = theta.shape
    order = list(itertools.product(range(height), range(width)))
    earlier = {s: [] for s in order}
    later = {s: [] for s in order}
    for s in order:
        for dy, dx in OFFSETS[: n_directions // 2]:
            t = (s[0] + dy, s[1] + dx)
            if 0 <= t[0] < height and 0 <= t[1] < width:
                later[s].append(t)
                earlier[t].append(s)
    gamma = {s: 1.0 / max(len(earlier[s]), len(later[s]), 1) for s in order}
    messages = {(s, t): np.zeros(n_labels) for s in order for t in earlier[s] + later[s]}

    def send(s, targets):
        belief = theta[:, s[0], s[1]] + sum(
            (messages[(u, s)] for u in earlier[s] + later[s]), np.zeros(n_labels)
        )
        for t in targets:
            w, pair = naive_edge(s, t, matrix, weights, n_directions)  # pair[x_s, x_t]
            h = gamma[s] * belief - messages[(t, s)]
            m = (h[:, None] + w * pair).min(axis=0)
            messages[(s, t)] = m - m.min()

    best = theta.argmin(axis=0)
    history = []
    for _ in range(n_iterations):
        for s in order:
            send(s, later[s])
        for s in reversed(order):
            send(s, earlier[s])
        labels = np.zeros((height, width), dtype=np.int64)
        for s in order:
            cost = theta[:, s[0], s[1]].copy()
            for u in earlier[s]:
                w, pair = naive_edge(u, s, matrix, weights, n_directions)
                cost += w * pair[labels[u]]
            for u in later[s]:
                cost += messages[(u, s)]
            labels[s] = cost.argmin()
        if energy(labels) < energy(best):
            best = labels
        history.append(best.copy())
    return history


# ----------------------------------------------------------------------------------------------------
# Grid structure
# ----------------------------------------------------------------------------------------------------


def test_grid_offsets_canonical_order():
    assert list(GRID_OFFSETS) == OFFSETS
    assert grid_offsets(4) == ((0, 1), (1, 0))
    assert grid_offsets(8) == tuple(OFFSETS[:4])
    assert grid_offsets(16) == tuple(OFFSETS)
    for dy, dx in GRID_OFFSETS:  # raster-forward: the edge's first node precedes the second
        assert dy > 0 or (dy == 0 and dx > 0)


@pytest.mark.parametrize("n_directions", [4, 8, 16])
def test_grid_directions_pairs_and_opposites(n_directions):
    steps = grid_directions(n_directions)
    assert len(steps) == n_directions and len(set(steps)) == n_directions
    for r, (dy, dx) in enumerate(steps):
        assert steps[opposite_direction(r)] == (-dy, -dx)
        assert opposite_direction(opposite_direction(r)) == r
        assert steps[2 * (r // 2)] == OFFSETS[r // 2]


def test_trwp_rho_from_tree_decomposition():
    # every edge lies in one scanline family, every pixel in D // 2 families
    for n_directions in (4, 8, 16):
        assert trwp_rho(n_directions) == pytest.approx(1 / len(grid_offsets(n_directions)))
    assert trwp_rho(4) == 0.5


def test_shift_moves_content_and_zero_fills():
    t = torch.arange(12.0).view(1, 3, 4)
    out = shift(t, 1, -2)
    for y, x in itertools.product(range(3), range(4)):
        sy, sx = y - 1, x + 2
        expected = t[0, sy, sx] if (0 <= sy < 3 and 0 <= sx < 4) else 0.0
        assert out[0, y, x] == expected


# ----------------------------------------------------------------------------------------------------
# Pairwise forms
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,truncation,formula",
    [
        ("potts", None, lambda d, t: float(d != 0)),
        ("truncated_linear", 2.5, lambda d, t: min(d, t)),
        ("truncated_linear", None, lambda d, t: float(d)),
        ("truncated_quadratic", 5.0, lambda d, t: min(d * d, t)),
        ("truncated_quadratic", None, lambda d, t: float(d * d)),
    ],
)
def test_parametric_pairwise_equals_its_matrix(kind, truncation, formula):
    form = Pairwise(kind, term_weight=1.7, truncation=truncation)
    matrix = form.matrix(6, dtype=F64)
    assert matrix.shape == (6, 6)
    for a, b in itertools.product(range(6), range(6)):
        assert matrix[a, b].item() == pytest.approx(1.7 * formula(abs(a - b), truncation))
    unary, _, weights = random_problem(0, 1, 6, 3, 3, 4)
    for method in METHODS:
        by_form = message_passing(unary, form, weights, method, 4, 2)
        by_matrix = message_passing(unary, matrix, weights, method, 4, 2)
        torch.testing.assert_close(by_form, by_matrix)


def test_pairwise_parameters_receive_gradients():
    weight = torch.tensor(2.0, dtype=F64, requires_grad=True)
    truncation = torch.tensor(1.5, dtype=F64, requires_grad=True)
    matrix = Pairwise("truncated_linear", weight, truncation).matrix(4)
    matrix.sum().backward()
    distances = (torch.arange(4)[:, None] - torch.arange(4)[None, :]).abs().double()
    assert weight.grad.item() == pytest.approx(distances.clamp(max=1.5).sum().item())
    assert truncation.grad.item() == pytest.approx(2.0 * (distances > 1.5).sum().item())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"kind": "cauchy"}, "kind"),
        ({"kind": "potts", "truncation": 1.0}, "truncation"),
        ({"kind": "truncated_linear", "truncation": 0.0}, "truncation"),
        ({"kind": "truncated_linear", "truncation": -1.0}, "truncation"),
        ({"kind": "potts", "term_weight": float("nan")}, "term_weight"),
        ({"kind": "potts", "term_weight": torch.ones(2)}, "term_weight"),
        ({"kind": "potts", "term_weight": torch.tensor(1)}, "term_weight"),
        ({"kind": "potts", "term_weight": "1"}, "term_weight"),
        ({"kind": "truncated_quadratic", "truncation": float("inf")}, "truncation"),
    ],
)
def test_bad_pairwise_form(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Pairwise(**kwargs)


def test_pairwise_matrix_validation():
    with pytest.raises(ValueError, match="n_labels"):
        Pairwise("potts").matrix(1)
    with pytest.raises(ValueError, match="pairwise"):
        pairwise_matrix(torch.zeros(3, 4), 3)
    with pytest.raises(ValueError, match="pairwise"):
        pairwise_matrix([[0.0, 1.0], [1.0, 0.0]], 2)


# ----------------------------------------------------------------------------------------------------
# Energy, Eq. 3.1
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_directions", [4, 8, 16])
def test_energy_matches_explicit_loop(n_directions):
    unary, matrix, weights = random_problem(1, 2, 3, 4, 5, n_directions)
    labels = torch.randint(0, 3, (2, 4, 5), generator=torch.Generator().manual_seed(2))
    energy = mrf_energy(labels, unary, matrix, weights, n_directions)
    for b in range(2):
        expected = sum(unary[b, labels[b, y, x], y, x].item() for y in range(4) for x in range(5))
        for k, (dy, dx) in enumerate(OFFSETS[: n_directions // 2]):
            for y, x in itertools.product(range(4), range(5)):
                if 0 <= y + dy < 4 and 0 <= x + dx < 5:
                    pair = matrix[labels[b, y, x], labels[b, y + dy, x + dx]]
                    expected += (weights[b, k, y, x] * pair).item()
        assert energy[b].item() == pytest.approx(expected, rel=1e-12)


def test_energy_ignores_edges_leaving_the_image_and_defaults_to_unit_weights():
    unary, matrix, _ = random_problem(3, 1, 3, 3, 4, 16)
    labels = torch.randint(0, 3, (1, 3, 4), generator=torch.Generator().manual_seed(4))
    weights = torch.ones(1, 8, 3, 4, dtype=F64)
    reference = mrf_energy(labels, unary, matrix, None, 16)
    assert torch.equal(reference, mrf_energy(labels, unary, matrix, weights, 16))
    for k, (dy, dx) in enumerate(OFFSETS):
        for y, x in itertools.product(range(3), range(4)):
            if not (0 <= y + dy < 3 and 0 <= x + dx < 4):
                weights[0, k, y, x] = 1e6
    torch.testing.assert_close(mrf_energy(labels, unary, matrix, weights, 16), reference)


def test_energy_gradients():
    unary, matrix, weights = random_problem(5, 1, 3, 3, 3, 8)
    unary.requires_grad_(True)
    matrix.requires_grad_(True)
    labels = torch.randint(0, 3, (1, 3, 3), generator=torch.Generator().manual_seed(6))
    mrf_energy(labels, unary, matrix, weights, 8).sum().backward()
    one_hot = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).double()
    assert torch.equal(unary.grad, one_hot)
    assert matrix.grad.sum().item() == pytest.approx(
        sum(
            weights[0, k, : 3 - dy, max(0, -dx) : 3 - max(0, dx)].sum().item()
            for k, (dy, dx) in enumerate(OFFSETS[:4])
        )
    )


# ----------------------------------------------------------------------------------------------------
# Message passing
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 6), (5, 1)])
@pytest.mark.parametrize("n_iterations", [1, 3])
def test_isgmr_gives_exact_min_marginals_on_a_chain(shape, n_iterations):
    height, width = shape
    for seed in range(3):
        unary, matrix, weights = random_problem(seed, 1, 3, height, width, 4)
        labellings, energies = brute_force(unary, matrix, weights, 4)
        expected = normalised(min_marginals(labellings, energies, 3))
        costs = message_passing(unary, matrix, weights, "isgmr", 4, n_iterations)[0]
        torch.testing.assert_close(normalised(costs), expected)
        assert torch.equal(costs.argmin(0), labellings[energies.argmin()])


@pytest.mark.parametrize("shape", [(1, 6), (5, 1)])
def test_sgm_on_a_chain_is_min_marginals_with_overcounted_unary(shape):
    # Eq. 3.3 / 3.6: every one of the 4 directions counts theta_i once (the two across the chain only
    # hold theta_i), so c_i = min-marginal_i + 3 theta_i + const_i, the over-counting ISGMR removes.
    height, width = shape
    for seed in range(3):
        unary, matrix, weights = random_problem(seed, 1, 3, height, width, 4)
        labellings, energies = brute_force(unary, matrix, weights, 4)
        expected = normalised(min_marginals(labellings, energies, 3) + 3 * unary[0])
        costs = message_passing(unary, matrix, weights, "sgm", 4, 1)[0]
        torch.testing.assert_close(normalised(costs), expected)


@pytest.mark.parametrize("shape", [(1, 6), (5, 1)])
def test_trwp_finds_the_map_of_a_chain(shape):
    height, width = shape
    for seed in range(4):
        unary, matrix, weights = random_problem(seed, 1, 3, height, width, 4)
        labellings, energies = brute_force(unary, matrix, weights, 4)
        costs = message_passing(unary, matrix, weights, "trwp", 4, 30)[0]
        assert torch.equal(costs.argmin(0), labellings[energies.argmin()])


@pytest.mark.parametrize("method", ["sgm", "isgmr", "trwp"])
@pytest.mark.parametrize("n_directions", [4, 8, 16])
def test_scanline_code_matches_naive_per_pixel_equations(method, n_directions):
    # non-symmetric V and random edge weights: catches any mix-up of orientation, offsets or messages
    unary, matrix, weights = random_problem(7, 1, 3, 4, 5, n_directions)
    costs = message_passing(unary, matrix, weights, method, n_directions, 2)
    expected = naive_message_passing(unary, matrix, weights, method, n_directions, 2)
    np.testing.assert_allclose(costs[0].numpy(), expected, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("n_directions", [4, 8, 16])
def test_meanfield_matches_naive_update(n_directions):
    unary, matrix, weights = random_problem(8, 1, 3, 3, 4, n_directions)
    costs = message_passing(unary, matrix, weights, "meanfield", n_directions, 3)
    expected = naive_meanfield(unary, matrix, weights, n_directions, 3)
    np.testing.assert_allclose(costs[0].numpy(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_batch_items_are_independent_and_none_means_unit_weights(method):
    unary, matrix, _ = random_problem(9, 3, 4, 4, 4, 8)
    ones = torch.ones(3, 4, 4, 4, dtype=F64)
    batched = message_passing(unary, matrix, None, method, 8, 2)
    torch.testing.assert_close(batched, message_passing(unary, matrix, ones, method, 8, 2))
    for b in range(3):
        torch.testing.assert_close(
            batched[b : b + 1], message_passing(unary[b : b + 1], matrix, None, method, 8, 2)
        )


@pytest.mark.parametrize("method", METHODS)
def test_per_pixel_constants_in_the_unary(method):
    # messages are min-normalised (Eq. 3.5) and softmax is shift-invariant: a per-pixel constant added to
    # the unary passes straight to the costs (Eq. 3.7) or vanishes (SGM, Eq. 3.6)
    unary, matrix, weights = random_problem(10, 2, 3, 4, 4, 4)
    constant = torch.rand(2, 1, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(11)) * 5
    base = message_passing(unary, matrix, weights, method, 4, 3)
    moved = message_passing(unary + constant, matrix, weights, method, 4, 3)
    expected = base if method == "sgm" else base + constant
    torch.testing.assert_close(moved, expected)


@pytest.mark.parametrize("method", METHODS)
def test_zero_edge_weights_decouple_the_pixels(method):
    unary, matrix, _ = random_problem(12, 1, 3, 3, 4, 8)
    zeros = torch.zeros(1, 4, 3, 4, dtype=F64)
    costs = message_passing(unary, matrix, zeros, method, 8, 2)
    # SGM: each of the 8 directions holds theta_i - min theta_i, and iteration 2 re-runs on that sum
    expected = 8**2 * normalised(unary[0])[None] if method == "sgm" else unary
    torch.testing.assert_close(costs, expected)


def test_half_precision_is_computed_in_float32():
    unary, matrix, weights = random_problem(13, 1, 4, 4, 4, 4)
    half = unary.half()
    costs = message_passing(half, matrix.half(), weights.half(), "trwp", 4, 2)
    assert costs.dtype == torch.float16
    expected = message_passing(half.float(), matrix.half().float(), weights.half().float(), "trwp", 4, 2)
    assert torch.equal(costs, expected.half())


def test_trwp_energy_close_to_trws_on_a_random_grid():
    unary, _, weights = random_problem(14, 1, 4, 6, 6, 4)
    form = Pairwise("truncated_linear", 1.0, 2.0)
    _, trws_energy = trws(unary, form, weights, 4, 30)
    costs = message_passing(unary, form, weights, "trwp", 4, 30)
    trwp_energy = mrf_energy(costs.argmin(1), unary, form, weights, 4)
    unary_energy = mrf_energy(unary.argmin(1), unary, form, weights, 4)
    assert trws_energy.item() < unary_energy.item()
    assert trwp_energy.item() <= 1.03 * trws_energy.item()


def test_iterations_lower_the_energy_of_isgmr_and_trwp():
    unary, _, weights = random_problem(15, 1, 4, 6, 6, 8)
    form = Pairwise("potts", 1.0)
    for method in ("isgmr", "trwp"):
        first = mrf_energy(
            message_passing(unary, form, weights, method, 8, 1).argmin(1), unary, form, weights, 8
        )
        many = mrf_energy(
            message_passing(unary, form, weights, method, 8, 20).argmin(1), unary, form, weights, 8
        )
        assert many.item() < first.item()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n_directions", [4, 16])
def test_gradcheck_unary_edge_weights_and_matrix(method, n_directions):
    # random continuous inputs keep every argmin unique, where the min-sum recursion is differentiable
    unary, matrix, weights = random_problem(16, 1, 3, 3, 3, n_directions)
    inputs = (unary.requires_grad_(), weights.requires_grad_(), matrix.requires_grad_())

    def costs(u, w, v):
        return message_passing(u, v, w, method, n_directions, 2)

    assert torch.autograd.gradcheck(costs, inputs)


@pytest.mark.parametrize("method", METHODS)
def test_gradcheck_pairwise_form_parameters(method):
    unary, _, weights = random_problem(17, 1, 4, 2, 3, 4)
    term_weight = torch.tensor(0.7, dtype=F64, requires_grad=True)
    truncation = torch.tensor(2.3, dtype=F64, requires_grad=True)

    def costs(u, tw, tr):
        return message_passing(u, Pairwise("truncated_quadratic", tw, tr), weights, method, 4, 2)

    assert torch.autograd.gradcheck(costs, (unary.requires_grad_(), term_weight, truncation))


# ----------------------------------------------------------------------------------------------------
# TRW-S
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 6), (5, 1)])
def test_trws_is_exact_on_chains(shape):
    height, width = shape
    for seed in range(4):
        unary, matrix, weights = random_problem(seed, 1, 3, height, width, 4)
        labellings, energies = brute_force(unary, matrix, weights, 4)
        labels, energy = trws(unary, matrix, weights, 4, 5)
        assert energy.item() == pytest.approx(energies.min().item())
        assert torch.equal(labels[0], labellings[energies.argmin()])


def test_trws_node_weights_of_monotonic_chains():
    assert torch.equal(_trws_node_weights(1, 4, 4), torch.ones(1, 4, dtype=F64))  # a chain: gamma = 1
    # top-right / bottom-left corners have one earlier and one later neighbour
    expected = torch.tensor([[0.5, 0.5, 1.0], [0.5, 0.5, 0.5], [1.0, 0.5, 0.5]], dtype=F64)
    assert torch.equal(_trws_node_weights(3, 3, 4), expected)
    eight = _trws_node_weights(3, 3, 8)
    assert eight[1, 1] == 1 / 4 and eight[0, 0] == 1 / 3 and eight[0, 1] == 1 / 4
    sixteen = _trws_node_weights(5, 5, 16)
    assert sixteen[2, 2] == 1 / 8 and sixteen[0, 0] == 1 / 5 and sixteen[1, 1] == 1 / 7


@pytest.mark.parametrize("n_directions", [4, 8, 16])
def test_trws_wavefronts_match_naive_raster_order_trws(n_directions):
    for seed in range(3):
        unary, matrix, weights = random_problem(seed, 1, 3, 4, 5, n_directions, symmetric=True)
        weights = weights * 2
        history = naive_trws(unary, matrix, weights, n_directions, 4)
        for n_iterations in (1, 4):
            labels, _ = trws(unary, matrix, weights, n_directions, n_iterations)
            assert np.array_equal(labels[0].numpy(), history[n_iterations - 1])


@pytest.mark.parametrize("n_directions", [4, 8, 16])
def test_trws_is_exact_on_binary_submodular_grids(n_directions):
    # with 2 labels and an attractive (Potts) pairwise the LP relaxation is tight
    for seed in range(2):
        unary, _, weights = random_problem(seed, 1, 2, 3, 3, n_directions)
        form = Pairwise("potts", 1.5)
        _, energies = brute_force(unary, form, weights, n_directions)
        labels, energy = trws(unary, form, weights, n_directions, 20)
        assert energy.item() == pytest.approx(energies.min().item())
        assert energy.item() == pytest.approx(mrf_energy(labels, unary, form, weights, n_directions).item())


@pytest.mark.parametrize("n_directions", [4, 8, 16])
def test_trws_never_ends_above_its_start(n_directions):
    unary, matrix, weights = random_problem(18, 2, 4, 4, 5, n_directions, symmetric=True)
    weights = weights * 3  # strong pairwise: the unary-only labelling is poor
    start = mrf_energy(unary.argmin(1), unary, matrix, weights, n_directions)
    labels, energy = trws(unary, matrix, weights, n_directions, 1)
    assert (energy <= start).all()
    torch.testing.assert_close(energy, mrf_energy(labels, unary, matrix, weights, n_directions))
    _, longer = trws(unary, matrix, weights, n_directions, 4)
    assert (longer <= energy).all()
    _, brute = brute_force(unary[:1, :, :2, :3], matrix, weights[:1, :, :2, :3], n_directions)
    _, tiny = trws(unary[:1, :, :2, :3], matrix, weights[:1, :, :2, :3], n_directions, 10)
    assert tiny.item() >= brute.min().item() - 1e-9


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------

GOOD_UNARY = torch.rand(1, 3, 4, 4)
GOOD_MATRIX = torch.rand(3, 3)


def _nan_unary():
    unary = GOOD_UNARY.clone()
    unary[0, 1, 2, 2] = float("nan")
    return unary


BAD_CASES = [
    ({"unary": torch.rand(3, 4, 4)}, "unary"),
    ({"unary": torch.rand(1, 1, 3, 4, 4)}, "unary"),
    ({"unary": _nan_unary()}, "unary"),
    ({"unary": torch.full((1, 3, 4, 4), float("inf"))}, "unary"),
    ({"unary": torch.rand(1, 1, 4, 4), "pairwise": torch.rand(1, 1)}, "unary"),
    ({"unary": torch.randint(0, 3, (1, 3, 4, 4))}, "unary"),
    ({"unary": torch.rand(1, 3, 0, 4)}, "unary"),
    ({"pairwise": torch.rand(3, 4)}, "pairwise"),
    ({"pairwise": torch.rand(4, 4)}, "pairwise"),
    ({"pairwise": torch.rand(1, 3, 3)}, "pairwise"),
    ({"pairwise": torch.tensor([[0.0, 1.0, float("nan")]] * 3)}, "pairwise"),
    ({"pairwise": "potts"}, "pairwise"),
    ({"pairwise": torch.rand(3, 3, device="meta")}, "pairwise"),
    ({"edge_weights": torch.rand(1, 4, 4, 4)}, "edge_weights"),
    ({"edge_weights": torch.rand(2, 2, 4, 4)}, "edge_weights"),
    ({"edge_weights": -torch.rand(1, 2, 4, 4)}, "edge_weights"),
    ({"edge_weights": torch.full((1, 2, 4, 4), float("nan"))}, "edge_weights"),
    ({"edge_weights": torch.rand(1, 2, 4, 4, device="meta")}, "edge_weights"),
    ({"n_directions": 6}, "n_directions"),
    ({"n_directions": 4.0}, "n_directions"),
]


@pytest.mark.parametrize(
    ("values", "dtype", "finite"),
    [
        ([1.0, -2.0, 3.0], torch.float32, True),
        ([3e38, 3e38, -1.0], torch.float32, True),  # the sum overflows: the elementwise test decides
        ([1e308, 1e308], torch.float64, True),
        ([6e4, 6e4], torch.float16, True),  # summed in float32
        ([float("inf"), float("-inf")], torch.float32, False),  # the sum is NaN
        ([1.0, float("-inf")], torch.float64, False),
        ([float("nan"), 1.0], torch.float16, False),
    ],
)
def test_all_finite(values, dtype, finite):
    assert all_finite(torch.tensor(values, dtype=dtype)) is finite


def test_costs_whose_sum_overflows_are_accepted():
    unary = GOOD_UNARY.clone()
    unary[0, :, 0, 0] = 3e38
    prepared, _, _ = prepare_mrf_inputs(unary, GOOD_MATRIX, None, 4)
    assert torch.equal(prepared, unary)


def _call(function, overrides):
    args = {"unary": GOOD_UNARY, "pairwise": GOOD_MATRIX, "edge_weights": None, "n_directions": 4}
    args.update(overrides)
    if function is mrf_energy:
        unary = args["unary"]
        shape = (unary.shape[0], *unary.shape[2:]) if unary.dim() == 4 else (1, 4, 4)
        return mrf_energy(torch.zeros(shape, dtype=torch.long), **args)
    return function(**args)


@pytest.mark.parametrize("function", [message_passing, mrf_energy, trws])
@pytest.mark.parametrize("overrides,name", BAD_CASES)
def test_bad_input_raises_value_error_naming_the_argument(function, overrides, name):
    with pytest.raises(ValueError, match=name):
        _call(function, overrides)


@pytest.mark.parametrize("function", [message_passing, trws])
@pytest.mark.parametrize("n_iterations", [0, -1, 2.0, True])
def test_bad_n_iterations(function, n_iterations):
    with pytest.raises(ValueError, match="n_iterations"):
        function(GOOD_UNARY, GOOD_MATRIX, n_iterations=n_iterations)


def test_bad_method():
    with pytest.raises(ValueError, match="method"):
        message_passing(GOOD_UNARY, GOOD_MATRIX, method="bp")


@pytest.mark.parametrize(
    "labels",
    [
        torch.zeros(1, 4, 4),
        torch.zeros(1, 4, 5, dtype=torch.long),
        torch.full((1, 4, 4), 3, dtype=torch.long),
        torch.full((1, 4, 4), -1, dtype=torch.long),
        torch.zeros(1, 4, 4, dtype=torch.long, device="meta"),
    ],
)
def test_bad_labels(labels):
    with pytest.raises(ValueError, match="labels"):
        mrf_energy(labels, GOOD_UNARY, GOOD_MATRIX)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tensors_on_different_devices():
    unary = GOOD_UNARY.cuda()
    with pytest.raises(ValueError, match="pairwise"):
        message_passing(unary, GOOD_MATRIX)
    with pytest.raises(ValueError, match="pairwise"):
        message_passing(unary, Pairwise("potts", torch.tensor(1.0)))
    with pytest.raises(ValueError, match="edge_weights"):
        message_passing(unary, GOOD_MATRIX.cuda(), torch.rand(1, 2, 4, 4))
    with pytest.raises(ValueError, match="labels"):
        mrf_energy(torch.zeros(1, 4, 4, dtype=torch.long), unary, GOOD_MATRIX.cuda())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", METHODS)
def test_cuda_equals_cpu(method):
    unary, matrix, weights = random_problem(19, 2, 4, 5, 6, 16)
    cpu = message_passing(unary, matrix, weights, method, 16, 2)
    gpu = message_passing(unary.cuda(), matrix.cuda(), weights.cuda(), method, 16, 2)
    torch.testing.assert_close(gpu.cpu(), cpu)
    labels, energy = trws(unary.cuda(), matrix.cuda(), weights.cuda(), 16, 3)
    assert labels.is_cuda and energy.is_cuda
    assert torch.equal(labels.cpu(), trws(unary, matrix, weights, 16, 3)[0])

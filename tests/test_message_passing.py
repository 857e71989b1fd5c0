"""The compiled message passing (app.ops.message_passing) against the plain-PyTorch reference.

Forward: equal costs on random sizes, labels, directions, iterations and pairwise forms (general matrix,
Potts, truncated-linear and truncated-quadratic O(L) paths). Backward: gradients from the stored indices
(Alg. 3-4) equal autograd through the reference in float64 on random, tie-free inputs, for the unary, the
pairwise matrix or form parameters (Eq. 3.36) and the edge weights (Eq. 3.33). Mean-field (its own op,
app::meanfield, differentiated from the stored distributions) is checked the same way.
"""

from __future__ import annotations

import importlib
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app.ops import message_passing
from app.ops.message_passing import (
    _GENERAL,
    _METHOD_IDS,
    _pairwise_kind,
    index_dtype,
    index_row,
    stored_argmins,
)
from app.ops.reference import Pairwise
from app.ops.reference import message_passing as reference

F64 = torch.float64
# the module (app.ops.reference.message_passing is also the name of its function)
reference_module = importlib.import_module("app.ops.reference.message_passing")
COMPILED_METHODS = ("isgmr", "trwp", "sgm")


def random_inputs(
    seed: int, batch: int, n_labels: int, height: int, width: int, n_directions: int, device="cpu"
):
    gen = torch.Generator().manual_seed(seed)
    unary = torch.rand(batch, n_labels, height, width, generator=gen, dtype=F64) * 4
    matrix = torch.rand(n_labels, n_labels, generator=gen, dtype=F64) * 2
    weights = torch.rand(batch, n_directions // 2, height, width, generator=gen, dtype=F64) + 0.1
    return unary.to(device), matrix.to(device), weights.to(device)


def make_pairwise(kind: str, matrix: torch.Tensor) -> torch.Tensor | Pairwise:
    """``matrix`` itself, or the form ``kind`` with parameters that require grad, in ``matrix``'s dtype."""
    if kind == "matrix":
        return matrix
    options = {"dtype": matrix.dtype, "device": matrix.device, "requires_grad": True}
    truncation = None if kind == "potts" else torch.tensor(2.5, **options)
    return Pairwise(kind, torch.tensor(0.8, **options), truncation)


def random_cases(n_cases: int, seed: int, methods: tuple[str, ...] = COMPILED_METHODS):
    rng = random.Random(seed)
    kinds = ("matrix", "potts", "truncated_linear", "truncated_quadratic")
    return [
        (
            rng.choice(methods),
            rng.choice((4, 8, 16)),
            rng.choice(kinds),
            rng.randint(2, 7),  # labels
            rng.randint(1, 7),  # height
            rng.randint(1, 7),  # width
            rng.randint(1, 4),  # iterations
            rng.randint(1, 2),  # batch
        )
        for _ in range(n_cases)
    ]


@pytest.mark.parametrize(
    "case", random_cases(24, seed=1) + random_cases(16, seed=3, methods=("meanfield",)), ids=str
)
def test_forward_matches_reference(case):
    method, n_directions, kind, n_labels, height, width, n_iterations, batch = case
    unary, matrix, weights = random_inputs(hash(case) % 1000, batch, n_labels, height, width, n_directions)
    pairwise = make_pairwise(kind, matrix)
    expected = reference(unary, pairwise, weights, method, n_directions, n_iterations)
    got = message_passing(unary, pairwise, weights, method, n_directions, n_iterations)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", (*COMPILED_METHODS, "meanfield"))
def test_forward_float32_and_default_weights(method):
    unary, matrix, _ = random_inputs(3, 2, 5, 6, 9, 8)
    expected = reference(unary, matrix, None, method, 8, 3)
    got = message_passing(unary.float(), matrix.float(), None, method, 8, 3)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


def test_half_input_is_computed_in_float32():
    unary, matrix, weights = random_inputs(4, 1, 4, 5, 5, 4)
    got = message_passing(unary.half(), matrix, weights.half(), "trwp", 4, 2)
    expected = reference(unary.half().float(), matrix.float(), weights.half().float(), "trwp", 4, 2)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=1e-2)


def _gradients(fn, unary, pairwise, weights, grad_output):
    leaves = [unary, weights, *(pairwise.tensors() if isinstance(pairwise, Pairwise) else (pairwise,))]
    grads = torch.autograd.grad(fn(unary, pairwise, weights), leaves, grad_output, allow_unused=True)
    return [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads, strict=True)]


@pytest.mark.parametrize(
    "case", random_cases(18, seed=2) + random_cases(16, seed=4, methods=("meanfield",)), ids=str
)
def test_gradients_match_reference(case):
    method, n_directions, kind, n_labels, height, width, n_iterations, batch = case
    unary, matrix, weights = random_inputs(hash(case) % 1000, batch, n_labels, height, width, n_directions)
    unary.requires_grad_()
    weights.requires_grad_()
    pairwise = make_pairwise(kind, matrix.requires_grad_())
    grad_output = torch.randn(unary.shape, dtype=F64, generator=torch.Generator().manual_seed(5))

    def run(fn):
        return _gradients(
            lambda u, p, w: fn(u, p, w, method, n_directions, n_iterations),
            unary,
            pairwise,
            weights,
            grad_output,
        )

    for got, expected in zip(run(message_passing), run(reference), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("method", COMPILED_METHODS)
@pytest.mark.parametrize(("height", "width"), ((3, 41), (41, 3)))
def test_scanline_blocks_match_reference(method, height, width):
    """Wide and tall images: the CPU kernel sweeps blocks of 16 neighbouring scanlines row by row, so several
    blocks (and, for the diagonal and (2, 1) offsets, partial ones at the borders) must still equal the
    reference, forward and backward, for every offset of the 16-connected grid. ISGMR's backward sweeps the rows
    of a tall image in blocks of 16 rows, column by column, where there are two blocks per thread: one thread
    here, so that the three blocks of 41 rows take that path."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_scanline_blocks(method, height, width)
    finally:
        torch.set_num_threads(threads)


def _check_scanline_blocks(method, height, width):
    unary, matrix, weights = random_inputs(12, 1, 3, height, width, 16)
    unary.requires_grad_()
    weights.requires_grad_()
    pairwise = Pairwise("potts", torch.tensor(0.8, dtype=F64, requires_grad=True))
    grad_output = torch.randn(unary.shape, dtype=F64, generator=torch.Generator().manual_seed(13))
    got = _gradients(
        lambda u, p, w: message_passing(u, p, w, method, 16, 1), unary, pairwise, weights, grad_output
    )
    expected = _gradients(
        lambda u, p, w: reference(u, p, w, method, 16, 1), unary, pairwise, weights, grad_output
    )
    torch.testing.assert_close(
        message_passing(unary, pairwise, weights, method, 16, 1),
        reference(unary, pairwise, weights, method, 16, 1),
        rtol=1e-9,
        atol=1e-9,
    )
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("method", COMPILED_METHODS)
@pytest.mark.parametrize("kind", ("matrix", "potts", "truncated_linear", "truncated_quadratic"))
def test_full_and_partial_label_vectors_match_reference(method, kind):
    """19 labels: the CPU kernels work on vectors of 8 float32 / 4 float64 labels, so every message has full
    vectors and a partial last one. float64 forward and gradients equal the reference; float32 agrees to its
    precision."""
    unary, matrix, weights = random_inputs(21, 1, 19, 5, 6, 8)
    grad_output = torch.randn(unary.shape, dtype=F64, generator=torch.Generator().manual_seed(22))
    expected = _gradients(
        lambda u, p, w: reference(u, p, w, method, 8, 2),
        unary.clone().requires_grad_(),
        make_pairwise(kind, matrix.clone().requires_grad_()),
        weights.clone().requires_grad_(),
        grad_output,
    )
    for dtype, tolerance in ((F64, 1e-8), (torch.float32, 1e-3)):
        got = _gradients(
            lambda u, p, w: message_passing(u, p, w, method, 8, 2),
            unary.to(dtype).requires_grad_(),
            make_pairwise(kind, matrix.to(dtype).requires_grad_()),
            weights.to(dtype).requires_grad_(),
            grad_output.to(dtype),
        )
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g.double(), e, rtol=tolerance, atol=tolerance)


_BASELINE_SCRIPT = """
import sys, torch
from app.ops import message_passing
from app.ops.reference import Pairwise
unary, matrix, weights, grad = torch.load(sys.argv[1])
results = []
for dtype in (torch.float32, torch.float64):
    for method in ("isgmr", "trwp", "sgm"):
        for pairwise in (
            matrix.to(dtype),
            Pairwise("potts", torch.tensor(0.8, dtype=dtype)),
            Pairwise("truncated_linear", torch.tensor(0.8, dtype=dtype), 3.0),
        ):
            u = unary.to(dtype).requires_grad_()
            w = weights.to(dtype).requires_grad_()
            costs = message_passing(u, pairwise, w, method, 8, 2)
            results += [costs.detach(), *torch.autograd.grad(costs, (u, w), grad.to(dtype))]
torch.save(results, sys.argv[2])
"""


def test_baseline_avx2_and_unpooled_runs_agree_bitwise(tmp_path):
    """The CPU sweeps are compiled for baseline x86-64 and for AVX2 (picked at run time); APP_DISABLE_AVX2=1
    keeps the baseline copy. Both round alike, so float32 and float64 costs and gradients are bitwise equal (19
    labels: full and partial label vectors, uint8 indices, general, Potts and truncated-linear pairwise; unary
    costs of both signs, as negated logits are). So are they without the buffer pool (APP_BUFFER_POOL_MIB=0:
    every buffer fresh)."""
    gen = torch.Generator().manual_seed(31)
    inputs = [
        torch.randn(1, 19, 9, 11, generator=gen) * 3,
        torch.rand(19, 19, generator=gen) * 2,
        torch.rand(1, 4, 9, 11, generator=gen) + 0.1,
        torch.randn(1, 19, 9, 11, generator=gen),
    ]
    torch.save(inputs, tmp_path / "inputs.pt")
    outputs = {}
    variants = {
        "default": {"APP_DISABLE_AVX2": "0"},
        "baseline": {"APP_DISABLE_AVX2": "1"},
        "unpooled": {"APP_BUFFER_POOL_MIB": "0"},
    }
    for name, variables in variants.items():
        env = {**os.environ, **variables}
        subprocess.run(
            [sys.executable, "-c", _BASELINE_SCRIPT, str(tmp_path / "inputs.pt"), str(tmp_path / name)],
            env=env,
            check=True,
        )
        outputs[name] = torch.load(tmp_path / name)
    assert len(outputs["default"]) == 54
    for name in ("baseline", "unpooled"):
        for got, expected in zip(outputs[name], outputs["default"], strict=True):
            assert torch.equal(got, expected), name


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_reused_buffers_leave_no_trace(dtype):
    """The CPU kernels take their buffers from a pool that hands freed ones out again, uninitialised (TRWP's
    backward does not even zero its message gradients E): a call on inputs A after calls on other inputs B of the
    same sizes gives A's first results bit for bit, for every method, with all three gradients."""
    gen = torch.Generator().manual_seed(5)

    def inputs(scale):
        unary = (torch.rand(2, 6, 7, 9, generator=gen) * scale).to(dtype).requires_grad_()
        weights = (torch.rand(2, 2, 7, 9, generator=gen) + 0.1).to(dtype).requires_grad_()
        term = torch.tensor(0.7 * scale, dtype=dtype, requires_grad=True)
        return unary, weights, term, torch.randn(2, 6, 7, 9, generator=gen).to(dtype)

    def run(method, unary, weights, term, grad):
        costs = message_passing(unary, Pairwise("potts", term), weights, method, 4, 3)
        return [costs.detach(), *torch.autograd.grad(costs, (unary, weights, term), grad)]

    first, other = inputs(1.0), inputs(100.0)
    for method in (*COMPILED_METHODS, "meanfield"):
        expected = run(method, *first)
        run(method, *other)
        for got, want in zip(run(method, *first), expected, strict=True):
            assert torch.equal(got, want), method


def test_many_labels_use_wide_indices():
    """300 labels: int16 indices, forward and backward still equal to the reference."""
    unary, matrix, weights = random_inputs(6, 1, 300, 2, 3, 4)
    _, p, q = torch.ops.app.message_passing(unary, matrix, weights, 1, 4, 1, 0)
    assert p.dtype == q.dtype == index_dtype(300) == torch.int16
    assert p.shape == (1, 4, 1, 2, 3, 300) and q.shape == (1, 4, 1, 2, 3)
    assert int(p.max()) > 255
    unary.requires_grad_()
    got = message_passing(unary, matrix, weights, "trwp", 4, 2)
    expected = reference(unary, matrix, weights, "trwp", 4, 2)
    torch.testing.assert_close(got, expected)
    grad_output = torch.randn_like(got)
    (g_got,) = torch.autograd.grad(got, unary, grad_output)
    (g_expected,) = torch.autograd.grad(expected, unary, grad_output)
    torch.testing.assert_close(g_got, g_expected)


@pytest.mark.parametrize(
    ("n_labels", "dtype"),
    [(2, torch.float32), (4, torch.float32), (33, torch.float32), (7, F64), (21, F64), (300, F64)],
)
def test_potts_stores_a_bit_per_label(n_labels, dtype):
    """Potts stores the bits [p(l) = l] and the label of the jumps (index_row entries per message, int16 above 256
    labels): they read back as the dense path's argmins, and the backward from them equals the dense path's. The
    CPU pads Potts labels to whole label vectors (8 floats, 4 doubles), the dense path not: the padding changes no
    cost, argmin or gradient."""
    unary, _, weights = random_inputs(31, 2, n_labels, 3, 5, 8)
    unary, weights = unary.to(dtype), weights.to(dtype)
    form = Pairwise("potts", 0.7)
    matrix, kind_id = form.matrix(n_labels, dtype=dtype), _pairwise_kind(form)
    grad_costs = torch.randn(unary.shape, generator=torch.Generator().manual_seed(31), dtype=dtype)
    for method_id in range(3):
        options = (method_id, 8, 2)
        costs, p, q = torch.ops.app.message_passing(unary, matrix, weights, *options, kind_id)
        dense = torch.ops.app.message_passing(unary, matrix, weights, *options, _GENERAL)
        assert p.dtype == index_dtype(n_labels) and p.shape == (2, 8, 2, 3, 5, index_row(n_labels, kind_id))
        assert torch.equal(costs, dense[0]) and torch.equal(q, dense[2])
        assert torch.equal(stored_argmins(p, n_labels, kind_id), dense[1].long())
        grads = torch.ops.app.message_passing_backward(
            grad_costs, matrix, weights, p, q, *options, kind_id, True, True
        )
        expected = torch.ops.app.message_passing_backward(
            grad_costs, matrix, weights, *dense[1:], *options, _GENERAL, True, True
        )
        for got, want in zip(grads, expected, strict=True):
            torch.testing.assert_close(got, want)


def test_small_label_counts_store_uint8():
    unary, matrix, weights = random_inputs(7, 1, 4, 3, 3, 8)
    _, p, q = torch.ops.app.message_passing(unary, matrix, weights, 0, 8, 2, 0)
    assert p.dtype == torch.uint8 and p.shape == (2, 8, 1, 3, 3, 4) and q.shape == (2, 8, 1, 3, 3)


def test_opcheck_registrations():
    unary, matrix, weights = random_inputs(8, 1, 3, 3, 4, 4)
    torch.library.opcheck(
        torch.ops.app.message_passing.default,
        (unary.requires_grad_(), matrix, weights, 1, 4, 2, 0),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"unary": torch.rand(3, 4, 4)}, "unary"),
        ({"unary": torch.full((1, 3, 4, 4), float("nan"))}, "unary"),
        ({"unary": torch.rand(1, 1, 4, 4)}, "unary"),
        ({"pairwise": torch.rand(3, 2)}, "pairwise"),
        ({"edge_weights": torch.rand(1, 1, 4, 4)}, "edge_weights"),
        ({"edge_weights": -torch.rand(1, 2, 4, 4)}, "edge_weights"),
        ({"n_directions": 6}, "n_directions"),
        ({"n_iterations": 0}, "n_iterations"),
        ({"method": "bp"}, "method"),
        ({"pairwise": torch.rand(3, 3, device="meta")}, "pairwise"),
    ],
)
def test_bad_input_raises_value_error(kwargs, name):
    args = {"unary": torch.rand(1, 3, 4, 4), "pairwise": torch.rand(3, 3), "edge_weights": None}
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        message_passing(**args)


@pytest.mark.cuda
@pytest.mark.parametrize("method", COMPILED_METHODS)
@pytest.mark.parametrize("n_directions", (4, 8, 16))
def test_cuda_matches_cpu(method, n_directions):
    unary, matrix, weights = random_inputs(9, 2, 6, 9, 11, n_directions)
    unary.requires_grad_()
    weights.requires_grad_()
    matrix.requires_grad_()
    grad_output = torch.randn_like(unary)
    on_cpu = message_passing(unary, matrix, weights, method, n_directions, 3)
    grads_cpu = torch.autograd.grad(on_cpu, (unary, matrix, weights), grad_output)
    cuda = [t.detach().cuda().requires_grad_() for t in (unary, matrix, weights)]
    on_gpu = message_passing(cuda[0], cuda[1], cuda[2], method, n_directions, 3)
    grads_gpu = torch.autograd.grad(on_gpu, cuda, grad_output.cuda())
    torch.testing.assert_close(on_gpu.cpu(), on_cpu)
    for got, expected in zip(grads_gpu, grads_cpu, strict=True):
        torch.testing.assert_close(got.cpu(), expected)


@pytest.mark.cuda
@pytest.mark.parametrize("method", COMPILED_METHODS)
def test_cuda_unary_gradient_without_parameter_gradients(method):
    """Neither the pairwise nor the edge weights need a gradient: the CUDA backward skips their accumulators."""
    unary, _, weights = random_inputs(12, 1, 9, 7, 8, 8)
    unary.requires_grad_()
    grad_output = torch.randn_like(unary)
    pairwise = Pairwise("potts", 0.8)
    (expected,) = torch.autograd.grad(
        message_passing(unary, pairwise, weights, method, 8, 3), unary, grad_output
    )
    on_gpu = unary.detach().cuda().requires_grad_()
    costs = message_passing(on_gpu, pairwise, weights.cuda(), method, 8, 3)
    (got,) = torch.autograd.grad(costs, on_gpu, grad_output.cuda())
    torch.testing.assert_close(got.cpu(), expected)


# (method id, directions, iterations) whose sums stay exact on exact_inputs: ISGMR and SGM add integers and halves;
# TRWP scales by rho = 2 / D, whose fractions outgrow float32 beyond one iteration of 4 directions, and runs on the
# image's top-left 4 x 4 pixels (on 5 x 6 its pairwise gradient needs 25 significant bits at 256 labels)
EXACT_RUNS = tuple(
    (_METHOD_IDS[method], n_directions, n_iterations)
    for method, n_directions, n_iterations in (
        ("isgmr", 8, 2),
        ("isgmr", 16, 2),
        ("trwp", 4, 1),
        ("sgm", 4, 2),
        ("sgm", 16, 2),
    )
)
EXACT_BITS = 20  # what the outputs of the exact runs may need: float32's 24 leave partial sums 16x that room
EXACT_LABELS = (2, 19, 32, 33, 64, 96, 100, 128, 130, 200, 256, 300)


def exact_inputs(n_labels: int, dtype: torch.dtype, seed: int):
    """Integer unary (2, L, 5, 6), pairwise matrices by kind (a dense integer matrix, Potts of cost 2, truncated
    linear min(d, 4), truncated quadratic min(d^2, 16)) and edge weights in {0.5, 1, 2} for 16 directions (take the
    first D/2 offsets): every product in a sweep is exact, and in EXACT_RUNS every sum too, so any two correct kernels
    agree bit for bit."""
    gen = torch.Generator().manual_seed(seed)
    unary = torch.randint(0, 6, (2, n_labels, 5, 6), generator=gen).to(dtype)
    matrices = {_GENERAL: torch.randint(0, 4, (n_labels, n_labels), generator=gen).to(dtype)}
    for pairwise in (
        Pairwise("potts", 2.0),
        Pairwise("truncated_linear", 1.0, 4.0),
        Pairwise("truncated_quadratic", 1.0, 16.0),
    ):
        matrices[_pairwise_kind(pairwise)] = pairwise.matrix(n_labels, dtype=dtype)
    weights = torch.tensor([0.5, 1.0, 2.0], dtype=dtype)[torch.randint(0, 3, (2, 8, 5, 6), generator=gen)]
    return unary, matrices, weights


def forward_and_backward(
    unary, matrix, weights, grad_costs, method_id, n_directions, n_iterations, kind, ops=torch.ops.app
):
    """The compiled ops' raw outputs (the ops of library ``ops``): costs, p, q, then the unary, pairwise and
    edge-weight gradients."""
    options = (method_id, n_directions, n_iterations, kind)
    costs, p, q = ops.message_passing(unary, matrix, weights, *options)
    grads = ops.message_passing_backward(grad_costs, matrix, weights, p, q, *options, True, True)
    return (costs, p, q, *grads)


def assert_outputs_match(got, expected, tolerance: float, context=None) -> None:
    """forward_and_backward outputs: the stored indices p, q equal, costs and gradients to ``tolerance``."""
    for index, (x, y) in enumerate(zip(got, expected, strict=True)):
        if index in (1, 2):
            assert torch.equal(x.cpu(), y.cpu()), (context, index)
        else:
            torch.testing.assert_close(
                x.cpu(),
                y.cpu(),
                rtol=tolerance,
                atol=tolerance,
                msg=lambda m, i=index: f"{context}, output {i}: {m}",
            )


def exact_run(n_labels: int, dtype: torch.dtype, seed: int, device: str = "cpu", ops=torch.ops.app):
    """forward_and_backward of every exact run and pairwise kind on exact_inputs with integer output gradients in
    [-2, 2]: {(kind, method id, directions, iterations): outputs}."""
    unary, matrices, weights = exact_inputs(n_labels, dtype, seed)
    grad_costs = torch.randint(-2, 3, unary.shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    runs = {}
    for kind, matrix in matrices.items():
        for method_id, n_directions, n_iterations in EXACT_RUNS:
            tensors = (unary, matrix, weights[:, : n_directions // 2], grad_costs)
            if method_id == _METHOD_IDS["trwp"]:
                tensors = tuple(t if t.dim() == 2 else t[..., :4, :4].contiguous() for t in tensors)
            runs[kind, method_id, n_directions, n_iterations] = forward_and_backward(
                *(t.to(device) for t in tensors), method_id, n_directions, n_iterations, kind, ops
            )
    return runs


@pytest.mark.parametrize("n_labels", EXACT_LABELS)
def test_exact_inputs_are_exact_in_float32(n_labels):
    """The premise of test_cuda_sweeps_equal_cpu_bitwise: float32 gives float64's costs, indices and gradients, and
    every float64 output fits in EXACT_BITS significant bits, so sums in another order round alike."""
    single, double = exact_run(n_labels, torch.float32, n_labels), exact_run(n_labels, F64, n_labels)
    for run, outputs in single.items():
        for got, expected in zip(outputs, double[run], strict=True):
            assert torch.equal(got.to(expected.dtype), expected), run
            if expected.is_floating_point():
                mantissa = torch.frexp(expected).mantissa * 2**EXACT_BITS
                assert torch.equal(mantissa, mantissa.round()), run


@pytest.mark.cuda
@pytest.mark.parametrize("n_labels", EXACT_LABELS)
def test_cuda_sweeps_equal_cpu_bitwise(n_labels):
    """On exact inputs the CUDA sweeps give the CPU's costs, stored argmins p, q and gradients bit for bit, ties
    included, at label counts on both sides of the kernels' per-warp and per-block boundaries and of the uint8
    indices' limit: float32 and float64, every pairwise kind, every method."""
    for dtype in (torch.float32, F64):
        on_cpu, on_gpu = exact_run(n_labels, dtype, n_labels), exact_run(n_labels, dtype, n_labels, "cuda")
        for run, outputs in on_gpu.items():
            for got, expected in zip(outputs, on_cpu[run], strict=True):
                assert torch.equal(got.cpu(), expected), (dtype, run)


@pytest.mark.cuda
def test_cuda_float32_matches_cpu():
    """float32 on random (tie-free) inputs, TRWP over 16 directions and two iterations (rho = 1/8: float32 rounds),
    96 labels, Potts and a dense matrix: costs and gradients equal the CPU's to rounding."""
    unary, matrix, weights = (t.float() for t in random_inputs(7, 2, 96, 9, 11, 16))
    grad_costs = torch.randn(unary.shape, generator=torch.Generator().manual_seed(7))
    potts = Pairwise("potts", 1.0)
    for kind, pairwise in ((_pairwise_kind(potts), potts.matrix(96)), (_GENERAL, matrix)):
        tensors = (unary, pairwise, weights, grad_costs)
        on_cpu = forward_and_backward(*tensors, _METHOD_IDS["trwp"], 16, 2, kind)
        on_gpu = forward_and_backward(*(t.cuda() for t in tensors), _METHOD_IDS["trwp"], 16, 2, kind)
        for index in (0, 3, 4, 5):  # costs and the three gradients
            torch.testing.assert_close(on_gpu[index].cpu(), on_cpu[index], rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("n_labels", (33, 96, 200))
def test_cuda_warp_and_block_sweeps_agree(monkeypatch, n_labels):
    """The warp sweeps (up to 256 labels) and the block sweeps (APP_CUDA_BLOCK_SWEEPS=1) on random float32
    inputs, TRWP-8, ISGMR-8 and SGM-4 with Potts and truncated linear: the same stored argmins, costs and
    gradients to rounding."""
    unary, _, weights = (t.float().cuda() for t in random_inputs(4, 2, n_labels, 12, 17, 8))
    grad_costs = torch.randn(unary.shape, generator=torch.Generator().manual_seed(4)).cuda()
    for pairwise in (Pairwise("potts", 0.5), Pairwise("truncated_linear", 0.3, 5.0)):
        matrix = pairwise.matrix(n_labels, dtype=torch.float32).cuda()
        for method, n_directions in (("trwp", 8), ("isgmr", 8), ("sgm", 4)):
            tensors = (unary, matrix, weights[:, : n_directions // 2], grad_costs)
            options = (_METHOD_IDS[method], n_directions, 2, _pairwise_kind(pairwise))
            monkeypatch.setenv("APP_CUDA_BLOCK_SWEEPS", "0")
            warp = forward_and_backward(*tensors, *options)
            monkeypatch.setenv("APP_CUDA_BLOCK_SWEEPS", "1")
            block = forward_and_backward(*tensors, *options)
            assert_outputs_match(warp, block, 1e-4, method)


@pytest.mark.cuda
def test_cuda_many_labels_use_the_shared_memory_opt_in():
    """6300 float64 labels: the block sweeps' two shared label rows (98.5 KiB) exceed CUDA's default 48 KiB per block
    and run with the launch's opt-in (every GPU the build targets allows >= 99 KiB); TRWP-4 and ISGMR-4 equal the
    CPU op, indices exactly (no pairwise gradient: its accumulators would be L^2 per CPU thread)."""
    n_labels = 6300
    unary, _, weights = random_inputs(11, 1, n_labels, 3, 4, 4)
    potts = Pairwise("potts", 0.9)
    matrix = potts.matrix(n_labels, dtype=F64)
    grad_costs = torch.randn(unary.shape, generator=torch.Generator().manual_seed(11), dtype=F64)

    def run(device, options):
        tensors = [t.to(device) for t in (unary, matrix, weights, grad_costs)]
        costs, p, q = torch.ops.app.message_passing(*tensors[:3], *options)
        grads = torch.ops.app.message_passing_backward(tensors[3], *tensors[1:3], p, q, *options, False, True)
        return [t.cpu() for t in (costs, p, q, grads[0], grads[2])]

    for method in ("trwp", "isgmr"):
        options = (_METHOD_IDS[method], 4, 2, _pairwise_kind(potts))
        assert_outputs_match(run("cuda", options), run("cpu", options), 1e-12, method)


@pytest.mark.cuda
def test_cuda_refuses_more_labels_than_shared_memory_holds():
    """More labels than the GPU's shared memory per block holds: a ValueError that points to the CPU op."""
    n_labels = 16000  # 250 KiB of float64 rows, more than any GPU's opt-in limit (227 KiB on sm_90)
    unary = torch.rand(1, n_labels, 1, 2, dtype=F64, device="cuda")
    matrix = Pairwise("potts", 1.0).matrix(n_labels, dtype=F64, device="cuda")
    with pytest.raises(ValueError, match="run it on the CPU"):
        message_passing(unary, matrix, None, "isgmr", 4, 1)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ("potts", "truncated_linear", "truncated_quadratic"))
def test_cuda_fast_paths_match_reference(kind):
    unary, matrix, weights = random_inputs(10, 1, 40, 8, 12, 4, device="cuda")
    pairwise = make_pairwise(kind, matrix)
    got = message_passing(unary, pairwise, weights, "trwp", 4, 3)
    expected = reference(unary.cpu(), make_pairwise(kind, matrix.cpu()), weights.cpu(), "trwp", 4, 3)
    torch.testing.assert_close(got.cpu(), expected)


def _capped_cases():
    """(kind, seed, labels, term weight, truncation, integer costs) for the forms whose matrix is capped beyond a
    reach of labels. The CPU takes a vectorised band up to a reach of 64 (truncated quadratic) or 32 (truncated
    linear; Potts: reach 0, SGM's path), wider the quadratic's lower envelope of parabolas: truncations below one
    label, at a square (the cap ties the parabola there), between squares, and 2000 (reach 44: the band) or none
    (reach L - 1: the band up to 65 labels, the envelope at 80); a zero weight (every label costs min h); integer
    costs, where labels tie exactly."""
    quadratic = [
        ("truncated_quadratic", seed, n_labels, weight, truncation, seed % 2 == 0)
        for seed, (n_labels, weight) in enumerate(((33, 0.3), (80, 1.0), (12, 2.5), (40, 0.0), (80, 0.02)))
        for truncation in (0.5, 9.0, 10.5, 2000.0, None)
    ]
    linear = [
        ("truncated_linear", seed, n_labels, weight, truncation, seed % 2 == 0)
        for seed, (n_labels, weight) in enumerate(((33, 0.3), (21, 1.0), (12, 2.5), (17, 0.0)))
        for truncation in (0.5, 3.0, 4.5, None)
    ]
    potts = [("potts", seed, 19, weight, None, seed % 2 == 0) for seed, weight in enumerate((0.4, 0.0))]
    return quadratic + linear + potts


@pytest.mark.parametrize("case", _capped_cases(), ids=str)
def test_capped_forms_equal_the_dense_path(case):
    """The vectorised band and the quadratic's envelope equal the O(L^2) min-convolution over the same matrix:
    costs and stored argmins p, q bitwise, ties included, for every method, in float64."""
    kind, seed, n_labels, weight, truncation, integer_costs = case
    unary, _, weights = random_inputs(seed, 2, n_labels, 5, 6, 8)
    if integer_costs:
        unary = (unary * 3).round()
    form = Pairwise(kind, weight, truncation)
    matrix, kind_id = form.matrix(n_labels, dtype=F64), _pairwise_kind(form)
    for method_id in range(3):
        dense = torch.ops.app.message_passing(unary, matrix, weights, method_id, 8, 3, _GENERAL)
        costs, p, q = torch.ops.app.message_passing(unary, matrix, weights, method_id, 8, 3, kind_id)
        fast = (costs, stored_argmins(p, n_labels, kind_id), q)
        for got, expected in zip(fast, dense, strict=True):
            assert torch.equal(got, expected.to(got.dtype))


@pytest.mark.parametrize("method", COMPILED_METHODS)
@pytest.mark.parametrize(
    ("kind", "n_labels", "truncation"),
    (("truncated_quadratic", 40, 16.0), ("truncated_quadratic", 70, None), ("truncated_linear", 40, None)),
)
def test_capped_form_gradients_match_reference(method, kind, n_labels, truncation):
    """Truncated quadratic with truncation 16 at 40 labels (the band; a square, so the cap ties the parabola at
    distance 4) and none at 70 (the envelope), truncated linear without truncation at 40 labels (its distance
    transform): unary, term weight, truncation and edge-weight gradients through the O(L) paths equal autograd
    through the reference."""
    unary, _, weights = random_inputs(31, 1, n_labels, 5, 6, 4)
    unary = (unary * 10).requires_grad_()
    weights.requires_grad_()
    options = {"dtype": F64, "requires_grad": True}
    pairwise = Pairwise(
        kind,
        torch.tensor(0.4, **options),
        None if truncation is None else torch.tensor(truncation, **options),
    )
    grad_output = torch.randn(unary.shape, dtype=F64, generator=torch.Generator().manual_seed(32))
    got, expected = (
        _gradients(lambda u, p, w, fn=fn: fn(u, p, w, method, 4, 3), unary, pairwise, weights, grad_output)
        for fn in (message_passing, reference)
    )
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("method", COMPILED_METHODS)
def test_potts_gradients_with_cut_edges(method):
    """Canny weights are exactly 0 across image edges: every message there ties, the O(L) Potts path must
    still pick the reference's first-index argmins."""
    unary, _, weights = random_inputs(11, 1, 5, 6, 7, 8)
    weights = (weights > 0.6).to(F64).requires_grad_()
    unary.requires_grad_()
    term_weight = torch.tensor(1.5, dtype=F64, requires_grad=True)
    pairwise = Pairwise("potts", term_weight)
    grad_output = torch.randn_like(unary)
    got = _gradients(
        lambda u, p, w: message_passing(u, p, w, method, 8, 2), unary, pairwise, weights, grad_output
    )
    expected = _gradients(
        lambda u, p, w: reference(u, p, w, method, 8, 2), unary, pairwise, weights, grad_output
    )
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("method", COMPILED_METHODS)
@pytest.mark.parametrize("kind", ("potts", "matrix"))
@pytest.mark.parametrize("weights_grad", (True, False))
def test_gradients_when_the_pairwise_needs_none(method, kind, weights_grad):
    """A fixed pairwise (a float Potts weight, a matrix without grad) and edge weights with or without grad: the
    kernels skip what is not needed (Potts: one pass per message); the unary and edge-weight gradients still
    equal the reference's. 19 labels (full and partial label vectors), a third of the edges cut (weight 0, every
    Potts message ties)."""
    unary, matrix, weights = random_inputs(41, 1, 19, 6, 7, 8)
    weights = torch.where(weights > 0.8, weights, torch.zeros_like(weights)).requires_grad_(weights_grad)
    unary.requires_grad_()
    pairwise = Pairwise("potts", 0.8) if kind == "potts" else matrix
    grad_output = torch.randn(unary.shape, dtype=F64, generator=torch.Generator().manual_seed(42))
    leaves = (unary, weights) if weights_grad else (unary,)

    def run(fn):
        return torch.autograd.grad(fn(unary, pairwise, weights, method, 8, 3), leaves, grad_output)

    for got, expected in zip(run(message_passing), run(reference), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("method", ("trwp", "meanfield"))
def test_backward_fills_no_gradient_for_the_stored_state(method):
    """The indices (and mean-field's distributions) are non-differentiable outputs: autograd must not fill zero
    gradients of their size (82 MiB at 256x512, 32 labels) before the backward runs. They are the only 5- and
    6-dimensional tensors here; the kernels' own buffers have at most 4 dimensions."""
    unary = torch.rand(1, 6, 9, 10, requires_grad=True)
    costs = message_passing(unary, Pairwise("potts", 1.0), None, method, 4, 3)
    with torch.profiler.profile(record_shapes=True) as prof:
        (grad,) = torch.autograd.grad(costs, unary, torch.ones_like(costs))
    filled = [
        e.input_shapes[0]
        for e in prof.events()
        if e.name in ("aten::fill_", "aten::zero_") and e.input_shapes
    ]
    assert grad.shape == unary.shape and grad.abs().sum() > 0
    assert all(len(shape) <= 4 for shape in filled), filled


def test_backward_op_returns_zeros_for_unneeded_gradients():
    unary, matrix, weights = random_inputs(43, 1, 6, 4, 5, 4)
    _, p, q = torch.ops.app.message_passing(unary, matrix, weights, 1, 4, 2, 0)
    grad = torch.randn_like(unary)
    full = torch.ops.app.message_passing_backward(grad, matrix, weights, p, q, 1, 4, 2, 0, True, True)
    masked = torch.ops.app.message_passing_backward(grad, matrix, weights, p, q, 1, 4, 2, 0, False, False)
    assert full[1].abs().sum() > 0 and full[2].abs().sum() > 0
    torch.testing.assert_close(masked[0], full[0], rtol=0, atol=0)
    assert not masked[1].any() and not masked[2].any()


# ---- mean-field (app::meanfield; its random cases are in the forward and gradient tests above)


@pytest.mark.parametrize("truncation", (0.5, 1.0, 2.0, 3.7, 30.0))
def test_meanfield_truncated_linear_product(truncation):
    """The O(L) truncated-linear product (prefix sums over the labels) for every reach: below one label
    (Potts-like), integer and fractional truncations, and none within the labels; forward and gradients."""
    unary, _, weights = random_inputs(20, 1, 12, 5, 6, 8)
    unary.requires_grad_()
    weights.requires_grad_()
    params = [torch.tensor(v, dtype=F64, requires_grad=True) for v in (0.6, truncation)]
    pairwise = Pairwise("truncated_linear", *params)
    grad_output = torch.randn(unary.shape, dtype=F64, generator=torch.Generator().manual_seed(10))
    leaves = (unary, weights, *params)
    results = []
    for fn in (message_passing, reference):
        costs = fn(unary, pairwise, weights, "meanfield", 8, 3)
        results.append((costs, *torch.autograd.grad(costs, leaves, grad_output)))
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_meanfield_float32_softmax_over_wide_costs():
    """float32: the CPU kernel's own exponential (clamped below e^-87) keeps the softmax of costs spread over
    hundreds of units, and a tie of the lowest costs, as accurate as the float64 reference to float32 precision."""
    unary, matrix, weights = random_inputs(21, 1, 6, 7, 9, 4)
    unary = unary * 100
    unary[:, :2] = unary[:, :1]  # equal lowest candidates
    expected = reference(unary, matrix, weights, "meanfield", 4, 3)
    got = message_passing(unary.float(), matrix.float(), weights.float(), "meanfield", 4, 3)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)


def test_meanfield_compiled_op_is_what_runs(monkeypatch):
    """The public op calls app::meanfield (q: one distribution per iteration), never the reference; an
    asymmetric matrix checks the V / V^T orientation of both neighbours."""
    unary, matrix, weights = random_inputs(14, 2, 4, 5, 6, 8)
    expected = reference(unary, matrix, weights, "meanfield", 8, 3)
    costs, q = torch.ops.app.meanfield(unary, matrix, weights, 8, 3, 0)
    assert q.shape == (3, 2, 4, 5, 6)
    torch.testing.assert_close(q.sum(2), torch.ones(3, 2, 5, 6, dtype=F64))
    torch.testing.assert_close(q[0], torch.softmax(-unary, 1))
    torch.testing.assert_close(costs, expected)

    def fail(*args):
        raise AssertionError("the reference ran")

    monkeypatch.setitem(reference_module._METHOD_FUNCTIONS, "meanfield", fail)
    monkeypatch.setattr(reference_module, "_meanfield", fail)
    torch.testing.assert_close(message_passing(unary, matrix, weights, "meanfield", 8, 3), expected)


def test_meanfield_unary_gradient_without_pairwise_gradient():
    """A pairwise that needs no gradient skips its GEMMs; the unary and edge-weight gradients are unchanged."""
    unary, matrix, weights = random_inputs(15, 1, 5, 6, 7, 4)
    unary.requires_grad_()
    weights.requires_grad_()
    grad_output = torch.randn(unary.shape, dtype=F64, generator=torch.Generator().manual_seed(8))
    got = torch.autograd.grad(
        message_passing(unary, matrix, weights, "meanfield", 4, 3), (unary, weights), grad_output
    )
    expected = torch.autograd.grad(
        reference(unary, matrix, weights, "meanfield", 4, 3), (unary, weights), grad_output
    )
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_meanfield_half_input_is_computed_in_float32(dtype):
    unary, matrix, weights = random_inputs(16, 1, 4, 5, 5, 4)
    got = message_passing(unary.to(dtype), Pairwise("potts", 0.7), weights.to(dtype), "meanfield", 4, 2)
    expected = reference(
        unary.to(dtype).float(), Pairwise("potts", 0.7), weights.to(dtype).float(), "meanfield", 4, 2
    )
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=1e-2)


def test_meanfield_opcheck_registrations():
    unary, matrix, weights = random_inputs(17, 1, 3, 3, 4, 8)
    torch.library.opcheck(
        torch.ops.app.meanfield.default,
        (unary.requires_grad_(), matrix.requires_grad_(), weights, 8, 2, 0),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


@pytest.mark.parametrize(
    "args",
    [
        (torch.rand(1, 3, 4), torch.rand(3, 3), torch.rand(1, 2, 4, 4), 4, 1, 0),
        (torch.rand(1, 3, 4, 4), torch.rand(3, 2), torch.rand(1, 2, 4, 4), 4, 1, 0),
        (torch.rand(1, 3, 4, 4), torch.rand(3, 3), torch.rand(1, 3, 4, 4), 4, 1, 0),
        (torch.rand(1, 3, 4, 4), torch.rand(3, 3).double(), torch.rand(1, 2, 4, 4), 4, 1, 0),
        (torch.rand(1, 3, 4, 4), torch.rand(3, 3), torch.rand(1, 2, 4, 4), 6, 1, 0),
        (torch.rand(1, 3, 4, 4), torch.rand(3, 3), torch.rand(1, 2, 4, 4), 4, 0, 0),
        (torch.rand(1, 3, 4, 4), torch.rand(3, 3), torch.rand(1, 2, 4, 4), 4, 1, 5),
    ],
)
def test_meanfield_kernel_checks_its_inputs(args):
    """Called directly, the C++ op refuses bad shapes, dtypes and arguments instead of reading out of bounds."""
    with pytest.raises(RuntimeError, match="meanfield"):
        torch.ops.app.meanfield(*args)


def test_backward_kernel_checks_the_stored_indices():
    """Called directly with indices of another call (other iterations, directions or size), the backward op refuses
    them instead of reading past their end."""
    unary, matrix, weights = random_inputs(19, 1, 3, 4, 5, 4)
    options = (_METHOD_IDS["trwp"], 4, 2, _GENERAL)
    _, p, q = torch.ops.app.message_passing(unary, matrix, weights, *options)
    other_options = (_METHOD_IDS["trwp"], 4, 3, _GENERAL)
    for bad_p, bad_q, call_options in (
        (p, q, other_options),
        (p[:, :, :, :3].clone(), q, options),
        (p, q[:1], options),
    ):
        with pytest.raises(RuntimeError, match="p must be"):
            torch.ops.app.message_passing_backward(
                unary, matrix, weights, bad_p, bad_q, *call_options, True, True
            )


def test_meanfield_backward_kernel_checks_q():
    unary, matrix, weights = random_inputs(18, 1, 3, 4, 4, 4)
    with pytest.raises(RuntimeError, match="q must be"):
        torch.ops.app.meanfield_backward(unary, matrix, weights, unary, 4, 0, True)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"unary": torch.rand(3, 4, 4)}, "unary"),
        ({"unary": torch.full((1, 3, 4, 4), float("inf"))}, "unary"),
        ({"pairwise": torch.rand(2, 2)}, "pairwise"),
        ({"edge_weights": -torch.rand(1, 2, 4, 4)}, "edge_weights"),
        ({"n_directions": 2}, "n_directions"),
        ({"n_iterations": 0}, "n_iterations"),
    ],
)
def test_meanfield_bad_input_raises_value_error(kwargs, name):
    args = {"unary": torch.rand(1, 3, 4, 4), "pairwise": torch.rand(3, 3), "method": "meanfield"}
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        message_passing(**args)


@pytest.mark.cuda
@pytest.mark.parametrize("n_directions", (4, 8, 16))
@pytest.mark.parametrize("kind", ("matrix", "potts"))
def test_cuda_meanfield_matches_reference(n_directions, kind):
    unary, matrix, weights = random_inputs(19, 2, 6, 9, 11, n_directions)
    grad_output = torch.randn(unary.shape, dtype=F64, generator=torch.Generator().manual_seed(9))

    def gradients(device):
        leaves = [t.to(device).requires_grad_() for t in (unary, matrix, weights)]
        pairwise = leaves[1] if kind == "matrix" else Pairwise("potts", leaves[1][0, 1])
        fn = message_passing if device == "cuda" else reference
        out = fn(leaves[0], pairwise, leaves[2], "meanfield", n_directions, 3)
        return [out, *torch.autograd.grad(out, leaves, grad_output.to(device))]

    for got, expected in zip(gradients("cuda"), gradients("cpu"), strict=True):
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-9, atol=1e-9)


def test_speed_benchmark_times_a_small_batch_with_all_gradients(monkeypatch, capsys):
    """``benchmarks/message_passing_speed.py`` on a tiny batch (--batch, --size, --all-gradients): every row has
    forward, backward and the reference's times, and the stored size of its Potts rows."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    benchmark = importlib.import_module("message_passing_speed")
    saved = {}
    monkeypatch.setattr(
        benchmark, "save_json", lambda name, payload: saved.update(name=name, payload=payload)
    )
    argv = ["--batch", "2", "--size", "5", "6", "--labels", "4", "--methods", "trwp", "isgmr", "meanfield"]
    argv += ["--directions", "4", "--reference-directions", "4", "--repeats", "1", "--all-gradients"]
    monkeypatch.setattr(sys, "argv", ["message_passing_speed.py", *argv])
    benchmark.main()
    assert saved["name"] == "message_passing_speed_cpu_potts_L4_all_gradients_b2_5x6"
    results = saved["payload"]["results"]
    assert [r["method"] for r in results] == ["trwp", "isgmr", "meanfield"]
    for row in results:
        assert row["forward_ms"] > 0 and row["backward_ms"] > 0 and row["reference_backward_ms"] > 0
    messages = 5 * 4 * 2 * 5 * 6  # iterations x directions x pixels
    assert results[0]["stored_mib"] == pytest.approx(messages * (index_row(4, 1) + 1) / 2**20)
    assert "| TRWP-4 | 4 |" in capsys.readouterr().out

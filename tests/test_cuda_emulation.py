"""The CUDA kernels run on the CPU through a host emulation of CUDA thread blocks (tests/emulation/gpu_emulator.h):
message passing gives the CPU op's outputs bit for bit on exact inputs, the segment mean, ConvCRF message and
mean-field to rounding; the emulator's own tests: warp intrinsics, scheduling order, poisoned shared memory, and the
misuse it reports.
"""

from __future__ import annotations

import random
import re
import struct
from pathlib import Path

import pytest
import torch
from test_message_passing import (
    EXACT_LABELS,
    F64,
    assert_outputs_match,
    exact_run,
    forward_and_backward,
    random_inputs,
)
from torch.utils import cpp_extension

from app.ops import Pairwise
from app.ops.message_passing import _GENERAL, _METHOD_IDS, _pairwise_kind

ROOT = Path(__file__).resolve().parents[1]
EMULATION = ROOT / "tests" / "emulation"
# the default run's label counts: one label a lane (the speed target's 32); one past a warp; 8 labels a lane
DEFAULT_LABELS = (32, 33, 200)


@pytest.fixture(scope="session")
def emulated_ops(tmp_path_factory):
    """Builds tests/emulation once (five translation units, 15-40 s): the libraries app_emulated and
    app_emulator_test."""
    cpp_extension.load(
        name="app_cuda_emulation",
        sources=sorted(str(path) for path in EMULATION.glob("*.cpp")),
        extra_cflags=["-O2", "-ffp-contract=off"],
        extra_include_paths=[str(ROOT / "csrc")],
        build_directory=str(tmp_path_factory.mktemp("cuda_emulation")),
        is_python_module=False,
    )
    return torch.ops.app_emulated


@pytest.fixture(scope="session")
def test_ops(emulated_ops):
    return torch.ops.app_emulator_test


def _sweep_cases():
    """(labels, sweeps): the warp sweeps (up to 256 labels) at DEFAULT_LABELS, the block sweeps
    (APP_CUDA_BLOCK_SWEEPS=1; always above 256 labels) at 33; every other label count slow."""
    for n_labels in EXACT_LABELS:
        for sweeps in ("warp", "block") if n_labels <= 256 else ("block",):
            default = n_labels in DEFAULT_LABELS if sweeps == "warp" else n_labels == 33
            marks = () if default else (pytest.mark.slow,)
            yield pytest.param(n_labels, sweeps, marks=marks, id=f"{sweeps}-{n_labels}")


@pytest.mark.parametrize(("n_labels", "sweeps"), _sweep_cases())
def test_emulated_cuda_sweeps_equal_cpu_bitwise(emulated_ops, monkeypatch, n_labels, sweeps):
    """The CUDA kernels' costs, stored argmins p, q and three gradients equal the CPU op's, float32 and float64,
    every pairwise kind and exact run (test_message_passing.test_cuda_sweeps_equal_cpu_bitwise without a GPU)."""
    monkeypatch.setenv("APP_CUDA_BLOCK_SWEEPS", "1" if sweeps == "block" else "0")
    for dtype in (torch.float32, torch.float64):
        on_cpu = exact_run(n_labels, dtype, n_labels)
        emulated = exact_run(n_labels, dtype, n_labels, ops=emulated_ops)
        for run, outputs in emulated.items():
            for got, expected in zip(outputs, on_cpu[run], strict=True):
                assert torch.equal(got, expected), (dtype, run)


@pytest.mark.parametrize("kind", ("potts", "truncated_linear", "truncated_quadratic", "matrix"))
@pytest.mark.parametrize("method", ("trwp", "isgmr", "sgm"))
def test_emulated_cuda_sweeps_match_cpu_on_random_inputs(emulated_ops, method, kind):
    """Random float64 inputs (no ties), 16 directions, 2 iterations, 40 labels (two per lane, the second lane row
    partial), batch 2, odd image sizes: costs and gradients equal the CPU op's to rounding, indices exactly."""
    unary, matrix, weights = random_inputs(3, 2, 40, 7, 9, 16)
    truncations = {"potts": None, "truncated_linear": 6.0, "truncated_quadratic": 30.0}
    pairwise = matrix if kind == "matrix" else Pairwise(kind, 0.7, truncations[kind])
    matrix = pairwise if kind == "matrix" else pairwise.matrix(40, dtype=torch.float64)
    grad_costs = torch.randn(unary.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    tensors = (unary, matrix, weights, grad_costs, _METHOD_IDS[method], 16, 2, _pairwise_kind(pairwise))
    on_cpu = forward_and_backward(*tensors)
    emulated = forward_and_backward(*tensors, ops=emulated_ops)
    assert_outputs_match(emulated, on_cpu, 1e-12)


@pytest.mark.parametrize("kind", ("potts", "matrix"))
@pytest.mark.parametrize("method", ("trwp", "isgmr", "sgm"))
def test_emulated_cuda_backward_without_parameter_gradients(emulated_ops, method, kind):
    """Neither the pairwise nor the edge weights need a gradient: the kernels skip their accumulators, return
    zeros for them and the unary gradient of the full backward."""
    unary, matrix, weights = random_inputs(6, 1, 20, 6, 7, 8)
    potts = Pairwise("potts", 0.9)
    pairwise, pairwise_kind = (
        (potts.matrix(20, dtype=torch.float64), _pairwise_kind(potts))
        if kind == "potts"
        else (matrix, _GENERAL)
    )
    options = (_METHOD_IDS[method], 8, 2, pairwise_kind)
    costs, p, q = emulated_ops.message_passing(unary, pairwise, weights, *options)
    grad_costs = torch.randn(unary.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    full = emulated_ops.message_passing_backward(grad_costs, pairwise, weights, p, q, *options, True, True)
    unary_only = emulated_ops.message_passing_backward(
        grad_costs, pairwise, weights, p, q, *options, False, False
    )
    torch.testing.assert_close(unary_only[0], full[0], rtol=1e-12, atol=1e-12)
    assert not unary_only[1].any() and not unary_only[2].any()


# Float64 labels whose two shared rows in the block sweeps pass CUDA's default 48 KiB of dynamic shared memory
# (3100 labels: 49.7 KiB; the launch asks for more), and labels beyond the emulated device's 99 KiB.
OPT_IN_LABELS, TOO_MANY_LABELS = 3100, 6400


@pytest.mark.parametrize("kind", ("potts", "matrix"))
def test_emulated_cuda_block_sweeps_beyond_the_default_shared_memory(emulated_ops, kind):
    """OPT_IN_LABELS in float64: the block sweeps run (with the launch's shared-memory opt-in) and equal the CPU op,
    indices exactly, costs and gradients to rounding."""
    unary, matrix, weights = random_inputs(8, 1, OPT_IN_LABELS, 2, 3, 4)
    pairwise_kind = _pairwise_kind(Pairwise("potts", 1.0)) if kind == "potts" else _GENERAL
    if kind == "potts":
        matrix = Pairwise("potts", 0.9).matrix(OPT_IN_LABELS, dtype=torch.float64)
    grad_costs = torch.randn(unary.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    tensors = (unary, matrix, weights, grad_costs, _METHOD_IDS["trwp"], 4, 1, pairwise_kind)
    on_cpu = forward_and_backward(*tensors)
    emulated = forward_and_backward(*tensors, ops=emulated_ops)
    assert_outputs_match(emulated, on_cpu, 1e-12)


def test_emulated_cuda_refuses_more_labels_than_shared_memory_holds(emulated_ops):
    """Beyond the device's shared memory per block: a ValueError that says how many labels fit and points to the
    CPU op, not a failed launch."""
    unary = torch.rand(1, TOO_MANY_LABELS, 1, 2, dtype=torch.float64)
    matrix = Pairwise("potts", 1.0).matrix(TOO_MANY_LABELS, dtype=torch.float64)
    weights = torch.ones(1, 2, 1, 2, dtype=torch.float64)
    with pytest.raises(
        ValueError,
        match=r"6400 labels \(computed in Double\) need \d+ bytes .*\(about 6336 labels\); run it on the CPU",
    ):
        emulated_ops.message_passing(unary, matrix, weights, _METHOD_IDS["isgmr"], 4, 1, _GENERAL)


def _segment_cases():
    """(name, values, segments): superpixel-like blocks (runs of one id along rows) with a size that leaves a
    partial block of threads, random ids (runs of one pixel), one segment; float16/32/64, batch 1-2."""
    gen = torch.Generator().manual_seed(0)
    rows, cols = torch.arange(37)[:, None], torch.arange(45)[None, :]
    blocks = (rows // 6 * 8 + cols // 6).expand(2, 37, 45).clone()
    blocks[1] = blocks[1].flip(-1) + 3  # other ids, runs ending at other lanes
    yield "blocks", torch.randn(2, 5, 37, 45, generator=gen), blocks
    yield (
        "random ids",
        torch.randn(1, 3, 20, 30, generator=gen, dtype=torch.float64),
        torch.randint(0, 50, (1, 20, 30), generator=gen),
    )
    yield (
        "one segment",
        torch.randn(1, 4, 9, 40, generator=gen).half(),
        torch.zeros(1, 9, 40, dtype=torch.int64),
    )


@pytest.mark.parametrize(
    ("name", "values", "segments"), _segment_cases(), ids=lambda x: x if isinstance(x, str) else ""
)
def test_emulated_cuda_segment_mean_matches_cpu(emulated_ops, name, values, segments):
    """The CUDA segment mean (a segmented warp scan per run of one id, one atomic per run) gives the CPU op's
    means to rounding (sums in another order), with ids up to num_segments unused."""
    num_segments = int(segments.max()) + 4
    got = emulated_ops.segment_mean(values, segments, num_segments)
    expected = torch.ops.app.segment_mean(values, segments, num_segments)
    assert got.dtype == values.dtype
    torch.testing.assert_close(got, expected)


# (filter size, (B, C, F, H, W)): a 3 x 3 window; 9 channels, a full and a partial block of the kernel's 8 in
# registers; an image smaller than the window
GAUSSIAN_CASES = ((3, (2, 3, 2, 6, 5)), (5, (1, 9, 3, 7, 6)), (7, (1, 2, 2, 3, 4)))


@pytest.mark.parametrize(
    ("filter_size", "shape"), GAUSSIAN_CASES, ids=("3x3", "5x5, 9 channels", "7x7 on 3x4")
)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_emulated_cuda_gaussian_message_matches_cpu(emulated_ops, dtype, filter_size, shape):
    """The CUDA ConvCRF message and its features gradient (a thread per pixel, the kernel values computed on the fly)
    give the CPU ops' outputs to rounding (the same sums in the same order: here they agree bit for bit)."""
    gen = torch.Generator().manual_seed(filter_size)
    batch, channels, n_features, height, width = shape
    q = torch.rand(batch, channels, height, width, generator=gen, dtype=dtype)
    features = torch.randn(batch, n_features, height, width, generator=gen, dtype=dtype)
    grad = torch.randn(q.shape, generator=gen, dtype=dtype)
    tolerance = {"rtol": 1e-12, "atol": 1e-12} if dtype == F64 else {}
    for op, args in (
        ("gaussian_message", (q, features, filter_size)),
        ("gaussian_message_features_backward", (grad, q, features, filter_size)),
    ):
        got = getattr(emulated_ops, op)(*args)
        torch.testing.assert_close(got, getattr(torch.ops.app, op)(*args), **tolerance)


MEANFIELD_PAIRWISE = {
    "potts": Pairwise("potts", 0.7),
    "truncated_linear": Pairwise("truncated_linear", 0.6, 2.5),
}


@pytest.mark.parametrize("n_directions", (4, 8, 16))
@pytest.mark.parametrize("kind", ("potts", "truncated_linear", "dense"))
def test_emulated_cuda_meanfield_matches_cpu(emulated_ops, kind, n_directions):
    """The CUDA mean-field (gather, edge-weight gradient and Potts kernels, ATen's softmax, GEMMs for the other V)
    gives the CPU op's costs, distributions and gradients, with and without the pairwise gradient, float32 and
    float64 (to rounding: the CPU fuses its own softmax and takes truncated linear by O(L) prefix sums); the dense
    V is asymmetric, which checks the V / V^T orientation of both neighbours."""
    unary, matrix, weights = random_inputs(n_directions, 2, 5, 6, 7, n_directions)
    pairwise_kind = _GENERAL
    if kind in MEANFIELD_PAIRWISE:
        matrix = MEANFIELD_PAIRWISE[kind].matrix(5, dtype=F64)
        pairwise_kind = _pairwise_kind(MEANFIELD_PAIRWISE[kind])
    grad_costs = torch.randn(unary.shape, generator=torch.Generator().manual_seed(n_directions), dtype=F64)
    for dtype in (torch.float32, F64):
        tensors = [t.to(dtype) for t in (unary, matrix, weights, grad_costs)]
        outputs = []
        for ops in (emulated_ops, torch.ops.app):
            costs, q = ops.meanfield(*tensors[:3], n_directions, 3, pairwise_kind)
            backward = (tensors[3], *tensors[1:3], q, n_directions, pairwise_kind)
            with_pairwise, without = (ops.meanfield_backward(*backward, grad) for grad in (True, False))
            outputs.append((costs, q, *with_pairwise, *without))
        tolerance = {"rtol": 1e-12, "atol": 1e-12} if dtype == F64 else {}
        for index, (got, expected) in enumerate(zip(*outputs, strict=True)):
            torch.testing.assert_close(
                got, expected, **tolerance, msg=lambda m, i=index, d=dtype: f"{d} {i}: {m}"
            )


def test_emulated_cuda_meanfield_of_an_empty_image(emulated_ops):
    """No pixels: every launch has no blocks and launches nothing (CUDA refuses an empty grid; the launch policy
    skips it), and the outputs are empty, as the CPU op's."""
    unary, matrix, weights = random_inputs(0, 1, 3, 0, 4, 4)
    costs, q = emulated_ops.meanfield(unary, matrix, weights, 4, 2, 1)
    assert costs.shape == unary.shape and q.shape == (2, *unary.shape)
    grads = emulated_ops.meanfield_backward(costs, matrix, weights, q, 4, 1, True)
    assert [g.shape for g in grads] == [unary.shape, matrix.shape, weights.shape]
    assert not grads[1].any()


def _bad_calls():
    """(op, arguments) that the ops' input checks refuse."""
    q, features = torch.rand(1, 2, 5, 5), torch.randn(1, 2, 5, 5)
    yield pytest.param("gaussian_message", (q, features, 4), id="even filter")
    yield pytest.param("gaussian_message", (q, features.double(), 3), id="two dtypes")
    yield pytest.param("gaussian_message", (q, features[:, :, :4].contiguous(), 3), id="two image sizes")
    yield pytest.param("gaussian_message_features_backward", (q[:, :1], q, features, 3), id="grad shape")
    unary, matrix, weights = torch.rand(1, 3, 4, 4), torch.rand(3, 3), torch.rand(1, 2, 4, 4)
    yield pytest.param("meanfield", (unary, matrix[:, :2], weights, 4, 1, 0), id="pairwise shape")
    yield pytest.param("meanfield", (unary, matrix, weights, 6, 1, 0), id="6 directions")
    yield pytest.param("meanfield", (unary, matrix, weights, 4, 0, 0), id="no iterations")
    yield pytest.param("meanfield", (unary, matrix, weights, 4, 1, 5), id="unknown kind")
    yield pytest.param("meanfield_backward", (unary, matrix, weights, unary, 4, 0, True), id="q shape")


@pytest.mark.parametrize(("op", "args"), _bad_calls())
def test_emulated_cuda_ops_refuse_bad_input_as_the_cpu_ops_do(emulated_ops, op, args):
    """The device ops' host drivers raise the CPU ops' errors (their TORCH_CHECKs are shared)."""
    with pytest.raises(RuntimeError) as on_cpu:
        getattr(torch.ops.app, op)(*args)
    with pytest.raises(RuntimeError, match=re.escape(str(on_cpu.value).splitlines()[0])):
        getattr(emulated_ops, op)(*args)


def intrinsic_inputs() -> torch.Tensor:
    """64 values for two warps: warp 0 in [0, 100) with a 0, warp 1 in [1, 90)."""
    rng = random.Random(5)
    values = [rng.randrange(100) for _ in range(32)] + [rng.randrange(1, 90) for _ in range(32)]
    values[3] = 0
    return torch.tensor(values, dtype=torch.int32)


def bits(fmt: str, value: float) -> int:
    """The bits of value in the struct format fmt ("f" or "d") as a signed integer."""
    return struct.unpack("<" + {"f": "i", "d": "q"}[fmt], struct.pack("<" + fmt, value))[0]


def expected_intrinsics(values: list[int]) -> list[list[int]]:
    """Row t: what CUDA gives thread t in intrinsics_kernel (tests/emulation/self_test.cpp)."""
    rows = []
    for t, v in enumerate(values):
        lane, warp = t % 32, values[t - t % 32 : t - t % 32 + 32]

        def up(delta, width=32, lane=lane, warp=warp, v=v):
            return warp[lane - delta] if lane % width >= delta else v

        def down(delta, width=32, lane=lane, warp=warp, v=v):
            return warp[lane + delta] if lane % width + delta < width else v

        def xor(lane_mask, width=32, lane=lane, warp=warp, v=v):
            source = lane ^ lane_mask
            return warp[source] if source < lane - lane % width + width else v

        half = warp[:16] if lane < 16 else warp[16:]
        rows.append(
            [
                warp[lane * 7 % 32],
                warp[lane - lane % 8 + 3],
                xor(5),
                xor(16, 16),
                up(3),
                up(2, 8),
                down(3),
                down(2, 8),
                sum((w & 1) << i for i, w in enumerate(warp)),
                int(any(w > 90 for w in warp)),
                int(all(w > 0 for w in warp)),
                sum(warp),
                min(warp),
                max(warp),
                sum(1 << i for i, w in enumerate(warp) if w % 4 == v % 4),
                sum(half) if lane < 16 else max(half),
                bits("f", warp[lane ^ 1] * 0.5),
                bits("d", down(1) * 0.25),
                warp[31] << 33,
                sum(1 << i for i, w in enumerate(warp) if w % 3 == v % 3),
                (v & -v).bit_length(),
                bin(v).count("1"),
                32 - v.bit_length(),
                int(f"{v:032b}"[::-1], 2),
                ((v << 33) & -(v << 33)).bit_length(),
                -1 if lane < 16 else warp[17],  # a source outside the mask reads all-ones bits
                sum(values) if t == 0 else 0,
            ]
        )
    return rows


def test_warp_intrinsics_give_cudas_results(test_ops):
    """Shuffles of every kind and width, votes, reductions (also by two half warps at once), match_any, bit
    casts and bit functions, atomicAdd; a shuffle from a lane outside its mask reads poison."""
    values = intrinsic_inputs()
    assert test_ops.intrinsics(values).tolist() == expected_intrinsics(values.tolist())


def test_scheduling_order_varies_and_interleaves_warps(test_ops):
    """Warp 1 writes a shared row that warp 0 reads: ordered by __syncthreads every reader gets its value; with
    only a __syncwarp in each warp some read before the write (poison, NaN), others after, in a pattern that
    changes from block to block."""
    expected = torch.arange(32, 64).float().expand(8, 32)
    assert torch.equal(test_ops.exchange(8, True), expected)
    racy = test_ops.exchange(8, False)
    unwritten = racy.isnan()
    assert torch.equal(racy[~unwritten], expected[~unwritten])
    assert 0 < unwritten.sum() < unwritten.numel()
    assert len({tuple(row) for row in unwritten.tolist()}) > 1


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_unwritten_shared_memory_reads_nan(test_ops, dtype):
    """Shared memory is poisoned at the start of every block: block 1 does not see what block 0 wrote."""
    out = test_ops.unwritten_shared(torch.empty(0, dtype=dtype))
    assert torch.equal(out[0], torch.arange(32, dtype=dtype))
    assert out[1].isnan().all()


MISUSES = {  # misuse(which) of tests/emulation/self_test.cpp: what it raises
    "divergent collectives": r"block 0, warp 0: lane \d+ calls __(shfl_sync<int>|ballot_sync)\(mask 0xffffffff\) while",
    "exited lane in a mask": r"__syncwarp\(mask 0xffffffff\)",
    "exit at a barrier": r"block 0, warp 0: thread \d+ exits while 1 threads wait at __syncthreads",
    "mask without its caller": r"lane 0 calls __syncwarp\(mask 0x2\) that does not name it",
    "deadlock": r"block 0: deadlock; 0 threads wait at __syncthreads; .*__shfl_sync<int>\(mask 0x3\)",
    "no threads": r"1 to 1024 threads, not 0",
    "1025 threads": r"1 to 1024 threads, not 1025",
    "too much shared memory": r"101377 bytes of dynamic shared memory",
}


@pytest.mark.parametrize(("which", "message"), enumerate(MISUSES.values()), ids=MISUSES)
def test_misuse_raises_and_the_emulator_recovers(test_ops, which, message):
    """Divergent collectives, exited lanes in a mask, an exit while others wait at __syncthreads, a mask without
    its caller, a deadlock and bad launch sizes raise RuntimeError; the next launch runs normally."""
    with pytest.raises(RuntimeError, match=message):
        test_ops.misuse(which)
    values = intrinsic_inputs()
    assert test_ops.intrinsics(values).tolist() == expected_intrinsics(values.tolist())

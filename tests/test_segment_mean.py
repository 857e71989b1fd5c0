import os

import pytest
import torch

from app.ops import has_cuda_kernels, segment_mean
from app.ops.reference import segment_mean_dense, segment_mean_reference

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def random_case(batch, channels, height, width, n_segments, dtype=torch.float32, device="cpu"):
    values = torch.randn(batch, channels, height, width, dtype=dtype, device=device)
    segments = torch.randint(0, n_segments, (batch, height, width), device=device)
    return values, segments


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 7), (3, 21, 17, 13), (1, 4, 64, 48)])
def test_forward_matches_reference(device, shape):
    values, segments = random_case(*shape, n_segments=max(1, shape[2] * shape[3] // 4), device=device)
    expected = segment_mean_reference(values, segments)
    torch.testing.assert_close(segment_mean(values, segments), expected)
    torch.testing.assert_close(segment_mean_dense(values, segments), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_matches_reference_float64(device):
    values, segments = random_case(2, 3, 6, 5, n_segments=7, dtype=torch.float64, device=device)
    values.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: segment_mean(x, segments), (values,))
    grad_output = torch.randn_like(values)
    (ours,) = torch.autograd.grad(segment_mean(values, segments), values, grad_output)
    (theirs,) = torch.autograd.grad(segment_mean_reference(values, segments), values, grad_output)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_accumulates_in_float32(device, dtype):
    values, segments = random_case(2, 4, 32, 32, n_segments=5, dtype=dtype, device=device)
    expected = segment_mean_reference(values.float(), segments)
    result = segment_mean(values, segments)
    assert result.dtype == dtype
    torch.testing.assert_close(result.float(), expected, atol=1e-2, rtol=1e-2)


def test_non_contiguous_and_empty_segment_ids():
    values = torch.randn(2, 8, 6, 3).permute(0, 3, 1, 2)  # (2, 3, 8, 6), non-contiguous
    assert not values.is_contiguous()
    segments = torch.randint(0, 3, (2, 8, 6)) * 10 + 5  # ids 5, 15, 25: most ids below 26 are empty
    segments = segments.transpose(1, 2).contiguous().transpose(1, 2)
    assert not segments.is_contiguous()
    torch.testing.assert_close(segment_mean(values, segments), segment_mean_reference(values, segments))


def test_huge_sparse_ids_are_relabelled():
    values = torch.randn(1, 2, 4, 4)
    segments = torch.tensor([0, 10**9]).repeat_interleave(8).reshape(1, 4, 4)
    result = segment_mean(values, segments)
    assert torch.allclose(result[0, :, :2], values[0, :, :2].mean(dim=(1, 2), keepdim=True).expand(2, 2, 4))


def test_one_segment_is_the_image_mean():
    values = torch.randn(2, 3, 9, 11)
    result = segment_mean(values, torch.zeros(2, 9, 11, dtype=torch.long))
    torch.testing.assert_close(result, values.mean(dim=(2, 3), keepdim=True).expand_as(values))


def test_one_pixel_per_segment_is_identity():
    values = torch.randn(2, 3, 4, 5)
    segments = torch.arange(20).reshape(1, 4, 5).repeat(2, 1, 1)
    torch.testing.assert_close(segment_mean(values, segments), values)


def test_segments_are_per_image():
    values = torch.randn(2, 1, 3, 3)
    segments = torch.zeros(2, 3, 3, dtype=torch.long)
    result = segment_mean(values, segments)
    assert torch.allclose(result[0], values[0].mean().expand(1, 3, 3))
    assert torch.allclose(result[1], values[1].mean().expand(1, 3, 3))


def test_explicit_num_segments():
    values, segments = random_case(1, 2, 5, 5, n_segments=4)
    torch.testing.assert_close(
        segment_mean(values, segments, num_segments=50), segment_mean_reference(values, segments)
    )
    with pytest.raises(ValueError, match="num_segments"):
        segment_mean(values, segments, num_segments=2)
    with pytest.raises(ValueError, match="num_segments must be >= 1"):
        segment_mean(values, segments, num_segments=0)


@pytest.mark.cuda
def test_cuda_call_with_num_segments_does_not_sync():
    """With num_segments given, the CUDA path leaves the id check to the kernel: no host-device sync."""
    values, segments = (t.cuda() for t in random_case(2, 3, 16, 16, n_segments=7))
    expected = segment_mean_reference(values, segments)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = segment_mean(values, segments, num_segments=7)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(
    ("values", "segments", "message"),
    [
        (torch.randn(3, 4, 4), torch.zeros(3, 4, 4, dtype=torch.long), "values must have 4 dimensions"),
        (torch.randn(1, 2, 4, 4), torch.zeros(1, 4, 4, dtype=torch.int32), "segments must have dtype"),
        (torch.randint(0, 3, (1, 2, 4, 4)), torch.zeros(1, 4, 4, dtype=torch.long), "values must have dtype"),
        (torch.randn(1, 2, 4, 4), torch.zeros(1, 4, 5, dtype=torch.long), "segments must have shape"),
        (torch.randn(2, 2, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), "segments must have shape"),
        (torch.randn(1, 2, 4, 4), torch.full((1, 4, 4), -1), "segments must be >= 0"),
        (torch.randn(1, 2, 0, 4), torch.zeros(1, 0, 4, dtype=torch.long), "at least one pixel"),
        ([1.0], torch.zeros(1, 4, 4, dtype=torch.long), "values must be a torch.Tensor"),
    ],
)
def test_bad_input_raises_value_error(values, segments, message):
    with pytest.raises(ValueError, match=message):
        segment_mean(values, segments)


@pytest.mark.parametrize(
    ("values", "segments", "num_segments"),
    [
        (torch.randn(1, 2, 4, 4), torch.zeros(1, 4, 5, dtype=torch.long), 1),
        (torch.randn(2, 2, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), 1),
        (torch.randn(1, 2, 4, 4), torch.zeros(1, 4, 4, dtype=torch.int32), 1),
        (torch.randn(1, 2, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), 0),
        (torch.randn(1, 2, 4, 4), torch.full((1, 4, 4), 3), 3),
    ],
)
def test_kernel_checks_its_inputs(values, segments, num_segments):
    """Called directly, the C++ op refuses mismatched shapes, id dtypes, bounds and ids instead of reading or
    writing out of bounds."""
    with pytest.raises(RuntimeError, match="segment_mean"):
        torch.ops.app.segment_mean(values, segments, num_segments)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_mismatch_raises():
    with pytest.raises(ValueError, match="one device"):
        segment_mean(torch.randn(1, 2, 4, 4, device="cuda"), torch.zeros(1, 4, 4, dtype=torch.long))


def test_torch_compile_traces_the_op():
    values, segments = random_case(2, 3, 8, 8, n_segments=6)

    def refine(x):
        return torch.ops.app.segment_mean(x * 2, segments, 6) + 1

    compiled = torch.compile(refine, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(values), refine(values))


def test_opcheck():
    values, segments = random_case(2, 3, 6, 6, n_segments=5, dtype=torch.float64)
    values.requires_grad_(True)
    torch.library.opcheck(torch.ops.app.segment_mean.default, (values, segments, 5))


def test_cuda_kernels_are_compiled_when_torch_has_cuda():
    # The development machines and CI have torch's CUDA build and nvcc, so the CUDA half must be there.
    if torch.version.cuda is None or os.environ.get("APP_DISABLE_CUDA", "0") not in ("", "0"):
        pytest.skip("CPU-only torch, or the CUDA build was turned off")
    assert has_cuda_kernels()

import pytest
import torch

from app.ops import gaussian_message
from app.ops.reference import gaussian_message_reference

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def random_case(batch, channels, n_features, height, width, dtype=torch.float64, device="cpu"):
    q = torch.rand(batch, channels, height, width, dtype=dtype, device=device)
    features = torch.randn(batch, n_features, height, width, dtype=dtype, device=device)
    return q, features


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("filter_size", [3, 5, 7, 9, 11, 13])
def test_forward_matches_reference(device, filter_size):
    q, features = random_case(2, 3, 5, 15, 13, device=device)
    expected = gaussian_message_reference(q, features, filter_size)
    torch.testing.assert_close(gaussian_message(q, features, filter_size), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (1, 21, 3, 1, 7), (2, 4, 2, 5, 2), (1, 2, 5, 4, 30)])
def test_odd_and_tiny_sizes(device, shape):
    q, features = random_case(*shape, dtype=torch.float32, device=device)
    torch.testing.assert_close(gaussian_message(q, features, 7), gaussian_message_reference(q, features, 7))


@pytest.mark.parametrize("device", DEVICES)
def test_borders_and_centre_excluded(device):
    # Constant features make K = 1: the message is the count of in-image neighbours, centre excluded.
    q = torch.ones(1, 1, 6, 5, dtype=torch.float64, device=device)
    message = gaussian_message(q, torch.zeros(1, 2, 6, 5, dtype=torch.float64, device=device), 3)
    assert message[0, 0, 0, 0] == 3  # corner
    assert message[0, 0, 0, 2] == 5  # edge
    assert message[0, 0, 2, 2] == 8  # interior


def test_far_features_send_nothing():
    q = torch.rand(1, 2, 4, 4, dtype=torch.float64)
    features = torch.arange(16, dtype=torch.float64).view(1, 1, 4, 4) * 100.0
    assert gaussian_message(q, features, 3).abs().max() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("filter_size", [3, 5])
def test_gradcheck_q_and_features(device, filter_size):
    q, features = random_case(2, 3, 2, 6, 5, device=device)
    q.requires_grad_(True)
    features.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: gaussian_message(a, b, filter_size), (q, features))


@pytest.mark.parametrize("device", DEVICES)
def test_backward_matches_reference(device):
    q, features = random_case(2, 4, 3, 11, 9, device=device)
    q.requires_grad_(True)
    features.requires_grad_(True)
    grad_output = torch.randn_like(q)
    ours = torch.autograd.grad(gaussian_message(q, features, 7), (q, features), grad_output)
    theirs = torch.autograd.grad(gaussian_message_reference(q, features, 7), (q, features), grad_output)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)


def test_gradient_only_for_features():
    q, features = random_case(1, 2, 2, 5, 5)
    features.requires_grad_(True)
    (grad,) = torch.autograd.grad(gaussian_message(q, features, 3).sum(), features)
    (expected,) = torch.autograd.grad(gaussian_message_reference(q, features, 3).sum(), features)
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(device, dtype):
    q, features = random_case(1, 3, 2, 12, 10, dtype=torch.float32, device=device)
    expected = gaussian_message_reference(q, features, 5)
    result = gaussian_message(q.to(dtype), features.to(dtype), 5)
    assert result.dtype == dtype
    torch.testing.assert_close(result.float(), expected, atol=5e-2, rtol=2e-2)


def test_non_contiguous_input():
    q = torch.rand(2, 9, 7, 4, dtype=torch.float64).permute(0, 3, 2, 1)  # (2, 4, 7, 9)
    features = torch.randn(2, 3, 14, 9, dtype=torch.float64)[:, :, ::2]  # (2, 3, 7, 9)
    assert not q.is_contiguous() and not features.is_contiguous()
    expected = gaussian_message_reference(q.contiguous(), features.contiguous(), 5)
    torch.testing.assert_close(gaussian_message(q, features, 5), expected)


def test_opcheck_schema_fake_and_autograd_registrations():
    q, features = random_case(1, 2, 2, 8, 8, dtype=torch.float32)
    result = torch.library.opcheck(torch.ops.app.gaussian_message.default, (q, features, 3))
    assert all(outcome == "SUCCESS" for outcome in result.values())


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"filter_size": 4}, "filter_size"),
        ({"filter_size": 1}, "filter_size"),
        ({"filter_size": 3.0}, "filter_size"),
        ({"features": torch.randn(1, 2, 6, 5)}, "features"),
        ({"features": torch.randn(2, 2, 5, 5)}, "features"),
        ({"features": torch.randn(1, 2, 5, 5, dtype=torch.float64)}, "features"),
        ({"q": torch.rand(1, 2, 5)}, "q"),
        ({"q": torch.full((1, 2, 5, 5), float("nan"))}, "q"),
        ({"features": torch.full((1, 2, 5, 5), float("inf"))}, "features"),
        ({"q": torch.ones(1, 2, 5, 5, dtype=torch.long)}, "q"),
    ],
)
def test_bad_input_names_the_argument(kwargs, name):
    arguments = {"q": torch.rand(1, 2, 5, 5), "features": torch.randn(1, 2, 5, 5), "filter_size": 3}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=name):
        gaussian_message(**arguments)

"""Transparent initialization (thesis Sec. 4.3.2, Eq. 4.3-4.12): identity at init, dense, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from app.models.transparent_init import (
    TransparentLayers,
    activation_scale,
    right_inverse,
    transparent_affine_maps,
)

ACTIVATIONS = [None, "relu", "leaky_relu", "softplus", "log_sigmoid"]


@torch.no_grad()
def max_error(layers: nn.Module, x: torch.Tensor) -> float:
    return float((layers(x) - x).abs().max())


def uniform_input(shape: tuple[int, ...], bound: float, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=generator, dtype=dtype) * 2 - 1) * bound


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layer_type", ["linear", "conv1x1"])
def test_identity_at_initialization_float32(activation: str | None, layer_type: str) -> None:
    layers = TransparentLayers(42, (64, 64), activation=activation, layer_type=layer_type, seed=0)
    shape = (2, 5, 7, 42) if layer_type == "linear" else (2, 42, 9, 11)
    x = uniform_input(shape, 10.0)
    with torch.no_grad():
        y = layers(x)
    assert y.shape == x.shape
    assert float((y - x).abs().max()) < 1e-4  # the thesis' recovery epsilon at inputs in [-10, 10]


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_identity_to_float64_precision_after_reset(activation: str | None) -> None:
    layers = TransparentLayers(6, (9, 7, 8), activation=activation, negative_slope=0.2, seed=3).double()
    x = uniform_input((256, 6), 100.0, dtype=torch.float64)
    rounded_error = max_error(layers, x)
    layers.reset_parameters()
    exact_error = max_error(layers, x)
    assert exact_error < 1e-9
    assert exact_error < rounded_error  # float32-rounded weights were not exact; the redraw in float64 is


def test_network_is_not_identity_per_layer_and_dense() -> None:
    layers = TransparentLayers(42, (64, 64), activation="relu", seed=1)
    affine = layers.affine_layers
    assert [tuple(layer.weight.shape) for layer in affine] == [(128, 42), (128, 128), (42, 128)]
    params = torch.cat([p.detach().flatten() for p in layers.parameters()])
    assert float((params.abs() > 1e-4).float().mean()) > 0.99  # init rate (Table 4.2)
    assert not torch.allclose(affine[0].weight[:42, :], torch.eye(42), atol=0.1)


def test_gradients_reach_every_weight() -> None:
    """Dense gradients, unlike identity (Net2Net) layers where zeros block most of them."""
    layers = TransparentLayers(8, (12, 10), activation="leaky_relu", seed=2)
    x = uniform_input((64, 8), 1.0)
    target = uniform_input((64, 8), 1.0, seed=1)
    nn.functional.mse_loss(layers(x), target).backward()
    for layer in layers.affine_layers:
        assert float((layer.weight.grad.abs() > 0).float().mean()) > 0.9


@pytest.mark.parametrize("hidden", [(5,), (5, 5), (7, 11, 6, 9)])
def test_any_depth_and_non_square_widths(hidden: tuple[int, ...]) -> None:
    layers = TransparentLayers(5, hidden, activation="relu", seed=4)
    assert len(layers.affine_layers) == len(hidden) + 1
    x = uniform_input((100, 5), 1.0)
    assert max_error(layers, x) < 1e-5


def test_large_biases_still_cancel() -> None:
    layers = TransparentLayers(4, (6, 6), activation="softplus", softplus_beta=2.0, bias_std=5.0, seed=5)
    assert float(layers.affine_layers[0].bias.detach().abs().max()) > 1.0
    x = uniform_input((200, 4), 1.0)
    assert max_error(layers, x) < 1e-4


def test_seed_reproducibility() -> None:
    first = TransparentLayers(4, (6,), seed=7)
    second = TransparentLayers(4, (6,), seed=7)
    third = TransparentLayers(4, (6,), seed=8)
    for a, b, c in zip(first.parameters(), second.parameters(), third.parameters()):
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


def test_training_moves_away_from_identity() -> None:
    layers = TransparentLayers(3, (4,), activation="relu", seed=9)
    x = uniform_input((32, 3), 1.0)
    optimizer = torch.optim.SGD(layers.parameters(), lr=0.1)
    for _ in range(5):
        optimizer.zero_grad()
        nn.functional.mse_loss(layers(x), 2 * x).backward()
        optimizer.step()
    assert max_error(layers, x) > 0.05


def test_affine_maps_compose_to_identity_without_activation() -> None:
    maps = transparent_affine_maps(5, (8, 6), torch.Generator().manual_seed(0))
    x = uniform_input((10, 5), 3.0, dtype=torch.float64)
    y = x
    for matrix, bias in maps:
        y = y @ matrix + bias
    assert [tuple(m.shape) for m, _ in maps] == [(5, 8), (8, 6), (6, 5)]
    assert torch.allclose(y, x, atol=1e-12)


def test_right_inverse() -> None:
    matrix = torch.randn(5, 9, generator=torch.Generator().manual_seed(0))
    inverse = right_inverse(matrix)
    assert inverse.shape == (9, 5) and inverse.dtype == torch.float64
    assert torch.allclose(matrix.double() @ inverse, torch.eye(5, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(inverse, torch.linalg.pinv(matrix.double()), atol=1e-10)


def test_right_inverse_rejects_tall_and_rank_deficient() -> None:
    with pytest.raises(ValueError, match="more rows than columns"):
        right_inverse(torch.randn(6, 4))
    rank_two = torch.randn(3, 2, dtype=torch.float64) @ torch.randn(2, 7, dtype=torch.float64)
    with pytest.raises(ValueError, match="rank-deficient"):
        right_inverse(rank_two)


def test_activation_scale() -> None:
    assert activation_scale("relu") == 1.0
    assert activation_scale("leaky_relu", 0.2) == pytest.approx(1.2)
    x = torch.linspace(-5, 5, 101)
    leaky = nn.LeakyReLU(0.2)
    assert torch.allclose(leaky(x) - leaky(-x), 1.2 * x)  # Eq. 4.11 with c = 1 + delta


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"in_features": 42, "hidden_features": (64, 32)}, r"hidden_features\[1\]=32 is below in_features"),
        ({"in_features": 42, "hidden_features": ()}, "k >= 2"),
        ({"in_features": 0, "hidden_features": (4,)}, "in_features"),
        ({"in_features": 4, "hidden_features": (4,), "activation": "tanh"}, "not supported"),
        ({"in_features": 4, "hidden_features": (4,), "activation": "sigmoid"}, "sigma"),
        ({"in_features": 4, "hidden_features": (4,), "layer_type": "conv3x3"}, "layer_type"),
        (
            {"in_features": 4, "hidden_features": (4,), "activation": "leaky_relu", "negative_slope": -1.0},
            "differ from -1",
        ),
        ({"in_features": 4, "hidden_features": (4,), "activation": "softplus", "softplus_beta": 0.0}, "beta"),
        ({"in_features": 4, "hidden_features": (4,), "bias_std": -1.0}, "bias_std"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TransparentLayers(**kwargs)


def test_built_from_config_by_jsonargparse() -> None:
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--fusion", type=TransparentLayers)
    config = parser.parse_args(
        [
            '--fusion={"class_path": "app.models.transparent_init.TransparentLayers", '
            '"init_args": {"in_features": 3, "hidden_features": [5, 4], "layer_type": "conv1x1", "seed": 1}}'
        ]
    )
    layers = parser.instantiate(config).fusion
    x = uniform_input((1, 3, 4, 4), 1.0)
    assert isinstance(layers, TransparentLayers)
    assert max_error(layers, x) < 1e-5

"""Transparent initialization (thesis Sec. 4.3.2 and appendix 4.6): dense random affine layers whose
composition is the identity at initialization, also through ReLU, LeakyReLU, Softplus or LogSigmoid.

Conventions follow the thesis: vectors are rows, an affine map is ``x -> x A + b`` with ``A`` of shape
``(m_in, m_out)`` (an ``nn.Linear`` stores ``A^T`` as its weight).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

ACTIVATIONS = ("relu", "leaky_relu", "softplus", "log_sigmoid")
LAYER_TYPES = ("linear", "conv1x1")
SOFTPLUS_THRESHOLD = 40.0  # exp(40) is far from float32 overflow; exp(-40) is below float64 rounding


def right_inverse(matrix: torch.Tensor) -> torch.Tensor:
    """Right inverse ``A^R`` with ``A A^R = I`` of a full-row-rank matrix (Eq. 4.4, 4.23-4.24).

    Computed in float64 from the SVD ``A = U D V^T`` as ``A^R = V D^{-1} U^T`` (Eq. 4.24), which equals
    ``A^T (A A^T)^{-1}`` (Eq. 4.23) but does not square the condition number.

    Args:
        matrix: (m, n) floating tensor with m <= n and rank m.

    Returns:
        (n, m) float64 tensor on the device of ``matrix``.
    """
    if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2:
        shape = tuple(getattr(matrix, "shape", ()))
        raise ValueError(f"matrix must be a 2D tensor, got {type(matrix).__name__} of shape {shape}")
    rows, cols = matrix.shape
    if rows == 0:
        raise ValueError("matrix must have at least one row")
    if rows > cols:
        raise ValueError(
            f"matrix of shape ({rows}, {cols}) has more rows than columns: its rank is below its row count, "
            "so no right inverse exists"
        )
    u, s, vh = torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)
    tolerance = max(rows, cols) * torch.finfo(torch.float64).eps * s[0]
    if not bool(torch.isfinite(s).all()) or bool(s[-1] <= tolerance):
        raise ValueError(
            f"matrix of shape ({rows}, {cols}) is rank-deficient (smallest singular value "
            f"{float(s[-1]):.3g}, largest {float(s[0]):.3g}); no right inverse exists"
        )
    return vh.mT @ (u.mT / s[:, None])


def activation_scale(activation: str, negative_slope: float = 0.01) -> float:
    """The constant ``c`` of Eq. 4.11, ``sigma(x) - sigma(-x) = c x``, for a supported activation.

    ``relu``, ``softplus`` (any beta) and ``log_sigmoid`` give ``c = 1`` (Eq. 4.49); ``leaky_relu`` with
    negative slope ``delta`` gives ``c = 1 + delta`` (Eq. 4.12).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"activation {activation!r} is not supported; choose one of {ACTIVATIONS} or None. Transparent "
            "initialization needs sigma(x) - sigma(-x) = c*x with c != 0 (Eq. 4.11)"
        )
    if activation == "leaky_relu":
        scale = 1.0 + negative_slope
        if not math.isfinite(scale) or abs(scale) < 1e-6:
            raise ValueError(
                f"negative_slope={negative_slope} gives sigma(x) - sigma(-x) = {scale}*x; it must be "
                "finite and differ from -1"
            )
        return scale
    return 1.0


def _check_widths(in_features: int, hidden_features: Sequence[int]) -> tuple[int, ...]:
    if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
        raise ValueError(f"in_features must be a positive int, got {in_features!r}")
    if isinstance(hidden_features, (str, bytes)) or not isinstance(hidden_features, Sequence):
        raise ValueError(f"hidden_features must be a sequence of ints, got {hidden_features!r}")
    widths = tuple(hidden_features)
    if len(widths) == 0:
        raise ValueError(
            "hidden_features must name at least one width: transparent layers need k >= 2 layers"
        )
    for index, width in enumerate(widths):
        if isinstance(width, bool) or not isinstance(width, int):
            raise ValueError(f"hidden_features[{index}] must be an int, got {width!r}")
        if width < in_features:
            raise ValueError(
                f"hidden_features[{index}]={width} is below in_features={in_features}: the product of the "
                "first k-1 layers then has rank < in_features and no right inverse exists (Theorem 1)"
            )
    return widths


def transparent_affine_maps(
    in_features: int,
    hidden_features: Sequence[int],
    generator: torch.Generator | None = None,
    bias_std: float = 1.0,
    storage_dtype: torch.dtype = torch.float64,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random affine maps ``A_1 .. A_k`` whose composition is the identity (Eq. 4.3-4.4, 4.26).

    ``A_i`` (i < k) has entries from N(0, 1/m_i) and ``b_i`` from N(0, bias_std^2) (appendix 4.6.4);
    ``A_k`` is the right inverse of the affine product ``A_1 ... A_{k-1}`` (Eq. 4.4), computed in float64
    from the first k-1 maps as rounded to ``storage_dtype``, so the identity is exact up to the rounding
    of ``A_k`` alone and the arithmetic of the forward pass.

    Args:
        in_features: m_0, the input and output width.
        hidden_features: m_1 .. m_{k-1}, each >= m_0 (Theorem 1).
        generator: CPU generator for the Gaussian draws; the global one when None.
        bias_std: standard deviation of the random biases b_1 .. b_{k-1}.
        storage_dtype: dtype the weights will be stored in.

    Returns:
        k pairs ``(A_i, b_i)`` in float64 on the CPU, ``A_i``: (m_{i-1}, m_i), ``b_i``: (m_i,), with
        ``m_k = m_0``.
    """
    widths = _check_widths(in_features, hidden_features)
    if not math.isfinite(bias_std) or bias_std < 0:
        raise ValueError(f"bias_std must be finite and >= 0, got {bias_std}")
    maps: list[tuple[torch.Tensor, torch.Tensor]] = []
    product = torch.eye(in_features, dtype=torch.float64)
    offset = torch.zeros(in_features, dtype=torch.float64)
    fan_in = in_features
    for width in widths:
        matrix = torch.randn(fan_in, width, generator=generator, dtype=torch.float64) / math.sqrt(width)
        bias = torch.randn(width, generator=generator, dtype=torch.float64) * bias_std
        matrix = matrix.to(storage_dtype).to(torch.float64)
        bias = bias.to(storage_dtype).to(torch.float64)
        maps.append((matrix, bias))
        product = product @ matrix
        offset = offset @ matrix + bias
        fan_in = width
    last = right_inverse(product)
    maps.append((last, -offset @ last))
    return maps


def _through_activation(
    maps: list[tuple[torch.Tensor, torch.Tensor]], scale: float
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Duplicate/subtract form of Eq. 4.8-4.10 with the 1/c factor of Eq. 4.11-4.12.

    ``A_1 D = [A_1, -A_1]``, ``S A_i D = [[A_i, -A_i], [-A_i, A_i]] / c``, ``S A_k = [[A_k], [-A_k]] / c``.
    """
    expanded = []
    last = len(maps) - 1
    for index, (matrix, bias) in enumerate(maps):
        if index > 0:
            matrix = torch.cat([matrix, -matrix], dim=0) / scale
        if index < last:
            matrix = torch.cat([matrix, -matrix], dim=1)
            bias = torch.cat([bias, -bias])
        expanded.append((matrix, bias))
    return expanded


class TransparentLayers(nn.Sequential):
    """k >= 2 dense random affine layers whose composition is the identity at initialization.

    Implements transparent initialization (thesis Sec. 4.3.2, Eq. 4.3-4.12; appendix 4.6). Without an
    activation the layers are ``m_0 -> m_1 -> ... -> m_{k-1} -> m_0`` with Gaussian ``A_1 .. A_{k-1}`` and
    ``A_k`` the right inverse of their affine product, so ``x A_1 ... A_k = x`` (Eq. 4.26). With an
    activation sigma the layers are the duplicate/subtract form of Eq. 4.7-4.10,
    ``m_0 -> 2 m_1 -> ... -> 2 m_{k-1} -> m_0`` with sigma after every layer but the last, and the
    identity holds because sigma(z) - sigma(-z) = c z (Eq. 4.11):

    - ``relu``: c = 1, exact (Eq. 4.5).
    - ``leaky_relu`` with slope delta: c = 1 + delta, exact (Eq. 4.12).
    - ``softplus`` with beta b: log(1 + e^{bz})/b - log(1 + e^{-bz})/b = z (c = 1). torch switches to
      the linear branch above ``b z > threshold``, which errs by up to e^{-threshold}/b per hidden unit;
      the layers use ``threshold=40`` (not torch's 20) so that error (4e-18/b) is below float64 rounding.
    - ``log_sigmoid``: c = 1, exact (Eq. 4.49).

    "Exact" means up to floating-point rounding: the maps are built in float64 and the last one inverts
    the first k-1 as stored, so float32 layers reproduce the input to about 1e-7 relative
    (``benchmarks/transparent_init.py``, thesis Table 4.3). The structure is for initialization only:
    no parameters are shared and training moves every entry freely. ``reset_parameters`` re-draws the
    same layers from ``seed`` into the current dtype and device (call it after ``.double()`` to get the
    identity to float64 precision).

    Args:
        in_features: m_0, channels of the input and of the output.
        hidden_features: m_1 .. m_{k-1}, widths of the random affine maps, each >= in_features
            (Theorem 1). With an activation the hidden layers are twice as wide.
        activation: None, ``"relu"``, ``"leaky_relu"``, ``"softplus"`` or ``"log_sigmoid"``.
        layer_type: ``"linear"`` (``nn.Linear``, input ``(*, m_0)``) or ``"conv1x1"`` (``nn.Conv2d`` with a
            1x1 kernel, input ``(B, m_0, H, W)``).
        negative_slope: delta of ``leaky_relu``.
        softplus_beta: beta of ``softplus``.
        bias_std: standard deviation of the random biases of the first k-1 maps (thesis: 1).
        seed: seed of the Gaussian draws; drawn from the global generator when None.

    Shape:
        - Input: ``(*, m_0)`` for ``linear``, ``(B, m_0, H, W)`` for ``conv1x1``.
        - Output: same as the input, and equal to it at initialization.

    Example:
        >>> layers = TransparentLayers(42, (64, 64), activation="relu", layer_type="conv1x1", seed=0)
        >>> x = torch.rand(2, 42, 8, 8) * 20 - 10
        >>> bool((layers(x) - x).abs().max() < 1e-4)
        True
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: Sequence[int] = (64, 64),
        activation: str | None = "relu",
        layer_type: str = "linear",
        negative_slope: float = 0.01,
        softplus_beta: float = 1.0,
        bias_std: float = 1.0,
        seed: int | None = None,
    ) -> None:
        widths = _check_widths(in_features, hidden_features)
        if layer_type not in LAYER_TYPES:
            raise ValueError(f"layer_type must be one of {LAYER_TYPES}, got {layer_type!r}")
        scale = 1.0 if activation is None else activation_scale(activation, negative_slope)
        if activation == "softplus" and (not math.isfinite(softplus_beta) or softplus_beta <= 0):
            raise ValueError(f"softplus_beta must be finite and > 0, got {softplus_beta}")
        if not math.isfinite(bias_std) or bias_std < 0:
            raise ValueError(f"bias_std must be finite and >= 0, got {bias_std}")
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        multiplier = 1 if activation is None else 2
        sizes = [in_features, *(multiplier * width for width in widths), in_features]
        modules: list[nn.Module] = []
        for index in range(len(sizes) - 1):
            if layer_type == "linear":
                modules.append(nn.Linear(sizes[index], sizes[index + 1]))
            else:
                modules.append(nn.Conv2d(sizes[index], sizes[index + 1], kernel_size=1))
            if activation is not None and index < len(sizes) - 2:
                modules.append(_make_activation(activation, negative_slope, softplus_beta))
        super().__init__(*modules)
        self.in_features = in_features
        self.hidden_features = widths
        self.activation = activation
        self.layer_type = layer_type
        self.activation_scale = scale
        self.bias_std = bias_std
        self.seed = seed
        self.reset_parameters()

    @property
    def affine_layers(self) -> list[nn.Linear | nn.Conv2d]:
        """The k affine layers, first to last."""
        return [module for module in self if isinstance(module, (nn.Linear, nn.Conv2d))]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-draw the transparent initialization from ``seed`` into the current dtype and device."""
        layers = self.affine_layers
        dtype = layers[0].weight.dtype
        generator = torch.Generator().manual_seed(self.seed)
        maps = transparent_affine_maps(
            self.in_features, self.hidden_features, generator, self.bias_std, storage_dtype=dtype
        )
        if self.activation is not None:
            maps = _through_activation(maps, self.activation_scale)
        for layer, (matrix, bias) in zip(layers, maps, strict=True):
            weight = matrix.mT.reshape(layer.weight.shape)
            layer.weight.copy_(weight.to(layer.weight.dtype))
            layer.bias.copy_(bias.to(layer.bias.dtype))


def _make_activation(activation: str, negative_slope: float, softplus_beta: float) -> nn.Module:
    if activation == "relu":
        return nn.ReLU()
    if activation == "leaky_relu":
        return nn.LeakyReLU(negative_slope)
    if activation == "softplus":
        return nn.Softplus(beta=softplus_beta, threshold=SOFTPLUS_THRESHOLD)
    return nn.LogSigmoid()

"""Resource accounting of a network from one forward pass (thesis Eq. 5.12).

Every leaf module (and every conv / linear / norm layer, leaf or not) is hooked; for each call the
table records the parameters the module owns, its FLOPs and the memory of its output.

FLOPs follow Eq. (5.12a): a neuron output that sums ``m`` products costs ``m`` multiplications,
``m - 1`` additions and one more addition when the layer has a bias, so a layer with ``MACs``
multiply-accumulates and ``outputs`` output elements costs ``2 * MACs + (bias - 1) * outputs``; for a
convolution that is exactly ``(2 f_h f_w f_d f_in - 1 + 1|bias) y_in y_h y_w y_d``. A transposed
convolution scatters every *input* element over the kernel, so its MACs are
``in_elements * (out_channels / groups) * kernel_volume``; the convolution formula applied to its
(larger) output would over-count it by ``stride^d``. Normalisation layers count 2 FLOPs per output
element (4 when affine); activations, pooling and resampling count none.

Memory follows Eq. (5.12b): the number of output elements (times the element size for bytes) of every
hooked module except activations, dropout and identities (not counted, as in Table 5.4).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["LayerResources", "ResourceTable", "measure_resources"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORM = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm)
_NOT_STORED = (nn.Identity, nn.Flatten, nn.Unflatten)


@dataclass
class LayerResources:
    """Resources of one leaf module (summed over its calls in the forward pass)."""

    name: str
    kind: str
    params: int
    flops: int
    output_elements: int
    output_bytes: int
    output_shape: tuple[int, ...]
    counts_memory: bool


@dataclass
class ResourceTable:
    """Per-layer and total parameters, FLOPs (Eq. 5.12a) and output memory (Eq. 5.12b).

    ``params`` is the number of parameters of the whole model (shared ones once), ``flops`` and
    ``memory_bytes`` are totals over the recorded layers for the batch that was run.
    """

    layers: list[LayerResources] = field(default_factory=list)
    params: int = 0
    batch_size: int = 1

    @property
    def flops(self) -> int:
        return sum(layer.flops for layer in self.layers)

    @property
    def memory_bytes(self) -> int:
        return sum(layer.output_bytes for layer in self.layers if layer.counts_memory)

    @property
    def memory_elements(self) -> int:
        return sum(layer.output_elements for layer in self.layers if layer.counts_memory)

    def layer(self, name: str) -> LayerResources:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise ValueError(f"no layer named {name!r} in the resource table")

    def totals(self) -> dict[str, float]:
        """Totals in the units of thesis Table 5.2: parameters in MB (float32), GFLOPs, memory in MB."""
        return {
            "params": float(self.params),
            "params_mb": self.params * 4 / 2**20,
            "gflops": self.flops / 1e9,
            "memory_mb": self.memory_bytes / 2**20,
        }

    def markdown(self) -> str:
        """A markdown table: one row per layer and a total row."""
        rows = [
            "| layer | kind | output | params | MFLOPs | memory (MB) |",
            "| --- | --- | --- | ---: | ---: | ---: |",
        ]
        for layer in self.layers:
            memory = f"{layer.output_bytes / 2**20:.3f}" if layer.counts_memory else "-"
            shape = "x".join(str(s) for s in layer.output_shape)
            mflops = layer.flops / 1e6
            rows.append(
                f"| {layer.name} | {layer.kind} | {shape} | {layer.params} | {mflops:.3f} | {memory} |"
            )
        rows.append(
            f"| **total** | | | {self.params} | {self.flops / 1e6:.3f} | {self.memory_bytes / 2**20:.3f} |"
        )
        return "\n".join(rows)


def _layer_flops(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> int:
    """FLOPs of one call of ``module`` by Eq. (5.12a), 0 for modules without multiply-adds."""
    bias = getattr(module, "bias", None) is not None
    if isinstance(module, _CONV):
        kernel = math.prod(module.kernel_size)
        macs = output.numel() * kernel * (module.in_channels // module.groups)
        return 2 * macs + (int(bias) - 1) * output.numel()
    if isinstance(module, _CONV_T):
        kernel = math.prod(module.kernel_size)
        x = inputs[0]
        macs = x.numel() * kernel * (module.out_channels // module.groups)
        return 2 * macs + (int(bias) - 1) * output.numel()
    if isinstance(module, nn.Linear):
        macs = output.numel() * module.in_features
        return 2 * macs + (int(bias) - 1) * output.numel()
    if isinstance(module, _NORM):
        # normalise (subtract, divide) and, when affine, scale and shift: 2 or 4 per element
        affine = getattr(module, "weight", None) is not None
        return (4 if affine else 2) * output.numel()
    return 0


def _counts_memory(module: nn.Module) -> bool:
    kind = type(module).__module__
    if kind in ("torch.nn.modules.activation", "torch.nn.modules.dropout"):
        return False
    return not isinstance(module, _NOT_STORED)


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors(item)]
    return []


def measure_resources(model: nn.Module, inputs: Any) -> ResourceTable:
    """Run one forward pass and account parameters, FLOPs and output memory per leaf module.

    Args:
        model: any module.
        inputs: a tensor (``model(inputs)``), a tuple (``model(*inputs)``) or a callable that receives
            the model and runs it, e.g. ``lambda m: loss_fn(m, batch)``.

    Returns:
        The :class:`ResourceTable`; layers appear in call order, a module called twice is one row.
        The forward pass runs under ``torch.no_grad()``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if callable(inputs) and not isinstance(inputs, torch.Tensor):
        run: Callable[[nn.Module], Any] = inputs
    elif isinstance(inputs, tuple):

        def run(m: nn.Module) -> Any:
            return m(*inputs)
    elif isinstance(inputs, torch.Tensor):

        def run(m: nn.Module) -> Any:
            return m(inputs)
    else:
        raise ValueError(
            f"inputs must be a tensor, a tuple of model arguments or a callable, got {type(inputs)}"
        )

    names = {id(m): n for n, m in model.named_modules()}
    rows: dict[int, LayerResources] = {}
    batch_size = [0]

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        outs = _tensors(output)
        if not outs:
            return
        if batch_size[0] == 0 and outs[0].dim() > 0:
            batch_size[0] = int(outs[0].shape[0])
        flops = _layer_flops(module, args, outs[0]) if isinstance(output, torch.Tensor) else 0
        elements = sum(t.numel() for t in outs)
        nbytes = sum(t.numel() * t.element_size() for t in outs)
        row = rows.get(id(module))
        if row is None:
            rows[id(module)] = LayerResources(
                name=names[id(module)],
                kind=type(module).__name__,
                params=sum(p.numel() for p in module.parameters(recurse=False)),
                flops=flops,
                output_elements=elements,
                output_bytes=nbytes,
                output_shape=tuple(outs[0].shape),
                counts_memory=_counts_memory(module),
            )
        else:
            row.flops += flops
            row.output_elements += elements
            row.output_bytes += nbytes

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if not list(m.children()) or isinstance(m, _CONV + _CONV_T + (nn.Linear,) + _NORM)
    ]
    try:
        with torch.no_grad():
            run(model)
    finally:
        for handle in handles:
            handle.remove()
    params = sum(p.numel() for p in model.parameters())
    return ResourceTable(layers=list(rows.values()), params=params, batch_size=max(batch_size[0], 1))

"""Neuron importance at initialization (thesis Sec. 5.4.1, Alg. 5 lines 1-7).

The gradient of the loss over a parameter mask at ``c = 1`` is ``g = w * dL/dw`` (Eq. 5.2, after Lee et
al. 2020), so no mask variables are needed. Per mini-batch ``t`` Alg. 5 accumulates ``|g_t|`` for MPMG
and ``g_t`` for MNMG and averages over the batches. The neuron importance then reduces each neuron's
row of incoming parameter mask gradients ``(N_l, fan_in)``:

* MPMG (Eq. 5.6): ``s_u = f(|g_u1|, ..., |g_uN|)`` with ``f`` = sum, mean or max;
* MNMG (Eq. 5.7-5.8): ``s_u = |f(g_u1, ..., g_uN)|``; with ``f`` = sum this is the neuron-mask gradient
  ``|dL/dc_u|`` for positively homogeneous activations such as ReLU (Proposition 1).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from app.pruning.fast_conv import fast_conv_weight_grad
from app.pruning.graph import CONV_T_LAYERS, NEURON_LAYERS

__all__ = ["ParameterMaskGradients", "neuron_importance", "parameter_mask_gradients", "per_neuron"]

REDUCTIONS = ("sum", "mean", "max")
IMPORTANCE_KINDS = ("mpmg", "mnmg")


def per_neuron(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """View a weight-shaped tensor of a neuron layer as one row per output neuron.

    Args:
        module: a convolution, transposed convolution or linear layer.
        tensor: shaped like ``module.weight``.

    Returns:
        ``(out_channels, fan_in)``: the incoming connections of each output neuron.
    """
    if isinstance(module, CONV_T_LAYERS):
        groups = module.groups
        c_in, c_out_g = tensor.shape[0], tensor.shape[1]
        t = tensor.reshape(groups, c_in // groups, c_out_g, -1).permute(0, 2, 1, 3)
        return t.reshape(groups * c_out_g, -1)
    if isinstance(module, NEURON_LAYERS):
        return tensor.reshape(tensor.shape[0], -1)
    raise ValueError(f"{type(module).__name__} is not a neuron layer (conv, transposed conv or linear)")


@dataclass
class ParameterMaskGradients:
    """Parameter mask gradients averaged over mini-batches (Alg. 5 lines 1-6).

    ``absolute[name]`` is ``mean_t |w * dL_t/dw|`` and ``signed[name]`` is ``mean_t w * dL_t/dw``, both
    ``(N_l, fan_in)`` per layer; ``n_batches`` is the number of mini-batches used.
    """

    absolute: dict[str, torch.Tensor]
    signed: dict[str, torch.Tensor]
    n_batches: int


def _check_loss(loss: Any) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
    if not loss.requires_grad:
        raise ValueError(
            "the loss does not depend on the masks: it has no gradient path to the model parameters"
        )
    if not torch.isfinite(loss.detach()).all():
        raise ValueError(f"the loss is not finite ({loss.item()})")
    return loss.reshape(())


def _length(batches: Iterable[Any]) -> int | None:
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None


def parameter_mask_gradients(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    layers: Sequence[str] | None = None,
    n_batches: int | None = None,
    progress: bool = False,
) -> ParameterMaskGradients:
    """Accumulate the parameter mask gradients of the neuron layers over mini-batches (Alg. 5).

    Args:
        model: any module.
        batches: an iterable of batches, each passed to ``loss_fn``.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        layers: names of the neuron layers to score; default every conv / transposed conv / linear layer.
        n_batches: use at most this many batches (default: all).
        progress: show a progress bar over the batches.

    Returns:
        :class:`ParameterMaskGradients`. Gradients of the model are cleared afterwards.
    """
    if n_batches is not None and n_batches < 1:
        raise ValueError(f"n_batches must be >= 1, got {n_batches}")
    modules = dict(model.named_modules())
    if layers is None:
        layers = [n for n, m in modules.items() if isinstance(m, NEURON_LAYERS)]
    for name in layers:
        if name not in modules:
            raise ValueError(f"unknown layer {name!r}")
        if not isinstance(modules[name], NEURON_LAYERS):
            raise ValueError(
                f"layer {name!r} is a {type(modules[name]).__name__}, not a conv or linear layer"
            )
    if not layers:
        raise ValueError("the model has no prunable layer (conv, transposed conv or linear)")

    targets = {name: modules[name] for name in layers}
    requires = {name: m.weight.requires_grad for name, m in targets.items()}
    absolute = {name: torch.zeros_like(per_neuron(m, m.weight.detach())) for name, m in targets.items()}
    signed = {name: torch.zeros_like(a) for name, a in absolute.items()}
    count = 0
    length = _length(batches)
    total_batches = length if n_batches is None else n_batches if length is None else min(n_batches, length)
    bar = tqdm(total=total_batches, desc="RANP importance", unit="batch", disable=not progress, leave=False)
    try:
        for m in targets.values():
            m.weight.requires_grad_(True)
        with fast_conv_weight_grad(model):  # same gradients, faster on CPUs without AVX-512
            for batch in batches:
                if n_batches is not None and count >= n_batches:
                    break
                model.zero_grad(set_to_none=True)
                loss = _check_loss(loss_fn(model, batch))
                loss.backward()
                for name, m in targets.items():
                    if m.weight.grad is None:
                        continue
                    g = per_neuron(m, (m.weight.detach() * m.weight.grad).float())
                    absolute[name] += g.abs()
                    signed[name] += g
                count += 1
                bar.update()
    finally:
        bar.close()
        model.zero_grad(set_to_none=True)
        for name, m in targets.items():
            m.weight.requires_grad_(requires[name])
    if count == 0:
        raise ValueError("batches is empty: at least one batch is needed to compute neuron importance")
    total = sum(float(a.sum()) for a in absolute.values())
    if total == 0.0:
        raise ValueError("the loss does not depend on the masks: every parameter mask gradient is zero")
    for name in targets:
        absolute[name] /= count
        signed[name] /= count
    return ParameterMaskGradients(absolute=absolute, signed=signed, n_batches=count)


def neuron_importance(
    gradients: ParameterMaskGradients, kind: str = "mpmg", reduction: str = "sum"
) -> dict[str, torch.Tensor]:
    """Vanilla neuron importance per layer (Eq. 5.6 for MPMG, Eq. 5.7-5.8 for MNMG).

    Args:
        gradients: from :func:`parameter_mask_gradients`.
        kind: ``"mpmg"`` (magnitude of parameter mask gradients) or ``"mnmg"`` (neuron mask gradients).
        reduction: ``f`` over a neuron's incoming connections: ``"sum"``, ``"mean"`` or ``"max"``.

    Returns:
        ``{layer: (N_l,)}`` non-negative importance.
    """
    if kind not in IMPORTANCE_KINDS:
        raise ValueError(f"importance must be one of {IMPORTANCE_KINDS}, got {kind!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    source = gradients.absolute if kind == "mpmg" else gradients.signed
    scores = {}
    for name, g in source.items():
        if reduction == "sum":
            s = g.sum(dim=1)
        elif reduction == "mean":
            s = g.mean(dim=1)
        else:
            s = g.amax(dim=1)
        scores[name] = s.abs() if kind == "mnmg" else s
    return scores
